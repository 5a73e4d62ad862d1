"""What the login server decides: registration, login and renewal, on a Clock."""

from __future__ import annotations

from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from overlay import certificate
from overlay.certificate import CLOCK_SKEW, Role, SignedCertificate
from overlay.identity import IdentityKey
from overlay.login_protocol import (
    BadProof,
    CertificateReply,
    InvalidUsernameReply,
    Login,
    RateLimited,
    Register,
    Registered,
    RegistrationClosed,
    Renew,
    SessionExpired,
    UnknownUser,
    UsernameTaken,
    WeakPassword,
    WrongPassword,
    proof_message,
)
from tests.support.loginserver import LoginServerFixture, make_login_server

T = TypeVar("T")
START = 1_700_000_000.0
LIFETIME = 3600
PASSWORD = "alice's password"
TRANSCRIPT = b"t" * 32
SOURCE = "198.51.100.7"


def settle(work: Coroutine[Any, Any, T]) -> T:
    """The result of a request whose slow work runs inline (so it is done at once)."""
    results: list[Any] = []
    Deferred.fromCoroutine(work).addBoth(results.append)
    assert results, "the request did not finish"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]  # type: ignore[no-any-return]


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(START)
    return clock


@pytest.fixture
def ls(tmp_path: Path, clock: Clock) -> LoginServerFixture:
    fixture = make_login_server(tmp_path, clock, open_registration=True, cert_lifetime=LIFETIME)
    settle(fixture.server.register(Register(1, "alice", PASSWORD), "203.0.113.1"))
    return fixture


def login_request(
    username: str = "alice",
    password: str = PASSWORD,
    key: IdentityKey | None = None,
    transcript: bytes = TRANSCRIPT,
    rid: int = 7,
) -> tuple[Login, IdentityKey]:
    key = key or IdentityKey.generate()
    proof = key.sign(proof_message(transcript, username.lower(), key.public_key))
    return Login(rid, username, password, key.public_key, proof), key


def log_in(
    ls: LoginServerFixture, source: str = SOURCE, **kwargs: Any
) -> tuple[CertificateReply, IdentityKey]:
    request, key = login_request(**kwargs)
    return settle(ls.server.login(request, source, TRANSCRIPT)), key


def renew_request(
    signed: SignedCertificate, key: IdentityKey, transcript: bytes = TRANSCRIPT
) -> Renew:
    proof = key.sign(proof_message(transcript, signed.username, key.public_key))
    return Renew(9, bytes(signed), proof)


# -- registration ------------------------------------------------------------------------


def test_register_creates_an_account_that_can_log_in(ls: LoginServerFixture) -> None:
    reply = settle(ls.server.register(Register(3, "Bob.Smith", "bob's password"), SOURCE))
    assert reply == Registered(3, "bob.smith")
    account = ls.server.store.get("bob.smith")
    assert account is not None
    assert account.password_hash.startswith(b"$argon2id$")
    assert account.created_at == START
    cert_reply, _key = log_in(ls, username="bob.smith", password="bob's password")
    assert SignedCertificate.parse(cert_reply.certificate).username == "bob.smith"
    assert ls.server.counters["registered"] == 2


def test_registration_closed(tmp_path: Path, clock: Clock) -> None:
    ls = make_login_server(tmp_path, clock)
    with pytest.raises(RegistrationClosed) as caught:
        settle(ls.server.register(Register(1, "alice", PASSWORD), SOURCE))
    assert str(caught.value) == (
        "Registration is closed on this login server; ask its operator for an account."
    )
    assert ls.server.store.usernames() == []


@pytest.mark.parametrize("username", ["al", "alice smith", "alice@example", "a" * 33, "älice", ""])
def test_register_refuses_invalid_usernames(ls: LoginServerFixture, username: str) -> None:
    with pytest.raises(InvalidUsernameReply) as caught:
        settle(ls.server.register(Register(1, username, PASSWORD), SOURCE))
    assert str(caught.value) == (
        f"{username!r} is not a valid username: use 3-32 characters of a-z, 0-9, '.', '_' and '-'."
    )
    assert caught.value.code == "invalid-username"
    assert ls.server.store.usernames() == ["alice"]


def test_register_refuses_weak_and_absurd_passwords(ls: LoginServerFixture) -> None:
    with pytest.raises(WeakPassword) as caught:
        settle(ls.server.register(Register(1, "bob", "1234567"), SOURCE))
    assert str(caught.value) == "Passwords need at least 8 characters."
    with pytest.raises(WeakPassword) as caught:
        settle(ls.server.register(Register(1, "bob", "x" * 1025), SOURCE))
    assert str(caught.value) == "Passwords may have at most 1024 characters."
    # Exactly 8 characters is enough.
    assert settle(ls.server.register(Register(1, "bob", "12345678"), SOURCE)).username == "bob"


