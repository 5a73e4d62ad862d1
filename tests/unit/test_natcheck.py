"""NAT discovery against our STUN servers behind in-memory NATs (tools.memnat), on a Clock."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock

from client.natcheck import NatReport, discover
from overlay.datagram import DatagramEndpoint
from overlay.stun import (
    CHANGE_REQUEST,
    OTHER_ADDRESS,
    RESPONSE_ORIGIN,
    XOR_MAPPED_ADDRESS,
    ChangeRequest,
    StunClass,
    StunMessage,
    is_stun,
)
from overlay.stun_client import StunClient
from tools.memnat import MemoryNAT
from tools.memnet import MemoryNetwork

# In-memory only: these addresses never reach a socket.
S1 = ("203.0.113.10", 3478)
S2 = ("198.51.100.20", 3478)
NAT_HOST = "203.0.113.99"
PRIVATE = ("198.18.0.5", 5000)


class Owner(DatagramProtocol):
    """The socket's owner: hands datagrams to the STUN client."""

    def __init__(self) -> None:
        self.client: StunClient | None = None

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        assert self.client is not None
        self.client.datagram_received(datagram, addr)


class Lab:
    def __init__(self, servers: tuple[tuple[str, int], ...] = (S1, S2)) -> None:
        self.clock = Clock()
        self.net = MemoryNetwork(self.clock, latency=0.01)
        for server in servers:
            self.net.attach(DatagramEndpoint(self.clock, stun_server=True), server)
        self.owner = Owner()
        self.client = StunClient(self.clock, lambda data, address: self.write(data, address))
        self.owner.client = self.client

    def write(self, data: bytes, address: tuple[str, int]) -> None:
        assert self.owner.transport is not None
        self.owner.transport.write(data, address)

    def public_host(self, address: tuple[str, int]) -> None:
        self.net.attach(self.owner, address)

    def behind(self, mapping: str, filtering: str = "address-and-port-dependent") -> MemoryNAT:
        nat = MemoryNAT(self.net, NAT_HOST, mapping=mapping, filtering=filtering)
        nat.attach(self.owner, PRIVATE)
        return nat

    def discover(self, local: tuple[str, int], servers: list[tuple[str, int]], **kw: Any) -> Any:
        out: list[Any] = []
        Deferred.fromCoroutine(discover(self.client, local, servers, **kw)).addBoth(out.append)
        assert self.net.counters["sent"] >= min(len(set(servers)), 1)  # all asked at once
        for _ in range(800):  # 4 s in 5 ms steps: past every timeout
            if out:
                break
            self.clock.advance(0.005)
        assert out, "discover did not finish"
        return out[0]


def test_a_public_host_is_seen_as_itself() -> None:
    lab = Lab()
    lab.public_host(("192.0.2.7", 6000))
    report = lab.discover(("192.0.2.7", 6000), [S1, S2])
    assert isinstance(report, NatReport)
    assert (report.udp_works, report.mapping, report.kind) == (True, "none", "public")
    assert report.reflexive == ("192.0.2.7", 6000) and report.filtering == "unknown"
    assert set(report.rtts) == {S1, S2}
    assert report.rtts[S1] == pytest.approx(0.02)


def test_a_cone_nat_maps_one_socket_to_one_public_address() -> None:
    lab = Lab()
    lab.behind("endpoint-independent")
    report = lab.discover(PRIVATE, [S1, S2])
    assert (report.mapping, report.kind) == ("endpoint-independent", "cone NAT")
    assert report.reflexive == (NAT_HOST, 40000)
    assert [p.mapped for p in report.probes] == [(NAT_HOST, 40000)] * 2


@pytest.mark.parametrize("mapping", ["address-dependent", "address-and-port-dependent"])
def test_a_symmetric_nat_maps_each_destination_differently(mapping: str) -> None:
    lab = Lab()
    nat = lab.behind(mapping)
    report = lab.discover(PRIVATE, [S1, S2])
    assert (report.mapping, report.kind) == ("address-dependent", "symmetric NAT")
    assert report.reflexive == (NAT_HOST, 40000)  # what the first server saw
    assert {p.mapped for p in report.probes} == {(NAT_HOST, 40000), (NAT_HOST, 40001)}
    assert nat.counters["mappings"] == 2


def test_one_answering_server_cannot_tell_the_mapping() -> None:
    lab = Lab(servers=(S1,))
    lab.behind("endpoint-independent")
    report = lab.discover(PRIVATE, [S1, S2, S1])  # S2 is silent; the duplicate asks once
    assert (report.udp_works, report.mapping, report.kind) == (
        True,
        "unknown",
        "NAT (type unknown)",
    )
    assert [p.server for p in report.probes] == [S1, S2]
    assert report.probes[1].error == "No STUN answer from 198.51.100.20:3478 within 3.1 s."
    assert set(report.rtts) == {S1}


def test_udp_blocked_when_nobody_answers() -> None:
    lab = Lab()
    lab.public_host(("192.0.2.7", 6000))
    lab.net.loss = 1.0
    report = lab.discover(("192.0.2.7", 6000), [S1, S2], timeout=1.0)
    assert (report.udp_works, report.reflexive, report.kind) == (False, None, "UDP blocked")
    assert report.mapping == "unknown" and report.rtts == {}
    assert report.to_json()["servers"][0] == {
        "address": "203.0.113.10:3478",
        "mapped": None,
        "rtt_ms": None,
        "error": "No STUN answer from 203.0.113.10:3478 within 1 s.",
    }


