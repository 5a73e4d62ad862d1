"""The supernode role: slot index, searches, replication and pulls over the in-memory UDP
network, and attached nodes over an in-memory TCP connection, all on one Clock."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.test import iosim

from overlay.certificate import Role, issue
from overlay.connection import ClientConnection
from overlay.datagram import DatagramEndpoint
from overlay.errors import ProtocolError
from overlay.identity import IdentityKey
from overlay.keyspace import KEY_SPACE, Prefix, user_key
from overlay.login_protocol import proof_message, supernode_name
from overlay.messages import Error, Message, Ping, Pong
from overlay.overlay_protocol import (
    PING_PAD,
    SEARCH_PAD,
    Ack,
    Attach,
    Attached,
    Incoming,
    Publish,
    Published,
    Pull,
    ReachCheck,
    ReachOk,
    Records,
    Search,
    SearchFound,
    SearchNone,
    SearchReferral,
    Send,
    Sent,
    SnPing,
    Store,
    Stored,
)
from overlay.presence import (
    Attachment,
    PresenceRecord,
    SignedPresence,
    Status,
    sign,
)
from overlay.search import Found, NotFound, Referral, Reply, iterative_search
from overlay.slotmap import BLOCK_SLOTS, Slot, SlotMap, SupernodeInfo, moves
from overlay.supernode import (
    DELIVERY_TIMEOUT,
    RETIRE_AFTER,
    Supernode,
    SupernodeConnection,
    reach_ok,
)
from tools.memnet import MemoryNetwork

NOW = 1_700_000_000
HOUR = 3600
CA = IdentityKey.from_seed(bytes(range(32)))
OTHER_CA = IdentityKey.from_seed(bytes(range(1, 33)))
ASKER = ("10.9.0.1", 5000)  # in-memory only: these addresses never reach a socket
_USERS: dict[str, IdentityKey] = {}


def user(name: str) -> IdentityKey:
    if name not in _USERS:
        _USERS[name] = IdentityKey.from_seed(name.encode().ljust(32, b"."))
    return _USERS[name]


def user_certificate(name: str, ca: IdentityKey = CA, role: Role = Role.USER) -> bytes:
    key = user(name)
    return bytes(
        issue(ca, name, key.public_key, serial=1, now=NOW - 60, lifetime=24 * HOUR, role=role)
    )


def record_of(
    name: str,
    *,
    sequence: int = 1,
    ca: IdentityKey = CA,
    signer: IdentityKey | None = None,
    supernode: SupernodeInfo | None = None,
) -> SignedPresence:
    attachment = None
    if supernode is not None:
        attachment = Attachment(
            supernode.node_id, supernode.host, supernode.tcp_port, supernode.udp_port
        )
    presence = PresenceRecord(
        username=name,
        certificate=user_certificate(name, ca),
        supernode=attachment,
        reflexive=None,
        nat_type="unknown",
        status=Status.ONLINE,
        sequence=sequence,
        issued_at=NOW,
        expires_at=NOW + HOUR,
    )
    return sign(presence, signer or user(name))


def pump(clock: Clock, seconds: float, step: float = 0.005) -> None:
    """Advance in small steps so datagrams sent along the way are delivered too."""
    for _ in range(round(seconds / step)):
        clock.advance(step)


def results(d: Deferred[Any]) -> list[Any]:
    out: list[Any] = []
    d.addBoth(out.append)
    return out


def error_of(message: Any) -> Error:
    assert isinstance(message, Error), message
    return message


class Overlay:
    """``count`` admitted supernodes on one in-memory network, all holding the same map."""

    def __init__(self, count: int, *, seed: int = 0, anti_entropy_every: float = 30.0) -> None:
        self.anti_entropy_every = anti_entropy_every
        self.clock = Clock()
        self.clock.advance(NOW)
        self.net = MemoryNetwork(self.clock, latency=0.001)
        self.keys: dict[bytes, IdentityKey] = {}
        self.sns: dict[bytes, Supernode] = {}
        self._hosts = itertools.count(1)
        self._seed = seed
        infos = [self.new_info() for _ in range(count)]
        self.map = SlotMap.empty().with_supernodes(infos)
        self.apply(self.map)
        pump(self.clock, 0.5)
        assert all(sn.synced for sn in self.sns.values())
        self.client = DatagramEndpoint(self.clock)
        self.net.attach(self.client, ASKER)

    def new_info(self) -> SupernodeInfo:
        """A supernode with a Supernode instance on the network (not yet admitted)."""
        n = next(self._hosts)
        key = IdentityKey.from_seed((self._seed * 100_000 + n).to_bytes(32, "big"))
        info = SupernodeInfo(key.public_key, f"10.1.{n // 250}.{n % 250 + 1}", 7000, 7001)
        self.keys[key.public_key] = key
        sn = Supernode(
            self.clock,
            key,
            CA.public_key,
            rng=random.Random(n),
            anti_entropy_every=self.anti_entropy_every,
        )
        self.sns[key.public_key] = sn
        self.net.attach(sn.udp, (info.host, info.udp_port))
        return info

    def admit(self, slot_map: SlotMap, node_id: bytes) -> None:
        key = self.keys[node_id]
        cert = issue(CA, supernode_name(node_id), node_id, serial=1, now=NOW, role=Role.SUPERNODE)
        self.sns[node_id].admitted(bytes(cert), slot_map.view_for(node_id), slot_map.info(node_id))
        assert key.public_key == node_id

    def apply(self, slot_map: SlotMap) -> None:
        for node_id in self.sns:
            if node_id in slot_map:
                self.admit(slot_map, node_id)

    # -- who is where --------------------------------------------------------------------------

    def slot_of_name(self, name: str) -> int:
        return self.map.slot_index_for_key(user_key(name))

    def members(self, slot: int) -> list[Supernode]:
        return [self.sns[n] for n in self.map.slots[slot].members]

    def outside(self, slot: int, *, same_block: bool) -> list[Supernode]:
        block = slot // BLOCK_SLOTS
        return [
            self.sns[info.node_id]
            for info in self.map.supernodes
            if self.map.slot_of(info.node_id) != slot
            and (self.map.slot_of(info.node_id) // BLOCK_SLOTS == block) == same_block
        ]

    def name_in_slot(self, slot: int, *, skip: int = 0) -> str:
        found = (f"user{i}" for i in itertools.count() if self.slot_of_name(f"user{i}") == slot)
        return next(itertools.islice(found, skip, None))

    def store_everywhere(self, record: SignedPresence) -> None:
        for sn in self.members(self.slot_of_name(record.record.username)):
            assert sn.index.put(record)

    # -- asking over UDP -----------------------------------------------------------------------

    def ask(self, sn: Supernode | SupernodeInfo, build: Callable[[int], Message], pad: int) -> Any:
        info = sn if isinstance(sn, SupernodeInfo) else sn.info
        assert info is not None
        got = results(self.client.request((info.host, info.udp_port), build, pad_to=pad))
        pump(self.clock, 0.05)
        assert got, "no reply yet"
        return got[0]

    def search(self, sn: Supernode | SupernodeInfo, name: str) -> Any:
        return self.ask(sn, lambda rid: Search(rid, name), SEARCH_PAD)

    def ask_search(self, sn: SupernodeInfo, name: str) -> Deferred[Reply]:
        def adapt(reply: Message) -> Any:
            if isinstance(reply, SearchFound):
                return Found((reply.record,))
            if isinstance(reply, SearchReferral):
                return Referral(reply.contacts, reply.level)
            if isinstance(reply, SearchNone):
                return NotFound(reply.replicas)
            return reply

        asking = self.client.request(
            (sn.host, sn.udp_port), lambda rid: Search(rid, name), pad_to=SEARCH_PAD
        )
        return asking.addCallback(adapt)

    def verify(self, name: str) -> Callable[[bytes], PresenceRecord]:
        return lambda blob: SignedPresence.parse(blob).verify(
            CA.public_key, self.clock.seconds(), name
        )


@pytest.fixture(scope="module")
def hundred() -> Overlay:
    """100 supernodes: 10 slots of 10, in 2 blocks (8 + 2 slots).  Tests only read it."""
    return Overlay(100, seed=1)


# -- searching ---------------------------------------------------------------------------------


def test_the_slot_answers_the_block_refers_to_the_slot_others_refer_to_the_block() -> None:
    overlay = Overlay(100, seed=2)
    record = record_of("alice")
    slot = overlay.slot_of_name("alice")
    overlay.store_everywhere(record)
    slot_ids = set(overlay.map.slots[slot].members)
    for member in overlay.members(slot)[:3]:
        reply = overlay.search(member, "alice")
        assert isinstance(reply, SearchFound), reply
        assert reply.record == bytes(record)
    # Any case finds the same user.
    assert isinstance(overlay.search(overlay.members(slot)[0], "Alice"), SearchFound)
    for neighbour in overlay.outside(slot, same_block=True)[:3]:
        reply = overlay.search(neighbour, "alice")
        assert isinstance(reply, SearchReferral), reply
        assert reply.level == "slot"
        assert {c.node_id for c in reply.contacts} == slot_ids
    block = slot // BLOCK_SLOTS
    for stranger in overlay.outside(slot, same_block=False)[:3]:
        reply = overlay.search(stranger, "alice")
        assert isinstance(reply, SearchReferral), reply
        assert reply.level == "block"
        assert reply.contacts
        assert all(overlay.map.slot_of(c.node_id) // BLOCK_SLOTS == block for c in reply.contacts)
    # A member that holds no record says so.
    nobody = overlay.name_in_slot(slot)
    assert nobody != "alice"
    assert isinstance(overlay.search(overlay.members(slot)[0], nobody), SearchNone)


def test_a_search_for_an_invalid_username_is_an_error_naming_the_name(hundred: Overlay) -> None:
    error = error_of(hundred.search(next(iter(hundred.sns.values())), "no spaces"))
    assert (error.request, error.code) == ("search", "protocol-error")
    assert error.message.startswith(
        "Cannot search 'no spaces': 'no spaces' is not a valid username"
    )


def test_an_iterative_search_from_any_supernode_finds_the_record_in_three_rounds() -> None:
    overlay = Overlay(100, seed=3)
    record = record_of("bob")
    overlay.store_everywhere(record)
    slot = overlay.slot_of_name("bob")
    searches = {
        info.node_id: results(
            Deferred.fromCoroutine(
                iterative_search(
                    overlay.clock,
                    "bob",
                    [info],
                    overlay.ask_search,
                    overlay.verify("bob"),
                    lambda rec: "offline" if rec.status is Status.OFFLINE else "found",
                )
            )
        )
        for info in overlay.map.supernodes
    }
    pump(overlay.clock, 0.2)
    for node_id, got in searches.items():
        [result] = got
        assert result.outcome == "found", (result, overlay.map.slot_of(node_id))
        assert result.record == record.record
        assert result.bad_records == result.timeouts == result.errors == 0
        where = overlay.map.slot_of(node_id)
        assert where is not None
        if where == slot:
            assert result.rounds == 1
        elif where // BLOCK_SLOTS == slot // BLOCK_SLOTS:
            assert result.rounds == 2
        else:
            assert result.rounds in (2, 3)


# -- replication -------------------------------------------------------------------------------


@pytest.mark.parametrize("origin", ["another block", "the same block", "the slot itself"])
def test_replicate_stores_the_record_at_every_member_of_its_slot(origin: str) -> None:
    overlay = Overlay(100, seed=4)
    record = record_of("carol")
    slot = overlay.slot_of_name("carol")
    if origin == "the slot itself":
        sender = overlay.members(slot)[0]
    else:
        sender = overlay.outside(slot, same_block=origin == "the same block")[0]
    got = results(Deferred.fromCoroutine(sender.replicate(bytes(record), user_key("carol"))))
    pump(overlay.clock, 0.2)
    assert got == [10]
    holders = {n for n, sn in overlay.sns.items() if "carol" in sn.index}
    assert holders == set(overlay.map.slots[slot].members)
    # Replicating the same record again: every replica reports it holds it (no new copies).
    again = results(Deferred.fromCoroutine(sender.replicate(bytes(record), user_key("carol"))))
    pump(overlay.clock, 0.2)
    assert again == [10]
    assert {n for n, sn in overlay.sns.items() if "carol" in sn.index} == holders


def test_store_of_a_key_this_supernode_does_not_serve_is_refused() -> None:
    overlay = Overlay(20, seed=5)
    record = record_of("dave")
    slot = overlay.slot_of_name("dave")
    stranger = overlay.outside(slot, same_block=True)[0]
    error = error_of(overlay.ask(stranger, lambda rid: Store(rid, bytes(record)), 0))
    assert (error.request, error.code) == ("store", "not-served")
    assert error.message == "This supernode does not serve the key of dave."
    assert "dave" not in stranger.index
    member = overlay.members(slot)[0]
    reply = overlay.ask(member, lambda rid: Store(rid, bytes(record)), 0)
    assert reply == Stored(reply.rid, True)
    # The same record again is not news, but "accepted" says the member holds it.
    reply = overlay.ask(member, lambda rid: Store(rid, bytes(record)), 0)
    assert isinstance(reply, Stored) and reply.accepted is True
    assert member.index.stats.stale == 1


@pytest.mark.parametrize(
    ("forgery", "text"),
    [
        ("signed by another key", "The presence record of erin is not signed by erin's key."),
        (
            "certificate of another CA",
            "The certificate in the presence record of erin was not signed by our login server.",
        ),
    ],
)
def test_forged_records_are_refused_and_not_stored(forgery: str, text: str) -> None:
    overlay = Overlay(20, seed=6)
    if forgery == "signed by another key":
        record = record_of("erin", signer=IdentityKey.generate())
    else:
        record = record_of("erin", ca=OTHER_CA)
    member = overlay.members(overlay.slot_of_name("erin"))[0]
    error = error_of(overlay.ask(member, lambda rid: Store(rid, bytes(record)), 0))
    assert (error.request, error.code, error.message) == ("store", "bad-presence", text)
    assert "erin" not in member.index
    assert member.index.stats.bad == 1
    assert isinstance(overlay.search(member, "erin"), SearchNone)


# -- joining and moving ------------------------------------------------------------------------


def _late_joiner(overlay: Overlay, names: int) -> tuple[Supernode, SlotMap, list[SignedPresence]]:
    """A new SN in the map (not yet told); ``names`` records already stored in its slot."""
    info = overlay.new_info()
    new_map = overlay.map.with_supernode(info)
    slot = new_map.slot_of(info.node_id)
    assert slot is not None
    assert new_map.slots[slot].prefix == overlay.map.slots[slot].prefix
    records = [record_of(overlay.name_in_slot(slot, skip=i)) for i in range(names)]
    for record in records:
        overlay.store_everywhere(record)
    return overlay.sns[info.node_id], new_map, records


def test_a_late_joiner_refers_searches_to_its_peers_until_it_has_pulled_its_slot() -> None:
    overlay = Overlay(25, seed=7)
    joiner, new_map, records = _late_joiner(overlay, 3)
    peers = {n for n in new_map.slots[new_map.slot_of(joiner.node_id) or 0].members} - {
        joiner.node_id
    }
    assert joiner.info is None
    joiner_host = new_map.info(joiner.node_id).host
    for peer in peers:  # its pulls get lost for now
        overlay.net.link_loss[joiner_host, new_map.info(peer).host] = 1.0
    overlay.apply(new_map)
    overlay.map = new_map
    assert not joiner.synced
    # A name it has no record of: until it has pulled its slot, "none" would be a guess.
    slot = new_map.slot_of(joiner.node_id) or 0
    held = {r.record.username for r in records}
    name = next(n for i in range(50) if (n := overlay.name_in_slot(slot, skip=i)) not in held)
    assert joiner.info is not None
    got = results(
        overlay.client.request(
            (joiner.info.host, joiner.info.udp_port),
            lambda rid: Search(rid, name),
            pad_to=SEARCH_PAD,
        )
    )
    pump(overlay.clock, 0.01)
    [reply] = got
    assert isinstance(reply, SearchReferral), reply
    assert reply.level == "not-ready"
    assert {c.node_id for c in reply.contacts} == peers
    assert not joiner.synced
    overlay.net.link_loss.clear()
    pump(overlay.clock, 5.0)  # the pull is tried again
    assert joiner.synced
    assert sorted(joiner.index.export(0, 1 << 64)) == sorted(bytes(r) for r in records)
    for record in records:
        reply = overlay.search(joiner, record.record.username)
        assert isinstance(reply, SearchFound) and reply.record == bytes(record)
    # Now it knows, and names the other replicas (an asker should hear one of them too).
    none = overlay.search(joiner, name)
    assert isinstance(none, SearchNone)
    assert {c.node_id for c in none.replicas} == peers


def test_a_newer_view_during_the_pull_does_not_leave_the_joiner_unsynced() -> None:
    overlay = Overlay(25, seed=8)
    joiner, new_map, records = _late_joiner(overlay, 2)
    overlay.apply(new_map)
    # A heartbeat brings a newer view (another SN moved) before the pull is done.
    someone = next(i for i in new_map.supernodes if i.node_id != joiner.node_id)
    newer = new_map.with_updated_info(SupernodeInfo(someone.node_id, someone.host, 7100, 7001))
    joiner.set_view(newer.view_for(joiner.node_id))
    pump(overlay.clock, 1.0)
    assert joiner.synced
    assert len(joiner.index) == 2
    assert isinstance(overlay.search(joiner, records[0].record.username), SearchFound)


def test_a_supernode_moved_to_another_slot_drops_the_old_records_and_pulls_the_new() -> None:
    overlay = Overlay(20, seed=9)  # two slots of ten
    old_map = overlay.map
    first = record_of(overlay.name_in_slot(0))
    second = record_of(overlay.name_in_slot(1))
    overlay.store_everywhere(first)
    overlay.store_everywhere(second)
    new_map = old_map
    for gone in old_map.slots[0].members[:2]:
        new_map = new_map.without_supernode(gone)
    moved = [n for n, (a, b) in moves(old_map, new_map).items() if a is not None and b is not None]
    assert len(moved) == 1
    sn = overlay.sns[moved[0]]
    assert second.record.username in sn.index and first.record.username not in sn.index
    overlay.apply(new_map)
    pump(overlay.clock, 0.5)
    assert sn.synced
    assert first.record.username in sn.index
    # The old slot's records stay a while for peers to pull, then go.
    assert second.record.username in sn.index
    # ... but are never served to searches: the key is not ours any more.
    name = second.record.username
    assert isinstance(overlay.ask(sn, lambda rid: Search(rid, name), SEARCH_PAD), SearchReferral)
    pump(overlay.clock, RETIRE_AFTER + 1, step=1.0)
    assert second.record.username not in sn.index


def crafted(version: int, layout: dict[Prefix, list[SupernodeInfo]]) -> SlotMap:
    """A map with exactly this layout (the login server's rules would never make some)."""
    infos = sorted((i for group in layout.values() for i in group), key=lambda i: i.node_id)
    slots = [
        Slot(p, tuple(sorted(i.node_id for i in group)))
        for p, group in sorted(layout.items(), key=lambda item: item[0].start)
    ]
    return SlotMap(version, tuple(slots), tuple(infos))


def test_a_slot_over_a_range_none_of_its_members_held_pulls_it_from_the_former_holders() -> None:
    overlay = Overlay(30, seed=31)  # slots 00*, 01*, 1*: members a, b, c
    a, b, c = (list(overlay.map.members(i)) for i in range(3))
    records = [record_of(overlay.name_in_slot(i)) for i in range(3)]
    for record in records:
        overlay.store_everywhere(record)
    # c now serves 0*, which none of its members ever held; a and b serve 1*, ditto.
    new = crafted(overlay.map.version + 1, {Prefix(0, 1): c, Prefix(1, 1): a + b})
    overlay.apply(new)
    overlay.map = new
    pump(overlay.clock, 1.0)  # well before the old holders hand their records over
    assert all(sn.synced for sn in overlay.sns.values())
    for info in c:
        sn = overlay.sns[info.node_id]
        assert all(r.record.username in sn.index for r in records[:2])
        reply = overlay.search(sn, records[0].record.username)
        assert isinstance(reply, SearchFound) and reply.record == bytes(records[0])
    for info in a + b:
        assert records[2].record.username in overlay.sns[info.node_id].index


def test_a_copy_of_a_range_left_long_ago_is_not_taken_for_the_range() -> None:
    overlay = Overlay(10, seed=32)  # one slot: everybody holds everything
    a = list(overlay.map.supernodes)
    b = [overlay.new_info() for _ in range(10)]
    split = crafted(overlay.map.version + 1, {Prefix(0, 1): a, Prefix(1, 1): b})
    overlay.apply(split)
    pump(overlay.clock, 1.0)
    assert all(sn.synced for sn in overlay.sns.values())
    # A record of the half a left arrives after the split: only b holds it.
    late = record_of(next(n for i in range(200) if user_key(n := f"late{i}") >> 63 == 1))
    for info in b:
        assert overlay.sns[info.node_id].index.put(late)
    overlay.clock.advance(60)
    merged = crafted(split.version + 1, {Prefix.root(): a + b})
    overlay.apply(merged)
    pump(overlay.clock, 2.0)
    # a's members keep the key space they held before the split for pulls, but that copy
    # lacks the late record: it must not pass for the range b's members hold in full.
    assert all(sn.synced for sn in overlay.sns.values())
    assert all(late.record.username in overlay.sns[info.node_id].index for info in a)


def test_while_pulling_the_rest_a_replica_says_none_only_for_the_part_it_holds_whole() -> None:
    overlay = Overlay(20, seed=33)  # slots 0* (a) and 1* (b)
    a, b = (list(overlay.map.members(i)) for i in range(2))
    merged = crafted(overlay.map.version + 1, {Prefix.root(): a + b})
    sn = overlay.sns[a[0].node_id]
    for info in a[1:] + b:  # its pulls of 1* get lost for now
        overlay.net.link_loss[a[0].host, info.host] = 1.0
    overlay.apply(merged)
    pump(overlay.clock, 0.2)
    assert not sn.synced and sn.held == Prefix(0, 1)
    held_name = next(n for i in range(200) if user_key(n := f"nobody{i}") >> 63 == 0)
    other_name = next(n for i in range(200) if user_key(n := f"nobody{i}") >> 63 == 1)
    none = overlay.search(sn, held_name)
    assert isinstance(none, SearchNone)
    # A slot of 20 (for a while): ten of the others are named, so the reply fits.
    assert len(none.replicas) == 10
    assert {r.node_id for r in none.replicas} < {i.node_id for i in a + b} - {sn.node_id}
    not_ready = overlay.search(sn, other_name)
    assert isinstance(not_ready, SearchReferral) and not_ready.level == "not-ready"
    overlay.net.link_loss.clear()
    pump(overlay.clock, 5.0)
    assert sn.synced
    assert isinstance(overlay.search(sn, other_name), SearchNone)


def test_a_large_range_is_pulled_whole_several_requests_at_a_time() -> None:
    overlay = Overlay(25, seed=34)
    joiner, new_map, records = _late_joiner(overlay, 30)
    overlay.apply(new_map)
    pump(overlay.clock, 0.1)  # 30 records, one per reply: done in a few round trips
    assert joiner.synced
    assert sorted(joiner.index.export(0, KEY_SPACE)) == sorted(bytes(r) for r in records)


def test_a_peer_whose_pull_replies_do_not_move_on_is_not_followed() -> None:
    overlay = Overlay(20, seed=35)
    sn = overlay.members(0)[0]
    assert sn.view is not None
    looping = DatagramEndpoint(overlay.clock)
    blob = bytes(record_of(overlay.name_in_slot(0)))

    async def handler(message: Message, address: Any) -> Message:
        assert isinstance(message, Pull)
        return Records(message.rid, (blob,), message.cursor)  # "more at the same place"

    looping.handler = handler
    overlay.net.attach(looping, ("10.9.0.2", 7001))
    peer = SupernodeInfo(bytes(32), "10.9.0.2", 7000, 7001)
    got = results(Deferred.fromCoroutine(sn.sync.pull_from(sn.view, peer, sn.view.prefix)))
    pump(overlay.clock, 0.5)
    [failure] = got
    assert failure.check(ProtocolError)
    assert str(failure.value) == "The pull reply's cursor does not move on."


# -- the small UDP requests --------------------------------------------------------------------


def test_sn_ping_is_answered_with_pong_when_padded(hundred: Overlay) -> None:
    sn = next(iter(hundred.sns.values()))
    reply = hundred.ask(sn, SnPing, PING_PAD)
    assert isinstance(reply, Pong)
    assert NOW < reply.time <= hundred.clock.seconds()
    # Unpadded, the pong would be larger than the ping: never sent (no amplification).
    refused = sn.udp.counters["amplification-refused"]
    assert sn.info is not None
    got = results(hundred.client.request((sn.info.host, sn.info.udp_port), SnPing, timeout=0.5))
    pump(hundred.clock, 0.6)
    assert got[0].check(Exception) and "No answer from" in str(got[0].value)
    assert sn.udp.counters["amplification-refused"] == refused + 1


def test_reach_check_is_signed_by_the_node_key(hundred: Overlay) -> None:
    sn, other = list(hundred.sns.values())[:2]
    nonce = bytes(range(16))
    reply = hundred.ask(sn, lambda rid: ReachCheck(rid, nonce), 160)
    assert isinstance(reply, ReachOk)
    assert reply.nonce == nonce
    assert reach_ok(sn.node_id, nonce, reply.signature)
    assert not reach_ok(other.node_id, nonce, reply.signature)
    assert not reach_ok(sn.node_id, bytes(16), reply.signature)


def test_before_admission_only_ping_and_reach_check_are_served() -> None:
    clock = Clock()
    clock.advance(NOW)
    net = MemoryNetwork(clock, latency=0.001)
    sn = Supernode(clock, IdentityKey.generate(), CA.public_key)
    net.attach(sn.udp, ("10.1.0.1", 7001))
    client = DatagramEndpoint(clock)
    net.attach(client, ASKER)

    def ask(build: Callable[[int], Message], pad: int = SEARCH_PAD) -> Any:
        got = results(client.request(("10.1.0.1", 7001), build, pad_to=pad))
        pump(clock, 0.05)
        return got[0]

    for build, name in [
        (lambda rid: Search(rid, "alice"), "search"),
        (lambda rid: Store(rid, bytes(record_of("alice"))), "store"),
    ]:
        error = error_of(ask(build))
        assert (error.request, error.code, error.message) == (
            name,
            "error",
            "Not a supernode (yet).",
        )
    assert isinstance(ask(SnPing), Pong)
    assert isinstance(ask(lambda rid: ReachCheck(rid, bytes(16))), ReachOk)
    assert len(sn.index) == 0


def test_a_request_that_is_not_for_a_supernode_gets_an_error(hundred: Overlay) -> None:
    sn = next(iter(hundred.sns.values()))
    error = error_of(hundred.ask(sn, Ping, 200))
    assert (error.request, error.code, error.message) == (
        "ping",
        "protocol-error",
        "ping is not a supernode request.",
    )


def test_garbage_datagrams_are_counted_and_never_answered(hundred: Overlay) -> None:
    sn = next(iter(hundred.sns.values()))
    assert sn.info is not None
    target = (sn.info.host, sn.info.udp_port)
    before = sn.udp.counters["bad-datagrams"]
    sent = hundred.net.counters["sent"]
    junk = [
        b"",
        b"\x01",
        b"\x01\x00\x41\x00\x00\x00\x02\xa0",
        b"\xff" * 100,
        bytes(Search(1, "x"))[:-1],
    ]
    for data in junk:
        hundred.net.send(ASKER, target, data)
    pump(hundred.clock, 0.05)
    assert sn.udp.counters["bad-datagrams"] == before + len(junk)
    assert hundred.net.counters["sent"] == sent + len(junk)  # nothing came back


# -- attached nodes over TCP -------------------------------------------------------------------


class Node(ClientConnection):
    """An ordinary node's connection: records what the supernode pushes, acks if told to."""

    def __init__(self, clock: Clock, pinned: bytes, *, answer: bool = True) -> None:
        super().__init__(clock, pinned, 600.0, "the supernode")
        self.answer = answer
        self.pushed: list[Message] = []

    def on_request(self, message: Message) -> None:
        self.pushed.append(message)
        if self.answer:
            self.send(Ack(getattr(message, "rid", 0)))


class Link:
    """A node connected to a supernode over an in-memory TCP connection."""

    def __init__(self, overlay: Overlay, sn: Supernode, *, answer: bool = True, port: int = 40000):
        self.overlay = overlay
        self.sn = sn
        self.server = sn.factory().buildProtocol(IPv4Address("TCP", "198.51.100.7", port))
        assert isinstance(self.server, SupernodeConnection)
        self.node = Node(overlay.clock, sn.node_id, answer=answer)
        self.pump = iosim.connect(
            self.server,
            iosim.FakeTransport(self.server, True),
            self.node,
            iosim.FakeTransport(self.node, False),
            clock=overlay.clock,
        )
        assert self.node.session is not None, self.node.failure

    def settle(self, seconds: float = 0.2, *others: Link) -> None:
        for _ in range(round(seconds / 0.005)):
            for link in (self, *others):
                link.pump.flush()
            self.overlay.clock.advance(0.005)
        for link in (self, *others):
            link.pump.flush()

    def request(self, build: Callable[[int], Message], seconds: float = 0.2) -> Any:
        got = results(self.node.request(build))
        self.settle(seconds)
        assert got, "no reply"
        return got[0]

    def attach(
        self, name: str, *, certificate: bytes | None = None, proof_name: str | None = None
    ) -> Any:
        assert self.node.session is not None
        key = user(name)
        transcript = self.node.session.transcript
        proof = key.sign(proof_message(transcript, proof_name or name, key.public_key))
        cert = certificate if certificate is not None else user_certificate(name)
        return self.request(lambda rid: Attach(rid, cert, proof))


@pytest.fixture
def twenty() -> Overlay:
    return Overlay(20, seed=10)


def test_a_node_attaches_with_its_certificate_and_a_proof(twenty: Overlay) -> None:
    sn = twenty.members(0)[0]
    link = Link(twenty, sn)
    reply = link.attach("alice")
    assert isinstance(reply, Attached), reply
    assert 0 < len(reply.contacts) <= 10
    assert sn.node_id not in {c.node_id for c in reply.contacts}
    assert all(c.node_id in twenty.map for c in reply.contacts)
    assert sn.attached["alice"] is link.server
    assert isinstance(link.request(lambda rid: Ping(rid)), Pong)
    # Closing the connection detaches the node.
    link.node.close()
    link.settle(0.01)
    assert "alice" not in sn.attached


@pytest.mark.parametrize(
    ("case", "code", "text"),
    [
        ("proof for another name", "protocol-error", "The attach proof did not verify."),
        ("supernode certificate", "wrong-role", "The certificate is for a supernode, not a user."),
        ("another CA", "bad-signature", "The certificate was not signed by our login server."),
        ("garbage certificate", "bad-certificate", "The certificate is not valid CBOR."),
    ],
)
def test_a_bad_attach_is_refused(twenty: Overlay, case: str, code: str, text: str) -> None:
    sn = twenty.members(0)[0]
    link = Link(twenty, sn)
    if case == "proof for another name":
        reply = link.attach("alice", proof_name="mallory")
    elif case == "supernode certificate":
        reply = link.attach("alice", certificate=user_certificate("alice", role=Role.SUPERNODE))
    elif case == "another CA":
        reply = link.attach("alice", certificate=user_certificate("alice", OTHER_CA))
    else:
        reply = link.attach("alice", certificate=b"\xff\xff")
    error = error_of(reply)
    assert (error.request, error.code, error.message) == ("attach", code, text)
    assert "alice" not in sn.attached
    assert link.node.session is not None and not link.node.closed


def test_requests_before_attach_are_refused_as_not_attached(twenty: Overlay) -> None:
    link = Link(twenty, twenty.members(0)[0])
    for build, name in [
        (lambda rid: Publish(rid, bytes(record_of("alice"))), "publish"),
        (lambda rid: Send(rid, "bob", b"hi"), "send"),
    ]:
        error = error_of(link.request(build))
        assert (error.request, error.code, error.message) == (name, "not-attached", "Attach first.")
    assert not any("alice" in sn.index for sn in twenty.sns.values())


@pytest.mark.parametrize("where", ["in the key's slot", "in the other slot"])
def test_publishing_the_own_record_stores_it_at_every_replica(twenty: Overlay, where: str) -> None:
    slot = twenty.slot_of_name("alice")
    sn = twenty.members(slot)[0] if where == "in the key's slot" else twenty.members(1 - slot)[0]
    link = Link(twenty, sn)
    assert isinstance(link.attach("alice"), Attached)
    record = record_of("alice", supernode=sn.info)
    reply = link.request(lambda rid: Publish(rid, bytes(record)))
    assert isinstance(reply, Published), reply
    assert reply.replicas == 10
    holders = {n for n, s in twenty.sns.items() if "alice" in s.index}
    assert holders == set(twenty.map.slots[slot].members)


def test_publishing_someone_elses_record_is_refused(twenty: Overlay) -> None:
    link = Link(twenty, twenty.members(0)[0])
    assert isinstance(link.attach("alice"), Attached)
    error = error_of(link.request(lambda rid: Publish(rid, bytes(record_of("bob")))))
    assert (error.request, error.code, error.message) == (
        "publish",
        "bad-presence",
        "The presence record is for bob, not alice.",
    )
    assert not any("bob" in sn.index for sn in twenty.sns.values())


def test_a_second_attach_of_the_same_user_replaces_the_first(twenty: Overlay) -> None:
    sn = twenty.members(0)[0]
    first = Link(twenty, sn, port=40001)
    second = Link(twenty, sn, port=40002)
    assert isinstance(first.attach("alice"), Attached)
    assert isinstance(second.attach("alice"), Attached)
    first.settle(0.01, second)
    assert first.node.closed and first.server.closed
    assert sn.attached["alice"] is second.server
    got = results(Deferred.fromCoroutine(sn.deliver_local("alice", b"to the new one")))
    second.settle(0.05, first)
    assert got == [True]
    assert second.node.pushed == [Incoming(1, b"to the new one")]
    assert first.node.pushed == []


def test_deliver_local_pushes_incoming_and_waits_for_the_ack(twenty: Overlay) -> None:
    sn = twenty.members(0)[0]
    link = Link(twenty, sn)
    assert isinstance(link.attach("alice"), Attached)
    got = results(Deferred.fromCoroutine(sn.deliver_local("alice", b"envelope")))
    link.settle(0.05)
    assert got == [True]
    assert link.node.pushed == [Incoming(1, b"envelope")]
    # Nobody attached under that name: not delivered.
    got = results(Deferred.fromCoroutine(sn.deliver_local("zed", b"envelope")))
    assert got == [False]


def test_a_node_that_never_acks_is_not_delivered_to_after_the_timeout(twenty: Overlay) -> None:
    sn = twenty.members(0)[0]
    link = Link(twenty, sn, answer=False)
    assert isinstance(link.attach("alice"), Attached)
    got = results(Deferred.fromCoroutine(sn.deliver_local("alice", b"envelope")))
    link.settle(DELIVERY_TIMEOUT - 0.1)
    assert got == []
    link.settle(0.2)
    assert got == [False]
    assert len(link.node.pushed) == 1
    connection = sn.attached["alice"]
    assert connection._waiting == {}  # the timed-out wait is forgotten, not kept for ever


def test_send_to_a_user_on_the_same_supernode_is_delivered(twenty: Overlay) -> None:
    sn = twenty.members(0)[0]
    alice = Link(twenty, sn, port=40001)
    bob = Link(twenty, sn, port=40002)
    assert isinstance(alice.attach("alice"), Attached)
    assert isinstance(bob.attach("bob"), Attached)
    got = results(alice.node.request(lambda rid: Send(rid, "bob", b"hello bob")))
    alice.settle(0.05, bob)
    [reply] = got
    assert isinstance(reply, Sent), reply
    assert bob.node.pushed == [Incoming(1, b"hello bob")]
    # Usernames are case-insensitive: "Bob" is bob.
    got = results(alice.node.request(lambda rid: Send(rid, "Bob", b"hello again")))
    alice.settle(0.05, bob)
    assert isinstance(got[0], Sent), got
    assert bob.node.pushed[-1] == Incoming(2, b"hello again")


def test_send_to_an_attached_user_who_never_acks_fails_after_the_timeout(twenty: Overlay) -> None:
    sn = twenty.members(0)[0]
    alice = Link(twenty, sn, port=40001)
    bob = Link(twenty, sn, answer=False, port=40002)
    assert isinstance(alice.attach("alice"), Attached)
    assert isinstance(bob.attach("bob"), Attached)
    got = results(alice.node.request(lambda rid: Send(rid, "bob", b"hello bob")))
    alice.settle(DELIVERY_TIMEOUT + 0.1, bob)
    error = error_of(got[0])
    assert (error.request, error.code, error.message) == (
        "send",
        "not-delivered",
        "bob did not take the message.",
    )


def test_send_to_an_unknown_user_without_search_is_not_delivered(twenty: Overlay) -> None:
    sn = twenty.members(0)[0]
    alice = Link(twenty, sn)
    assert isinstance(alice.attach("alice"), Attached)
    error = error_of(alice.request(lambda rid: Send(rid, "carol", b"hi")))
    assert (error.request, error.code, error.message) == (
        "send",
        "not-delivered",
        "This supernode cannot search.",
    )
    sn.locate_user = lambda name: succeed(None)
    error = error_of(alice.request(lambda rid: Send(rid, "carol", b"hi")))
    assert error.message == "carol is offline."


def test_send_to_a_user_on_another_supernode_is_forwarded(twenty: Overlay) -> None:
    here, there = twenty.members(0)[0], twenty.members(1)[0]
    alice = Link(twenty, here, port=40001)
    bob = Link(twenty, there, port=40002)
    assert isinstance(alice.attach("alice"), Attached)
    assert isinstance(bob.attach("bob"), Attached)
    asked: list[str] = []

    def locate(name: str) -> Deferred[SupernodeInfo | None]:
        asked.append(name)
        return succeed(there.info)

    here.locate_user = locate
    got = results(alice.node.request(lambda rid: Send(rid, "bob", b"over the overlay")))
    alice.settle(0.1, bob)
    [reply] = got
    assert isinstance(reply, Sent), reply
    assert asked == ["bob"]
    assert bob.node.pushed == [Incoming(1, b"over the overlay")]
    # Once bob has gone, the forward comes back undelivered.
    bob.node.close()
    bob.settle(0.01)
    error = error_of(alice.request(lambda rid: Send(rid, "bob", b"again"), 0.1))
    assert error.message == "bob could not be reached through its supernode."
