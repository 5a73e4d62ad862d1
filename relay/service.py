"""The relay as a service: ``TurnServer`` on real UDP and TCP listeners, relayed UDP sockets.

    Relay(reactor, config).start()    listens: UDP and TCP on config.listen_host (port 0 for
                                      both: one ephemeral number for both when it can)
    relay.udp_address, tcp_address    where clients reach it
    relay.describe(), spare()         status, spare allocations (to pick relays)
    await relay.stop()                closes listeners, connections and relayed sockets

Transports (RFC 8656 s.3.1):

- UDP: one ``DatagramProtocol``; each datagram goes to ``TurnServer.handle(("udp", source))``
  and the answer back to the source.
- TCP: one ``Protocol`` per connection, frames cut by ``overlay.turn.StreamFramer`` (ChannelData
  is padded to 4 bytes on a stream); a framing error closes that connection (counted
  ``tcp-framing``); the connection's allocation is deleted when it closes.
- Relayed sockets: ``reactor.listenUDP(0, interface=relay_ip)`` per allocation.

The supernode embeds one ``Relay`` with a random secret and mints credentials for its callers
with ``overlay.turn.mint_credential(secret, user, now)``; ``voip-relay serve`` runs one alone.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.error import CannotListenError, MessageLengthError
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from overlay.stun import Address
from overlay.turn import StreamFramer, TurnError
from relay.allocations import ClientKey, PeerHandler, RelayedSocket, RelayFactory
from relay.server import RelayConfig, TurnServer

log = Logger()
#: Tries to find one ephemeral port number free for both UDP and TCP.
SAME_PORT_TRIES = 10


class _RelayedProtocol(DatagramProtocol):
    def __init__(self, handler: PeerHandler) -> None:
        self.handler = handler

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.handler(datagram, (addr[0], addr[1]))


class UdpRelayedSocket:
    """One allocation's socket on the relay address."""

    def __init__(self, port: Any) -> None:
        self.port = port
        host = port.getHost()
        self.address: Address = (host.host, host.port)

    def send(self, data: bytes, peer: Address) -> None:
        try:
            self.port.write(data, peer)
        except (OSError, MessageLengthError) as exc:
            log.debug("relay: cannot send to {peer}: {error}", peer=peer, error=exc)

    def close(self) -> Deferred[None] | None:
        return maybeDeferred(self.port.stopListening)


def udp_relay_factory(reactor: Any, relay_ip: str) -> RelayFactory:
    def open_socket(handler: PeerHandler) -> RelayedSocket:
        try:
            port = reactor.listenUDP(0, _RelayedProtocol(handler), interface=relay_ip)
        except CannotListenError as exc:
            raise OSError(f"cannot listen on {relay_ip}: {exc.socketError}") from None
        return UdpRelayedSocket(port)

    return open_socket


class _UdpListener(DatagramProtocol):
    def __init__(self, server: TurnServer) -> None:
        self.server = server

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        source = (addr[0], addr[1])
        reply = self.server.handle(("udp", source), datagram)
        if reply is not None and self.transport is not None:
            try:
                self.transport.write(reply, source)
            except (OSError, MessageLengthError):
                self.server.counters["send-failed"] += 1


