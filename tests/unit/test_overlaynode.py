"""The ordinary node's checks of its supernode, and a supernode's TCP port under garbage."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock, LoopingCall
from twisted.internet.testing import StringTransport
from twisted.test import iosim

from client.overlaynode import OverlayNode, SupernodeLink
from overlay.certificate import Role, issue
from overlay.channel import HelloReply
from overlay.datagram import DatagramEndpoint
from overlay.errors import ProtocolError
from overlay.framing import Frame
from overlay.hostcache import HostCache
from overlay.identity import IdentityKey
from overlay.index import Lookup
from overlay.login_protocol import Contact, supernode_name
from overlay.messages import Error, decode
from overlay.presence import Status
from overlay.slotmap import SlotMap, SupernodeInfo
from overlay.supernode import NotDelivered, Supernode
from tools.memnet import MemoryNetwork

CA = IdentityKey.from_seed(bytes(range(32)))
NOW = 1_700_000_000.0


def link_to(sn_key: IdentityKey) -> SupernodeLink:
    clock = Clock()
    clock.advance(NOW)
    node = OverlayNode(clock, CA.public_key, HostCache(None, clock), DatagramEndpoint(clock))
    info = SupernodeInfo(sn_key.public_key, "127.0.0.1", 7100, 7101)
    return SupernodeLink(node, info)


def hello_reply(certificate: bytes | None) -> HelloReply:
    return HelloReply(b"\x00" * 32, b"\x00" * 64, NOW, certificate)


def test_a_supernode_without_a_supernode_certificate_is_refused() -> None:
    key = IdentityKey.generate()
    link = link_to(key)
    with pytest.raises(ProtocolError, match="showed no supernode certificate"):
        link.check_hello(hello_reply(None))
    user_cert = issue(CA, "mallory", key.public_key, serial=1, now=NOW)
    with pytest.raises(ProtocolError, match="is for a user, not a supernode"):
        link.check_hello(hello_reply(bytes(user_cert)))
    other_ca = IdentityKey.generate()
    forged = issue(
        other_ca,
        supernode_name(key.public_key),
        key.public_key,
        serial=1,
        now=NOW,
        role=Role.SUPERNODE,
    )
    with pytest.raises(ProtocolError, match="not signed by our login server"):
        link.check_hello(hello_reply(bytes(forged)))
    someone_else = IdentityKey.generate().public_key
    theirs = issue(
        CA, supernode_name(someone_else), someone_else, serial=1, now=NOW, role=Role.SUPERNODE
    )
    with pytest.raises(ProtocolError, match="certificate is for another key"):
        link.check_hello(hello_reply(bytes(theirs)))
    good = issue(
        CA, supernode_name(key.public_key), key.public_key, serial=1, now=NOW, role=Role.SUPERNODE
    )
    link.check_hello(hello_reply(bytes(good)))  # accepted


def test_garbage_on_a_supernodes_tcp_port_is_answered_and_that_connection_closed() -> None:
    clock = Clock()
    clock.advance(NOW)
    supernode = Supernode(clock, IdentityKey.generate(), CA.public_key)
    factory = supernode.factory()
    bad, good = factory.buildProtocol(None), factory.buildProtocol(None)
    bad_wire, good_wire = StringTransport(), StringTransport()
    bad.makeConnection(bad_wire)
    good.makeConnection(good_wire)
    bad.dataReceived(b"\x07garbage that is not a frame at all")
    reply = decode(Frame.parse(bad_wire.value(), 4096))
    assert isinstance(reply, Error) and reply.request == "frame"
    assert bad_wire.disconnecting
    assert supernode.counters["bad-frames"] == 1
    assert not good_wire.disconnecting  # the other connection goes on
    # A silent connection is closed after the handshake timeout, on the clock.
    clock.advance(11)
    assert good_wire.disconnecting


# -- attaching, keep-alive and re-attaching on an injected clock -------------------------------


class Net:
    """Supernodes and one node on an in-memory UDP network, TCP through iosim pumps."""

    def __init__(self, count: int) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.udp = MemoryNetwork(self.clock, latency=0.001)
        self.pumps: list[Any] = []
        self.down: set[bytes] = set()
        self.sns: dict[bytes, Supernode] = {}
        infos = []
        for n in range(count):
            key = IdentityKey.from_seed((1000 + n).to_bytes(32, "big"))
            info = SupernodeInfo(key.public_key, f"10.9.0.{n + 1}", 7100, 7101)
            sn = Supernode(self.clock, key, CA.public_key)
            self.udp.attach(sn.udp, (info.host, info.udp_port))
            self.sns[key.public_key] = sn
            infos.append(info)
        slot_map = SlotMap.empty().with_supernodes(infos)
        for info in infos:
            cert = issue(
                CA,
                supernode_name(info.node_id),
                info.node_id,
                serial=1,
                now=NOW,
                role=Role.SUPERNODE,
            )
            self.sns[info.node_id].admitted(bytes(cert), slot_map.view_for(info.node_id), info)
        self.infos = infos
        self.flusher = LoopingCall(self.flush)
        self.flusher.clock = self.clock
        self.flusher.start(0.001)

    def flush(self) -> None:
        for pump in list(self.pumps):
            pump.flush()

    def endpoint(self, reactor: Any, host: str, port: int, timeout: float) -> Any:
        net = self

        class Endpoint:
            def connect(self, factory: Any) -> Any:
                sn = next(s for s in net.sns.values() if s.info and s.info.host == host)
                if sn.node_id in net.down:
                    return fail(ConnectionRefusedError())
                client = factory.buildProtocol(None)
                server = sn.factory().buildProtocol(None)
                net.pumps.append(
                    iosim.connect(
                        server,
                        iosim.FakeTransport(server, True),
                        client,
                        iosim.FakeTransport(client, False),
                        greet=False,
                    )
                )
                return succeed(client)

        return Endpoint()

    def kill(self, node_id: bytes) -> None:
        sn = self.sns[node_id]
        self.down.add(node_id)
        self.udp.detach((sn.info.host, sn.info.udp_port))  # type: ignore[union-attr]
        for connection in list(sn.attached.values()):
            connection.transport.loseConnection()  # type: ignore[union-attr]

    def node(self, name: str, **options: Any) -> OverlayNode:
        udp = DatagramEndpoint(self.clock)
        self.udp.attach(udp, ("10.9.1.1", 5000))
        node = OverlayNode(
            self.clock,
            CA.public_key,
            HostCache(None, self.clock),
            udp,
            keepalive=15.0,
            silence_timeout=2.0,
            endpoint_factory=self.endpoint,
            **options,
        )
        identity = IdentityKey.generate()
        cert = issue(CA, name, identity.public_key, serial=1, now=NOW)
        node.start(
            identity,
            cert,
            tuple(Contact(i.host, i.tcp_port, i.udp_port, i.node_id) for i in self.infos),
        )
        return node

    def run(self, seconds: float, step: float = 0.005) -> None:
        for _ in range(round(seconds / step)):
            self.clock.advance(step)


def test_a_node_attaches_publishes_and_keeps_alive() -> None:
    net = Net(3)
    node = net.node("alice")
    net.run(0.5)
    assert node.status()["attached"] and node.replicas == 3
    attached_to = node.link.info.node_id  # type: ignore[union-attr]
    assert "alice" in net.sns[attached_to].attached
    attaches = net.sns[attached_to].counters["attached"]
    net.run(40.0, step=0.05)  # keep-alives every 15 s keep the same link open
    assert node.link is not None and node.link.info.node_id == attached_to
    assert net.sns[attached_to].counters["attached"] == attaches
    assert node.attachments == 1


def test_when_its_supernode_dies_the_node_attaches_to_the_next_at_once() -> None:
    net = Net(3)
    node = net.node("alice")
    net.run(0.5)
    first = node.link.info.node_id  # type: ignore[union-attr]
    net.kill(first)
    net.run(0.5)
    assert node.status()["attached"]
    assert node.link.info.node_id != first  # type: ignore[union-attr]
    assert node.attachments == 2


def test_with_every_supernode_gone_the_node_backs_off_and_never_spins() -> None:
    net = Net(2)
    node = net.node("alice")
    net.run(0.5)
    for node_id in list(net.sns):
        net.kill(node_id)
    net.run(30.0, step=0.05)
    assert not node.status()["attached"]
    # Backoff: 0.5 s doubling to 10 s (with jitter): a handful of tries in 30 s, not hundreds.
    pings = net.udp.counters["sent"]
    assert pings < 200
    assert node.last_error in ("No supernode answered.", "No supernode known yet.")


# -- presence records are republished before they expire ---------------------------------------

LIFETIME = 90  # seconds a record claims to be current; republished every 30 s


def held(net: Net, username: str) -> list[Lookup]:
    """What every supernode of the (single-slot) overlay answers about ``username``."""
    return [sn.index.get(username) for sn in net.sns.values()]


def sequences(net: Net, username: str) -> list[int]:
    records = [lookup.record for lookup in held(net, username)]
    assert all(r is not None for r in records)
    return [r.sequence for r in records if r is not None]


def run_checking_found(net: Net, username: str, seconds: float, step: float = 0.1) -> None:
    """Advance the clock, asserting at every step that every replica finds the user online."""
    for _ in range(round(seconds / step)):
        net.clock.advance(step)
        states = [lookup.state for lookup in held(net, username)]
        assert states == ["found"] * len(states), (net.clock.seconds() - NOW, states)


def test_the_record_is_republished_before_it_expires_and_never_lapses() -> None:
    net = Net(3)
    node = net.node("alice", record_lifetime=LIFETIME)
    net.run(0.5)
    assert node.replicas == 3
    before = sequences(net, "alice")
    for _ in range(5):  # 5 x 31 s: well past the 90 s a record lives without a refresh
        run_checking_found(net, "alice", LIFETIME / 3 + 1)
        after = sequences(net, "alice")
        assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)
        before = after
    record = held(net, "alice")[0].record
    assert record is not None and record.expires_at - record.issued_at == LIFETIME


def test_a_republish_the_supernode_refuses_is_retried_before_the_record_expires(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    net = Net(3)
    node = net.node("alice", record_lifetime=LIFETIME)
    net.run(0.5)
    sn = net.sns[node.link.info.node_id]  # type: ignore[union-attr]
    replicate = sn.replicate
    refusals = 0

    async def refuse_twice(record: bytes, key: int) -> int:
        nonlocal refusals
        if refusals < 2:  # e.g. the slot's peers did not answer in time
            refusals += 1
            raise NotDelivered("No supernode of the key's block answered.")
        return await replicate(record, key)

    monkeypatch.setattr(sn, "replicate", refuse_twice)
    before = sequences(net, "alice")
    run_checking_found(net, "alice", 2 * LIFETIME)
    assert refusals == 2
    assert node.link is not None and node.link.info.node_id == sn.node_id  # no needless move
    assert all(a > b for a, b in zip(sequences(net, "alice"), before, strict=True))


def test_republishing_stops_once_the_node_stops() -> None:
    net = Net(3)
    node = net.node("alice", record_lifetime=LIFETIME)
    net.run(0.5)
    Deferred.fromCoroutine(node.stop(publish_offline=False))
    net.run(0.5)
    last = sequences(net, "alice")
    accepted = [sn.index.stats.accepted for sn in net.sns.values()]
    net.run(3 * LIFETIME, step=0.1)
    assert sequences(net, "alice") == last
    assert [sn.index.stats.accepted for sn in net.sns.values()] == accepted
    # Nobody refreshed it: searches now say the user is offline (last seen at the last refresh).
    assert [lookup.state for lookup in held(net, "alice")] == ["offline"] * 3


def test_after_logging_out_the_offline_record_is_not_replaced_by_a_republish() -> None:
    net = Net(3)
    node = net.node("alice", record_lifetime=LIFETIME)
    net.run(0.5)
    net.run(LIFETIME / 3 - 0.1, step=0.1)  # stop just before a republish is due
    Deferred.fromCoroutine(node.stop())
    net.run(0.5)
    lookups = held(net, "alice")
    assert all(lu.record is not None and lu.record.status is Status.OFFLINE for lu in lookups)
    last = sequences(net, "alice")
    net.run(3 * LIFETIME, step=0.1)
    assert sequences(net, "alice") == last
    assert all(lu.record.status is Status.OFFLINE for lu in held(net, "alice"))  # type: ignore[union-attr]


def test_logging_out_right_after_a_republish_still_shows_offline() -> None:
    net = Net(3)
    node = net.node("alice", record_lifetime=LIFETIME)
    net.run(0.5)
    assert node.certificate is not None
    node.update_certificate(node.certificate)  # a renewed certificate is republished at once
    Deferred.fromCoroutine(node.stop())  # ... and the user logs out in the same millisecond
    net.run(0.5)
    assert [lookup.state for lookup in held(net, "alice")] == ["offline"] * 3


def test_a_migrating_node_publishes_at_its_new_supernode_before_it_lets_go(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    net = Net(3)
    node = net.node("alice")
    net.run(0.5)
    assert node.link is not None
    old = net.sns[node.link.info.node_id]
    at_detach: list[list[bytes | None]] = []
    detach = old.detach

    def recording_detach(username: str, connection: Any) -> None:
        # Where do searches send messages for alice at the moment the old supernode lets go?
        records = [lookup.record for lookup in held(net, "alice")]
        at_detach.append([r.supernode.node_id if r and r.supernode else None for r in records])
        detach(username, connection)

    monkeypatch.setattr(old, "detach", recording_detach)
    old.migrate_all(old.contacts_for_nodes())  # the supernode is leaving
    net.run(0.5)
    assert node.link is not None and node.link.info.node_id != old.node_id
    assert node.attachments == 2  # moved directly, never detached in between
    assert at_detach == [[node.link.info.node_id] * 3]
