"""A NAT for the in-memory UDP network (``tools.memnet``): RFC 4787 mapping and filtering.

Hosts behind a ``MemoryNAT`` get a private address; what they send leaves from the NAT's public
host on a mapped port, and what comes back to that port is filtered, then delivered to them:

    mapping    "endpoint-independent"        one public port per private socket (cone NATs)
               "address-dependent"           one per private socket and destination host
               "address-and-port-dependent"  one per destination host and port (symmetric)
    filtering  "endpoint-independent"        anyone may send to a mapped port (full cone)
               "address-dependent"           hosts the private socket sent to (restricted cone)
               "address-and-port-dependent"  host and port it sent to (port-restricted cone)

Mapped ports are allocated in order from ``first_port``.  With ``lifetime`` a mapping idle that
long (on the network's clock) is forgotten, as a real NAT forgets a quiet binding.  No hairpinning:
hosts behind one NAT reach each other only through a second NAT's public address.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from twisted.internet.protocol import DatagramProtocol

from tools.memnet import MemoryNetwork, MemoryUDPTransport

Address = tuple[str, int]
BEHAVIOURS = ("endpoint-independent", "address-dependent", "address-and-port-dependent")


class _Mapping(DatagramProtocol):
    """The public side of one mapping: receives from the network, filters, forwards inside."""

    def __init__(self, nat: MemoryNAT, private: Address, public: Address) -> None:
        self.nat = nat
        self.private = private
        self.public = public
        self.contacted: set[Address] = set()
        self.used = nat.network.clock.seconds()
        self.transport: MemoryUDPTransport | None = None  # type: ignore[assignment]

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.nat.inbound(self, datagram, (addr[0], addr[1]))


class NATedTransport(MemoryUDPTransport):
    """The transport of a host behind the NAT (what ``DatagramProtocol.transport`` is)."""

    def __init__(self, nat: MemoryNAT, address: Address, protocol: DatagramProtocol) -> None:
        super().__init__(nat.network, address, protocol)
        self.nat = nat

    def write(self, data: bytes, addr: Any = None) -> None:
        if self.connected and addr is not None:
            self.nat.outbound(self.address, (addr[0], addr[1]), bytes(data))

    def _detach(self) -> None:
        self.nat.detach(self.address)


class MemoryNAT:
    def __init__(
        self,
        network: MemoryNetwork,
        public_host: str,
        *,
        mapping: str = "endpoint-independent",
        filtering: str = "address-and-port-dependent",
        first_port: int = 40000,
        lifetime: float | None = None,
    ) -> None:
        if mapping not in BEHAVIOURS or filtering not in BEHAVIOURS:
            raise ValueError(f"unknown NAT behaviour {mapping!r}/{filtering!r}")
        self.network = network
        self.public_host = public_host
        self.mapping = mapping
        self.filtering = filtering
        self.next_port = first_port
        self.lifetime = lifetime
        self.inside: dict[Address, NATedTransport] = {}
        self.mappings: dict[tuple[Any, ...], _Mapping] = {}
        self.counters: Counter[str] = Counter()

    def attach(self, protocol: DatagramProtocol, private: Address) -> NATedTransport:
        if private in self.inside:
            raise OSError(f"address {private} in use")
        transport = NATedTransport(self, private, protocol)
        self.inside[private] = transport
        protocol.makeConnection(transport)  # type: ignore[arg-type]
        return transport

    def detach(self, private: Address) -> None:
        self.inside.pop(private, None)
        for key, mapping in list(self.mappings.items()):
            if mapping.private == private:
                self._forget(key, mapping)

    def _key(self, private: Address, destination: Address) -> tuple[Any, ...]:
        if self.mapping == "endpoint-independent":
            return (private,)
        if self.mapping == "address-dependent":
            return (private, destination[0])
        return (private, destination)

    def _forget(self, key: tuple[Any, ...], mapping: _Mapping) -> None:
        self.mappings.pop(key, None)
        if mapping.transport is not None:
            mapping.transport.stopListening()

    def _expired(self, mapping: _Mapping) -> bool:
        now = self.network.clock.seconds()
        return self.lifetime is not None and now - mapping.used > self.lifetime

    def outbound(self, private: Address, destination: Address, data: bytes) -> None:
        key = self._key(private, destination)
        mapping = self.mappings.get(key)
        if mapping is not None and self._expired(mapping):
            self._forget(key, mapping)
            mapping = None
        if mapping is None:
            public = (self.public_host, self.next_port)
            self.next_port += 1
            mapping = _Mapping(self, private, public)
            self.network.attach(mapping, public)
            self.mappings[key] = mapping
            self.counters["mappings"] += 1
        mapping.contacted.add(destination)
        mapping.used = self.network.clock.seconds()
        self.network.send(mapping.public, destination, data)

    def inbound(self, mapping: _Mapping, data: bytes, source: Address) -> None:
        if self._expired(mapping):
            self.counters["expired"] += 1
            return
        allowed = (
            self.filtering == "endpoint-independent"
            or (
                self.filtering == "address-dependent"
                and any(host == source[0] for host, _ in mapping.contacted)
            )
            or source in mapping.contacted
        )
        inside = self.inside.get(mapping.private)
        if not allowed or inside is None:
            self.counters["filtered"] += 1
            return
        mapping.used = self.network.clock.seconds()
        self.counters["delivered"] += 1
        inside.protocol.datagramReceived(data, source)
