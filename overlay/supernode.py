"""The supernode role: index a slot of the user directory, answer searches, carry ONs.

A ``Supernode`` owns:

- its node key and, once admitted by the login server, its supernode certificate and routing
  view (``overlay.slotmap.RoutingView``: own slot, own block, a few contacts per other block);
- the presence records of its slot (``overlay.index.PresenceIndex``), replicated at every
  member of the slot; a supernode whose slot changed pulls what it lacks of it from the
  replicas, or from those who held it before the change (``overlay.slotsync``), and until then
  answers searches for that part with "not ready" rather than "none"; it compares digests
  with a random slot peer now and then and pulls what differs (``overlay.antientropy``);
- a UDP endpoint (``overlay.datagram``) for searches, stores, pulls, pings, reachability checks
  and forwarded messages;
- a TCP service for attached ordinary nodes (``SupernodeConnection``): attach with a user
  certificate and a proof of its key, publish presence, send messages, keep-alive;
- searches on behalf of attached nodes that cannot search themselves (UDP blocked): ``find``
  runs the iterative search from here (``search_for_node``, set by the node running this
  supernode) and returns the signed record, which the node verifies itself: a supernode can
  refuse or fail such a search, never forge its answer.  Each connection gets a ``FindBudget``
  (a few running at once, a few more per window) so a node cannot make its supernode search
  without end.

Message table: ``overlay.overlay_protocol``.
"""

from __future__ import annotations

