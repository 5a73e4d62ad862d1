"""The key space, the slot map (splits, merges, rebalancing, signing) and routing views."""

from __future__ import annotations

import contextlib
import hashlib
import math
import random
from collections import Counter
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from overlay.errors import ProtocolError
from overlay.identity import IdentityKey
from overlay.keyspace import KEY_BITS, KEY_SPACE, Prefix, user_key
from overlay.slotmap import (
    BLOCK_SLOTS,
    Refer,
    RoutingView,
    RoutingViewError,
    Serve,
    SignedRoutingView,
    SignedSlotMap,
    SlotMap,
    SlotMapError,
    SlotMapSignatureError,
    SupernodeInfo,
    moves,
)
from overlay.usernames import InvalidUsername

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CA = IdentityKey.from_seed(b"\x01" * 32)
OTHER_CA = IdentityKey.from_seed(b"\x02" * 32)
keys = st.integers(0, KEY_SPACE - 1)


def sn(n: int) -> SupernodeInfo:
    return SupernodeInfo(
        node_id=hashlib.sha256(n.to_bytes(8, "big")).digest(),
        host=f"198.51.100.{n % 250 + 1}",
        tcp_port=7000 + n % 1000,
        udp_port=9000,
    )


def build(count: int, first: int = 0) -> SlotMap:
    return SlotMap.empty().with_supernodes(sn(i) for i in range(first, first + count))


_MAPS: dict[int, SlotMap] = {}


def cached(count: int) -> SlotMap:
    if count not in _MAPS:
        _MAPS[count] = build(count)
    return _MAPS[count]


# -- key space ---------------------------------------------------------------------------------


def test_user_key_follows_the_design_and_ignores_case() -> None:
    expected = hashlib.blake2b(b"voip-user-key-v1" + b"alice", digest_size=8).digest()
    assert user_key("alice") == int.from_bytes(expected, "big")
    assert user_key("Alice") == user_key("ALICE") == user_key("alice")
    assert user_key("alice") != user_key("alicf")


def test_user_key_refuses_an_invalid_username() -> None:
    with pytest.raises(InvalidUsername, match="'a b' is not a valid username"):
        user_key("a b")


def test_user_keys_spread_over_the_key_space() -> None:
    values = [user_key(f"user{i}") for i in range(4096)]
    assert len(set(values)) == len(values)
    buckets = Counter(v >> (KEY_BITS - 4) for v in values)  # 16 buckets of 256 expected
    assert len(buckets) == 16
    assert min(buckets.values()) > 180
    assert max(buckets.values()) < 340


prefixes = st.integers(0, KEY_BITS).flatmap(
    lambda length: st.builds(Prefix, st.integers(0, (1 << length) - 1), st.just(length))
)


@FAST
@given(prefixes, keys)
def test_prefix_children_split_the_range_and_parent_undoes_it(prefix: Prefix, key: int) -> None:
    assert prefix.end - prefix.start == 1 << (KEY_BITS - prefix.length)
    assert prefix.contains(key) == (prefix.start <= key < prefix.end)
    if prefix.length < KEY_BITS:
        left, right = prefix.children()
        assert (left.start, left.end, right.start, right.end) == (
            prefix.start,
            right.start,
            left.end,
            prefix.end,
        )
        assert left.parent() == right.parent() == prefix
        assert left.sibling() == right and right.sibling() == left
        assert prefix.covers(left) and prefix.covers(right) and not left.covers(prefix)
        assert prefix.contains(key) == (left.contains(key) or right.contains(key))
        assert not (left.contains(key) and right.contains(key))
    if prefix.length > 0:
        assert prefix.parent().covers(prefix)
        assert not prefix.covers(prefix.sibling())


def test_prefix_programming_errors_raise_value_error() -> None:
    assert (Prefix.root().start, Prefix.root().end) == (0, KEY_SPACE)
    with pytest.raises(ValueError, match="must fit in its length"):
        Prefix(2, 1)
    with pytest.raises(ValueError, match="length must be in"):
        Prefix(0, KEY_BITS + 1)
    with pytest.raises(ValueError, match="root prefix has no parent"):
        Prefix.root().parent()
    with pytest.raises(ValueError, match="root prefix has no sibling"):
        Prefix.root().sibling()
    with pytest.raises(ValueError, match="no children"):
        Prefix(5, KEY_BITS).children()
    with pytest.raises(ValueError, match="a key must be an int"):
        Prefix.root().contains(KEY_SPACE)
    with pytest.raises(ValueError, match="a key must be an int"):
        Prefix.root().contains(-1)


