"""What the login server decides: registration, login, renewal.

Independent of sockets: ``LoginServer`` takes parsed requests and the caller's source address
and returns replies or raises a ``LoginError``.  Time comes from the injected clock; the slow
password hashing runs through ``run_slow`` (a thread pool in production, inline in tests).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger

from login_server.accounts import AccountStore, check_password, hash_password
from login_server.ratelimit import FailureLimiter
from login_server.registry import SupernodeRegistry
from overlay import certificate
from overlay.certificate import Expired, Role, SignedCertificate
from overlay.errors import CertificateError
from overlay.identity import DEFAULT_COST, IdentityKey, KdfCost, verify_signature
from overlay.login_protocol import (
    BadProof,
    CertificateReply,
    Contact,
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
from overlay.usernames import InvalidUsername, canonical_username

T = TypeVar("T")
PASSWORD_MIN = 8
PASSWORD_MAX = 1024


class Clock(Protocol):
    def seconds(self) -> float: ...


SlowRunner = Callable[[Callable[[], Any]], "Deferred[Any]"]


def run_inline(work: Callable[[], Any]) -> Deferred[Any]:
    """Run slow work on the calling thread (tests, tools)."""
    return maybeDeferred(work)


def _canonical(username: str) -> str:
    try:
        return canonical_username(username)
    except InvalidUsername as exc:
        raise InvalidUsernameReply(str(exc)) from None


def _wait(seconds: float) -> str:
    return f"{max(1, round(seconds))} s"


class LoginServer:
    log = Logger()

    def __init__(
        self,
        clock: Clock,
        store: AccountStore,
        ca_key: IdentityKey,
        *,
        run_slow: SlowRunner = run_inline,
        open_registration: bool = False,
        cert_lifetime: int = certificate.DEFAULT_LIFETIME,
        hash_cost: KdfCost = DEFAULT_COST,
        bootstrap: Callable[[], Sequence[Contact]] | None = None,
        registry: SupernodeRegistry | None = None,
        account_failures: tuple[int, float] = (5, 300.0),
        source_failures: tuple[int, float] = (20, 300.0),
        source_registrations: tuple[int, float] = (10, 3600.0),
    ) -> None:
        self.clock = clock
        self.store = store
        self.ca_key = ca_key
        self.run_slow = run_slow
        self.open_registration = open_registration
        self.cert_lifetime = cert_lifetime
        self.hash_cost = hash_cost
        self.registry = registry
        if bootstrap is None:
            bootstrap = registry.bootstrap if registry is not None else tuple
        self.bootstrap = bootstrap
        seconds = clock.seconds
        self.account_limiter = FailureLimiter(seconds, *account_failures)
        self.source_limiter = FailureLimiter(seconds, *source_failures)
        self.registration_limiter = FailureLimiter(seconds, *source_registrations)
        self.counters: Counter[str] = Counter()

    # -- registration ----------------------------------------------------------------------

    async def register(self, request: Register, source: str) -> Registered:
        if not self.open_registration:
            raise RegistrationClosed()
        wait = self.registration_limiter.retry_after(source)
        if wait is not None:
            raise RateLimited(
                f"Too many registrations from {source}; try again in {_wait(wait)}.", wait
            )
        name = _canonical(request.username)
        if len(request.password) < PASSWORD_MIN:
            raise WeakPassword(f"Passwords need at least {PASSWORD_MIN} characters.")
        if len(request.password) > PASSWORD_MAX:
            raise WeakPassword(f"Passwords may have at most {PASSWORD_MAX} characters.")
        # Every attempt that names a well-formed user counts, so probing which names exist
        # is as limited as creating accounts.
        self.registration_limiter.failed(source)
        if self.store.get(name) is not None:
            raise UsernameTaken(f"The username {name} is taken.")
        password_hash = await self.run_slow(lambda: hash_password(request.password, self.hash_cost))
        self.store.add(name, password_hash, self.clock.seconds())
        self.counters["registered"] += 1
        self.log.info("registered {username} from {source}", username=name, source=source)
        return Registered(request.rid, name)

    # -- login -----------------------------------------------------------------------------

    def _check_limits(self, name: str, source: str) -> None:
        for key, limiter, who in (
            (name, self.account_limiter, name),
            (source, self.source_limiter, source),
        ):
            wait = limiter.retry_after(key)
            if wait is not None:
                self.counters["rate-limited"] += 1
                raise RateLimited(
                    f"Too many failed logins for {who}; try again in {_wait(wait)}.", wait
                )

    def _failed(self, name: str | None, source: str) -> None:
        self.counters["login-failed"] += 1
        self.source_limiter.failed(source)
        if name is not None:
            self.account_limiter.failed(name)

    async def login(self, request: Login, source: str, transcript: bytes) -> CertificateReply:
        name = _canonical(request.username)
        self._check_limits(name, source)
        proof = proof_message(transcript, name, request.public_key)
        if not verify_signature(request.public_key, proof, request.proof):
            self._failed(None, source)
            raise BadProof()
        account = self.store.get(name)
        if account is None or account.disabled:
            self._failed(None, source)
            raise UnknownUser(f"There is no account named {name}.")
        ok = await self.run_slow(lambda: check_password(account.password_hash, request.password))
        if not ok:
            self._failed(name, source)
            raise WrongPassword(f"Wrong password for {name}.")
        self.account_limiter.succeeded(name)
        self.counters["login"] += 1
        self.log.info("login {username} from {source}", username=name, source=source)
        return self._certificate(request.rid, name, request.public_key)

    async def renew(self, request: Renew, source: str, transcript: bytes) -> CertificateReply:
        try:
            signed = SignedCertificate.parse(request.certificate)
            cert = signed.verify(self.ca_key.public_key, self.clock.seconds(), Role.USER)
        except Expired:
            raise SessionExpired("Your certificate has expired; log in again.") from None
        except CertificateError as exc:
            self._failed(None, source)
            raise BadProof(f"That certificate was not accepted: {exc}") from None
        proof = proof_message(transcript, cert.username, cert.public_key)
        if not verify_signature(cert.public_key, proof, request.proof):
            self._failed(None, source)
            raise BadProof()
        account = self.store.get(cert.username)
        if account is None or account.disabled:
            raise UnknownUser(f"There is no account named {cert.username} any more.")
        self.counters["renew"] += 1
        return self._certificate(request.rid, cert.username, cert.public_key)

    def _certificate(self, rid: int, name: str, public_key: bytes) -> CertificateReply:
        now = self.clock.seconds()
        serial = self.store.record_certificate(
            name, public_key, Role.USER.value, now, now + self.cert_lifetime
        )
        signed = certificate.issue(
            self.ca_key, name, public_key, serial=serial, now=now, lifetime=self.cert_lifetime
        )
        return CertificateReply(rid, bytes(signed), tuple(self.bootstrap()), now)
