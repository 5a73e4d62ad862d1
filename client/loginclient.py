"""The node's side of the login protocol: one connection per operation.

Connect, check the server's handshake against the pinned CA key, send one sealed request,
wait for its reply or error, close.  Every wait is bounded by ``timeout`` seconds of the
injected reactor's clock, and every failure becomes a ``VoipError`` that names the login
server and its address.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from overlay.certificate import SignedCertificate
from overlay.channel import ServerNotTrusted
from overlay.connection import ClientConnection
from overlay.errors import ProtocolError, VoipError
from overlay.identity import IdentityKey
from overlay.login_protocol import (
    DEFAULT_TIMEOUT,
    CertificateReply,
    Contact,
    Login,
    Register,
    Registered,
    Renew,
    error_from_reply,
    proof_message,
    supernode_name,
)
from overlay.messages import Error, Message, Ping, Pong
from overlay.overlay_protocol import SnAdmitted, SnApply, SnHeartbeat, SnLeave, SnState
from overlay.usernames import canonical_username


class LoginServerUnreachable(VoipError):
    """The login server cannot be reached; check --login-server and your network."""

    code = "login-server-unreachable"


class LoginServerNotTrusted(VoipError):
    """The server did not prove it is the login server your CA key names (check --ca)."""

    code = "login-server-not-trusted"


@dataclass(frozen=True)
class LoginResult:
    certificate: SignedCertificate
    bootstrap: tuple[Contact, ...]
    server_time: float


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    # isascii: str.isdigit() also accepts digits such as '²' that int() refuses.
    if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise VoipError(f"{text!r} is not an address like 127.0.0.1:7000.")
    return host.strip("[]"), int(port)


class _Connection(ClientConnection):
    def __init__(self, clock: IReactorTime, pinned_key: bytes, timeout: float) -> None:
        super().__init__(clock, pinned_key, timeout, peer="the login server")

    def fail(self, exc: Exception) -> None:
        super().fail(LoginServerNotTrusted() if isinstance(exc, ServerNotTrusted) else exc)

    def connection_closed(self, reason: Failure | None) -> None:
        if self.failure is None:
            self.failure = LoginServerUnreachable("The login server closed the connection.")
        super().connection_closed(reason)


class LoginClient:
    """Talks to one login server whose CA key is pinned."""

    def __init__(
        self,
        reactor: Any,
        address: str,
        ca_key: bytes,
        timeout: float = DEFAULT_TIMEOUT,
        endpoint_factory: Callable[[Any, str, int, float], Any] | None = None,
    ) -> None:
        self.reactor = reactor
        self.address = address
        self.host, self.port = parse_address(address)
        self.ca_key = ca_key
        self.timeout = timeout
        self._endpoint_factory = endpoint_factory or (
            lambda r, h, p, t: HostnameEndpoint(r, h, p, timeout=t)
        )

    def _where(self, exc: BaseException) -> VoipError:
        at = f"the login server at {self.address}"
        if isinstance(exc, LoginServerNotTrusted):
            return LoginServerNotTrusted(
                f"The server at {self.address} did not prove it holds the CA key you trust "
                "(wrong --ca, or not our login server)."
            )
        if isinstance(exc, VoipError):
            return exc
        if isinstance(exc, net_error.ConnectionRefusedError):
            return LoginServerUnreachable(f"Cannot reach {at}: connection refused.")
        if isinstance(
            exc, TimeoutError | builtins.TimeoutError | CancelledError | net_error.TimeoutError
        ):
            return LoginServerUnreachable(
                f"{at[0].upper()}{at[1:]} did not answer within {self.timeout:g} s."
            )
        if isinstance(exc, net_error.DNSLookupError):
            return LoginServerUnreachable(f"Cannot resolve the login server name {self.host}.")
        if isinstance(exc, net_error.ConnectError):
            reason = exc.osError or exc.__class__.__doc__ or "connection failed"
            return LoginServerUnreachable(f"Cannot reach {at}: {str(reason).strip().rstrip('.')}.")
        return LoginServerUnreachable(f"Cannot reach {at}: {exc}.")

    async def _exchange(self, build: Callable[[bytes, int], Message]) -> Message:
        connection: _Connection | None = None

        async def run() -> Message:
            nonlocal connection
            factory = Factory.forProtocol(
                lambda: _Connection(self.reactor, self.ca_key, self.timeout)
            )
            endpoint = self._endpoint_factory(self.reactor, self.host, self.port, self.timeout)
            connected = await endpoint.connect(factory)
            assert isinstance(connected, _Connection)
            connection = connected
            await connection.ready
            session = connection.session
            assert session is not None
            return await connection.request(lambda rid: build(session.transcript, rid))

        work = Deferred.fromCoroutine(run())
        work.addTimeout(self.timeout, self.reactor)
        try:
            reply = await work
        except Exception as exc:  # noqa: BLE001 - mapped to a user-facing error here
            raise self._where(exc) from None
        finally:
            if connection is not None:
                connection.close()
        if isinstance(reply, Error):
            raise error_from_reply(reply.code, reply.message, reply.retry_after)
        return reply

    async def register(self, username: str, password: str) -> str:
        reply = await self._exchange(lambda _t, rid: Register(rid, username, password))
        if not isinstance(reply, Registered):
            raise ProtocolError(f"The login server answered register with {reply.NAME}.")
        return reply.username

    async def login(self, username: str, password: str, identity: IdentityKey) -> LoginResult:
        name = canonical_username(username)  # the server checks the proof over this form

        def build(transcript: bytes, rid: int) -> Message:
            proof = identity.sign(proof_message(transcript, name, identity.public_key))
            return Login(rid, name, password, identity.public_key, proof)

        return self._result(await self._exchange(build), identity)

    async def renew(self, certificate: SignedCertificate, identity: IdentityKey) -> LoginResult:
        def build(transcript: bytes, rid: int) -> Message:
            proof = identity.sign(
                proof_message(transcript, certificate.username, identity.public_key)
            )
            return Renew(rid, bytes(certificate), proof)

        return self._result(await self._exchange(build), identity)

    # -- supernodes ---------------------------------------------------------------------------

    def _node_proof(self, node_key: IdentityKey, transcript: bytes) -> bytes:
        name = supernode_name(node_key.public_key)
        return node_key.sign(proof_message(transcript, name, node_key.public_key))

    async def sn_apply(self, node_key: IdentityKey, tcp_port: int, udp_port: int) -> SnAdmitted:
        def build(transcript: bytes, rid: int) -> Message:
            proof = self._node_proof(node_key, transcript)
            return SnApply(rid, node_key.public_key, proof, tcp_port, udp_port)

        reply = await self._exchange(build)
        if not isinstance(reply, SnAdmitted):
            raise ProtocolError(f"The login server answered sn-apply with {reply.NAME}.")
        return reply

    async def sn_heartbeat(self, node_key: IdentityKey, attached: int, version: int) -> SnState:
        def build(transcript: bytes, rid: int) -> Message:
            proof = self._node_proof(node_key, transcript)
            return SnHeartbeat(rid, node_key.public_key, proof, attached, version)

        reply = await self._exchange(build)
        if not isinstance(reply, SnState):
            raise ProtocolError(f"The login server answered sn-heartbeat with {reply.NAME}.")
        return reply

    async def sn_leave(self, node_key: IdentityKey) -> None:
        def build(transcript: bytes, rid: int) -> Message:
            return SnLeave(rid, node_key.public_key, self._node_proof(node_key, transcript))

        await self._exchange(build)

    async def ping(self) -> float:
        """Round-trip time to the login server, in seconds."""
        start = self.reactor.seconds()
        reply = await self._exchange(lambda _t, rid: Ping(rid))
        if not isinstance(reply, Pong):
            raise ProtocolError(f"The login server answered ping with {reply.NAME}.")
        return float(self.reactor.seconds() - start)

    def _result(self, reply: Message, identity: IdentityKey) -> LoginResult:
        if not isinstance(reply, CertificateReply):
            raise ProtocolError(f"The login server answered with {reply.NAME}, not a certificate.")
        signed = SignedCertificate.parse(reply.certificate)
        signed.verify(self.ca_key, self.reactor.seconds(), username=None)
        if signed.public_key != identity.public_key:
            raise ProtocolError("The login server certified a key that is not ours.")
        return LoginResult(signed, reply.bootstrap, reply.time)