# -- the map's rules ---------------------------------------------------------------------------


def check_invariants(m: SlotMap) -> None:
    count = m.supernode_count
    expected = 0
    for slot in m.slots:
        assert slot.prefix.start == expected  # no gap, no overlap
        expected = slot.prefix.end
    assert expected == KEY_SPACE
    placed = Counter(node for slot in m.slots for node in slot.members)
    assert set(placed) == {info.node_id for info in m.supernodes}
    assert set(placed.values()) <= {1}
    assert len(m) == max(1, math.ceil(count / 10))
    sizes = [len(slot.members) for slot in m.slots]
    assert max(sizes) <= 10
    assert max(sizes) - min(sizes) <= 1
    if count >= 90:
        assert set(sizes) <= {9, 10}
    assert m.block_count == math.ceil(len(m) / BLOCK_SLOTS)
    # Splitting the widest slot and merging the deepest pair keep slot ranges within a factor 2.
    lengths = [slot.prefix.length for slot in m.slots]
    assert max(lengths) - min(lengths) <= 1
    for index, slot in enumerate(m.slots):
        assert m.slot_index_for_key(slot.prefix.start) == index
        assert m.slot_index_for_key(slot.prefix.end - 1) == index
        assert m.block_of_slot(index) == index // BLOCK_SLOTS
        for info in m.members(index):
            assert m.slot_of(info.node_id) == index
            assert m.prefix_of(info.node_id) == slot.prefix


ops = st.lists(
    st.tuples(st.sampled_from(["add", "add", "remove"]), st.integers(0, 10**6)), max_size=80
)


def apply(m: SlotMap, op: str, number: int, fresh: list[int]) -> SlotMap:
    if op == "add" or m.supernode_count == 0:
        fresh[0] += 1
        return m.with_supernode(sn(fresh[0]))
    victim = m.supernodes[number % m.supernode_count].node_id
    return m.without_supernode(victim)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 300), ops)
def test_any_sequence_of_joins_and_leaves_keeps_the_invariants(start: int, steps: Any) -> None:
    runs = []
    for _ in range(2):
        m = build(start)
        assert m.version == start
        fresh = [10_000]
        check_invariants(m)
        history = [bytes(m)]
        for op, number in steps:
            new = apply(m, op, number, fresh)
            assert new.version == m.version + 1
            check_invariants(new)
            m = new
            history.append(bytes(m))
        runs.append(history)
    assert runs[0] == runs[1]  # the same changes give byte-identical maps


def test_batch_join_equals_joining_one_by_one() -> None:
    one_by_one = SlotMap.empty()
    for i in range(57):
        one_by_one = one_by_one.with_supernode(sn(i))
    assert one_by_one == build(57)
    assert bytes(one_by_one) == bytes(build(57))
    assert one_by_one.version == 57


def test_growing_to_300_and_shrinking_to_nothing() -> None:
    m = SlotMap.empty()
    assert len(m) == 1 and m.slots[0].prefix == Prefix.root() and m.slot_index_for_key(7) == 0
    for i in range(300):
        m = m.with_supernode(sn(i))
        check_invariants(m)
    assert len(m) == 30
    order = random.Random(4).sample(range(300), 300)
    for i in order:
        m = m.without_supernode(sn(i).node_id)
        check_invariants(m)
    assert m.supernode_count == 0 and len(m) == 1 and m.version == 600


@pytest.mark.parametrize("count", [23, 93, 95, 155])
def test_a_new_supernode_joins_the_smallest_slot_and_nothing_else_moves(count: int) -> None:
    m = build(count)  # no slot is full: the join needs no split and no rebalancing
    smallest = min(range(len(m)), key=lambda i: len(m.slots[i].members))
    for newcomer in range(5000, 5008):
        new = m.with_supernode(sn(newcomer))
        assert new.slot_of(sn(newcomer).node_id) == smallest
        assert [s for i, s in enumerate(new.slots) if i != smallest] == [
            s for i, s in enumerate(m.slots) if i != smallest
        ]