def test_an_unspecified_local_host_is_resolved_per_server() -> None:
    lab = Lab()
    lab.public_host(("192.0.2.7", 6000))
    asked: list[tuple[str, int]] = []

    def resolve(server: tuple[str, int]) -> str:
        asked.append(server)
        return "192.0.2.7"

    report = lab.discover(("0.0.0.0", 6000), [S1, S2], resolve=resolve)
    assert report.kind == "public" and asked


def test_the_report_as_json() -> None:
    lab = Lab()
    lab.behind("endpoint-independent")
    document = lab.discover(PRIVATE, [S1, ("2001:db8::1", 3478)]).to_json()
    assert document["schema_version"] == 1
    assert document["local"] == "198.18.0.5:5000" and document["reflexive"] == "203.0.113.99:40000"
    assert (document["kind"], document["mapping"]) == ("NAT (type unknown)", "unknown")
    assert document["servers"][0]["rtt_ms"] == 20.0
    assert document["servers"][1]["address"] == "[2001:db8::1]:3478"


# -- RFC 5780: a server with an alternate address ---------------------------------------------


class Rfc5780Server:
    """A STUN server on two hosts and two ports that honours CHANGE-REQUEST (test double; the
    real thing, coturn, is exercised in tests/integration/test_stun_interop.py)."""

    def __init__(self, net: MemoryNetwork, hosts: tuple[str, str], ports: tuple[int, int]) -> None:
        self.hosts, self.ports = hosts, ports
        self.sockets: dict[tuple[str, int], _Port] = {}
        for host in hosts:
            for port in ports:
                self.sockets[(host, port)] = _Port(self)
                net.attach(self.sockets[(host, port)], (host, port))

    def answer(self, at: tuple[str, int], data: bytes, source: tuple[str, int]) -> None:
        if not is_stun(data):
            return
        request = StunMessage.parse(data)
        if request.message_class is not StunClass.REQUEST:
            return
        change = request.get(CHANGE_REQUEST) or ChangeRequest()
        host = self.hosts[1 - self.hosts.index(at[0])] if change.change_ip else at[0]
        port = self.ports[1 - self.ports.index(at[1])] if change.change_port else at[1]
        reply = request.success(
            XOR_MAPPED_ADDRESS(source),
            RESPONSE_ORIGIN((host, port)),
            OTHER_ADDRESS((self.hosts[1], self.ports[1])),
        )
        transport = self.sockets[(host, port)].transport
        assert transport is not None
        transport.write(bytes(reply), source)


class _Port(DatagramProtocol):
    def __init__(self, server: Rfc5780Server) -> None:
        self.server = server

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        assert self.transport is not None
        host = self.transport.getHost()
        self.server.answer((host.host, host.port), datagram, (addr[0], addr[1]))


@pytest.mark.parametrize(
    "filtering", ["endpoint-independent", "address-dependent", "address-and-port-dependent"]
)
def test_rfc5780_tests_tell_the_filtering(filtering: str) -> None:
    lab = Lab(servers=())
    Rfc5780Server(lab.net, ("203.0.113.50", "203.0.113.51"), (3478, 3479))
    lab.behind("endpoint-independent", filtering)
    report = lab.discover(PRIVATE, [("203.0.113.50", 3478)])
    assert report.filtering == filtering
    # The alternate host saw the same mapping: endpoint-independent, from one server.
    assert (report.mapping, report.kind) == ("endpoint-independent", "cone NAT")
    assert report.alternate is not None and report.alternate.server == ("203.0.113.51", 3478)


def test_rfc5780_mapping_probe_finds_a_symmetric_nat_with_one_server() -> None:
    lab = Lab(servers=())
    Rfc5780Server(lab.net, ("203.0.113.50", "203.0.113.51"), (3478, 3479))
    lab.behind("address-dependent")
    report = lab.discover(PRIVATE, [("203.0.113.50", 3478)])
    assert (report.mapping, report.kind) == ("address-dependent", "symmetric NAT")
    assert report.filtering == "address-and-port-dependent"


# -- the NAT model itself -----------------------------------------------------------------------


class Inbox(DatagramProtocol):
    def __init__(self) -> None:
        self.got: list[tuple[bytes, tuple[str, int]]] = []

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.got.append((datagram, (addr[0], addr[1])))


def test_memnat_filters_forgets_idle_mappings_and_frees_them() -> None:
    clock = Clock()
    net = MemoryNetwork(clock)
    nat = MemoryNAT(net, NAT_HOST, filtering="address-dependent", lifetime=30.0)
    inside, peer, stranger = Inbox(), Inbox(), Inbox()
    transport = nat.attach(inside, PRIVATE)
    net.attach(peer, ("192.0.2.1", 1000))
    net.attach(stranger, ("192.0.2.2", 1000))
    transport.write(b"hi", ("192.0.2.1", 1000))
    clock.advance(0)
    assert peer.got == [(b"hi", (NAT_HOST, 40000))]
    net.send(("192.0.2.1", 2000), (NAT_HOST, 40000), b"same host, other port")
    net.send(("192.0.2.2", 1000), (NAT_HOST, 40000), b"stranger")
    clock.advance(0)
    assert inside.got == [(b"same host, other port", ("192.0.2.1", 2000))]
    assert nat.counters["filtered"] == 1
    clock.advance(31)
    net.send(("192.0.2.1", 1000), (NAT_HOST, 40000), b"too late")
    clock.advance(0)
    transport.write(b"again", ("192.0.2.1", 1000))
    clock.advance(0)
    assert nat.counters["expired"] == 1 and peer.got[-1] == (b"again", (NAT_HOST, 40001))
    transport.stopListening()
    assert not nat.mappings and (NAT_HOST, 40001) not in net.endpoints
    with pytest.raises(ValueError, match="unknown NAT behaviour"):
        MemoryNAT(net, NAT_HOST, mapping="cone")
