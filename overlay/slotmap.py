"""The slot map: which supernodes replicate which part of the user directory.

The key space is cut into **slots**, the leaves of a binary trie (``overlay.keyspace.Prefix``),
ordered by start key; consecutive groups of ``BLOCK_SLOTS`` slots form **blocks**.  With N
supernodes the map has max(1, ceil(N / 10)) slots of 9-10 supernodes once N >= 90.  A change
(join, leave, new address) gives a new ``SlotMap`` with the version one higher; the login
server signs it.  Every step is deterministic:

- a new supernode joins the smallest slot (ties: lowest start);
- above 10 per slot on average, the slot with the shortest prefix (lowest start) splits in two;
- at or below 10 * (slots - 1), the deepest pair of sibling slots (lowest start) merges;
- then, while the largest and smallest slot differ by more than one, the largest slot's
  highest node id moves to the smallest slot (ties: lowest start).

A supernode gets only its ``RoutingView``: its own block in full and a few contacts per other
block.  Encodings (canonical CBOR; ``parse`` refuses anything else, raising ``SlotMapError``)::

    map    = [1, version, [[value, length, [node_id, ...]], ...], [info, ...]]
    view   = [1, version, node_id, slot_count, slot_index,
              [[value, length, [info, ...]], ...],                  the viewer's block
              [[block, start, last, [info, ...]], ...]]             every other block
    info   = [node_id, host, tcp_port, udp_port]
    signed = [body, Ed25519(CA, context || body)]    context "voip-slotmap-v1" / "voip-view-v1"
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

import cbor2

from overlay.errors import ProtocolError
from overlay.framing import MAX_PAYLOAD
from overlay.identity import PUBLIC_KEY_SIZE, SIGNATURE_SIZE, IdentityKey, verify_signature
from overlay.keyspace import KEY_BITS, KEY_SPACE, Prefix, check_key
from overlay.messages import MessageError, Record, record

SLOT_CAPACITY = 10
BLOCK_SLOTS = 8
DEFAULT_CONTACTS = 3
FORMAT = 1
MAP_CONTEXT = b"voip-slotmap-v1"
VIEW_CONTEXT = b"voip-view-v1"
MAX_MAP_SIZE = 8 * 1024 * 1024
#: A signed view travels inside one control message.
MAX_VIEW_SIZE = MAX_PAYLOAD - 1024
MAX_HOST = 253
_MAX_INT = 2**63 - 1


class SlotMapError(ProtocolError):
    """The slot map is not valid."""

    code = "bad-slot-map"


class RoutingViewError(SlotMapError):
    """The routing view is not valid."""


class SlotMapSignatureError(SlotMapError):
    """The slot map was not signed by our login server."""

    code = "bad-signature"


@record
class SupernodeInfo(Record):
    """How to reach a supernode; ``node_id`` is its Ed25519 public key."""

    node_id: bytes
    host: str
    tcp_port: int
    udp_port: int

    def __post_init__(self) -> None:
        if not isinstance(self.node_id, bytes) or len(self.node_id) != PUBLIC_KEY_SIZE:
            raise MessageError("A supernode id must be 32 bytes.")
        if not isinstance(self.host, str) or not 0 < len(self.host) <= MAX_HOST:
            raise MessageError("A supernode host must be 1-253 characters.")
        for port in (self.tcp_port, self.udp_port):
            if not _is_int(port, 1, 65535):
                raise MessageError("A supernode port must be in 1-65535.")


@dataclass(frozen=True)
class Slot:
    prefix: Prefix
    members: tuple[bytes, ...]  # node ids, ascending


def _is_int(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _canonical(obj: Any) -> bytes:
    return bytes(cbor2.dumps(obj, canonical=True))


def _info_array(info: SupernodeInfo) -> list[Any]:
    return [info.node_id, info.host, info.tcp_port, info.udp_port]


def _load(data: Any, what: str, limit: int, error: type[SlotMapError]) -> Any:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise error(f"The {what} is not a byte string.")
    if len(data) > limit:
        raise error(f"The {what} is too large.")
    try:
        return cbor2.loads(bytes(data))
    except Exception:  # noqa: BLE001 - cbor2 raises many types on garbage
        raise error(f"The {what} is not valid CBOR.") from None


def _prefix(item: Any, what: str, error: type[SlotMapError]) -> Prefix:
    value, length = item[0], item[1]
    if not (_is_int(length, 0, KEY_BITS) and _is_int(value, 0, (1 << length) - 1)):
        raise error(f"The {what} has a bad slot prefix.")
    return Prefix(value, length)


def _info(item: Any, what: str, error: type[SlotMapError]) -> SupernodeInfo:
    if not (isinstance(item, list) and len(item) == 4):
        raise error(f"The {what} has a malformed supernode entry.")
    try:
        return SupernodeInfo(*item)
    except MessageError as exc:
        raise error(f"The {what} has a bad supernode entry: {exc}") from None


def _infos(item: Any, what: str, error: type[SlotMapError]) -> tuple[SupernodeInfo, ...]:
    if not isinstance(item, list):
        raise error(f"The {what} has a member list that is not a list.")
    return tuple(_info(entry, what, error) for entry in item)


def _check_tiling(prefixes: Iterable[Prefix], start: int, end: int, what: str) -> None:
    """The prefixes, in order, cover [start, end) exactly once; else ``SlotMapError``."""
    error = RoutingViewError if what == "routing view" else SlotMapError
    expected = start
    for prefix in prefixes:
        if prefix.start < expected:
            raise error(f"The {what} has overlapping slots.")
        if prefix.start > expected:
            raise error(f"The {what} leaves a gap in the key space.")
        expected = prefix.end
    if expected != end:
        raise error(f"The {what} leaves a gap in the key space.")


def _spread(viewer: bytes, label: bytes, number: int) -> int:
    digest = hashlib.blake2b(viewer + label + number.to_bytes(8, "big"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


@dataclass(frozen=True)
class SlotMap:
    """The whole map (held by the login server): immutable; every change makes a new one."""

    version: int
    slots: tuple[Slot, ...]
    supernodes: tuple[SupernodeInfo, ...]  # by node id, ascending
    _starts: list[int] = field(init=False, repr=False, compare=False)
    _info: dict[bytes, SupernodeInfo] = field(init=False, repr=False, compare=False)
    _slot_of: dict[bytes, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not _is_int(self.version, 0, _MAX_INT):
            raise SlotMapError("The slot map version is not a valid number.")
        if not self.slots:
            raise SlotMapError("The slot map has no slots.")
        _check_tiling((s.prefix for s in self.slots), 0, KEY_SPACE, "slot map")
        ids = [info.node_id for info in self.supernodes]
        if any(a >= b for a, b in itertools.pairwise(ids)):
            raise SlotMapError("The slot map's supernode table is not sorted or has duplicates.")
        info = {i.node_id: i for i in self.supernodes}
        slot_of: dict[bytes, int] = {}
        for index, slot in enumerate(self.slots):
            if list(slot.members) != sorted(set(slot.members)):
                raise SlotMapError("The slot map has a slot whose members are not sorted.")
            for node_id in slot.members:
                if node_id not in info:
                    raise SlotMapError("The slot map puts an unknown supernode in a slot.")
                if node_id in slot_of:
                    raise SlotMapError("The slot map puts a supernode in two slots.")
                slot_of[node_id] = index
        if len(slot_of) != len(info):
            raise SlotMapError("The slot map lists a supernode that is in no slot.")
        object.__setattr__(self, "_starts", [s.prefix.start for s in self.slots])
        object.__setattr__(self, "_info", info)
        object.__setattr__(self, "_slot_of", slot_of)

    @classmethod
    def empty(cls, version: int = 0) -> SlotMap:
        return cls(version, (Slot(Prefix.root(), ()),), ())

    # -- changes ---------------------------------------------------------------------------

    def with_supernode(self, info: SupernodeInfo) -> SlotMap:
        """``info`` joins; ``ValueError`` if its node id is already in the map."""
        return self.with_supernodes([info])

    def with_supernodes(self, infos: Iterable[SupernodeInfo]) -> SlotMap:
        """The same as calling ``with_supernode`` for each in turn (version + one per SN)."""
        draft = _Draft(self)
        for info in infos:
            draft.add(info)
        return draft.build()

    def without_supernode(self, node_id: bytes) -> SlotMap:
        """The SN leaves; ``ValueError`` if it is not in the map."""
        draft = _Draft(self)
        draft.remove(node_id)
        return draft.build()

    def with_updated_info(self, info: SupernodeInfo) -> SlotMap:
        """A new address for a known SN; its slot does not change."""
        if info.node_id not in self._info:
            raise ValueError("unknown supernode")
        table = tuple(info if i.node_id == info.node_id else i for i in self.supernodes)
        return SlotMap(self.version + 1, self.slots, table)

    # -- queries ---------------------------------------------------------------------------

    def __len__(self) -> int:
        """The number of slots."""
        return len(self.slots)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._info

    @property
    def supernode_count(self) -> int:
        return len(self.supernodes)

    @property
    def block_count(self) -> int:
        return -(-len(self.slots) // BLOCK_SLOTS)

    def info(self, node_id: bytes) -> SupernodeInfo:
        """``KeyError`` when the SN is not in the map."""
        return self._info[node_id]

    def slot_index_for_key(self, key: int) -> int:
        return bisect.bisect_right(self._starts, check_key(key)) - 1

    def block_of_slot(self, index: int) -> int:
        if not 0 <= index < len(self.slots):
            raise IndexError("no such slot")
        return index // BLOCK_SLOTS

    def slots_of_block(self, block: int) -> range:
        if not 0 <= block < self.block_count:
            raise IndexError("no such block")
        return range(block * BLOCK_SLOTS, min((block + 1) * BLOCK_SLOTS, len(self.slots)))

    def block_range(self, block: int) -> tuple[int, int]:
        """The keys ``[start, end)`` of a block."""
        indices = self.slots_of_block(block)
        return self.slots[indices[0]].prefix.start, self.slots[indices[-1]].prefix.end

    def slot_of(self, node_id: bytes) -> int | None:
        return self._slot_of.get(node_id)

    def prefix_of(self, node_id: bytes) -> Prefix | None:
        index = self._slot_of.get(node_id)
        return None if index is None else self.slots[index].prefix

    def members(self, index: int) -> tuple[SupernodeInfo, ...]:
        return tuple(self._info[n] for n in self.slots[index].members)

    # -- views -----------------------------------------------------------------------------

    def view_for(self, node_id: bytes, contacts_per_block: int = DEFAULT_CONTACTS) -> RoutingView:
        """What ``node_id`` needs to route: its block in full, contacts in every other block."""
        index = self._slot_of.get(node_id)
        if index is None:
            raise ValueError("unknown supernode")
        if contacts_per_block < 1:
            raise ValueError("contacts_per_block must be at least 1")
        own = index // BLOCK_SLOTS
        block_slots = tuple(
            ViewSlot(self.slots[i].prefix, self.members(i)) for i in self.slots_of_block(own)
        )
        others = tuple(
            BlockContacts(b, *self.block_range(b), self._contacts(node_id, b, contacts_per_block))
            for b in range(self.block_count)
            if b != own
        )
        return RoutingView(self.version, node_id, len(self.slots), index, block_slots, others)

    def _contacts(self, viewer: bytes, block: int, count: int) -> tuple[SupernodeInfo, ...]:
        """Up to ``count`` members of ``block``, from different slots, spread by ``viewer``."""
        indices = self.slots_of_block(block)
        first = _spread(viewer, b"block", block) % len(indices)
        order = [indices[(first + j) % len(indices)] for j in range(len(indices))]
        rotations = []
        for i in order:
            members = self.slots[i].members
            turn = _spread(viewer, b"slot", i) % len(members) if members else 0
            rotations.append(members[turn:] + members[:turn])
        chosen: list[SupernodeInfo] = []
        for depth in range(max(map(len, rotations))):
            for rotation in rotations:
                if depth < len(rotation) and len(chosen) < count:
                    chosen.append(self._info[rotation[depth]])
        return tuple(chosen)

    # -- encoding --------------------------------------------------------------------------

    def __bytes__(self) -> bytes:
        slots = [[s.prefix.value, s.prefix.length, list(s.members)] for s in self.slots]
        return _canonical([FORMAT, self.version, slots, [_info_array(i) for i in self.supernodes]])

    @classmethod
    def parse(cls, data: bytes) -> SlotMap:
        """Decode; raises only ``SlotMapError`` with a specific message."""
        document = _load(data, "slot map", MAX_MAP_SIZE, SlotMapError)
        if not (isinstance(document, list) and len(document) == 4):
            raise SlotMapError("The slot map is not a [format, version, slots, table] array.")
        form, version, raw_slots, raw_table = document
        if form != FORMAT or not isinstance(form, int) or isinstance(form, bool):
            raise SlotMapError("The slot map has an unknown format version.")
        if not (isinstance(raw_slots, list) and isinstance(raw_table, list)):
            raise SlotMapError("The slot map's slots or table is not a list.")
        table = tuple(_info(item, "slot map", SlotMapError) for item in raw_table)
        slots = []
        for item in raw_slots:
            if not (isinstance(item, list) and len(item) == 3 and isinstance(item[2], list)):
                raise SlotMapError("The slot map has a malformed slot.")
            if not all(isinstance(n, bytes) for n in item[2]):
                raise SlotMapError("The slot map has a slot member that is not a node id.")
            slots.append(Slot(_prefix(item, "slot map", SlotMapError), tuple(item[2])))
        result = cls(version, tuple(slots), table)
        if bytes(result) != bytes(data):
            raise SlotMapError("The slot map is not canonically encoded.")
        return result

    def sign(self, ca_key: IdentityKey) -> SignedSlotMap:
        body = bytes(self)
        return SignedSlotMap(body, ca_key.sign(MAP_CONTEXT + body))


class _Draft:
    """A mutable copy of a map, for applying the deterministic rules of one change."""

    def __init__(self, base: SlotMap) -> None:
        self.version = base.version
        self.prefixes = [s.prefix for s in base.slots]
        self.members = [list(s.members) for s in base.slots]
        self.table = dict(base._info)

    def add(self, info: SupernodeInfo) -> None:
        if info.node_id in self.table:
            raise ValueError("this supernode is already in the map")
        self.table[info.node_id] = info
        self.members[self._smallest()].append(info.node_id)
        while len(self.table) > SLOT_CAPACITY * len(self.prefixes):
            self._split(min(range(len(self.prefixes)), key=lambda i: self.prefixes[i].length))
        self._rebalance()
        self.version += 1

    def remove(self, node_id: bytes) -> None:
        if self.table.pop(node_id, None) is None:
            raise ValueError("unknown supernode")
        for members in self.members:
            if node_id in members:
                members.remove(node_id)
        while len(self.prefixes) > 1 and len(self.table) <= SLOT_CAPACITY * (
            len(self.prefixes) - 1
        ):
            pairs = [
                i
                for i in range(len(self.prefixes) - 1)
                if self.prefixes[i].length > 0
                and self.prefixes[i].sibling() == self.prefixes[i + 1]
            ]
            self._merge(max(pairs, key=lambda i: (self.prefixes[i].length, -i)))
        self._rebalance()
        self.version += 1

    def _smallest(self) -> int:
        return min(range(len(self.members)), key=lambda i: len(self.members[i]))

    def _split(self, index: int) -> None:
        members = sorted(self.members[index])
        half = (len(members) + 1) // 2
        self.prefixes[index : index + 1] = self.prefixes[index].children()
        self.members[index : index + 1] = [members[:half], members[half:]]

    def _merge(self, index: int) -> None:
        self.prefixes[index : index + 2] = [self.prefixes[index].parent()]
        self.members[index : index + 2] = [self.members[index] + self.members[index + 1]]

    def _rebalance(self) -> None:
        while True:
            largest = max(range(len(self.members)), key=lambda i: len(self.members[i]))
            smallest = self._smallest()
            if len(self.members[largest]) - len(self.members[smallest]) <= 1:
                return
            moving = max(self.members[largest])
            self.members[largest].remove(moving)
            self.members[smallest].append(moving)

    def build(self) -> SlotMap:
        slots = tuple(
            Slot(p, tuple(sorted(m))) for p, m in zip(self.prefixes, self.members, strict=True)
        )
        return SlotMap(self.version, slots, tuple(self.table[n] for n in sorted(self.table)))


def moves(old: SlotMap, new: SlotMap) -> dict[bytes, tuple[Prefix | None, Prefix | None]]:
    """The SNs that must pull records after ``old`` -> ``new``: ``{node_id: (old, new)}``.

    Reported: SNs that joined (``(None, prefix)``), left (``(prefix, None)``), or whose new
    slot has keys outside their old slot.  An SN whose slot split keeps a part of what it
    held, so it needs nothing and is not reported.
    """
    changed: dict[bytes, tuple[Prefix | None, Prefix | None]] = {}
    for node_id in old._info.keys() | new._info.keys():
        before, after = old.prefix_of(node_id), new.prefix_of(node_id)
        if before is None or after is None or not before.covers(after):
            changed[node_id] = (before, after)
    return changed


@dataclass(frozen=True)
class SignedSlotMap:
    map_bytes: bytes
    signature: bytes

    def __bytes__(self) -> bytes:
        return _canonical([self.map_bytes, self.signature])

    @classmethod
    def parse(cls, data: bytes) -> SignedSlotMap:
        body, signature = _parse_signed(data, "slot map", MAX_MAP_SIZE + 128, SlotMapError)
        return cls(body, signature)

    def verify(self, ca_public_key: bytes) -> SlotMap:
        if not verify_signature(ca_public_key, MAP_CONTEXT + self.map_bytes, self.signature):
            raise SlotMapSignatureError("The slot map was not signed by our login server.")
        return SlotMap.parse(self.map_bytes)


def _parse_signed(
    data: Any, what: str, limit: int, error: type[SlotMapError]
) -> tuple[bytes, bytes]:
    outer = _load(data, f"signed {what}", limit, error)
    if not (isinstance(outer, list) and len(outer) == 2 and isinstance(outer[0], bytes)):
        raise error(f"The signed {what} is not a [body, signature] pair.")
    if not isinstance(outer[1], bytes) or len(outer[1]) != SIGNATURE_SIZE:
        raise error(f"The signed {what} has a signature that is not 64 bytes.")
    if _canonical(outer) != bytes(data):
        raise error(f"The signed {what} is not canonically encoded.")
    return outer[0], outer[1]


# -- routing views ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Serve:
    """The key is in the viewer's own slot: answer from the index."""


