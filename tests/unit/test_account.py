"""Who is logged in on the daemon: keys, certificates, renewal, staying logged in.

The login server is the real ``login_server.logic.LoginServer`` over a real account store; only
the network is taken out: ``InMemoryLoginClient`` implements the ``LoginClient`` interface by
calling the server directly, with proofs bound to a fixed channel transcript.  Time is a
``Clock`` shared by the server and the account.
"""

from __future__ import annotations

import gc
import random
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from client.account import RETRY_FIRST, RETRY_MAX, Account, AlreadyLoggedIn, NotLoggedIn, State
from client.loginclient import LoginResult, LoginServerUnreachable
from client.state import StateDir
from login_server.accounts import hash_password
from overlay.certificate import SignedCertificate
from overlay.errors import VoipError
from overlay.identity import MIN_COST, IdentityKey, KeyFile, key_fingerprint
from overlay.login_protocol import (
    Login,
    LoginError,
    Register,
    Renew,
    WrongPassword,
    error_from_reply,
    proof_message,
)
from tests.support.loginserver import LoginServerFixture, make_login_server

START = 1_700_000_000.0
LIFETIME = 3 * 3600
RENEW_AT = LIFETIME * 2 / 3
PASSWORD = "correct horse battery"
NEW_PASSWORD = "staple horse battery"
SOURCE = "198.51.100.7"
TRANSCRIPT = bytes(range(32))
SEED = 1234
UNREACHABLE = "Cannot reach the login server at login.test:7000: connection refused."


class InMemoryLoginClient:
    """``client.loginclient.LoginClient`` with the network taken out.

    Requests go straight to a real ``LoginServer``; its refusals come back the way the real
    client raises them (through ``error_from_reply``), and its certificates are checked
    against the pinned CA key as the real client does.
    """

    address = "login.test:7000"

    def __init__(self, fixture: LoginServerFixture, clock: Clock) -> None:
        self.server = fixture.server
        self.ca_key = fixture.ca_public
        self.clock = clock
        #: When set, every request fails with it (an unreachable server, an error reply).
        self.failure: VoipError | None = None
        #: When set, the next renewal waits for it before it reaches the server.
        self.renew_gate: Deferred[None] | None = None
        self.requests: list[str] = []

    async def _send(self, name: str, call: Any) -> Any:
        self.requests.append(name)
        if self.failure is not None:
            raise self.failure
        try:
            return await call()
        except LoginError as exc:  # what travels back in an ``error`` reply
            raise error_from_reply(exc.code, str(exc), getattr(exc, "retry_after", None)) from None

    async def register(self, username: str, password: str) -> str:
        reply = await self._send(
            "register", lambda: self.server.register(Register(1, username, password), SOURCE)
        )
        return str(reply.username)

    async def login(self, username: str, password: str, identity: IdentityKey) -> LoginResult:
        proof = identity.sign(proof_message(TRANSCRIPT, username, identity.public_key))
        request = Login(1, username, password, identity.public_key, proof)
        reply = await self._send("login", lambda: self.server.login(request, SOURCE, TRANSCRIPT))
        return self._result(reply.certificate, reply.bootstrap, identity)

    async def renew(self, certificate: SignedCertificate, identity: IdentityKey) -> LoginResult:
        if self.renew_gate is not None:
            gate, self.renew_gate = self.renew_gate, None
            await gate
        proof = identity.sign(proof_message(TRANSCRIPT, certificate.username, identity.public_key))
        request = Renew(1, bytes(certificate), proof)
        reply = await self._send("renew", lambda: self.server.renew(request, SOURCE, TRANSCRIPT))
        return self._result(reply.certificate, reply.bootstrap, identity)

    def _result(self, data: bytes, bootstrap: Any, identity: IdentityKey) -> LoginResult:
        signed = SignedCertificate.parse(data)
        signed.verify(self.ca_key, self.clock.seconds(), username=None)
        assert signed.public_key == identity.public_key
        return LoginResult(signed, bootstrap, self.clock.seconds())


