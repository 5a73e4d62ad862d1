"""The supernode role: index a slot of the user directory, answer searches, carry ONs.

A ``Supernode`` owns:

- its node key and, once admitted by the login server, its supernode certificate and routing
  view (``overlay.slotmap.RoutingView``: own slot, own block, a few contacts per other block);
- the presence records of its slot (``overlay.index.PresenceIndex``), replicated at every
  member of the slot; a supernode that joins a slot pulls the slot's records from a peer before
  it answers searches for it (until then it refers askers to its peers);
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
from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from overlay.certificate import Role, SignedCertificate
from overlay.channel import Hello, server_handshake
from overlay.connection import FramedConnection
from overlay.datagram import Address, DatagramEndpoint
from overlay.errors import ProtocolError, VoipError
from overlay.identity import IdentityKey, verify_signature
from overlay.index import PresenceIndex
from overlay.keyspace import user_key
from overlay.login_protocol import proof_message
from overlay.messages import Message, Ping, Pong
from overlay.overlay_protocol import (
    Ack,
    Attach,
    Attached,
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
from overlay.slotmap import Refer, RoutingView, Serve, SupernodeInfo

REACH_CONTEXT = b"voip-reach-v1"
ATTACH_IDLE_TIMEOUT = 60.0
HANDSHAKE_TIMEOUT = 10.0
PEER_TIMEOUT = 2.0
PULL_BATCH = 1
DELIVERY_TIMEOUT = 5.0


class SupernodeFull(VoipError):
    """This supernode carries as many nodes as it may; try another."""

    code = "supernode-full"


class NotAttached(VoipError):
    """Attach first."""

    code = "not-attached"


class NotDelivered(VoipError):
    """The message could not be delivered."""

    code = "not-delivered"


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
        self.index = PresenceIndex(clock, ca_public_key, self._owns)
        self.udp = DatagramEndpoint(clock, self.handle_datagram)
        self.attached: dict[str, SupernodeConnection] = {}
        self.counters: Counter[str] = Counter()
        self._sync: Deferred[None] | None = None

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

    def set_view(self, view: RoutingView) -> None:
        old = self.view
        self.view = view
        if old is None or old.prefix != view.prefix:
            start, end = view.prefix.start, view.prefix.end
            dropped = self.index.drop(0, start) + self.index.drop(end, 1 << 64)
            self.log.info(
                "serving slot {prefix} (view {version}); dropped {dropped} records",
                prefix=view.prefix,
                version=view.version,
                dropped=dropped,
            )
            self.synced = not [p for p in view.peers if p.node_id != self.node_id]
            if not self.synced:
                self._sync = Deferred.fromCoroutine(self._pull_slot(view))

    async def _pull_slot(self, view: RoutingView) -> None:
        peers = [p for p in view.peers if p.node_id != self.node_id]
        self.rng.shuffle(peers)
        start, end = view.prefix.start, view.prefix.end
        for peer in peers:
            cursor: int | None = 0
            try:
                while cursor is not None and self.view is view:
                    reply = await self.udp.request(
                        (peer.host, peer.udp_port),
                        functools.partial(Pull, start=start, end=end, cursor=cursor),
                        timeout=PEER_TIMEOUT,
                    )
                    if not isinstance(reply, Records):
                        raise ProtocolError(f"pull answered with {reply.NAME}")
                    self.index.import_records(reply.records)
                    cursor = reply.cursor
            except VoipError as exc:
                self.log.info("pull from a slot peer failed: {error}", error=exc)
                continue
            break
        if self.view is view:
            self.synced = True

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
            return Stored(message.rid, self.index.put(message.record))
        if isinstance(message, Pull):
            return self._pull(message)
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
            if not self.synced:
                peers = tuple(p for p in self.view.peers if p.node_id != self.node_id)
                return SearchReferral(message.rid, peers, "slot")
            lookup = self.index.get(message.username)
            if lookup.signed is None:
                return SearchNone(message.rid)
            return SearchFound(message.rid, bytes(lookup.signed))
        assert isinstance(route, Refer)
        return SearchReferral(message.rid, route.contacts, route.level)

    def _locate(self, rid: int, key: int) -> SearchReferral:
        assert self.view is not None
        route = self.view.route(key)
        if isinstance(route, Serve):
            return SearchReferral(rid, self.view.peers, "slot")
        assert isinstance(route, Refer)
        return SearchReferral(rid, route.contacts, route.level)

    def _pull(self, message: Pull) -> Records:
        records = self.index.export(message.start, message.end)
        at = max(0, message.cursor)
        batch = tuple(records[at : at + PULL_BATCH])
        following = at + len(batch)
        return Records(message.rid, batch, following if following < len(records) else None)

    # -- replication ----------------------------------------------------------------------------

    async def slot_members(self, key: int) -> tuple[SupernodeInfo, ...]:
        """The members of the slot that holds ``key`` (at most two hops away)."""
        assert self.view is not None
        route = self.view.route(key)
        if isinstance(route, Serve):
            return self.view.peers
        assert isinstance(route, Refer)
        if route.level == "slot":
            return route.contacts
        for contact in route.contacts:
            try:
                reply = await self.udp.request(
                    (contact.host, contact.udp_port),
                    lambda rid: Locate(rid, key),
                    timeout=PEER_TIMEOUT,
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
                    stored += self.index.put(record)
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
        except VoipError:
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

    def push(self, build: Callable[[int], Message]) -> Deferred[Message]:
        """Send a request to the attached node and wait for its reply."""
        rid = self._next_rid
        self._next_rid += 1
        waiter: Deferred[Message] = Deferred()
        self._waiting[rid] = waiter
        waiter.addTimeout(DELIVERY_TIMEOUT, self.clock)
        self.send(build(rid))
        return waiter

    def connection_closed(self, reason: Failure | None) -> None:
        if self.username is not None:
            self.supernode.detach(self.username, self)
        for waiter in self._waiting.values():
            waiter.errback(NotDelivered("The node went away."))
        self._waiting.clear()


class SupernodeFactory(Factory):
    def __init__(self, supernode: Supernode) -> None:
        self.supernode = supernode

    def buildProtocol(self, addr: IAddress | None) -> SupernodeConnection:
        return SupernodeConnection(self.supernode, getattr(addr, "host", str(addr)))
