"""The supernode role: index a slot of the user directory, answer searches, carry ONs.

A ``Supernode`` owns:

- its node key and, once admitted by the login server, its supernode certificate and routing
  view (``overlay.slotmap.RoutingView``: own slot, own block, a few contacts per other block);
- the presence records of its slot (``overlay.index.PresenceIndex``), replicated at every
  member of the slot; a supernode that joins a slot pulls the slot's records from a peer (or,
  when no peer holds them, from the members of the slots that held them before the change)
  before it answers "none" for it (until then it refers askers to its peers: "not ready"), and
  compares digests with a random slot peer now and then (``overlay.antientropy``);
- a UDP endpoint (``overlay.datagram``) for searches, stores, pulls, pings, reachability checks
  and forwarded messages;
- a TCP service for attached ordinary nodes (``SupernodeConnection``): attach with a user
  certificate and a proof of its key, publish presence, send messages, keep-alive.

Message table: ``overlay.overlay_protocol``.
"""

from __future__ import annotations

import contextlib
import functools
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    DeferredSemaphore,
    FirstError,
    gatherResults,
)
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from overlay.antientropy import ANTI_ENTROPY_EVERY, AntiEntropy
from overlay.certificate import Role, SignedCertificate
from overlay.channel import Hello, server_handshake
from overlay.connection import FramedConnection
from overlay.datagram import Address, DatagramEndpoint
from overlay.errors import ProtocolError, VoipError
from overlay.identity import IdentityKey, verify_signature
from overlay.index import PresenceIndex
from overlay.keyspace import KEY_BITS, KEY_SPACE, Prefix, user_key
from overlay.login_protocol import proof_message
from overlay.messages import Error, Message, Ping, Pong
from overlay.overlay_protocol import (
    SEARCH_PAD,
    Ack,
    Attach,
    Attached,
    DigestReply,
    DigestRequest,
    Forward,
    Forwarded,
    Incoming,
    Locate,
    Migrate,
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
from overlay.presence import PresenceError, SignedPresence
from overlay.search import LEVEL_NOT_READY
from overlay.slotmap import Refer, RoutingView, Serve, SupernodeInfo, ViewSlot
from overlay.usernames import canonical_username

REACH_CONTEXT = b"voip-reach-v1"
ATTACH_IDLE_TIMEOUT = 60.0
HANDSHAKE_TIMEOUT = 10.0
PEER_TIMEOUT = 2.0
PULL_BATCH = 1
#: Pull requests a puller keeps out at once (one record comes per reply).
PULL_WINDOW = 8
#: Sources asked at once whether they hold a range.
PROBE_PARALLEL = 2
DELIVERY_TIMEOUT = 5.0
SYNC_RETRY = 2.0
SYNC_ATTEMPTS = 5
#: How many times a range nobody holds whole is halved before we conclude nobody holds it.
PULL_SPLIT_DEPTH = 6
#: How long records of a range we stopped serving stay available to pulls.
RETIRE_AFTER = 600.0
#: Records of a range we left are stored at its new slot after views had time to spread.
HANDOFF_DELAY = 3.0
HANDOFF_PARALLEL = 16


class SupernodeFull(VoipError):
    """This supernode carries as many nodes as it may; try another."""

    code = "supernode-full"


class HoldsNone(VoipError):
    """This supernode holds none of that key range."""

    code = "holds-none"


class HoldsPart(VoipError):
    """This supernode holds only a part of that key range; ask for less."""

    code = "holds-part"


class NotAttached(VoipError):
    """Attach first."""

    code = "not-attached"


class NotDelivered(VoipError):
    """The message could not be delivered."""

    code = "not-delivered"


def _username_of(blob: bytes) -> str:
    return SignedPresence.parse(blob).record.username


def _missing(prefix: Prefix, held: Prefix | None) -> list[Prefix]:
    """The parts of ``prefix`` outside ``held`` (which lies inside it), as prefixes."""
    if held is None:
        return [prefix]
    out: list[Prefix] = []
    part = held
    while part != prefix:
        out.append(part.sibling())
        part = part.parent()
    return out


@dataclass
class _Probe:
    """What the sources of a range said when asked for its first record."""

    #: those that hold all of it, with their reply
    full: list[tuple[SupernodeInfo, Records]] = field(default_factory=list)
    #: those that hold a part of it
    partial: list[SupernodeInfo] = field(default_factory=list)
    #: did any not answer (timed out, failed)?
    silent: bool = False


def _first_error(failure: Failure) -> Failure:
    """The failure of the first of several requests that failed (``gatherResults``)."""
    if isinstance(failure.value, FirstError):
        return failure.value.subFailure
    return failure


def _check_range(request: str, start: int, end: int) -> None:
    if not 0 <= start < end <= KEY_SPACE:
        raise ProtocolError(f"{request} asks for keys [{start}, {end}), not a key range.")


def reach_signature(key: IdentityKey, nonce: bytes) -> bytes:
    return key.sign(REACH_CONTEXT + nonce)


def reach_ok(node_key: bytes, nonce: bytes, signature: bytes) -> bool:
    return verify_signature(node_key, REACH_CONTEXT + nonce, signature)


class Supernode:
    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        node_key: IdentityKey,
        ca_public_key: bytes,
        *,
        max_attached: int = 10_000,
        rng: random.Random | None = None,
        anti_entropy_every: float = ANTI_ENTROPY_EVERY,
    ) -> None:
        self.clock = clock
        self.node_key = node_key
        self.ca_public_key = ca_public_key
        self.max_attached = max_attached
        self.rng = rng or random.Random()  # noqa: S311 - picking peers, not cryptography
        self.certificate: bytes | None = None
        self.view: RoutingView | None = None
        self.info: SupernodeInfo | None = None
        self.synced = False
        #: The key range whose records this supernode holds completely (None: none yet).
        self.held: Prefix | None = None
        #: Ranges held before the slot changed, kept until the time given, for pulls only.
        self.retired: list[tuple[Prefix, float]] = []
        #: The slots (with members) of the block of each view we left, kept until the time
        #: given: who held a range before the map changed, to pull it from them.
        self.former: list[tuple[tuple[ViewSlot, ...], float]] = []
        self.index = PresenceIndex(clock, ca_public_key, self._owns)
        self.udp = DatagramEndpoint(clock, self.handle_datagram, stun_server=True)
        self.attached: dict[str, SupernodeConnection] = {}
        self.counters: Counter[str] = Counter()
        self._sync: Deferred[None] | None = None
        self.anti_entropy = AntiEntropy(self, every=anti_entropy_every)

    @property
    def node_id(self) -> bytes:
        return self.node_key.public_key

    def _owns(self, key: int) -> bool:
        return self.view is not None and self.view.prefix.contains(key)

    # -- membership -----------------------------------------------------------------------------

    def admitted(self, certificate: bytes, view: RoutingView, info: SupernodeInfo) -> None:
        """The login server made us a supernode (or sent a newer view)."""
        self.certificate = certificate
        self.info = info
        self.set_view(view)
        self.anti_entropy.start()

    def stop(self) -> None:
        """Stop the periodic work (anti-entropy); ``admitted`` starts it again."""
        self.anti_entropy.stop()

    def set_view(self, view: RoutingView) -> None:
        """Take a (new) routing view; when our slot changed, fetch what we lack of it.

        ``held`` is the key range our index holds completely.  A slot that split keeps what
        it held (a part of it); a slot that grew (merge, or a move to another slot) pulls the
        ranges it lacks from slot peers that hold them, and until then refers searches for its
        slot to those peers instead of answering "no such record".
        """
        old = self.view
        self.view = view
        if old is not None and old.prefix == view.prefix:
            known = {p.node_id for p in old.peers}
            joined = [p for p in view.peers if p.node_id not in known]
            if joined and self.synced:
                # They pulled when they joined, perhaps before records we took since.
                self._push_records(joined)
            return
        prefix = view.prefix
        held = self.held
        now = self.clock.seconds()
        self.former = [(slots, until) for slots, until in self.former if until > now]
        if old is not None:
            self.former.append((old.block_slots, now + RETIRE_AFTER))
        if held is not None and not prefix.covers(held):
            # Records we no longer serve stay a while, for peers to pull: when a slot's
            # members all move or merge at once, they are the only copies.
            self.retired.append((held, now + RETIRE_AFTER))
            self.clock.callLater(RETIRE_AFTER, self._forget, held)
            self.clock.callLater(HANDOFF_DELAY, self._hand_off, held, 1)
        if held is not None and prefix.covers(held):
            self.held = held
        elif held is not None and held.covers(prefix):
            self.held = prefix
        else:
            self.held = None
        missing = _missing(prefix, self.held)
        if missing and not view.peers:
            missing = []  # alone in the slot: nobody to learn from (a new overlay)
        self.synced = not missing
        if self.synced:
            self.held = prefix
        self.log.info(
            "serving slot {prefix} (view {version}); pulling {missing} ranges",
            prefix=prefix,
            version=view.version,
            missing=len(missing),
        )
        if missing:
            self._sync = Deferred.fromCoroutine(self._pull_ranges(view, missing, 1))

    async def _pull_ranges(self, view: RoutingView, missing: list[Prefix], attempt: int) -> None:
        done = await gatherResults(
            [Deferred.fromCoroutine(self._pull_range(view, wanted)) for wanted in missing]
        ).addErrback(_first_error)
        still = [wanted for wanted, ok in zip(missing, done, strict=True) if not ok]
        if not self._serving(view):
            return
        if still and attempt < SYNC_ATTEMPTS:
            self.clock.callLater(SYNC_RETRY, self._retry_sync, view, still, attempt + 1)
            return
        if still:
            self.log.warn(
                "no slot peer holds {count} ranges of {prefix}; serving without them "
                "(their users republish within minutes)",
                count=len(still),
                prefix=view.prefix,
            )
        self.held = view.prefix
        self.synced = True

    def _retry_sync(self, view: RoutingView, missing: list[Prefix], attempt: int) -> None:
        if self._serving(view) and not self.synced:
            self._sync = Deferred.fromCoroutine(self._pull_ranges(view, missing, attempt))

    async def _pull_range(
        self,
        view: RoutingView,
        wanted: Prefix,
        depth: int = 0,
        peers: list[SupernodeInfo] | None = None,
        *,
        retired: bool = False,
    ) -> bool:
        """Fetch ``wanted`` from peers that hold it.  True when done, or when no peer holds
        any of it (nothing to learn); False when peers did not answer (try again later).

        A peer holds one prefix-aligned range, maybe only a part of ``wanted`` (slots merge
        and move while views spread): such a peer answers "partly", and the range is then
        asked for in halves, of the peers that hold part of it.  Slot peers are asked first,
        then the members of the slots that held ``wanted`` in views we left: after a merge or
        a move, the range's only holders may now serve other slots.  When nobody holds a range
        now, it is asked for once more from ranges peers left (``retired``): copies as of
        when they left it, better than none.
        """
        if peers is None:
            peers = self._sources(view, wanted, retired=retired)
        if not self._serving(view):
            return True  # not ours any more: nothing to do
        # Ask every source at once for the range's first record; in the current map any full
        # holder will do (the first to answer), of copies of left ranges the most recent.
        probe = await self._probe(peers, wanted, retired=retired, first_wins=not retired)
        if probe.full:
            peer, first = probe.full[0]
            self.index.import_records(first.records)
            if first.cursor is None:
                return True
            try:
                await self.pull_from(view, peer, wanted, retired=retired, cursor=first.cursor)
            except VoipError as exc:
                self.log.debug("pull from a slot peer failed: {error}", error=exc)
                return False
            return True
        if probe.partial and depth < PULL_SPLIT_DEPTH and wanted.length < KEY_BITS:
            halves = [
                await self._pull_range(view, half, depth + 1, probe.partial, retired=retired)
                for half in wanted.children()
            ]
            return all(halves)
        if not probe.partial and not probe.silent and not retired:
            return await self._pull_range(view, wanted, depth, retired=True)
        return not probe.silent

    def _probe(
        self, peers: list[SupernodeInfo], wanted: Prefix, *, retired: bool, first_wins: bool
    ) -> Deferred[_Probe]:
        """Ask ``peers`` for the first record of ``wanted``, ``PROBE_PARALLEL`` at a time, in
        order.  Fires when every one answered or failed, or (``first_wins``) at the first full
        holder's reply (those not asked by then are not asked)."""
        probe = _Probe()
        settled: Deferred[_Probe] = Deferred()
        remaining = len(peers)
        window = DeferredSemaphore(PROBE_PARALLEL)

        def answered(reply: Records, peer: SupernodeInfo) -> None:
            if reply.cursor is not None and reply.cursor <= 0:
                probe.silent = True  # a broken reply: as good as none
                return
            probe.full.append((peer, reply))
            if first_wins and not settled.called:
                settled.callback(probe)

        def failed(failure: Failure, peer: SupernodeInfo) -> None:
            if isinstance(failure.value, HoldsPart):
                probe.partial.append(peer)
            elif isinstance(failure.value, VoipError):
                probe.silent |= not isinstance(failure.value, HoldsNone)
            else:
                self.log.failure("probing a slot peer failed", failure)
                probe.silent = True

        def counted(_: object) -> None:
            nonlocal remaining
            remaining -= 1
            if remaining == 0 and not settled.called:
                order = {p.node_id: i for i, p in enumerate(peers)}
                probe.full.sort(key=lambda item: order[item[0].node_id])
                settled.callback(probe)

        def ask(peer: SupernodeInfo) -> Deferred[None]:
            if settled.called:
                return defer.succeed(None)
            asking = self._pull_one(peer, wanted, 0, retired)
            return asking.addCallbacks(answered, failed, callbackArgs=(peer,), errbackArgs=(peer,))

        for peer in peers:
            window.run(ask, peer).addBoth(counted)
        if not peers:
            settled.callback(probe)
        return settled

    async def pull_from(
        self,
        view: RoutingView,
        peer: SupernodeInfo,
        wanted: Prefix,
        limit: int | None = None,
        *,
        retired: bool = False,
        cursor: int = 0,
    ) -> int:
        """Import ``peer``'s records of ``wanted`` (at most ``limit``, from its ``cursor``-th
        on); how many came.

        A reply carries one record (it may not be larger than its request), so once the first
        reply says there is more, up to ``PULL_WINDOW`` requests, for consecutive positions,
        are out at once.
        ``HoldsPart`` / ``HoldsNone`` when the peer does not hold all of ``wanted`` (counting
        ranges it left only when ``retired``), another ``VoipError`` when it did not answer.
        Stops when we no longer serve ``view``'s slot.
        """
        received = 0
        at = cursor
        window = 1  # an empty or one-record range costs one request
        while self._serving(view):
            count = window if limit is None else min(window, limit - received)
            if count <= 0:
                break
            replies = await gatherResults(
                [self._pull_one(peer, wanted, at + i, retired) for i in range(count)],
                consumeErrors=True,
            ).addErrback(_first_error)
            finished = False
            for position, reply in enumerate(replies, start=at):
                if reply.cursor is not None and reply.cursor <= position:
                    raise ProtocolError("The pull reply's cursor does not move on.")
                self.index.import_records(reply.records)
                received += len(reply.records)
                finished = finished or reply.cursor is None
            if finished:
                break
            at += count
            window = PULL_WINDOW
        return received

    def _pull_one(
        self, peer: SupernodeInfo, wanted: Prefix, position: int, retired: bool
    ) -> Deferred[Records]:
        def check(reply: Message) -> Records:
            if isinstance(reply, Error) and reply.code == HoldsPart.code:
                raise HoldsPart()
            if isinstance(reply, Error) and reply.code == HoldsNone.code:
                raise HoldsNone()
            if not isinstance(reply, Records):
                raise ProtocolError(f"pull answered with {reply.NAME}")
            return reply

        return self.udp.request(
            (peer.host, peer.udp_port),
            functools.partial(
                Pull, start=wanted.start, end=wanted.end, cursor=position, retired=retired
            ),
            timeout=PEER_TIMEOUT,
            pad_to=SEARCH_PAD,  # room for a record in the reply
        ).addCallback(check)

    def _sources(
        self, view: RoutingView, wanted: Prefix, *, retired: bool = False
    ) -> list[SupernodeInfo]:
        """Whom to pull ``wanted`` from: slot peers, then members of slots that held part of
        it in views we left and that our view still knows (the others may well be dead)."""
        peers = list(view.peers)
        self.rng.shuffle(peers)
        skip = {p.node_id for p in peers} | {self.node_id}
        former: dict[bytes, SupernodeInfo] = {}
        for slots, _ in self.former:
            for slot in slots:
                if slot.prefix.start < wanted.end and wanted.start < slot.prefix.end:
                    for member in slot.members:
                        if member.node_id not in skip:
                            former.setdefault(member.node_id, member)
        alive = {s.node_id for s in view.known_supernodes()}
        known = [m for m in former.values() if m.node_id in alive]
        self.rng.shuffle(known)
        if retired:  # copies of ranges left: those left most recently (at this change) first
            return known + peers
        return peers + known

    def _serving(self, view: RoutingView) -> bool:
        """Do we still serve ``view``'s slot (a newer view of the same slot counts)?"""
        return self.view is not None and self.view.prefix == view.prefix

    def contacts_for_nodes(self, count: int = 10) -> tuple[SupernodeInfo, ...]:
        """SNs to hand to attached nodes for their host cache."""
        if self.view is None:
            return ()
        known = [s for s in self.view.known_supernodes() if s.node_id != self.node_id]
        self.rng.shuffle(known)
        return tuple(known[:count])

    # -- UDP: anyone may ask --------------------------------------------------------------------

    async def handle_datagram(self, message: Message, address: Address) -> Message | None:
        self.counters[message.NAME] += 1
        if isinstance(message, SnPing):
            return Pong(message.rid, self.clock.seconds())
        if isinstance(message, ReachCheck):
            return ReachOk(
                message.rid, message.nonce, reach_signature(self.node_key, message.nonce)
            )
        if self.view is None:
            raise VoipError("Not a supernode (yet).")
        if isinstance(message, Search):
            return self._search(message)
        if isinstance(message, Locate):
            return self._locate(message.rid, message.key)
        if isinstance(message, Store):
            self.index.put(message.record)  # False: we hold this record or a newer one already
            return Stored(message.rid, True)
        if isinstance(message, Pull):
            return self._pull(message)
        if isinstance(message, DigestRequest):
            return self._digest(message)
        if isinstance(message, Forward):
            delivered = await self.deliver_local(message.to, message.envelope)
            return Forwarded(message.rid, delivered)
        raise ProtocolError(f"{message.NAME} is not a supernode request.")

    def _search(self, message: Search) -> Message:
        assert self.view is not None
        try:
            key = user_key(message.username)
        except VoipError as exc:
            raise ProtocolError(f"Cannot search {message.username!r}: {exc}") from None
        route = self.view.route(key)
        if isinstance(route, Serve):
            lookup = self.index.get(message.username)
            if lookup.signed is not None:
                return SearchFound(message.rid, bytes(lookup.signed))
            complete = self.synced or (self.held is not None and self.held.contains(key))
            if not complete:  # "none" would be a guess: send the asker to the replicas
                return SearchReferral(message.rid, self.view.peers, LEVEL_NOT_READY)
            return SearchNone(message.rid, self.view.peers)
        assert isinstance(route, Refer)
        return SearchReferral(message.rid, route.contacts, route.level)

    def _locate(self, rid: int, key: int) -> SearchReferral:
        assert self.view is not None
        route = self.view.route(key)
        if isinstance(route, Serve):
            return SearchReferral(rid, self.view.own_slot.members, "slot")
        assert isinstance(route, Refer)
        return SearchReferral(rid, route.contacts, route.level)

    def _push_records(self, peers: list[SupernodeInfo]) -> None:
        """Store every record of our slot at ``peers`` (new members of our slot)."""
        assert self.view is not None
        records = self.index.export(self.view.prefix.start, self.view.prefix.end)
        window = DeferredSemaphore(HANDOFF_PARALLEL)

        def store(peer: SupernodeInfo, blob: bytes) -> Deferred[Message]:
            return self.udp.request(
                (peer.host, peer.udp_port), lambda rid: Store(rid, blob), timeout=PEER_TIMEOUT
            )

        pushes = [window.run(store, peer, blob) for peer in peers for blob in records]
        DeferredList(pushes, consumeErrors=True)
        self.counters["pushed"] += len(pushes)

    def _hand_off(self, retired: Prefix, attempt: int) -> None:
        """Store the records of a range we stopped serving at its new slot (records move
        with slots); what no new member accepted is tried again later."""
        serving = self.view.prefix if self.view is not None else None
        keyed = [
            (user_key(_username_of(blob)), blob)
            for blob in self.index.export(retired.start, retired.end)
        ]
        records = [
            (key, blob) for key, blob in keyed if serving is None or not serving.contains(key)
        ]
        if not records or self.view is None:
            return

        async def place(key: int, blob: bytes) -> bool:
            try:
                return await self.replicate(blob, key) > 0
            except VoipError:
                return False

        async def move() -> None:
            window = DeferredSemaphore(HANDOFF_PARALLEL)
            placed = await gatherResults([window.run(place, key, blob) for key, blob in records])
            unplaced = placed.count(False)
            self.counters["handed-off"] += len(records) - unplaced
            if unplaced and attempt < SYNC_ATTEMPTS:
                self.clock.callLater(HANDOFF_DELAY, self._hand_off, retired, attempt + 1)

        Deferred.fromCoroutine(move()).addErrback(lambda f: self.log.failure("hand-off failed", f))

    def _forget(self, retired: Prefix) -> None:
        """Drop the records of a range we stopped serving ``RETIRE_AFTER`` seconds ago."""
        now = self.clock.seconds()
        self.retired = [(p, until) for p, until in self.retired if until > now]
        serving = self.view.prefix if self.view is not None else None
        if serving is not None and serving.covers(retired):
            return
        if serving is not None and retired.covers(serving):
            self.index.drop(retired.start, serving.start)
            self.index.drop(serving.end, retired.end)
        else:
            self.index.drop(retired.start, retired.end)

    def _pull(self, message: Pull) -> Records:
        _check_range(message.NAME, message.start, message.end)
        now = self.clock.seconds()
        ranges = [p for p, until in self.retired if until > now] if message.retired else []
        if self.held is not None:
            ranges.append(self.held)
        overlapping = [p for p in ranges if p.start < message.end and message.start < p.end]
        if not overlapping:
            raise HoldsNone()
        if not any(p.start <= message.start and message.end <= p.end for p in overlapping):
            raise HoldsPart()
        records = self.index.export(message.start, message.end)
        at = max(0, message.cursor)
        batch = tuple(records[at : at + PULL_BATCH])
        following = at + len(batch)
        return Records(message.rid, batch, following if following < len(records) else None)

    def _digest(self, message: DigestRequest) -> DigestReply:
        """Our digest of a range we hold completely (never of retired ranges: stale)."""
        _check_range(message.NAME, message.start, message.end)
        held = self.held
        if held is None or held.end <= message.start or message.end <= held.start:
            raise HoldsNone()
        if not (held.start <= message.start and message.end <= held.end):
            raise HoldsPart()
        digest = self.index.digest(message.start, message.end)
        return DigestReply(message.rid, digest.count, digest.fingerprint_bytes)

    # -- replication ----------------------------------------------------------------------------

    async def slot_members(self, key: int) -> tuple[SupernodeInfo, ...]:
        """The members of the slot that holds ``key`` (at most two hops away)."""
        assert self.view is not None
        route = self.view.route(key)
        if isinstance(route, Serve):
            return self.view.own_slot.members
        assert isinstance(route, Refer)
        if route.level == "slot":
            return route.contacts
        for contact in route.contacts:
            try:
                reply = await self.udp.request(
                    (contact.host, contact.udp_port),
                    lambda rid: Locate(rid, key),
                    timeout=PEER_TIMEOUT,
                    pad_to=SEARCH_PAD,  # room for the slot's members in the reply
                )
            except VoipError:
                continue
            if isinstance(reply, SearchReferral) and reply.level == "slot":
                return reply.contacts
        raise NotDelivered("No supernode of the key's block answered.")

    async def replicate(self, record: bytes, key: int) -> int:
        """Store a record at every member of its slot; returns how many accepted it."""
        members = await self.slot_members(key)
        stored = 0
        requests: list[Deferred[Message]] = []
        for member in members:
            if member.node_id == self.node_id:
                with contextlib.suppress(PresenceError):
                    self.index.put(record)  # held now, whether new or not
                    stored += 1
                continue
            requests.append(
                self.udp.request(
                    (member.host, member.udp_port),
                    lambda rid: Store(rid, record),
                    timeout=PEER_TIMEOUT,
                )
            )
        for ok, reply in await DeferredList(requests, consumeErrors=True):
            if ok and isinstance(reply, Stored) and reply.accepted:
                stored += 1
        return stored

    # -- delivery -------------------------------------------------------------------------------

    async def deliver_local(self, username: str, envelope: bytes) -> bool:
        connection = self.attached.get(username)
        if connection is None:
            return False
        try:
            reply = await connection.push(lambda rid: Incoming(rid, envelope))
        except (VoipError, defer.TimeoutError):  # the node did not ack in time
            return False
        return isinstance(reply, Ack)

    async def forward(self, target: SupernodeInfo, username: str, envelope: bytes) -> bool:
        if target.node_id == self.node_id:
            return await self.deliver_local(username, envelope)
        reply = await self.udp.request(
            (target.host, target.udp_port),
            lambda rid: Forward(rid, username, envelope),
            timeout=DELIVERY_TIMEOUT,
        )
        return isinstance(reply, Forwarded) and reply.delivered

    #: Set by the node that runs this supernode: ``find(username) -> SupernodeInfo | None``,
    #: where the user is attached (an iterative search from here).
    locate_user: Callable[[str], Deferred[SupernodeInfo | None]] | None = None

    async def send(self, sender: str, to: str, envelope: bytes) -> None:
        to = canonical_username(to)
        if to in self.attached:
            if await self.deliver_local(to, envelope):
                return
            raise NotDelivered(f"{to} did not take the message.")
        if self.locate_user is None:
            raise NotDelivered("This supernode cannot search.")
        target = await self.locate_user(to)
        if target is None:
            raise NotDelivered(f"{to} is offline.")
        if not await self.forward(target, to, envelope):
            raise NotDelivered(f"{to} could not be reached through its supernode.")

    def migrate_all(self, contacts: tuple[SupernodeInfo, ...]) -> None:
        """We are leaving: tell every attached node where to go."""
        for connection in list(self.attached.values()):
            connection.push(lambda rid: Migrate(rid, contacts)).addErrback(lambda _: None)

    # -- TCP ------------------------------------------------------------------------------------

    def factory(self) -> Factory:
        return SupernodeFactory(self)

    def attach(self, username: str, connection: SupernodeConnection) -> None:
        old = self.attached.get(username)
        if old is not None and old is not connection:
            old.close()
        if old is None and len(self.attached) >= self.max_attached:
            self.counters["refused-full"] += 1
            raise SupernodeFull()
        self.attached[username] = connection

    def detach(self, username: str, connection: SupernodeConnection) -> None:
        if self.attached.get(username) is connection:
            del self.attached[username]


