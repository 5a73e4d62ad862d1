"""An in-memory UDP network for tests and the simulator: latency, loss, no sockets.

Twisted's MemoryReactor has no UDP, so this gives ``DatagramProtocol`` instances a transport
whose ``write`` delivers to another protocol attached to the network, after ``latency`` seconds
of the injected clock, dropping a ``loss`` fraction (seeded, so runs repeat).  Addresses are
whatever (host, port) the test chooses; an address nobody holds swallows the datagram.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import DatagramProtocol

Address = tuple[str, int]


class MemoryUDPTransport:
    def __init__(self, network: MemoryNetwork, address: Address, protocol: DatagramProtocol):
        self.network = network
        self.address = address
        self.protocol = protocol
        self.connected = True

    def write(self, data: bytes, addr: Any = None) -> None:
        if self.connected and addr is not None:
            self.network.send(self.address, (addr[0], addr[1]), bytes(data))

    def getHost(self) -> Any:
        return _Host(*self.address)

    def stopListening(self) -> None:
        if self.connected:
            self.connected = False
            self._detach()
            self.protocol.doStop()  # type: ignore[no-untyped-call]

    def _detach(self) -> None:
        self.network.detach(self.address)

    loseConnection = stopListening


class _Host:
    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port


class MemoryNetwork:
    def __init__(
        self,
        clock: IReactorTime,
        *,
        latency: float = 0.0,
        loss: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.clock = clock
        self.latency = latency
        self.loss = loss
        self.rng = random.Random(seed)
        self.endpoints: dict[Address, MemoryUDPTransport] = {}
        self.counters: Counter[str] = Counter()
        #: Per-link overrides: (src host, dst host) -> loss fraction (1.0 = cut).
        self.link_loss: dict[tuple[str, str], float] = {}

    def attach(self, protocol: DatagramProtocol, address: Address) -> MemoryUDPTransport:
        if address in self.endpoints:
            raise OSError(f"address {address} in use")
        transport = MemoryUDPTransport(self, address, protocol)
        self.endpoints[address] = transport
        protocol.makeConnection(transport)  # type: ignore[arg-type]
        return transport

    def detach(self, address: Address) -> None:
        self.endpoints.pop(address, None)

    def send(self, source: Address, destination: Address, data: bytes) -> None:
        self.counters["sent"] += 1
        self.counters["bytes"] += len(data)
        loss = self.link_loss.get((source[0], destination[0]), self.loss)
        if loss and self.rng.random() < loss:
            self.counters["lost"] += 1
            return
        self.clock.callLater(self.latency, self._deliver, source, destination, data)

    def _deliver(self, source: Address, destination: Address, data: bytes) -> None:
        transport = self.endpoints.get(destination)
        if transport is None or not transport.connected:
            self.counters["undeliverable"] += 1
            return
        self.counters["delivered"] += 1
        transport.protocol.datagramReceived(data, source)