@dataclass
class Rig:
    clock: Clock
    login_server: LoginServerFixture
    client: InMemoryLoginClient
    state: StateDir
    account: Account

    def new_account(self, clock: Clock | None = None) -> Account:
        """Another daemon over the same state directory (a restart)."""
        return Account(
            clock or self.clock,
            StateDir(self.state.path),
            self.client,
            key_cost=MIN_COST,
            rng=random.Random(SEED),
        )

    def change_password(self, username: str, password: str) -> None:
        store = self.login_server.server.store
        store.delete(username)
        store.add(username, hash_password(password, MIN_COST), self.clock.seconds())


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    clock = Clock()
    clock.advance(START)
    fixture = make_login_server(tmp_path, clock, open_registration=True, cert_lifetime=LIFETIME)
    client = InMemoryLoginClient(fixture, clock)
    state = StateDir(tmp_path / "state")
    state.prepare()
    account = Account(clock, state, client, key_cost=MIN_COST, rng=random.Random(SEED))
    yield Rig(clock, fixture, client, state, account)
    fixture.server.store.close()


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def fingerprint_of(path: Path) -> str:
    return key_fingerprint(KeyFile.read(path).public_key)


async def registered_and_logged_in(
    rig: Rig, name: str = "alice", stay: bool = False
) -> dict[str, Any]:
    await rig.account.register(name, PASSWORD)
    return await rig.account.login(name, PASSWORD, stay=stay)


# -- login ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_register_then_login_makes_a_private_key_and_shows_the_certificate(rig: Rig) -> None:
    progress: list[str] = []
    assert await rig.account.register("Alice", PASSWORD, progress.append) == "alice"
    status = await rig.account.login("ALICE", PASSWORD, progress=progress.append)

    key = rig.state.key_path("alice")
    assert key.exists()
    assert mode_of(key) == 0o600
    assert progress == [
        "Registering alice at the login server login.test:7000...",
        "Logging in to the login server at login.test:7000...",
    ]
    assert status["state"] == "logged-in"
    assert status["username"] == "alice"
    assert status["login_server"] == "login.test:7000"
    assert status["stay_logged_in"] is False
    assert status["last_error"] is None
    assert status["renewals"] == 0
    assert status["next_renewal"] == START + RENEW_AT
    cert = status["certificate"]
    assert cert["role"] == "user"
    assert cert["not_before"] == int(START)
    assert cert["not_after"] == int(START) + LIFETIME
    assert cert["serial"] >= 1
    assert cert["key_fingerprint"] == fingerprint_of(key)
    assert rig.account.status() == status


@pytest_twisted.ensureDeferred
async def test_wrong_password_for_a_new_user_leaves_no_key(rig: Rig) -> None:
    await rig.account.register("alice", PASSWORD)
    with pytest.raises(WrongPassword, match=r"^Wrong password for alice\.$"):
        await rig.account.login("alice", "not the password")
    assert not rig.state.key_path("alice").exists()
    assert list((rig.state.path / "keys").iterdir()) == []
    status = rig.account.status()
    assert status["state"] == "logged-out"
    assert "certificate" not in status


@pytest_twisted.ensureDeferred
async def test_wrong_password_keeps_the_existing_key_untouched(rig: Rig) -> None:
    await registered_and_logged_in(rig)
    rig.account.logout()
    key = rig.state.key_path("alice")
    before = key.read_bytes()
    with pytest.raises(WrongPassword, match=r"^Wrong password for alice\.$"):
        await rig.account.login("alice", "not the password")
    assert key.read_bytes() == before
    assert not key.with_suffix(".key.old").exists()


@pytest_twisted.ensureDeferred
async def test_logging_in_again_reuses_the_identity_key(rig: Rig) -> None:
    first = await registered_and_logged_in(rig)
    key_bytes = rig.state.key_path("alice").read_bytes()
    rig.account.logout()
    # A restarted daemon (a new Account) finds the same key in the state directory.
    second = await rig.new_account().login("alice", PASSWORD)
    assert second["certificate"]["key_fingerprint"] == first["certificate"]["key_fingerprint"]
    assert second["certificate"]["serial"] != first["certificate"]["serial"]
    assert rig.state.key_path("alice").read_bytes() == key_bytes
    assert not rig.state.key_path("alice").with_suffix(".key.old").exists()


