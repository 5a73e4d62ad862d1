"""A TCP connection that speaks framed messages, in the clear or sealed by a channel session.

Both ends of the login protocol (and later the overlay's control connections) build on
``FramedConnection``: it cuts the stream into frames, decodes them, seals and opens them once a
``Session`` is set, closes the connection on a framing or decryption failure (the stream cannot
be trusted after that), and closes an idle connection after ``idle_timeout`` seconds of the
injected clock.  Subclasses implement ``message_received``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from overlay.channel import ChannelError, Sealed, Session
from overlay.errors import ProtocolError
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