class SupernodeConnection(FramedConnection):
    """An ordinary node attached over TCP."""

    def __init__(self, supernode: Supernode, source: str) -> None:
        super().__init__(supernode.clock, HANDSHAKE_TIMEOUT)
        self.supernode = supernode
        self.source = source
        self.username: str | None = None
        self._next_rid = 1
        self._waiting: dict[int, Deferred[Message]] = {}

    def message_received(self, message: Message) -> None:
        sn = self.supernode
        if self.session is None:
            if not isinstance(message, Hello):
                self.send_error(0, message.NAME, ProtocolError("Expected hello first."))
                self.close()
                return
            try:
                reply, session = server_handshake(
                    sn.node_key, message, self.clock.seconds(), sn.certificate
                )
            except ProtocolError as exc:
                self.send_error(0, message.NAME, exc)
                self.close()
                return
            self.send(reply)
            self.session = session
            self.idle_timeout = ATTACH_IDLE_TIMEOUT
            self._touch()
            return
        if message.REPLY:
            waiter = self._waiting.pop(getattr(message, "rid", -1), None)
            if waiter is not None:
                waiter.callback(message)
            return
        rid = getattr(message, "rid", 0)
        try:
            if isinstance(message, Ping):
                self.send(Pong(rid, self.clock.seconds()))
            elif isinstance(message, Attach):
                self._attach(message)
            elif self.username is None:
                raise NotAttached()
            elif isinstance(message, Publish):
                self._run(message, self._publish(message))
            elif isinstance(message, Send):
                self._run(message, self._send_message(message))
            else:
                raise ProtocolError(f"{message.NAME} is not a request a node may make.")
        except VoipError as exc:
            self.send_error(rid, message.NAME, exc)

    def _attach(self, message: Attach) -> None:
        sn = self.supernode
        assert self.session is not None
        signed = SignedCertificate.parse(message.certificate)
        cert = signed.verify(sn.ca_public_key, self.clock.seconds(), Role.USER)
        proof = proof_message(self.session.transcript, cert.username, cert.public_key)
        if not verify_signature(cert.public_key, proof, message.proof):
            raise ProtocolError("The attach proof did not verify.")
        if self.username is not None and self.username != cert.username:
            sn.detach(self.username, self)  # one connection carries one user at a time
        sn.attach(cert.username, self)
        self.username = cert.username
        sn.counters["attached"] += 1
        self.send(Attached(message.rid, sn.contacts_for_nodes()))

    async def _publish(self, message: Publish) -> Message:
        sn = self.supernode
        signed = SignedPresence.parse(message.record)
        record = signed.verify(sn.ca_public_key, self.clock.seconds(), self.username)
        replicas = await sn.replicate(message.record, user_key(record.username))
        return Published(message.rid, replicas)

    async def _send_message(self, message: Send) -> Message:
        assert self.username is not None
        await self.supernode.send(self.username, message.to, message.envelope)
        return Sent(message.rid)

    def _run(self, request: Message, work: Any) -> None:
        rid = getattr(request, "rid", 0)

        def failed(failure: Failure) -> None:
            if isinstance(failure.value, VoipError):
                self.send_error(rid, request.NAME, failure.value)
            else:
                self.log.failure("{request} failed", failure, request=request.NAME)
                self.send_error(rid, request.NAME, VoipError("The supernode failed."))

        Deferred.fromCoroutine(work).addCallbacks(self.send, failed)

    def bad_message(self, request: str, exc: ProtocolError) -> None:
        """Answer what we could not understand (naming it), and count it."""
        self.supernode.counters["bad-frames" if request == "frame" else "bad-messages"] += 1
        self.send_error(0, request, exc)

    def push(self, build: Callable[[int], Message]) -> Deferred[Message]:
        """Send a request to the attached node and wait for its reply."""
        rid = self._next_rid
        self._next_rid += 1
        waiter: Deferred[Message] = Deferred()
        self._waiting[rid] = waiter
        waiter.addTimeout(DELIVERY_TIMEOUT, self.clock)

        def settled(result: Any) -> Any:
            self._waiting.pop(rid, None)  # answered, timed out or failed: nobody waits any more
            return result

        waiter.addBoth(settled)
        self.send(build(rid))
        return waiter

    def connection_closed(self, reason: Failure | None) -> None:
        if self.username is not None:
            self.supernode.detach(self.username, self)
        # Each errback removes its own entry (see ``push``): iterate over a detached copy.
        waiting, self._waiting = self._waiting, {}
        for waiter in waiting.values():
            waiter.errback(NotDelivered("The node went away."))


class SupernodeFactory(Factory):
    def __init__(self, supernode: Supernode) -> None:
        self.supernode = supernode

    def buildProtocol(self, addr: IAddress | None) -> SupernodeConnection:
        return SupernodeConnection(self.supernode, getattr(addr, "host", str(addr)))