import contextlib
import random
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    DeferredSemaphore,
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
from overlay.keyspace import KEY_SPACE, Prefix, user_key
from overlay.login_protocol import proof_message
from overlay.mailbox import Collect, Deposit, Drop, Mailboxes, Post
from overlay.messages import Message, Ping, Pong
from overlay.overlay_protocol import (
    SEARCH_PAD,
    Ack,
    Attach,
    Attached,
    DigestReply,
    DigestRequest,
    Find,
    FindResult,
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
    RelayMint,
    RelayRequest,
    Relays,
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
from overlay.relayoffers import RelayEndpoint, RelayOffers
from overlay.search import LEVEL_NOT_READY, SearchResult
from overlay.slotmap import Refer, RoutingView, Serve, SupernodeInfo, ViewSlot
from overlay.slotsync import HoldsNone, HoldsPart, SlotSync, missing_ranges
from overlay.usernames import canonical_username

REACH_CONTEXT = b"voip-reach-v1"
ATTACH_IDLE_TIMEOUT = 60.0
HANDSHAKE_TIMEOUT = 10.0
PEER_TIMEOUT = 2.0
PULL_BATCH = 1
DELIVERY_TIMEOUT = 5.0
#: Attempts at handing the records of a range we left over to its new slot.
HANDOFF_ATTEMPTS = 5
#: How long records of a range we stopped serving stay available to pulls.
RETIRE_AFTER = 600.0
#: Records of a range we left are stored at its new slot after views had time to spread.
HANDOFF_DELAY = 3.0
HANDOFF_PARALLEL = 16
#: At most this many slot peers are named in a "none" or "not ready" search reply.
MAX_NAMED = 10


class SupernodeFull(VoipError):
    """This supernode carries as many nodes as it may; try another."""

    code = "supernode-full"


class NotAttached(VoipError):
    """Attach first."""

    code = "not-attached"


class NotDelivered(VoipError):
    """The message could not be delivered."""

    code = "not-delivered"


class TooManySearches(VoipError):
    """Too many searches through this supernode; try again shortly."""

    code = "too-many-searches"

    def __init__(self, message: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


#: An attached node may have this many ``find``s running at once ...
FIND_IN_FLIGHT = 10
#: ... and start this many in any ``FIND_WINDOW`` seconds.
FIND_PER_WINDOW = 20
FIND_WINDOW = 10.0


class FindBudget:
    """How many ``find``s one connection may run: at most ``in_flight`` at once and
    ``per_window`` started in any ``window`` seconds of the clock (a sliding window)."""

    def __init__(
        self,
        clock: IReactorTime,
        in_flight: int = FIND_IN_FLIGHT,
        per_window: int = FIND_PER_WINDOW,
        window: float = FIND_WINDOW,
    ) -> None:
        self.clock = clock
        self.in_flight = in_flight
        self.per_window = per_window
        self.window = window
        self.running = 0
        self._started: deque[float] = deque()

    def take(self) -> None:
        """Start one, or raise ``TooManySearches`` (``retry_after`` set when the window is full)."""
        now = self.clock.seconds()
        while self._started and self._started[0] <= now - self.window:
            self._started.popleft()
        if self.running >= self.in_flight:
            raise TooManySearches(
                f"Too many searches: at most {self.in_flight} at once; wait for one to finish."
            )
        if len(self._started) >= self.per_window:
            wait = max(0.0, self._started[0] + self.window - now)
            raise TooManySearches(
                f"Too many searches: at most {self.per_window} in {self.window:g} s; "
                f"try again in {wait:.1f} s.",
                retry_after=wait,
            )
        self.running += 1
        self._started.append(now)

    def release(self) -> None:
        """One has finished (answered or failed)."""
        self.running = max(0, self.running - 1)


def _username_of(blob: bytes) -> str:
    return SignedPresence.parse(blob).record.username


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
        self.sync = SlotSync(self)
        #: Our relay, offered to attached nodes (``relay-offer``); None: we relay nothing.
        self.relay: RelayEndpoint | None = None
        self.offers = RelayOffers(self)
        self.anti_entropy = AntiEntropy(self, every=anti_entropy_every)
        #: Messages held for offline users of our slot (``overlay.mailbox``).
        self.mailbox = Mailboxes(self)

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
        ranges it lacks (``overlay.slotsync``), and until then refers searches for them to its
        peers ("not ready") instead of answering "no such record".
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
        missing = missing_ranges(prefix, self.held)
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
            self.sync.pull(view, missing)

    def serves(self, view: RoutingView) -> bool:
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
        if isinstance(message, RelayMint):
            return self.offers.handle_mint(message)
        if isinstance(message, Deposit | Collect | Drop):
            return self.mailbox.handle(message)
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
                return SearchReferral(message.rid, self._replicas(), LEVEL_NOT_READY)
            return SearchNone(message.rid, self._replicas())
        assert isinstance(route, Refer)
        return SearchReferral(message.rid, route.contacts, route.level)

    def _replicas(self) -> tuple[SupernodeInfo, ...]:
        """Slot peers to name in a search reply: at most ``MAX_NAMED``, so it fits the
        padded request (a slot has 9-10 members, but may have more for a while)."""
        assert self.view is not None
        peers = list(self.view.peers)
        if len(peers) > MAX_NAMED:
            peers = self.rng.sample(peers, MAX_NAMED)
        return tuple(peers)

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
            if unplaced and attempt < HANDOFF_ATTEMPTS:
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

    #: Set by the node that runs this supernode: ``search(username) -> (result, signed)``, an
    #: iterative search from here for an attached node that cannot search itself (``find``);
    #: ``signed``: the bytes of the chosen record (None without one), passed on unaltered.
    search_for_node: Callable[[str], Deferred[tuple[SearchResult, bytes | None]]] | None = None

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
        self.finds = FindBudget(supernode.clock)

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
            elif isinstance(message, RelayRequest):
                self._run(message, self._relay_offer(message))
            elif isinstance(message, Find):
                self._find(message)
            elif isinstance(message, Post):
                self._run(message, sn.mailbox.post(self.username, message))
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
        sn.mailbox.deliver_soon(cert.username)  # messages held while it was away

    async def _publish(self, message: Publish) -> Message:
        sn = self.supernode
        signed = SignedPresence.parse(message.record)
        record = signed.verify(sn.ca_public_key, self.clock.seconds(), self.username)
        replicas = await sn.replicate(message.record, user_key(record.username))
        sn.mailbox.published(signed)
        return Published(message.rid, replicas)

    async def _relay_offer(self, message: RelayRequest) -> Message:
        assert self.username is not None
        return Relays(message.rid, await self.supernode.offers.for_node(self.username))

    async def _send_message(self, message: Send) -> Message:
        assert self.username is not None
        await self.supernode.send(self.username, message.to, message.envelope)
        return Sent(message.rid)

    def _find(self, message: Find) -> None:
        """Search for the node (its UDP is blocked), within its ``FindBudget``."""
        sn = self.supernode
        search = sn.search_for_node
        if search is None or sn.view is None:
            raise VoipError("This supernode cannot search.")
        try:
            user_key(message.username)
        except VoipError as exc:
            raise ProtocolError(f"Cannot search {message.username!r}: {exc}") from None
        try:
            self.finds.take()
        except TooManySearches:
            sn.counters["finds-refused"] += 1
            raise
        sn.counters["finds"] += 1

        async def run() -> Message:
            try:
                result, signed = await search(message.username)
            finally:
                self.finds.release()
            sn.counters[f"finds-{result.outcome}"] += 1
            return FindResult(message.rid, result.outcome, result.rounds, signed)

        self._run(message, run())

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