def test_register_refuses_a_taken_name_in_any_case(ls: LoginServerFixture) -> None:
    with pytest.raises(UsernameTaken) as caught:
        settle(ls.server.register(Register(1, "ALICE", "another password"), SOURCE))
    assert str(caught.value) == "The username alice is taken."
    # alice's own password still works.
    log_in(ls)


def test_registrations_per_source_are_limited(ls: LoginServerFixture, clock: Clock) -> None:
    for i in range(10):
        settle(ls.server.register(Register(i, f"user{i}", PASSWORD), SOURCE))
        clock.advance(1)
    with pytest.raises(RateLimited) as caught:
        settle(ls.server.register(Register(11, "user10", PASSWORD), SOURCE))
    # The first of the ten was 10 s ago; the window is an hour.
    assert caught.value.retry_after == 3590.0
    assert str(caught.value) == f"Too many registrations from {SOURCE}; try again in 3590 s."
    assert ls.server.store.get("user10") is None
    # Another source may still register, and the limit lifts when the window has passed.
    settle(ls.server.register(Register(12, "user10", PASSWORD), "192.0.2.99"))
    clock.advance(3590)
    assert settle(ls.server.register(Register(13, "user11", PASSWORD), SOURCE)).username == "user11"


# -- login -------------------------------------------------------------------------------


def test_login_returns_a_certificate_for_the_key(ls: LoginServerFixture) -> None:
    reply, key = log_in(ls, rid=42)
    assert reply.rid == 42
    assert reply.time == START
    signed = SignedCertificate.parse(reply.certificate)
    cert = signed.verify(ls.ca_public, START, Role.USER, username="alice")
    assert cert.public_key == key.public_key
    assert cert.not_before == int(START)
    assert cert.not_after - cert.not_before == LIFETIME
    assert cert.serial >= 1
    assert ls.server.counters["login"] == 1


def test_login_accepts_the_username_in_any_case(ls: LoginServerFixture) -> None:
    reply, _key = log_in(ls, username="ALICE")
    assert SignedCertificate.parse(reply.certificate).username == "alice"


def test_certificates_from_another_ca_do_not_verify(ls: LoginServerFixture) -> None:
    reply, _key = log_in(ls)
    signed = SignedCertificate.parse(reply.certificate)
    with pytest.raises(certificate.BadSignature):
        signed.verify(IdentityKey.generate().public_key, START)


def test_wrong_password(ls: LoginServerFixture) -> None:
    with pytest.raises(WrongPassword) as caught:
        log_in(ls, password="not alice's password")
    assert str(caught.value) == "Wrong password for alice."
    assert ls.server.counters["login-failed"] == 1


def test_unknown_user(ls: LoginServerFixture) -> None:
    with pytest.raises(UnknownUser) as caught:
        log_in(ls, username="Bob")
    assert str(caught.value) == "There is no account named bob."


def test_proof_over_another_channel_is_refused(ls: LoginServerFixture) -> None:
    # A proof signed for another connection's transcript cannot be replayed here.
    request, _key = login_request(transcript=b"x" * 32)
    with pytest.raises(BadProof) as caught:
        settle(ls.server.login(request, SOURCE, TRANSCRIPT))
    assert str(caught.value) == "The proof of your identity key did not verify."


def test_proof_by_another_key_is_refused(ls: LoginServerFixture) -> None:
    request, _key = login_request()
    other = IdentityKey.generate()
    forged = Login(
        request.rid,
        request.username,
        request.password,
        request.public_key,
        other.sign(proof_message(TRANSCRIPT, "alice", request.public_key)),
    )
    with pytest.raises(BadProof):
        settle(ls.server.login(forged, SOURCE, TRANSCRIPT))


def test_failed_logins_per_account_are_limited(ls: LoginServerFixture, clock: Clock) -> None:
    # Five wrong passwords from five places, one per second.
    for i in range(5):
        with pytest.raises(WrongPassword):
            log_in(ls, source=f"10.0.0.{i}", password="guess")
        clock.advance(1)
    clock.advance(5)
    # Even the right password from a new place is refused until the window has passed.
    with pytest.raises(RateLimited) as caught:
        log_in(ls, source="10.9.9.9")
    assert caught.value.retry_after == 290.0
    assert str(caught.value) == "Too many failed logins for alice; try again in 290 s."
    assert caught.value.code == "rate-limited"
    assert ls.server.counters["rate-limited"] == 1

    clock.advance(289.6)
    with pytest.raises(RateLimited) as caught:
        log_in(ls)
    assert caught.value.retry_after == pytest.approx(0.4)
    assert str(caught.value) == "Too many failed logins for alice; try again in 1 s."

    clock.advance(0.4)  # the first failure has left the window
    reply, _key = log_in(ls)
    assert SignedCertificate.parse(reply.certificate).username == "alice"