def test_splits_take_the_widest_slot_and_merges_the_deepest_pair() -> None:
    def shape(m: SlotMap) -> list[str]:
        return [str(slot.prefix) for slot in m.slots]

    m = build(41)
    assert shape(build(10)) == ["*"]
    assert shape(build(11)) == ["0*", "1*"]
    assert shape(build(21)) == ["00*", "01*", "1*"]
    assert shape(m) == ["000*", "001*", "01*", "10*", "11*"]
    for i in range(11):
        m = m.without_supernode(sn(i).node_id)
    assert shape(m) == ["0*", "10*", "11*"]  # 41 -> 40 merged 000+001, 31 -> 30 merged 00+01


def test_change_errors_are_programming_errors() -> None:
    m = build(5)
    with pytest.raises(ValueError, match="already in the map"):
        m.with_supernode(sn(3))
    with pytest.raises(ValueError, match="unknown supernode"):
        m.without_supernode(sn(77).node_id)
    with pytest.raises(ValueError, match="unknown supernode"):
        m.with_updated_info(sn(77))
    with pytest.raises(ValueError, match="unknown supernode"):
        m.view_for(sn(77).node_id)


def test_updated_info_changes_the_address_only() -> None:
    m = build(30)
    moved = SupernodeInfo(sn(4).node_id, "203.0.113.7", 7100, 9100)
    new = m.with_updated_info(moved)
    assert new.version == m.version + 1
    assert new.info(moved.node_id) == moved and m.info(moved.node_id) == sn(4)
    assert new.slots == m.slots
    assert moves(m, new) == {}
    assert moved in new.members(new.slot_of(moved.node_id))  # type: ignore[arg-type]


def test_supernode_info_checks_its_fields() -> None:
    good = sn(1).to_map()
    assert SupernodeInfo.from_map(good) == sn(1)
    for change, message in [
        ({"node_id": b"short"}, "A supernode id must be 32 bytes."),
        ({"host": ""}, "A supernode host must be 1-253 characters."),
        ({"tcp_port": 0}, "A supernode port must be in 1-65535."),
        ({"udp_port": 65536}, "A supernode port must be in 1-65535."),
    ]:
        # Inside a message, a bad entry is a protocol error, never a crash.
        with pytest.raises(ProtocolError, match=message):
            SupernodeInfo.from_map({**good, **change})


# -- moves -------------------------------------------------------------------------------------


@SLOW
@given(st.integers(1, 200), ops.filter(bool))
def test_moves_names_exactly_the_supernodes_that_must_pull(start: int, steps: Any) -> None:
    m = build(start)
    fresh = [10_000]
    for op, number in steps[:5]:
        new = apply(m, op, number, fresh)
        reported = moves(m, new)
        for node_id in m._info.keys() | new._info.keys():
            before, after = m.prefix_of(node_id), new.prefix_of(node_id)
            if node_id not in new:
                assert reported[node_id] == (before, None)
            elif node_id not in m:
                assert reported[node_id] == (None, after)
            elif before == after:
                assert node_id not in reported  # unchanged slot: nothing to do
            else:
                assert before is not None and after is not None
                # keys of the new slot that the SN did not hold before?
                missing = not (before.start <= after.start and after.end <= before.end)
                assert (node_id in reported) == missing
                if missing:
                    assert reported[node_id] == (before, after)
        m = new


@pytest.mark.parametrize("first", [0, 1000, 5000])
def test_a_join_to_100_supernodes_moves_only_a_few(first: int) -> None:
    m = build(100, first)
    new = m.with_supernode(sn(99_999))
    assert len(new) == 11  # a slot split
    changed = moves(m, new)
    assert changed[sn(99_999).node_id] == (None, new.prefix_of(sn(99_999).node_id))
    assert len(changed) <= 12


def test_a_join_without_a_split_moves_only_the_newcomer() -> None:
    m = build(95)
    new = m.with_supernode(sn(99_999))
    assert list(moves(m, new)) == [sn(99_999).node_id]


