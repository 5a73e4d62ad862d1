"""The login server's connect-back check of an applicant, over real sockets on 127.0.0.1."""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol

from login_server.reachability import NetworkProber
from overlay.datagram import DatagramEndpoint
from overlay.identity import IdentityKey
from overlay.supernode import Supernode

CA = IdentityKey.from_seed(bytes(range(32)))
LOOPBACK = "127.0.0.1"


class Tracking(Factory):
    """Wraps a factory; ``closed()`` waits until every connection it made has ended."""

    def __init__(self, inner: Factory) -> None:
        self.inner = inner
        self.lost: list[Deferred[None]] = []

    def buildProtocol(self, addr: Any) -> Any:
        protocol = self.inner.buildProtocol(addr)
        assert protocol is not None
        done: Deferred[None] = Deferred()
        self.lost.append(done)
        original = protocol.connectionLost

        def connection_lost(reason: Any = None) -> None:
            original(reason)
            done.callback(None)

        protocol.connectionLost = connection_lost  # type: ignore[method-assign]
        return protocol

    def closed(self) -> Deferred[Any]:
        return DeferredList(self.lost)


class Silent(DatagramProtocol):
    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.received = True


class Lab:
    """Opens ports on 127.0.0.1 and closes every one of them in ``stop``."""

    def __init__(self, timeout: float = 2.0) -> None:
        self.ports: list[Any] = []
        self.factories: list[Tracking] = []
        self.udp = DatagramEndpoint(reactor)
        self.udp_port = self.listen_udp(self.udp)
        self.prober = NetworkProber(reactor, self.udp, timeout=timeout)

    def listen_tcp(self, factory: Factory) -> int:
        tracking = Tracking(factory)
        self.factories.append(tracking)
        port = reactor.listenTCP(0, tracking, interface=LOOPBACK)  # type: ignore[attr-defined]
        self.ports.append(port)
        return int(port.getHost().port)

    def listen_udp(self, protocol: DatagramProtocol) -> int:
        port = reactor.listenUDP(0, protocol, interface=LOOPBACK)  # type: ignore[attr-defined]
        self.ports.append(port)
        return int(port.getHost().port)

    def supernode(self, key: IdentityKey | None = None) -> tuple[Supernode, int, int]:
        sn = Supernode(reactor, key or IdentityKey.generate(), CA.public_key)
        return sn, self.listen_tcp(sn.factory()), self.listen_udp(sn.udp)

    async def closed_port(self) -> int:
        """A TCP port number that nothing listens on (any more)."""
        port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface=LOOPBACK)  # type: ignore[attr-defined]
        number = int(port.getHost().port)
        await port.stopListening()
        return number

    async def stop(self) -> None:
        for port in self.ports:
            await port.stopListening()
        for factory in self.factories:
            await factory.closed()


@pytest_twisted.ensureDeferred
async def test_a_reachable_supernode_passes_both_checks() -> None:
    lab = Lab()
    try:
        sn, tcp, udp = lab.supernode()
        assert await lab.prober(LOOPBACK, tcp, udp, sn.node_id) is None
        assert sn.counters["reach-check"] == 1
        assert len(lab.factories[0].lost) == 1  # one TCP connection back
    finally:
        await lab.stop()


@pytest_twisted.ensureDeferred
async def test_a_closed_tcp_port_is_refused_before_any_udp_check() -> None:
    lab = Lab()
    try:
        sn, _, udp = lab.supernode()
        closed = await lab.closed_port()
        reason = await lab.prober(LOOPBACK, closed, udp, sn.node_id)
        assert reason == f"TCP port {closed}: connection refused"
        assert lab.udp.counters["requests"] == 0
        assert sn.counters["reach-check"] == 0
    finally:
        await lab.stop()


@pytest_twisted.ensureDeferred
async def test_a_tcp_server_with_another_key_is_not_the_applicant() -> None:
    lab = Lab()
    try:
        applicant = IdentityKey.generate()
        impostor, tcp, _ = lab.supernode()
        _, _, udp = lab.supernode(applicant)
        reason = await lab.prober(LOOPBACK, tcp, udp, applicant.public_key)
        assert reason == f"TCP port {tcp}: the handshake was not signed by the node's key"
        assert impostor.counters["reach-check"] == 0
    finally:
        await lab.stop()


@pytest_twisted.ensureDeferred
async def test_a_tcp_server_that_never_answers_the_handshake_times_out() -> None:
    lab = Lab(timeout=0.5)
    try:
        sn, _, udp = lab.supernode()
        mute = lab.listen_tcp(Factory.forProtocol(Protocol))
        reason = await lab.prober(LOOPBACK, mute, udp, sn.node_id)
        assert reason == f"TCP port {mute}: no answer"
    finally:
        await lab.stop()


@pytest_twisted.ensureDeferred
async def test_a_udp_port_nobody_answers_fails_after_the_timeout() -> None:
    lab = Lab(timeout=0.5)
    try:
        sn, tcp, _ = lab.supernode()
        silent = Silent()
        udp = lab.listen_udp(silent)
        reason = await lab.prober(LOOPBACK, tcp, udp, sn.node_id)
        assert reason == f"UDP port {udp}: no answer within 0.5 s"
        assert silent.received  # the check was sent; it just never came back
    finally:
        await lab.stop()


@pytest_twisted.ensureDeferred
async def test_a_udp_answer_signed_by_another_key_is_refused() -> None:
    lab = Lab()
    try:
        sn, tcp, _ = lab.supernode()
        other, _, udp = lab.supernode()
        reason = await lab.prober(LOOPBACK, tcp, udp, sn.node_id)
        assert reason == f"UDP port {udp}: the answer was not signed by the node's key"
        assert other.counters["reach-check"] == 1
    finally:
        await lab.stop()