@pytest_twisted.ensureDeferred
async def test_changed_password_at_the_server_makes_a_new_key_and_keeps_the_old(rig: Rig) -> None:
    first = await registered_and_logged_in(rig)
    rig.account.logout()
    key = rig.state.key_path("alice")
    old_key_bytes = key.read_bytes()
    rig.change_password("alice", NEW_PASSWORD)

    # The old password still opens the local key, but the server refuses it.
    with pytest.raises(WrongPassword, match=r"^Wrong password for alice\.$"):
        await rig.account.login("alice", PASSWORD)
    assert key.read_bytes() == old_key_bytes

    status = await rig.account.login("alice", NEW_PASSWORD)
    assert status["state"] == "logged-in"
    new_fingerprint = status["certificate"]["key_fingerprint"]
    assert new_fingerprint != first["certificate"]["key_fingerprint"]
    assert fingerprint_of(key) == new_fingerprint
    assert mode_of(key) == 0o600
    KeyFile.read(key).unlock_with_password(NEW_PASSWORD)
    old = rig.state.path / "keys" / "alice.key.old"
    assert old.read_bytes() == old_key_bytes
    assert fingerprint_of(old) == first["certificate"]["key_fingerprint"]


@pytest_twisted.ensureDeferred
async def test_logout_when_not_logged_in(rig: Rig) -> None:
    with pytest.raises(NotLoggedIn, match=r"^Not logged in; run 'voipctl login NAME' first\.$"):
        rig.account.logout()
    await registered_and_logged_in(rig)
    assert rig.account.logout() == {"username": "alice"}
    status = rig.account.status()
    assert status["state"] == "logged-out"
    assert status["username"] is None
    with pytest.raises(NotLoggedIn):
        rig.account.logout()
    # No renewal runs for a user who logged out.
    rig.clock.advance(LIFETIME)
    assert "renew" not in rig.client.requests


@pytest_twisted.ensureDeferred
async def test_a_second_user_cannot_log_in_over_the_first(rig: Rig) -> None:
    await rig.account.register("bob", PASSWORD)
    await registered_and_logged_in(rig, "alice")
    with pytest.raises(
        AlreadyLoggedIn, match=r"^alice is logged in on this daemon; log out first\.$"
    ):
        await rig.account.login("bob", PASSWORD)
    assert rig.account.status()["username"] == "alice"
    assert rig.account.status()["state"] == "logged-in"
    assert not rig.state.key_path("bob").exists()
    rig.account.logout()
    assert (await rig.account.login("bob", PASSWORD))["username"] == "bob"


# -- renewal --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_certificate_is_renewed_at_two_thirds_of_its_lifetime(rig: Rig) -> None:
    first = await registered_and_logged_in(rig)
    rig.clock.advance(RENEW_AT - 1)
    assert rig.account.status()["renewals"] == 0
    assert "renew" not in rig.client.requests

    rig.clock.advance(1)
    status = rig.account.status()
    assert rig.client.requests.count("renew") == 1
    assert status["state"] == "logged-in"
    assert status["renewals"] == 1
    assert status["certificate"]["serial"] > first["certificate"]["serial"]
    assert status["certificate"]["not_before"] == int(START + RENEW_AT)
    assert status["certificate"]["not_after"] == int(START + RENEW_AT) + LIFETIME
    assert status["certificate"]["key_fingerprint"] == first["certificate"]["key_fingerprint"]
    assert status["next_renewal"] == START + 2 * RENEW_AT

    rig.clock.advance(RENEW_AT)
    assert rig.account.status()["renewals"] == 2


@pytest_twisted.ensureDeferred
async def test_unreachable_server_is_retried_with_backoff_until_the_certificate_expires(
    rig: Rig,
) -> None:
    status = await registered_and_logged_in(rig)
    not_after = status["certificate"]["not_after"]
    rig.client.failure = LoginServerUnreachable(UNREACHABLE)
    jitter = random.Random(SEED)  # the same draws as the account's own generator
    rig.clock.advance(RENEW_AT)

    delays: list[float] = []
    while True:
        status = rig.account.status()
        assert status["state"] == "logged-in"
        assert status["last_error"] == f"Certificate renewal failed: {UNREACHABLE}"
        attempt = rig.client.requests.count("renew")
        base = min(RETRY_MAX, RETRY_FIRST * 2 ** (attempt - 1))
        delay = base * jitter.uniform(0.8, 1.2)
        now = rig.clock.seconds()
        if now + delay >= not_after:
            # No retry would come before the certificate expires: the account waits for that.
            assert status["next_renewal"] == not_after
            rig.clock.advance(not_after - now)
            break
        assert status["next_renewal"] == pytest.approx(now + delay)
        assert 0.8 * base <= delay <= 1.2 * base
        delays.append(delay)
        rig.clock.advance(delay)

    bases = [30, 60, 120, 240, 480, 600, 600]
    assert len(delays) > len(bases)
    for delay, base in zip(delays, bases, strict=False):
        assert 0.8 * base <= delay <= 1.2 * base
    assert all(delay <= 1.2 * 600 for delay in delays)

    status = rig.account.status()
    assert rig.clock.seconds() == not_after
    assert status["state"] == "logged-out"
    assert status["username"] == "alice"
    assert "certificate" not in status
    assert status["last_error"] == (
        f"Logged out: the certificate expired (Certificate renewal failed: {UNREACHABLE})."
    )
    attempts = rig.client.requests.count("renew")
    rig.clock.advance(LIFETIME)
    assert rig.client.requests.count("renew") == attempts