def test_a_leave_reports_the_leaver() -> None:
    m = build(95)
    new = m.without_supernode(sn(3).node_id)
    assert moves(m, new)[sn(3).node_id] == (m.prefix_of(sn(3).node_id), None)


# -- encoding and signatures -------------------------------------------------------------------


@SLOW
@given(st.integers(0, 60), ops)
def test_map_encoding_round_trips(start: int, steps: Any) -> None:
    m = build(start)
    fresh = [10_000]
    for op, number in steps[:10]:
        m = apply(m, op, number, fresh)
    data = bytes(m)
    assert SlotMap.parse(data) == m
    assert bytes(SlotMap.parse(data)) == data
    signed = m.sign(CA)
    assert SignedSlotMap.parse(bytes(signed)).verify(CA.public_key) == m


@FAST
@given(st.binary(max_size=300))
def test_parsing_random_bytes_raises_only_slot_map_errors(data: bytes) -> None:
    for parse in (SlotMap.parse, SignedSlotMap.parse, RoutingView.parse, SignedRoutingView.parse):
        with contextlib.suppress(SlotMapError):
            parse(data)


@FAST
@given(st.data())
def test_parsing_mutated_encodings_raises_only_slot_map_errors(data: st.DataObject) -> None:
    m = cached(25)
    view = m.view_for(m.supernodes[0].node_id)
    for original, parse in [
        (bytes(m), SlotMap.parse),
        (bytes(view), RoutingView.parse),
        (bytes(m.sign(CA)), SignedSlotMap.parse),
        (bytes(view.sign(CA)), SignedRoutingView.parse),
    ]:
        buffer = bytearray(original)
        for _ in range(data.draw(st.integers(1, 3))):
            kind = data.draw(st.sampled_from(["flip", "cut", "insert"]))
            at = data.draw(st.integers(0, len(buffer) - 1))
            if kind == "flip":
                buffer[at] ^= data.draw(st.integers(1, 255))
            elif kind == "cut":
                del buffer[at:]
                if not buffer:
                    buffer.append(0)
            else:
                buffer[at:at] = data.draw(st.binary(min_size=1, max_size=4))
        try:
            parsed: Any = parse(bytes(buffer))
        except SlotMapError:
            continue
        assert bytes(parsed) == bytes(buffer)  # whatever is accepted is canonical


def test_a_forged_map_is_refused() -> None:
    m = build(30)
    forged = m.sign(OTHER_CA)
    with pytest.raises(SlotMapSignatureError, match=r"^The slot map was not signed by our login"):
        SignedSlotMap.parse(bytes(forged)).verify(CA.public_key)
    # A map changed after signing (a supernode moved to another slot) is refused too.
    tampered = bytes(m.with_supernode(sn(500)))
    with pytest.raises(SlotMapSignatureError, match="not signed by our login server"):
        SignedSlotMap(tampered, m.sign(CA).signature).verify(CA.public_key)


def encoded(document: Any) -> bytes:
    return bytes(cbor2.dumps(document, canonical=True))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d[2][1].__setitem__(0, d[2][1][0] ^ 1), "The slot map has overlapping slots."),
        (lambda d: d[2].pop(1), "The slot map leaves a gap in the key space."),
        (lambda d: d[2].pop(), "The slot map leaves a gap in the key space."),
        (lambda d: d[2].__setitem__(0, [0, 0, []]), "The slot map has overlapping slots."),
        (
            lambda d: d[2][0].__setitem__(2, sorted([*d[2][0][2], d[2][1][2][0]])),
            "The slot map puts a supernode in two slots.",
        ),
        (lambda d: d[2][0][2].append(b"\xff" * 32), "puts an unknown supernode in a slot."),
        (lambda d: d[2][0][2].pop(), "The slot map lists a supernode that is in no slot."),
        (lambda d: d[2][0][2].reverse(), "a slot whose members are not sorted."),
        (lambda d: d[3].reverse(), "supernode table is not sorted or has duplicates."),
        (lambda d: d[3][0].__setitem__(2, 0), "bad supernode entry: A supernode port must be"),
        (lambda d: d[3].append("x"), "The slot map has a malformed supernode entry."),
        (lambda d: d[2][0].__setitem__(1, 65), "The slot map has a bad slot prefix."),
        (lambda d: d[2].clear(), "The slot map has no slots."),
        (lambda d: d.__setitem__(0, 2), "The slot map has an unknown format version."),
        (lambda d: d.__setitem__(1, -1), "The slot map version is not a valid number."),
        (lambda d: d.pop(), "is not a \\[format, version, slots, table\\] array."),
    ],
)
def test_a_map_that_breaks_the_rules_is_refused(mutate: Any, message: str) -> None:
    document = cbor2.loads(bytes(cached(25)))
    mutate(document)
    with pytest.raises(SlotMapError, match=message):
        SlotMap.parse(encoded(document))