class TurnStream(Protocol):
    """One TCP client: frames in, answers out; its allocation dies with it."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.framer = StreamFramer()
        self.key: ClientKey | None = None

    def connectionMade(self) -> None:
        peer: Any = self.transport.getPeer()  # type: ignore[union-attr]
        self.key = ("tcp", (peer.host, peer.port))
        self.relay.connections[self.key] = self
        self.relay.counters["tcp-connections"] += 1

    def dataReceived(self, data: bytes) -> None:
        assert self.key is not None and self.transport is not None
        try:
            frames = self.framer.feed(data)
        except TurnError:
            self.relay.counters["tcp-framing"] += 1
            self.transport.loseConnection()
            return
        for frame in frames:
            reply = self.relay.server.handle(self.key, frame)
            if reply is not None:
                self.transport.write(reply)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.key is not None:
            self.relay.connections.pop(self.key, None)
            self.relay.server.connection_lost(self.key)


class TurnStreamFactory(Factory):
    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def buildProtocol(self, addr: Any) -> Protocol:
        return TurnStream(self.relay)


class Relay:
    def __init__(self, reactor: Any, config: RelayConfig, clock: IReactorTime | None = None):
        self.reactor = reactor
        self.config = config
        self.counters: Counter[str] = Counter()
        self.connections: dict[ClientKey, TurnStream] = {}
        self.server = TurnServer(
            clock if clock is not None else reactor,
            config,
            udp_relay_factory(reactor, config.relay_ip),
            self._deliver,
            self.counters,
        )
        self._udp: Any = None
        self._tcp: IListeningPort | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Listen on UDP and TCP; raises CannotListenError (nothing left open) when it cannot."""
        host, config = self.config.listen_host, self.config
        if config.udp_port == 0 and config.tcp_port == 0:
            self._listen_same_port(host)
        else:
            self._udp = self.reactor.listenUDP(
                config.udp_port, _UdpListener(self.server), interface=host
            )
            try:
                self._tcp = self.reactor.listenTCP(
                    config.tcp_port, TurnStreamFactory(self), interface=host
                )
            except CannotListenError:
                self._udp.stopListening()
                self._udp = None
                raise
        self.server.start()

    def _listen_same_port(self, host: str) -> None:
        for _ in range(SAME_PORT_TRIES):
            udp = self.reactor.listenUDP(0, _UdpListener(self.server), interface=host)
            try:
                tcp = self.reactor.listenTCP(
                    udp.getHost().port, TurnStreamFactory(self), interface=host
                )
            except CannotListenError:
                udp.stopListening()
                continue
            self._udp, self._tcp = udp, tcp
            return
        self._udp = self.reactor.listenUDP(0, _UdpListener(self.server), interface=host)
        self._tcp = self.reactor.listenTCP(0, TurnStreamFactory(self), interface=host)

    def stop(self) -> Deferred[None]:
        """Stop listening, close every TCP connection and every relayed socket."""
        pending: list[Deferred[Any]] = []
        for port in (self._udp, self._tcp):
            if port is not None:
                pending.append(maybeDeferred(port.stopListening))
        self._udp = self._tcp = None
        for connection in list(self.connections.values()):
            transport = connection.transport
            if transport is not None:
                transport.loseConnection()
        for closing in self.server.stop():
            if isinstance(closing, Deferred):
                pending.append(closing)
        if not pending:
            return succeed(None)
        done: Deferred[Any] = DeferredList(pending, consumeErrors=True)
        return done.addCallback(lambda _: None)

    # -- status ------------------------------------------------------------------------------

    @property
    def udp_address(self) -> Address:
        if self._udp is None:
            raise RuntimeError("the relay is not listening")
        host = self._udp.getHost()
        return (host.host, host.port)

    @property
    def tcp_address(self) -> Address:
        if self._tcp is None:
            raise RuntimeError("the relay is not listening")
        host: Any = self._tcp.getHost()
        return (host.host, host.port)

    def spare(self) -> int:
        return self.server.spare()

    def describe(self) -> dict[str, object]:
        status = self.server.describe()
        if self._udp is not None and self._tcp is not None:
            status["udp"] = "{}:{}".format(*self.udp_address)
            status["tcp"] = "{}:{}".format(*self.tcp_address)
        status["realm"] = self.config.realm
        status["relay_ip"] = self.config.relay_ip
        return status

    # -- to clients --------------------------------------------------------------------------

    def _deliver(self, client: ClientKey, data: bytes) -> None:
        transport, address = client
        if transport == "udp":
            if self._udp is None:
                return
            try:
                self._udp.write(data, address)
            except (OSError, MessageLengthError):
                self.counters["send-failed"] += 1
            return
        connection = self.connections.get(client)
        if connection is not None and connection.transport is not None:
            connection.transport.write(data)