@pytest_twisted.ensureDeferred
async def test_renewal_recovers_when_the_server_comes_back(rig: Rig) -> None:
    first = await registered_and_logged_in(rig)
    rig.client.failure = LoginServerUnreachable(UNREACHABLE)
    rig.clock.advance(RENEW_AT)
    rig.clock.advance(rig.account.status()["next_renewal"] - rig.clock.seconds())
    assert rig.client.requests.count("renew") == 2
    assert rig.account.status()["renewals"] == 0

    rig.client.failure = None
    retry_at = rig.account.status()["next_renewal"]
    rig.clock.advance(retry_at - rig.clock.seconds())
    status = rig.account.status()
    assert status["state"] == "logged-in"
    assert status["renewals"] == 1
    assert status["last_error"] is None
    assert status["certificate"]["serial"] > first["certificate"]["serial"]
    assert status["next_renewal"] == pytest.approx(int(retry_at) + RENEW_AT)
    # The backoff starts again from 30 s at the next failure.
    rig.client.failure = LoginServerUnreachable(UNREACHABLE)
    rig.clock.advance(status["next_renewal"] - rig.clock.seconds())
    delay = rig.account.status()["next_renewal"] - rig.clock.seconds()
    assert 0.8 * RETRY_FIRST <= delay <= 1.2 * RETRY_FIRST


@pytest.mark.parametrize("refusal", ["session-expired", "unknown-user"])
@pytest_twisted.ensureDeferred
async def test_refused_renewal_logs_out_at_once(rig: Rig, refusal: str) -> None:
    await registered_and_logged_in(rig, stay=True)
    assert rig.state.session_path.exists()
    if refusal == "unknown-user":
        rig.login_server.server.store.delete("alice")
        reason = "There is no account named alice any more."
    else:
        reason = "Your certificate has expired; log in again."
        rig.client.failure = error_from_reply("session-expired", reason, None)
    rig.clock.advance(RENEW_AT)

    status = rig.account.status()
    assert status["state"] == "logged-out"
    assert status["last_error"] == f"Logged out: {reason}"
    assert "certificate" not in status
    assert not rig.state.session_path.exists()
    rig.clock.advance(LIFETIME)
    assert rig.client.requests.count("renew") == 1


@pytest_twisted.ensureDeferred
async def test_a_late_renewal_failure_does_not_touch_the_next_user(rig: Rig) -> None:
    await rig.account.register("bob", PASSWORD)
    await registered_and_logged_in(rig, "alice")
    gate: Deferred[None] = Deferred()
    rig.client.renew_gate = gate
    rig.clock.advance(RENEW_AT)  # alice's renewal is now waiting for the network
    rig.account.logout()
    await rig.account.login("bob", PASSWORD)
    rig.client.failure = error_from_reply(
        "session-expired", "Your certificate has expired; log in again.", None
    )
    gate.callback(None)  # alice's renewal fails only now

    status = rig.account.status()
    assert status["state"] == "logged-in"
    assert status["username"] == "bob"
    assert status["last_error"] is None


@pytest_twisted.ensureDeferred
async def test_a_late_renewal_failure_after_logout_is_ignored(rig: Rig) -> None:
    await registered_and_logged_in(rig)
    gate: Deferred[None] = Deferred()
    rig.client.renew_gate = gate
    rig.clock.advance(RENEW_AT)
    rig.account.logout()
    rig.client.failure = LoginServerUnreachable(UNREACHABLE)
    gate.callback(None)
    gc.collect()  # a failure left in a dropped Deferred is logged now, in this test

    status = rig.account.status()
    assert status["state"] == "logged-out"
    assert status["last_error"] is None
    rig.clock.advance(LIFETIME)
    assert rig.client.requests.count("renew") == 1