def test_non_canonical_map_encodings_are_refused() -> None:
    data = bytes(cached(25))
    with pytest.raises(SlotMapError, match=r"^The slot map is not canonically encoded\.$"):
        SlotMap.parse(data + b"\x00")
    # The version 25 written as a 2-byte integer instead of 1.
    assert data[:3] == bytes([0x84, 0x01, 0x18])
    longer = data[:2] + b"\x19\x00" + data[3:]
    with pytest.raises(SlotMapError, match="not canonically encoded"):
        SlotMap.parse(longer)
    with pytest.raises(SlotMapError, match=r"^The slot map is not valid CBOR\.$"):
        SlotMap.parse(b"\xff\xff")
    with pytest.raises(SlotMapError, match=r"^The signed slot map is not a"):
        SignedSlotMap.parse(data)


# -- routing views -----------------------------------------------------------------------------


def views_of(m: SlotMap) -> dict[bytes, RoutingView]:
    return {info.node_id: m.view_for(info.node_id) for info in m.supernodes}


def referrals_needed(views: dict[bytes, RoutingView], m: SlotMap, key: int) -> dict[bytes, int]:
    """For every SN: the most referrals a search starting there can meet (any contact followed)."""
    depth: dict[bytes, int] = {}
    owner = m.slot_index_for_key(key)

    def walk(node_id: bytes, budget: int) -> int:
        if node_id in depth:
            return depth[node_id]
        assert budget > 0, "the search did not converge"
        route = views[node_id].route(key)
        if isinstance(route, Serve):
            assert m.slot_of(node_id) == owner  # only the key's slot serves it
            result = 0
        else:
            assert route.contacts, "a referral with nobody to ask"
            result = 1 + max(walk(c.node_id, budget - 1) for c in route.contacts)
        depth[node_id] = result
        return result

    for node_id in views:
        walk(node_id, 4)
    return depth


@pytest.mark.parametrize(("count", "samples"), [(100, 60), (1000, 25)])
def test_a_search_from_any_supernode_converges_in_three_rounds(count: int, samples: int) -> None:
    m = cached(count)
    views = views_of(m)
    rng = random.Random(count)
    for key in [rng.randrange(KEY_SPACE) for _ in range(samples)] + [0, KEY_SPACE - 1]:
        depth = referrals_needed(views, m, key)
        assert max(depth.values()) <= 2  # ask own SN, then at most two referrals
        assert Counter(depth.values())[0] == len(m.slots[m.slot_index_for_key(key)].members)


@SLOW
@given(keys, st.integers(0, 10**6), st.sampled_from([1, 9, 10, 11, 80, 81, 150]))
@example(key=16_140_901_064_495_857_664, pick=0, count=81)  # a block of one slot
def test_routes_refer_to_the_right_supernodes(key: int, pick: int, count: int) -> None:
    m = cached(count)
    viewer = m.supernodes[pick % count].node_id
    view = m.view_for(viewer)
    route = view.route(key)
    target = m.slot_index_for_key(key)
    here = m.slot_of(viewer)
    assert here is not None
    if target == here:
        assert route == Serve()
    elif m.block_of_slot(target) == m.block_of_slot(here):
        assert route == Refer(m.members(target), "slot")
    else:
        assert isinstance(route, Refer) and route.level == "block"
        block = m.block_of_slot(target)
        slots = [m.slot_of(c.node_id) for c in route.contacts]
        assert all(s in m.slots_of_block(block) for s in slots)
        in_block = sum(len(m.members(s)) for s in m.slots_of_block(block))
        assert len(route.contacts) == min(3, in_block)
        # From different slots first; a block of fewer slots gives more members of each.
        assert len(set(slots)) == min(len(slots), len(m.slots_of_block(block)))
    assert view.version == m.version
    assert view.prefix == m.prefix_of(viewer)
    assert {p.node_id for p in view.peers} == {i.node_id for i in m.members(here)} - {viewer}


