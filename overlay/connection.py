"""A TCP connection that speaks framed messages, in the clear or sealed by a channel session.

Both ends of the login protocol (and later the overlay's control connections) build on
``FramedConnection``: it cuts the stream into frames, decodes them, seals and opens them once a
``Session`` is set, closes the connection on a framing or decryption failure (the stream cannot
be trusted after that), and closes an idle connection after ``idle_timeout`` seconds of the
injected clock.  Subclasses implement ``message_received``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from overlay.channel import ChannelError, ClientHandshake, HelloReply, Sealed, Session
from overlay.errors import ProtocolError, VoipError
from overlay.framing import MAX_PAYLOAD, FrameDecoder
from overlay.messages import Error, Message, MessageError, decode, name_of


class FramedConnection(Protocol):
    log = Logger()

    def __init__(self, clock: IReactorTime, idle_timeout: float, max_payload: int = MAX_PAYLOAD):
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.decoder = FrameDecoder(max_payload)
        self.session: Session | None = None
        self.closed = False
        self._idle: IDelayedCall | None = None

    # -- life cycle --------------------------------------------------------------------------

    def connectionMade(self) -> None:
        self._touch()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.closed = True
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None
        self.connection_closed(reason)

    def connection_closed(self, reason: Failure | None) -> None:
        """Hook for subclasses."""

    def _touch(self) -> None:
        if self.closed:
            return
        if self._idle is not None and self._idle.active():
            self._idle.reset(self.idle_timeout)
        else:
            self._idle = self.clock.callLater(self.idle_timeout, self.timed_out)

    def timed_out(self) -> None:
        self.log.debug("closing idle connection")
        self.close()

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.loseConnection()

    # -- receiving ---------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.closed:
            return
        self._touch()
        try:
            for outer in self.decoder.feed(data):
                frame = outer
                if self.session is not None:
                    if outer.type != Sealed.TYPE:
                        raise ChannelError(
                            f"Got {name_of(outer.type)} in the clear after the handshake."
                        )
                    sealed = decode(outer)
                    assert isinstance(sealed, Sealed)
                    frame = self.session.open_frame(sealed)
                try:
                    message = decode(frame)
                except MessageError as exc:
                    # The stream is still in step: answer and carry on.
                    self.bad_message(name_of(frame.type), exc)
                    continue
                self.message_received(message)
                if self.closed:
                    return
        except ProtocolError as exc:
            self.bad_message("frame", exc)
            self.close()

    def message_received(self, message: Message) -> None:
        raise NotImplementedError

    def bad_message(self, request: str, exc: ProtocolError) -> None:
        """Hook: a frame or message could not be understood."""
        self.log.info("bad {request} from peer: {error}", request=request, error=exc)

    # -- sending -----------------------------------------------------------------------------

    def send(self, message: Message) -> None:
        if self.closed or self.transport is None:
            return
        outgoing: Message = message if self.session is None else self.session.seal(message)
        self.transport.write(bytes(outgoing))

    def send_error(self, rid: int, request: str, exc: Any) -> None:
        code = getattr(exc, "code", "error")
        retry_after = getattr(exc, "retry_after", None)
        self.send(Error(rid, request, code, str(exc), retry_after))


class ConnectionClosed(VoipError):
    """The peer closed the connection."""

    code = "connection-closed"


class ClientConnection(FramedConnection):
    """The connecting side: handshake against a pinned key, then requests matched by ``rid``.

    ``ready`` fires once the server proved its key (``ServerNotTrusted`` otherwise).  Replies
    go to the request that waits for them; requests the server pushes go to ``on_request``.
    When the connection ends, every waiter fails with the reason (``failure`` if one was set).
    """

    def __init__(
        self, clock: IReactorTime, pinned_key: bytes, idle_timeout: float, peer: str = "the peer"
    ) -> None:
        super().__init__(clock, idle_timeout)
        self.peer = peer
        self.handshake = ClientHandshake(pinned_key)
        self.ready: Deferred[ClientConnection] = Deferred()
        self.replies: dict[int, Deferred[Message]] = {}
        self.rids = itertools.count(1)
        self.failure: Exception | None = None
        self.hello_reply: HelloReply | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self.send(self.handshake.hello())

    def check_hello(self, reply: HelloReply) -> None:
        """Hook: further checks of the server's hello-reply (raise ``ProtocolError``)."""

    def message_received(self, message: Message) -> None:
        if self.session is None:
            if not isinstance(message, HelloReply):
                self.fail(ProtocolError(f"{self.peer} sent {message.NAME} instead of hello-reply."))
                return
            try:
                session = self.handshake.finish(message)
                self.check_hello(message)
            except ProtocolError as exc:
                self.fail(exc)
                return
            self.session = session
            self.hello_reply = message
            self.ready.callback(self)
            return
        if not message.REPLY:
            self.on_request(message)
            return
        rid = getattr(message, "rid", None)
        waiter = self.replies.pop(rid, None) if isinstance(rid, int) else None
        if waiter is not None:
            waiter.callback(message)

    def on_request(self, message: Message) -> None:
        """Hook: a request the server pushed.  By default it is refused."""
        rid = getattr(message, "rid", 0)
        self.send_error(rid, message.NAME, ProtocolError(f"{message.NAME} is not expected here."))

    def request(self, build: Callable[[int], Message]) -> Deferred[Message]:
        rid = next(self.rids)
        waiter: Deferred[Message] = Deferred()
        self.replies[rid] = waiter
        self.send(build(rid))
        return waiter

    def fail(self, exc: Exception) -> None:
        self.failure = exc
        self.close()

    def timed_out(self) -> None:
        # The same "did not answer" as a request's own timeout, whichever fires first.
        self.fail(TimeoutError())

    def connection_closed(self, reason: Failure | None) -> None:
        exc = self.failure or ConnectionClosed(
            f"{self.peer[0].upper()}{self.peer[1:]} closed the connection."
        )
        if not self.ready.called:
            self.ready.errback(exc)
        for waiter in self.replies.values():
            waiter.errback(exc)
        self.replies.clear()
