"""Who is logged in on this daemon: identity key, certificate, renewal, staying logged in.

Time comes from the injected reactor (``seconds``/``callLater``), so renewal and expiry are
tested with ``twisted.internet.task.Clock``.  A certificate is renewed when two thirds of its
lifetime have passed; a failed renewal is retried with jittered exponential backoff (30 s
doubling to 10 min) until it succeeds or the certificate expires, and then the user is
logged out with the reason kept for ``voipctl status``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from enum import Enum
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from client.loginclient import LoginClient, LoginResult
from client.state import SavedSession, StateDir
from login_server.logic import SlowRunner, run_inline
from overlay.certificate import SignedCertificate
from overlay.errors import VoipError, WrongPassphrase
from overlay.identity import DEFAULT_COST, IdentityKey, KdfCost, KeyFile, key_fingerprint
from overlay.login_protocol import (
    BadProof,
    LoginError,
    SessionExpired,
    UnknownUser,
)
from overlay.usernames import canonical_username

Progress = Callable[[str], None]
RETRY_FIRST = 30.0
RETRY_MAX = 600.0


class NotLoggedIn(VoipError):
    """Not logged in; run 'voipctl login NAME' first."""

    code = "not-logged-in"


class AlreadyLoggedIn(VoipError):
    """Someone is already logged in on this daemon; log out first."""

    code = "already-logged-in"


class State(Enum):
    LOGGED_OUT = "logged-out"
    LOGGED_IN = "logged-in"


def _quiet(_: str) -> None:
    pass


class Account:
    log = Logger()

    def __init__(
        self,
        reactor: Any,
        state: StateDir,
        client: LoginClient,
        *,
        run_slow: SlowRunner = run_inline,
        key_cost: KdfCost = DEFAULT_COST,
        rng: random.Random | None = None,
    ) -> None:
        self.reactor = reactor
        self.state_dir = state
        self.client = client
        self.run_slow = run_slow
        self.key_cost = key_cost
        self.rng = rng or random.Random()  # noqa: S311 - backoff jitter, not cryptography
        self.state = State.LOGGED_OUT
        self.username: str | None = None
        self.identity: IdentityKey | None = None
        self.certificate: SignedCertificate | None = None
        self.bootstrap: tuple[Any, ...] = ()
        self._refreshing = False
        self.stay_logged_in = False
        self.last_error: str | None = None
        self.renewals = 0
        self._renewal: IDelayedCall | None = None
        self._failures = 0
        #: Called with no argument whenever the login state changes (for later subsystems).
        self.on_change: list[Callable[[], None]] = []

    # -- commands ----------------------------------------------------------------------------

    async def register(self, username: str, password: str, progress: Progress = _quiet) -> str:
        name = canonical_username(username)
        progress(f"Registering {name} at the login server {self.client.address}...")
        return await self.client.register(name, password)

    async def login(
        self, username: str, password: str, stay: bool = False, progress: Progress = _quiet
    ) -> dict[str, Any]:
        name = canonical_username(username)
        if self.state is State.LOGGED_IN and self.username != name:
            raise AlreadyLoggedIn(f"{self.username} is logged in on this daemon; log out first.")
        key_path = self.state_dir.key_path(name)
        identity: IdentityKey | None = None
        file_key: bytes | None = None
        if key_path.exists():
            progress("Unlocking your identity key...")
            key_file = KeyFile.read(key_path)
            try:
                identity, file_key = await self.run_slow(
                    lambda: key_file.unlock_with_password(password)
                )
            except WrongPassphrase:
                identity = None  # the password may have changed at the server: see below
        fresh = identity is None
        if identity is None:
            identity = IdentityKey.generate()
        progress(f"Logging in to the login server at {self.client.address}...")
        result = await self.client.login(name, password, identity)
        if fresh:
            if key_path.exists():
                key_path.replace(key_path.with_suffix(".key.old"))
            new_identity = identity
            file_key = await self.run_slow(
                lambda: new_identity.save(key_path, password, self.key_cost)
            )
        assert file_key is not None
        self._logged_in(name, identity, result)
        self.stay_logged_in = stay
        if stay:
            self.state_dir.save_session(SavedSession(name, file_key, result.certificate))
        else:
            self.state_dir.forget_session()
        return self.status()

    def logout(self) -> dict[str, Any]:
        if self.state is not State.LOGGED_IN:
            raise NotLoggedIn()
        name = self.username
        self._logged_out(None)
        self.state_dir.forget_session()
        return {"username": name}

    def restore(self) -> bool:
        """At start-up: log in again from a saved session, if the user chose to stay."""
        if not self.state_dir.session_path.exists():
            return False
        saved = self.state_dir.load_session()
        if saved is None:
            self.last_error = (
                f"The saved session {self.state_dir.session_path} is damaged; log in again."
            )
            self.log.warn("{error}", error=self.last_error)
            self.state_dir.forget_session()
            return False
        try:
            identity = KeyFile.read(self.state_dir.key_path(saved.username)).unlock(saved.file_key)
            saved.certificate.verify(self.client.ca_key, self.reactor.seconds())
        except VoipError as exc:
            self.last_error = f"Could not stay logged in as {saved.username}: {exc}"
            self.log.warn("{error}", error=self.last_error)
            self.state_dir.forget_session()
            return False
        if saved.certificate.public_key != identity.public_key:
            self.last_error = (
                f"Could not stay logged in as {saved.username}: the saved certificate is for "
                "another key; log in again."
            )
            self.state_dir.forget_session()
            return False
        self.stay_logged_in = True
        self._logged_in(saved.username, identity, LoginResult(saved.certificate, (), 0.0))
        return True

    def status(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "state": self.state.value,
            "username": self.username,
            "login_server": self.client.address,
            "stay_logged_in": self.stay_logged_in,
            "last_error": self.last_error,
        }
        if self.certificate is not None and self.identity is not None:
            cert = self.certificate.cert
            document["certificate"] = {
                "serial": cert.serial,
                "role": cert.role.value,
                "not_before": cert.not_before,
                "not_after": cert.not_after,
                "key_fingerprint": key_fingerprint(cert.public_key),
            }
            document["renewals"] = self.renewals
            if self._renewal is not None and self._renewal.active():
                document["next_renewal"] = self._renewal.getTime()
        return document

    # -- internals ---------------------------------------------------------------------------

    def _logged_in(self, name: str, identity: IdentityKey, result: LoginResult) -> None:
        self.state = State.LOGGED_IN
        self.username = name
        self.identity = identity
        self.certificate = result.certificate
        if result.bootstrap:
            self.bootstrap = result.bootstrap
        self.last_error = None
        self._failures = 0
        self._schedule(self._renewal_due())
        self.log.info(
            "logged in as {username}, certificate valid until {until}",
            username=name,
            until=result.certificate.not_after,
        )
        self._changed()

    def _logged_out(self, reason: str | None) -> None:
        self._cancel()
        self.state = State.LOGGED_OUT
        self.identity = None
        self.certificate = None
        self.stay_logged_in = False
        self.last_error = reason
        if reason is None:
            self.username = None
        self._changed()

    def _changed(self) -> None:
        for callback in list(self.on_change):
            callback()

    def refresh(self) -> None:
        """Renew now (for a fresh bootstrap list when the overlay knows no supernode)."""
        if self.state is State.LOGGED_IN and not self._refreshing:
            self._refreshing = True
            self._cancel()
            self._renew().addBoth(self._refreshed)

    def _refreshed(self, result: Any) -> Any:
        self._refreshing = False
        if self.state is State.LOGGED_IN and self._renewal is None and self.certificate:
            self._schedule(self._renewal_due())
        return result

    def _renewal_due(self) -> float:
        assert self.certificate is not None
        cert = self.certificate.cert
        return cert.not_before + (cert.not_after - cert.not_before) * 2 / 3

    def _cancel(self) -> None:
        if self._renewal is not None and self._renewal.active():
            self._renewal.cancel()
        self._renewal = None

    def _schedule(self, when: float) -> None:
        self._cancel()
        delay = max(0.0, when - self.reactor.seconds())
        self._renewal = self.reactor.callLater(delay, self._renew)

    def _renew(self) -> Deferred[None]:
        self._renewal = None
        return Deferred.fromCoroutine(self._renew_now())

    async def _renew_now(self) -> None:
        if self.state is not State.LOGGED_IN or self.certificate is None or self.identity is None:
            return
        renewing = self.certificate
        try:
            result = await self.client.renew(renewing, self.identity)
        except (SessionExpired, UnknownUser, BadProof) as exc:
            if self.certificate is renewing:
                self._logged_out(f"Logged out: {exc}")
                self.state_dir.forget_session()
            return
        except (LoginError, VoipError) as exc:
            if self.certificate is renewing:
                self._retry(exc)
            return
        if self.state is not State.LOGGED_IN or self.certificate is not renewing:
            return  # logged out (or in again) meanwhile: this renewal no longer applies
        assert self.identity is not None
        self.renewals += 1
        self._logged_in(self.username or "", self.identity, result)
        if self.stay_logged_in:
            saved = self.state_dir.load_session()
            if saved is not None:
                self.state_dir.save_session(
                    SavedSession(saved.username, saved.file_key, result.certificate)
                )

    def _retry(self, exc: VoipError) -> None:
        assert self.certificate is not None
        self._failures += 1
        self.last_error = f"Certificate renewal failed: {exc}"
        delay = min(RETRY_MAX, RETRY_FIRST * 2 ** (self._failures - 1))
        delay *= self.rng.uniform(0.8, 1.2)
        now = self.reactor.seconds()
        expiry = self.certificate.not_after
        self.log.warn("{error}; retrying in {delay:.0f} s", error=self.last_error, delay=delay)
        if now + delay >= expiry:
            self._renewal = self.reactor.callLater(max(0.0, expiry - now), self._expire)
        else:
            self._renewal = self.reactor.callLater(delay, self._renew)

    def _expire(self) -> None:
        self._renewal = None
        reason = self.last_error or "no renewal"
        self._logged_out(f"Logged out: the certificate expired ({reason}).")
        self.state_dir.forget_session()