def test_views_spread_the_contacts_of_a_block() -> None:
    m = cached(1000)
    chosen: Counter[bytes] = Counter()
    for view in views_of(m).values():
        if view.block_index != 0:
            chosen.update(c.node_id for c in view.other_blocks[0].contacts)
    block_members = {i.node_id for s in m.slots_of_block(0) for i in m.members(s)}
    assert set(chosen) <= block_members
    assert len(chosen) >= 0.9 * len(block_members)  # not the same three for everyone
    assert max(chosen.values()) < 5 * (sum(chosen.values()) / len(block_members))


def test_view_state_grows_sub_linearly(capsys: pytest.CaptureFixture[str]) -> None:
    sizes = {}
    for count in (100, 400, 1600):
        m = cached(count)
        view = m.view_for(m.supernodes[count // 2].node_id)
        sizes[count] = view.state_size()
        assert view.state_size() == sum(len(s.members) for s in view.block_slots) + sum(
            len(b.contacts) for b in view.other_blocks
        )
        assert len(view.known_supernodes()) == view.state_size()
    with capsys.disabled():
        print(f"\nrouting view entries per SN: {sizes}")
    assert sizes[1600] < 200
    assert sizes[1600] - sizes[400] < 1600 - 400


def test_a_single_supernode_serves_everything() -> None:
    m = build(1)
    view = m.view_for(sn(0).node_id)
    assert view.other_blocks == () and view.peers == () and view.state_size() == 1
    assert view.route(0) == view.route(KEY_SPACE - 1) == Serve()


def test_signed_view_round_trip_and_rejections() -> None:
    m = cached(400)
    view = m.view_for(sn(7).node_id)
    signed = SignedRoutingView.parse(bytes(view.sign(CA)))
    assert signed.verify(CA.public_key, sn(7).node_id) == view
    assert RoutingView.parse(bytes(view)) == view
    with pytest.raises(SlotMapSignatureError, match=r"^The routing view was not signed by our"):
        view.sign(OTHER_CA).verify(CA.public_key)
    with pytest.raises(RoutingViewError, match=r"^The routing view is for another supernode\.$"):
        signed.verify(CA.public_key, sn(8).node_id)
    # A slot map signature does not make a routing view (separate signing contexts).
    with pytest.raises(SlotMapSignatureError, match="routing view was not signed"):
        SignedRoutingView(bytes(view), CA.sign(b"voip-slotmap-v1" + bytes(view))).verify(
            CA.public_key
        )


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d[6][0].__setitem__(1, d[6][0][1] + 1), "do not cover the key space exactly"),
        (lambda d: d[6].pop(), "does not list every other block."),
        (lambda d: d.__setitem__(3, 2**62), "does not list every other block."),
        (lambda d: d[6][0].__setitem__(3, []), "has a block without contacts."),
        (lambda d: d[5].pop(), "block has the wrong number of slots."),
        (lambda d: d[5][1].__setitem__(0, d[5][1][0] + 1), "leaves a gap in the key space."),
        (lambda d: d[5][1][2].append(d[5][0][2][0]), "puts a supernode in two slots."),
        (lambda d: d.__setitem__(2, b"\x00" * 32), "does not put its supernode in its own slot."),
        (lambda d: d.__setitem__(4, 99), "has a bad slot count or index."),
        (lambda d: d[6][0].__setitem__(2, KEY_SPACE), "has a block with a bad index or range."),
        (lambda d: d[5][0][2].append([b"x" * 32, "h", 1, 2, 3]), "malformed supernode entry."),
    ],
)
def test_a_view_that_breaks_the_rules_is_refused(mutate: Any, message: str) -> None:
    m = cached(400)
    document = cbor2.loads(bytes(m.view_for(m.supernodes[0].node_id)))
    mutate(document)
    with pytest.raises(RoutingViewError, match=message):
        RoutingView.parse(encoded(document))