@dataclass(frozen=True)
class Refer:
    """Ask these SNs instead: the key's slot members ("slot") or block contacts ("block")."""

    contacts: tuple[SupernodeInfo, ...]
    level: Literal["slot", "block"]


Route: TypeAlias = Serve | Refer


@dataclass(frozen=True)
class ViewSlot:
    prefix: Prefix
    members: tuple[SupernodeInfo, ...]


@dataclass(frozen=True)
class BlockContacts:
    index: int
    start: int
    end: int  # exclusive
    contacts: tuple[SupernodeInfo, ...]


@dataclass(frozen=True)
class RoutingView:
    """One SN's routing state (hierarchical, never the whole map), as the login server made it."""

    version: int
    node_id: bytes
    slot_count: int
    slot_index: int
    block_slots: tuple[ViewSlot, ...]  # every slot of the viewer's block, in key order
    other_blocks: tuple[BlockContacts, ...]  # every other block, in key order
    _slot_starts: list[int] = field(init=False, repr=False, compare=False)
    _block_starts: list[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        error = RoutingViewError
        if not _is_int(self.version, 0, _MAX_INT):
            raise error("The routing view version is not a valid number.")
        if not isinstance(self.node_id, bytes) or len(self.node_id) != PUBLIC_KEY_SIZE:
            raise error("The routing view's supernode id is not 32 bytes.")
        if not _is_int(self.slot_count, 1, _MAX_INT) or not _is_int(
            self.slot_index, 0, self.slot_count - 1
        ):
            raise error("The routing view has a bad slot count or index.")
        own = self.slot_index // BLOCK_SLOTS
        if len(self.block_slots) != min(BLOCK_SLOTS, self.slot_count - own * BLOCK_SLOTS):
            raise error("The routing view's block has the wrong number of slots.")
        start, end = self.block_slots[0].prefix.start, self.block_slots[-1].prefix.end
        _check_tiling((s.prefix for s in self.block_slots), start, end, "routing view")
        ids = [m.node_id for s in self.block_slots for m in s.members]
        if len(set(ids)) != len(ids):
            raise error("The routing view puts a supernode in two slots.")
        if self.node_id not in (m.node_id for m in self.own_slot.members):
            raise error("The routing view does not put its supernode in its own slot.")
        others = [b.index for b in self.other_blocks]  # the count first: it bounds the work
        if len(others) != self.block_count - 1 or others != [
            b for b in range(self.block_count) if b != own
        ]:
            raise error("The routing view does not list every other block.")
        ranges = sorted(
            [(own, start, end)] + [(b.index, b.start, b.end) for b in self.other_blocks]
        )
        expected = 0
        for _, low, high in ranges:
            if low != expected or high <= low:
                raise error("The routing view's blocks do not cover the key space exactly once.")
            expected = high
        if expected != KEY_SPACE:
            raise error("The routing view's blocks do not cover the key space exactly once.")
        if not all(b.contacts for b in self.other_blocks):
            raise error("The routing view has a block without contacts.")
        object.__setattr__(self, "_slot_starts", [s.prefix.start for s in self.block_slots])
        object.__setattr__(self, "_block_starts", [b.start for b in self.other_blocks])

    @property
    def block_index(self) -> int:
        return self.slot_index // BLOCK_SLOTS

    @property
    def block_count(self) -> int:
        return -(-self.slot_count // BLOCK_SLOTS)

    @property
    def own_slot(self) -> ViewSlot:
        return self.block_slots[self.slot_index - self.block_index * BLOCK_SLOTS]

    @property
    def prefix(self) -> Prefix:
        """The keys this SN serves."""
        return self.own_slot.prefix

    @property
    def peers(self) -> tuple[SupernodeInfo, ...]:
        """The other members of this SN's slot (its replicas)."""
        return tuple(m for m in self.own_slot.members if m.node_id != self.node_id)

    @property
    def block_range(self) -> tuple[int, int]:
        return self.block_slots[0].prefix.start, self.block_slots[-1].prefix.end

    def _groups(self) -> list[tuple[SupernodeInfo, ...]]:
        return [s.members for s in self.block_slots] + [b.contacts for b in self.other_blocks]

    def known_supernodes(self) -> tuple[SupernodeInfo, ...]:
        """Every SN in the view once (own slot, block, then contacts): for host caches."""
        seen: dict[bytes, SupernodeInfo] = {}
        for info in itertools.chain(self.own_slot.members, *self._groups()):
            seen.setdefault(info.node_id, info)
        return tuple(seen.values())

    def state_size(self) -> int:
        """How many ``SupernodeInfo`` entries this view holds."""
        return sum(len(group) for group in self._groups())

    def route(self, key: int) -> Route:
        """Serve the key, or whom to refer the asker to (one step closer to the key)."""
        start, end = self.block_range
        if start <= check_key(key) < end:
            slot = self.block_slots[bisect.bisect_right(self._slot_starts, key) - 1]
            return Serve() if slot is self.own_slot else Refer(slot.members, "slot")
        block = self.other_blocks[bisect.bisect_right(self._block_starts, key) - 1]
        return Refer(block.contacts, "block")

    def __bytes__(self) -> bytes:
        slots = [
            [s.prefix.value, s.prefix.length, [_info_array(m) for m in s.members]]
            for s in self.block_slots
        ]
        blocks = [
            [b.index, b.start, b.end - 1, [_info_array(c) for c in b.contacts]]
            for b in self.other_blocks
        ]
        header = [FORMAT, self.version, self.node_id, self.slot_count, self.slot_index]
        return _canonical([*header, slots, blocks])

    @classmethod
    def parse(cls, data: bytes) -> RoutingView:
        """Decode; raises only ``RoutingViewError`` (a ``SlotMapError``)."""
        error = RoutingViewError
        document = _load(data, "routing view", MAX_VIEW_SIZE, error)
        if not (isinstance(document, list) and len(document) == 7):
            raise error("The routing view is not a 7-element array.")
        form, version, node_id, slot_count, slot_index, raw_slots, raw_blocks = document
        if form != FORMAT or not isinstance(form, int) or isinstance(form, bool):
            raise error("The routing view has an unknown format version.")
        if not (isinstance(raw_slots, list) and raw_slots and isinstance(raw_blocks, list)):
            raise error("The routing view's slots or blocks are not lists.")
        slots = []
        for item in raw_slots:
            if not (isinstance(item, list) and len(item) == 3):
                raise error("The routing view has a malformed slot.")
            slots.append(
                ViewSlot(
                    _prefix(item, "routing view", error), _infos(item[2], "routing view", error)
                )
            )
        blocks = []
        for item in raw_blocks:
            if not (isinstance(item, list) and len(item) == 4):
                raise error("The routing view has a malformed block.")
            index, start, last, contacts = item
            if not (
                _is_int(index, 0, _MAX_INT)
                and _is_int(start, 0, KEY_SPACE - 1)
                and _is_int(last, start, KEY_SPACE - 1)
            ):
                raise error("The routing view has a block with a bad index or range.")
            blocks.append(
                BlockContacts(index, start, last + 1, _infos(contacts, "routing view", error))
            )
        view = cls(version, node_id, slot_count, slot_index, tuple(slots), tuple(blocks))
        if bytes(view) != bytes(data):
            raise error("The routing view is not canonically encoded.")
        return view

    def sign(self, ca_key: IdentityKey) -> SignedRoutingView:
        body = bytes(self)
        return SignedRoutingView(body, ca_key.sign(VIEW_CONTEXT + body))


@dataclass(frozen=True)
class SignedRoutingView:
    view_bytes: bytes
    signature: bytes

    def __bytes__(self) -> bytes:
        return _canonical([self.view_bytes, self.signature])

    @classmethod
    def parse(cls, data: bytes) -> SignedRoutingView:
        body, signature = _parse_signed(data, "routing view", MAX_VIEW_SIZE + 128, RoutingViewError)
        return cls(body, signature)

    def verify(self, ca_public_key: bytes, node_id: bytes | None = None) -> RoutingView:
        """The view, if the CA signed it (and, given ``node_id``, if it is that SN's)."""
        if not verify_signature(ca_public_key, VIEW_CONTEXT + self.view_bytes, self.signature):
            raise SlotMapSignatureError("The routing view was not signed by our login server.")
        view = RoutingView.parse(self.view_bytes)
        if node_id is not None and view.node_id != node_id:
            raise RoutingViewError("The routing view is for another supernode.")
        return view
