"""The login server's side of a connection: handshake, then sealed requests.

See ``overlay.login_protocol`` for the message table.  Each request is answered with its reply
or an ``error`` naming it; a frame that cannot be parsed gets an ``error`` for "frame" and the
connection is closed; other connections are not affected.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from login_server.logic import LoginServer
from overlay.channel import Hello, server_handshake
from overlay.connection import FramedConnection
from overlay.errors import ProtocolError
from overlay.login_protocol import Login, LoginError, Register, Renew, ServerError
from overlay.messages import Message, Ping, Pong
from overlay.overlay_protocol import SnApply, SnHeartbeat, SnLeave

HANDSHAKE_TIMEOUT = 10.0
IDLE_TIMEOUT = 120.0
MAX_PENDING = 4


class LoginServerConnection(FramedConnection):
    def __init__(self, server: LoginServer, clock: IReactorTime, source: str) -> None:
        super().__init__(clock, HANDSHAKE_TIMEOUT)
        self.server = server
        self.source = source
        self.pending = 0

    def message_received(self, message: Message) -> None:
        if self.session is None:
            if not isinstance(message, Hello):
                self.send_error(0, message.NAME, ProtocolError("Expected hello first."))
                self.close()
                return
            try:
                reply, session = server_handshake(self.server.ca_key, message, self.clock.seconds())
            except ProtocolError as exc:
                self.server.counters["bad-messages"] += 1
                self.send_error(0, message.NAME, exc)
                self.close()
                return
            self.send(reply)  # in the clear; everything after it is sealed
            self.session = session
            self.idle_timeout = IDLE_TIMEOUT
            self._touch()  # restart the timer: the handshake timeout no longer applies
            return
        if isinstance(message, Ping):
            self.send(Pong(message.rid, self.clock.seconds()))
        elif isinstance(message, Register):
            self._run(message, self.server.register(message, self.source))
        elif isinstance(message, Login):
            self._run(message, self.server.login(message, self.source, self.session.transcript))
        elif isinstance(message, Renew):
            self._run(message, self.server.renew(message, self.source, self.session.transcript))
        elif isinstance(message, SnApply | SnHeartbeat | SnLeave):
            self._run(message, self._supernode(message, self.session.transcript))
        else:
            rid = getattr(message, "rid", 0)
            self.send_error(rid, message.NAME, ProtocolError(f"{message.NAME} is not a request."))

    def _run(self, request: Message, work: Coroutine[Any, Any, Message]) -> None:
        rid = getattr(request, "rid", 0)
        if self.pending >= MAX_PENDING:
            work.close()
            self.server.counters["busy"] += 1
            self.send_error(
                rid, request.NAME, ServerError("Too many requests at once on one connection.")
            )
            return
        self.pending += 1

        def done(reply: Message) -> None:
            self.pending -= 1
            self.send(reply)

        def failed(failure: Failure) -> None:
            self.pending -= 1
            if isinstance(failure.value, LoginError):
                self.send_error(rid, request.NAME, failure.value)
            else:
                self.server.counters["internal-error"] += 1
                self.log.failure("{request} failed", failure, request=request.NAME)
                self.send_error(rid, request.NAME, ServerError())

        Deferred.fromCoroutine(work).addCallbacks(done, failed)

    async def _supernode(self, message: Message, transcript: bytes) -> Message:
        registry = self.server.registry
        if registry is None:
            raise ServerError("This login server does not run a supernode registry.")
        if isinstance(message, SnApply):
            return await registry.apply(message, self.source, transcript)
        if isinstance(message, SnHeartbeat):
            return registry.heartbeat(message, transcript)
        assert isinstance(message, SnLeave)
        return registry.leave(message, transcript)

    def bad_message(self, request: str, exc: ProtocolError) -> None:
        self.server.counters["bad-frames" if request == "frame" else "bad-messages"] += 1
        self.log.info(
            "bad {request} from {source}: {error}", request=request, source=self.source, error=exc
        )
        self.send_error(0, request, exc)


class LoginServerFactory(Factory):
    def __init__(self, server: LoginServer, clock: IReactorTime) -> None:
        self.server = server
        self.clock = clock

    def buildProtocol(self, addr: IAddress | None) -> LoginServerConnection:
        host = getattr(addr, "host", str(addr))
        return LoginServerConnection(self.server, self.clock, host)