# -- staying logged in ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_stay_logged_in_survives_a_restart(rig: Rig) -> None:
    # The first daemon runs on a clock that never moves again: it has stopped.
    first = rig.new_account(clock=Clock())
    await first.register("alice", PASSWORD)
    before = await first.login("alice", PASSWORD, stay=True)
    assert mode_of(rig.state.session_path) == 0o600
    assert PASSWORD.encode() not in rig.state.session_path.read_bytes()
    requests = list(rig.client.requests)

    restarted = rig.new_account()
    assert restarted.restore() is True
    status = restarted.status()
    assert status["state"] == "logged-in"
    assert status["username"] == "alice"
    assert status["stay_logged_in"] is True
    assert status["certificate"] == before["certificate"]
    assert rig.client.requests == requests  # no password was needed, nothing was sent

    # The restored key is good enough for the real server: renewal works and is saved.
    rig.clock.advance(RENEW_AT)
    renewed = restarted.status()
    assert renewed["renewals"] == 1
    saved = rig.state.load_session()
    assert saved is not None
    assert saved.certificate.cert.serial == renewed["certificate"]["serial"]


@pytest_twisted.ensureDeferred
async def test_without_stay_logged_in_nothing_is_restored(rig: Rig) -> None:
    await registered_and_logged_in(rig, stay=False)
    assert not rig.state.session_path.exists()
    restarted = rig.new_account()
    assert restarted.restore() is False
    assert restarted.status()["state"] == "logged-out"
    assert restarted.status()["last_error"] is None


@pytest_twisted.ensureDeferred
async def test_logging_in_again_without_stay_forgets_the_session(rig: Rig) -> None:
    await registered_and_logged_in(rig, stay=True)
    assert rig.state.session_path.exists()
    await rig.account.login("alice", PASSWORD, stay=False)
    assert not rig.state.session_path.exists()


@pytest_twisted.ensureDeferred
async def test_an_expired_saved_session_is_refused(rig: Rig) -> None:
    first = rig.new_account(clock=Clock())
    await first.register("alice", PASSWORD)
    status = await first.login("alice", PASSWORD, stay=True)
    rig.clock.advance(status["certificate"]["not_after"] - rig.clock.seconds() + 3600)

    restarted = rig.new_account()
    assert restarted.restore() is False
    after = restarted.status()
    assert after["state"] == "logged-out"
    assert after["last_error"] == "Could not stay logged in as alice: The certificate has expired."
    assert not rig.state.session_path.exists()
    # The user can still log in with the password, with the same key.
    again = await restarted.login("alice", PASSWORD)
    assert again["certificate"]["key_fingerprint"] == status["certificate"]["key_fingerprint"]


@pytest_twisted.ensureDeferred
async def test_a_saved_session_without_its_key_file_is_refused(rig: Rig) -> None:
    first = rig.new_account(clock=Clock())
    await first.register("alice", PASSWORD)
    await first.login("alice", PASSWORD, stay=True)
    rig.state.key_path("alice").unlink()

    restarted = rig.new_account()
    assert restarted.restore() is False
    assert re.fullmatch(
        r"Could not stay logged in as alice: Cannot read the key file .*alice\.key: .*\.",
        restarted.status()["last_error"],
    )
    assert not rig.state.session_path.exists()


@pytest_twisted.ensureDeferred
async def test_logout_forgets_the_saved_session(rig: Rig) -> None:
    await registered_and_logged_in(rig, stay=True)
    assert rig.state.session_path.exists()
    rig.account.logout()
    assert not rig.state.session_path.exists()
    assert rig.new_account().restore() is False


def test_an_account_starts_logged_out(rig: Rig) -> None:
    assert rig.account.state is State.LOGGED_OUT
    assert rig.account.status() == {
        "state": "logged-out",
        "username": None,
        "login_server": "login.test:7000",
        "stay_logged_in": False,
        "last_error": None,
    }


def test_a_damaged_session_file_is_reported_and_removed(rig: Rig) -> None:
    rig.account.state_dir.session_path.write_bytes(b"\x00not a session")
    assert rig.account.restore() is False
    assert rig.account.last_error == (
        f"The saved session {rig.account.state_dir.session_path} is damaged; log in again."
    )
    assert not rig.account.state_dir.session_path.exists()
