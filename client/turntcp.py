"""TURN over TCP (RFC 8656 s.3.1, RFC 8489 s.6.2.2): the connection under a ``TurnClient``.

When UDP to the relay is blocked, the client speaks the same messages on one TCP connection:
STUN messages as they are, ChannelData padded to a multiple of 4 bytes (``ChannelData.to_bytes
(padded=True)``), both split out of the byte stream by ``overlay.turn.StreamFramer``.  A request
is not retransmitted on a stream; ``TurnClient`` gives it up after its ``tcp_timeout``.

    connect(client, reactor)  connects to client.server within CONNECT_TIMEOUT; the client then
                              writes to the connection and reads every frame from it
    a frame the framer rejects closes the connection (a stream cannot be resynchronised)
    the connection closing (either side) -> client.connection_lost(reason): the allocation is
                              lost, ``on_failed`` is called once
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from overlay.turn import StreamFramer, TurnError

if TYPE_CHECKING:
    from client.turnclient import TurnClient

CONNECT_TIMEOUT = 5.0


class TurnStream(Protocol):
    """The TCP connection of one TurnClient: frames in, bytes out."""

    def __init__(self, client: TurnClient) -> None:
        self.client = client
        self.framer = StreamFramer()
        #: Why we closed the connection (a bad frame), for ``on_failed``.
        self.reason: str | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        transport = self.transport
        self.client._write_stream = transport.write
        self.client._close_stream = self.close

    def dataReceived(self, data: bytes) -> None:
        try:
            frames = self.framer.feed(data)
        except TurnError as exc:
            self.client.counters["stream-errors"] += 1
            self.close(f"The relay {self.server} sent a bad TCP frame ({exc}).")
            return
        for frame in frames:
            if not self.client.frame_received(frame):
                self.client.counters["unclaimed"] += 1

    def close(self, reason: str | None = None) -> None:
        self.reason = self.reason or reason
        if self.transport is not None:
            self.transport.loseConnection()

    @property
    def server(self) -> str:
        from client.turnclient import show

        return show(self.client.server)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        text = self.reason or f"The TCP connection to the relay {self.server} closed."
        self.client.connection_lost(text)


async def connect(client: TurnClient, reactor: Any) -> TurnClient:
    """Connect ``client`` (transport tcp) to its server; TurnTimeout when that fails."""
    from client.turnclient import TurnTimeout, show

    host, port = client.server
    kind = TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint
    endpoint = kind(reactor, host, port, timeout=CONNECT_TIMEOUT)
    factory = Factory.forProtocol(lambda: TurnStream(client))
    connecting: Deferred[Any] = endpoint.connect(factory)
    try:
        await connecting
    except ConnectError as exc:
        what = exc.__class__.__name__
        raise TurnTimeout(
            f"The relay {show(client.server)} could not be reached over TCP ({what})."
        ) from None
    return client