def test_a_success_clears_the_account_failures(ls: LoginServerFixture) -> None:
    for _ in range(4):
        with pytest.raises(WrongPassword):
            log_in(ls, password="guess")
    log_in(ls)
    for _ in range(4):
        with pytest.raises(WrongPassword):
            log_in(ls, password="guess")
    log_in(ls)  # not limited: only four failures since the success


def test_failed_logins_per_source_are_limited_across_accounts(
    ls: LoginServerFixture, clock: Clock
) -> None:
    settle(ls.server.register(Register(2, "bob", "bob's password"), "203.0.113.2"))
    for i in range(20):
        with pytest.raises(UnknownUser):
            log_in(ls, username=f"nobody{i}")
    with pytest.raises(RateLimited) as caught:
        log_in(ls, username="bob", password="bob's password")
    assert caught.value.retry_after == 300.0
    assert str(caught.value) == f"Too many failed logins for {SOURCE}; try again in 300 s."
    # The same account from another source is fine: the limit is on the source.
    log_in(ls, username="bob", password="bob's password", source="192.0.2.1")
    clock.advance(300)
    log_in(ls, username="bob", password="bob's password")


def test_bad_proofs_count_against_the_source(ls: LoginServerFixture) -> None:
    for _ in range(20):
        request, _key = login_request(transcript=b"x" * 32)
        with pytest.raises(BadProof):
            settle(ls.server.login(request, SOURCE, TRANSCRIPT))
    with pytest.raises(RateLimited):
        log_in(ls)


# -- renewal -----------------------------------------------------------------------------


def test_renew_issues_a_fresh_certificate(ls: LoginServerFixture, clock: Clock) -> None:
    reply, key = log_in(ls)
    old = SignedCertificate.parse(reply.certificate)
    clock.advance(LIFETIME / 2)
    renewed = settle(ls.server.renew(renew_request(old, key), SOURCE, TRANSCRIPT))
    assert renewed.rid == 9
    new = SignedCertificate.parse(renewed.certificate)
    cert = new.verify(ls.ca_public, clock.seconds(), Role.USER, username="alice")
    assert cert.public_key == key.public_key
    assert cert.serial > old.cert.serial
    assert cert.not_after == int(START + LIFETIME / 2) + LIFETIME
    assert ls.server.counters["renew"] == 1


def test_renew_of_an_expired_certificate(ls: LoginServerFixture, clock: Clock) -> None:
    reply, key = log_in(ls)
    signed = SignedCertificate.parse(reply.certificate)
    clock.advance(LIFETIME + CLOCK_SKEW + 1)
    with pytest.raises(SessionExpired) as caught:
        settle(ls.server.renew(renew_request(signed, key), SOURCE, TRANSCRIPT))
    assert str(caught.value) == "Your certificate has expired; log in again."


def test_renew_for_a_deleted_account(ls: LoginServerFixture) -> None:
    reply, key = log_in(ls)
    ls.server.store.delete("alice")
    with pytest.raises(UnknownUser) as caught:
        settle(
            ls.server.renew(
                renew_request(SignedCertificate.parse(reply.certificate), key), SOURCE, TRANSCRIPT
            )
        )
    assert str(caught.value) == "There is no account named alice any more."


def test_renew_of_a_certificate_from_another_ca(ls: LoginServerFixture) -> None:
    key = IdentityKey.generate()
    foreign = certificate.issue(
        IdentityKey.generate(), "alice", key.public_key, serial=1, now=START, lifetime=LIFETIME
    )
    with pytest.raises(BadProof) as caught:
        settle(ls.server.renew(renew_request(foreign, key), SOURCE, TRANSCRIPT))
    assert str(caught.value) == (
        "That certificate was not accepted: The certificate was not signed by our login server."
    )


def test_renew_needs_a_proof_for_this_channel(ls: LoginServerFixture) -> None:
    reply, key = log_in(ls)
    signed = SignedCertificate.parse(reply.certificate)
    with pytest.raises(BadProof) as caught:
        settle(ls.server.renew(renew_request(signed, key, b"x" * 32), SOURCE, TRANSCRIPT))
    assert str(caught.value) == "The proof of your identity key did not verify."
    # Someone who holds only the certificate (not the key) cannot renew it.
    thief = IdentityKey.generate()
    with pytest.raises(BadProof):
        settle(ls.server.renew(renew_request(signed, thief), SOURCE, TRANSCRIPT))


def test_renew_refuses_garbage(ls: LoginServerFixture) -> None:
    with pytest.raises(BadProof) as caught:
        settle(ls.server.renew(Renew(1, b"\xff\xfe", b"p" * 64), SOURCE, TRANSCRIPT))
    assert str(caught.value) == (
        "That certificate was not accepted: The certificate is not valid CBOR."
    )
