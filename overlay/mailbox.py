"""Mailboxes: instant messages for offline users, held by the supernodes of their slot.

A node ``post``s a signed message envelope (``client.envelope``, kind "msg" or "receipt") to
its supernode.  The supernode first tries to deliver it at once, exactly as ``send`` does; when
the recipient is not attached anywhere (or did not take it), it ``deposit``s the envelope at
every member of the recipient's slot (the supernodes that hold the recipient's presence record)
and answers ``posted {queued: true}`` only once at least two of them (every member, if the slot
has fewer) stored it, so the sender's supernode may die right after without losing anything.
The recipient's supernode ``collect``s the user's envelopes from the slot's members when the
user attaches, and each time the user publishes a record (every 5 minutes), pushes them in the
order they were sealed as ``incoming``, and once the node acknowledged each, tells the members to
``drop`` them.  A message is pushed again if its drop was lost; the recipient dedupes by message
id, so it is shown once.

Message table (UDP between supernodes unless said otherwise)::

    node -> SN (TCP)  post {rid, to, envelope}   -> posted {rid, queued, replicas}
                      (queued false: delivered now; true: held by ``replicas`` slot members;
                      error mailbox-full "bob's mailbox is full." / not-delivered)
    SN -> SN          deposit {rid, envelope}    -> deposited {rid, accepted}
                      (error mailbox-full; the envelope must verify: CA-signed sender
                      certificate, the sender's signature, sealed within 120 s, kind msg/receipt)
    SN -> SN          collect {rid, user, cursor, certificate, sent_at, signature}  (padded)
                                                 -> collected {rid, envelopes, cursor}
                      (one envelope per reply, oldest first; cursor None: no more)
    SN -> SN          drop {rid, user, ids, certificate, sent_at, signature}
                                                 -> dropped {rid, count}
                      (ids: the envelopes' 16-byte BLAKE2b digests, at most 16)

``collect`` and ``drop`` carry the asking supernode's certificate (role supernode, signed by
the CA) and its node key's signature over the request, made within the last 60 s: only a
supernode may read or empty a mailbox.  Envelopes stay encrypted to their recipient
(``client.messaging``); supernodes see who writes to whom, and when.

Bounds (``MailboxStore``): 100 envelopes per recipient, 20 per sender and recipient, 50,000 in
all; an envelope is kept 72 h from when it was deposited (on the injected clock).  The store is
in memory only: a copy at every member of the slot makes it survive a member dying.  A member
that joins a slot later does not pull mailboxes (collect asks every member, so the others
still deliver); when every member of a slot is replaced at once, its mailboxes are lost.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cbor2
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from client.envelope import MAX_AGE, Envelope, EnvelopeError, verify_sender
from overlay.certificate import Role, SignedCertificate
from overlay.errors import ProtocolError, VoipError
from overlay.identity import verify_signature
from overlay.keyspace import user_key
from overlay.messages import Error, Message, message
from overlay.presence import SignedPresence, Status
from overlay.usernames import canonical_username, is_valid_username

if TYPE_CHECKING:
    from overlay.slotmap import SupernodeInfo
    from overlay.supernode import Supernode

#: How long a supernode holds a message for an offline user.
HOLD_FOR = 72 * 3600.0
PER_RECIPIENT = 100
PER_PAIR = 20
MAX_TOTAL = 50_000
HELD_KINDS = frozenset({"msg", "receipt"})
#: Collect requests are padded so a reply with one envelope (at most 1,000 bytes) fits.
COLLECT_PAD = 1100
MAX_DROP_IDS = 16
MAX_SKEW = 60.0
PEER_TIMEOUT = 2.0
#: Replicas that must hold a deposited message before the sender is told "queued".
MIN_REPLICAS = 2
#: Rounds of collect per replica at most (the per-recipient bound, with room to spare).
MAX_COLLECT_ROUNDS = PER_RECIPIENT + 10
CONTEXT = b"voip-mailbox-v1"

log = Logger()


class MailboxFull(VoipError):
    """The recipient's mailbox is full."""

    code = "mailbox-full"


class NotQueued(VoipError):
    """The message could not be delivered nor held for its recipient."""

    code = "not-delivered"


@message(0x0070, "post")
class Post(Message):
    """Deliver this envelope now, or hold it for its recipient at the recipient's slot."""

    rid: int
    to: str
    envelope: bytes


@message(0x0071, "posted", reply=True)
class Posted(Message):
    rid: int
    queued: bool = False
    replicas: int = 0


@message(0x0072, "deposit")
class Deposit(Message):
    rid: int
    envelope: bytes


@message(0x0073, "deposited", reply=True)
class Deposited(Message):
    rid: int
    accepted: bool


@message(0x0074, "collect")
class Collect(Message):
    rid: int
    user: str
    cursor: int
    certificate: bytes
    sent_at: int
    signature: bytes


@message(0x0075, "collected", reply=True)
class Collected(Message):
    rid: int
    envelopes: tuple[bytes, ...]
    cursor: int | None = None


@message(0x0076, "drop")
class Drop(Message):
    rid: int
    user: str
    ids: tuple[bytes, ...]
    certificate: bytes
    sent_at: int
    signature: bytes


@message(0x0077, "dropped", reply=True)
class Dropped(Message):
    rid: int
    count: int


@dataclass(frozen=True)
class Held:
    digest: bytes
    sender: str
    recipient: str
    sent_at_ms: int
    stored_at: float
    envelope: bytes


class MailboxStore:
    """The envelopes held at one supernode, per recipient in the order they were sealed."""

    def __init__(
        self,
        clock: IReactorTime,
        *,
        per_recipient: int = PER_RECIPIENT,
        per_pair: int = PER_PAIR,
        total: int = MAX_TOTAL,
        hold_for: float = HOLD_FOR,
    ) -> None:
        self.clock = clock
        self.per_recipient = per_recipient
        self.per_pair = per_pair
        self.total = total
        self.hold_for = hold_for
        self.boxes: dict[str, list[Held]] = {}
        self.counters: Counter[str] = Counter()

    def __len__(self) -> int:
        return sum(len(box) for box in self.boxes.values())

    def put(self, held: Held) -> bool:
        """Hold ``held``; False when it is held already; ``MailboxFull`` over a bound."""
        self.expire()
        box = self.boxes.get(held.recipient, [])
        if any(h.digest == held.digest for h in box):
            return False
        if len(box) >= self.per_recipient:
            self.counters["refused-full"] += 1
            raise MailboxFull(f"{held.recipient}'s mailbox is full.")
        if sum(1 for h in box if h.sender == held.sender) >= self.per_pair:
            self.counters["refused-full"] += 1
            raise MailboxFull(
                f"{held.recipient}'s mailbox is full: {self.per_pair} messages from "
                f"{held.sender} are waiting already."
            )
        if len(self) >= self.total:
            self.counters["refused-full"] += 1
            raise MailboxFull(f"{held.recipient}'s mailbox is full (this supernode is).")
        box.append(held)
        box.sort(key=lambda h: (h.sent_at_ms, h.digest))
        self.boxes[held.recipient] = box
        self.counters["held"] += 1
        return True

    def list(self, user: str) -> list[Held]:
        self.expire()
        return list(self.boxes.get(user, ()))

    def drop(self, user: str, digests: Iterable[bytes]) -> int:
        wanted = set(digests)
        box = self.boxes.get(user, [])
        kept = [h for h in box if h.digest not in wanted]
        dropped = len(box) - len(kept)
        if kept:
            self.boxes[user] = kept
        else:
            self.boxes.pop(user, None)
        self.counters["dropped"] += dropped
        return dropped

    def expire(self) -> None:
        cutoff = self.clock.seconds() - self.hold_for
        for user in list(self.boxes):
            box = self.boxes[user]
            kept = [h for h in box if h.stored_at > cutoff]
            self.counters["expired"] += len(box) - len(kept)
            if kept:
                self.boxes[user] = kept
            else:
                del self.boxes[user]


def _signed_part(  # noqa: PLR0917 - the signed fields, in order
    name: str, rid: int, user: str, target: bytes, sent_at: int, what: object
) -> bytes:
    return CONTEXT + bytes(cbor2.dumps([name, rid, user, target, sent_at, what], canonical=True))


class Mailboxes:
    """A supernode's part in holding messages: its store and the requests around it."""

    def __init__(self, supernode: Supernode) -> None:
        self.sn = supernode
        self.store = MailboxStore(supernode.clock)
        self._collecting: dict[str, bool] = {}

    # -- the envelope ---------------------------------------------------------------------------

    def check(self, data: bytes, *, fresh: bool = True) -> Held:
        """A deposited envelope, verified: who wrote it to whom; ``ProtocolError`` else."""
        now = self.sn.clock.seconds()
        envelope = Envelope.parse(data)
        if envelope.kind not in HELD_KINDS:
            raise EnvelopeError(f"A {envelope.kind} envelope is not held for offline users.")
        sent_at = envelope.sent_at_ms / 1000
        if fresh and abs(sent_at - now) > MAX_AGE:
            raise EnvelopeError("The message is too old to be held (or its clock is far off).")
        certificate = verify_sender(envelope, self.sn.ca_public_key, sent_at)
        return Held(
            envelope.digest,
            certificate.username,
            envelope.recipient,
            envelope.sent_at_ms,
            now,
            bytes(data),
        )

    # -- UDP requests from other supernodes ------------------------------------------------------

    def handle(self, request: Message) -> Message:
        if isinstance(request, Deposit):
            held = self.check(request.envelope)
            view = self.sn.view
            if view is None or not view.prefix.contains(user_key(held.recipient)):
                raise ProtocolError(f"This supernode does not hold {held.recipient}'s mailbox.")
            self.store.put(held)  # False: held already, which is as good
            self.sn.counters["mailbox-deposits"] += 1
            return Deposited(request.rid, True)
        if isinstance(request, Collect):
            self._authenticate(request, request.cursor)
            box = self.store.list(canonical_username(request.user))
            at = max(0, request.cursor)
            batch = tuple(h.envelope for h in box[at : at + 1])
            following = at + len(batch)
            return Collected(request.rid, batch, following if following < len(box) else None)
        if isinstance(request, Drop):
            self._authenticate(request, list(request.ids))
            return Dropped(request.rid, self.store.drop(request.user, request.ids))
        raise ProtocolError(f"{request.NAME} is not a mailbox request.")

    def _authenticate(self, request: Collect | Drop, what: object) -> None:
        sn = self.sn
        now = sn.clock.seconds()
        if not is_valid_username(request.user):
            raise ProtocolError(f"The {request.NAME} request names no valid user.")
        if abs(now - request.sent_at) > MAX_SKEW:
            raise ProtocolError(f"The {request.NAME} request is stale.")
        try:
            cert = SignedCertificate.parse(request.certificate).verify(
                sn.ca_public_key, now, Role.SUPERNODE
            )
        except VoipError:
            sn.counters["mailbox-refused"] += 1
            raise ProtocolError(
                f"The {request.NAME} request has no valid supernode certificate."
            ) from None
        signed = _signed_part(
            request.NAME, request.rid, request.user, sn.node_id, request.sent_at, what
        )
        if not verify_signature(cert.public_key, signed, request.signature):
            sn.counters["mailbox-refused"] += 1
            raise ProtocolError(f"The {request.NAME} request is not signed by its supernode.")

    def _ask(
        self, member: SupernodeInfo, name: str, user: str, what: object, pad: int = 0
    ) -> Deferred[Message]:
        sn = self.sn
        sent_at = int(sn.clock.seconds())

        def build(rid: int) -> Message:
            signature = sn.node_key.sign(
                _signed_part(name, rid, user, member.node_id, sent_at, what)
            )
            cert = sn.certificate or b""
            if name == "collect":
                assert isinstance(what, int)
                return Collect(rid, user, what, cert, sent_at, signature)
            assert isinstance(what, list)
            return Drop(rid, user, tuple(what), cert, sent_at, signature)

        return sn.udp.request(
            (member.host, member.udp_port), build, timeout=PEER_TIMEOUT, pad_to=pad
        )

    # -- posting (the sender's supernode) ---------------------------------------------------------

    async def post(self, sender: str, request: Post) -> Posted:
        """Deliver now, or deposit at the recipient's slot; ``MailboxFull`` / ``NotQueued``."""
        to = canonical_username(request.to)
        held = self.check(request.envelope)
        if held.sender != sender or held.recipient != to:
            raise ProtocolError("A posted message must be from its poster to the named user.")
        with contextlib.suppress(VoipError):
            await self.sn.send(sender, to, request.envelope)
            self.sn.counters["mailbox-posted-live"] += 1
            return Posted(request.rid, False, 0)
        replicas = await self.deposit(held)
        self.sn.counters["mailbox-posted-queued"] += 1
        return Posted(request.rid, True, replicas)

    async def deposit(self, held: Held) -> int:
        sn = self.sn
        try:
            members = await sn.slot_members(user_key(held.recipient))
        except VoipError as exc:
            raise NotQueued(f"{held.recipient} is offline, and their slot is unreachable.") from exc
        accepted = full = 0
        asks: list[Deferred[Message]] = []
        for member in members:
            if member.node_id == sn.node_id:
                try:
                    self.store.put(held)
                    accepted += 1
                except MailboxFull:
                    full += 1
                continue
            asks.append(
                sn.udp.request(
                    (member.host, member.udp_port),
                    lambda rid: Deposit(rid, held.envelope),
                    timeout=PEER_TIMEOUT,
                )
            )
        for ok, reply in await DeferredList(asks, consumeErrors=True):
            if ok and isinstance(reply, Deposited) and reply.accepted:
                accepted += 1
            elif ok and isinstance(reply, Error) and reply.code == MailboxFull.code:
                full += 1
        if accepted >= min(MIN_REPLICAS, len(members)) and accepted > 0:
            return accepted
        if full:
            raise MailboxFull(f"{held.recipient}'s mailbox is full.")
        raise NotQueued(
            f"{held.recipient} is offline, and too few supernodes of their slot took the "
            f"message ({accepted} of {len(members)})."
        )

    # -- delivery at login (the recipient's supernode) --------------------------------------------

    def published(self, record: SignedPresence) -> None:
        """A node published its record: deliver what waits for it, unless it is logging out
        (it would take messages it cannot read any more)."""
        if record.record.status is not Status.OFFLINE:
            self.deliver_soon(record.record.username)

    def deliver_soon(self, user: str) -> None:
        """``user`` attached or published: push what the slot holds for them (one run at a
        time per user; a request during a run makes it run once more)."""
        if user in self._collecting:
            self._collecting[user] = True
            return
        self._collecting[user] = False

        async def run() -> None:
            try:
                while True:
                    await self._deliver(user)
                    if not self._collecting.get(user):
                        break
                    self._collecting[user] = False
            finally:
                self._collecting.pop(user, None)

        Deferred.fromCoroutine(run()).addErrback(
            lambda f: log.failure("delivering held messages to {user} failed", f, user=user)
        )

    async def _deliver(self, user: str) -> None:
        sn = self.sn
        if sn.view is None or sn.certificate is None:
            return
        try:
            members = await sn.slot_members(user_key(user))
        except VoipError:
            return
        found: dict[bytes, tuple[int, bytes]] = {}
        collecting = [
            Deferred.fromCoroutine(self._collect_from(member, user)) for member in members
        ]
        for ok, envelopes in await DeferredList(collecting, consumeErrors=True):
            for data in envelopes if ok else ():
                try:
                    envelope = Envelope.parse(data)
                except EnvelopeError:
                    continue
                if envelope.recipient == user:
                    found.setdefault(envelope.digest, (envelope.sent_at_ms, data))
        if not found:
            return
        delivered: list[bytes] = []
        for digest, (_, data) in sorted(found.items(), key=lambda item: (item[1][0], item[0])):
            if not await sn.deliver_local(user, data):
                break
            delivered.append(digest)
        sn.counters["mailbox-delivered"] += len(delivered)
        if delivered:
            await self._drop_everywhere(members, user, delivered)

    async def _collect_from(self, member: SupernodeInfo, user: str) -> list[bytes]:
        if member.node_id == self.sn.node_id:
            return [h.envelope for h in self.store.list(user)]
        envelopes: list[bytes] = []
        cursor: int | None = 0
        for _ in range(MAX_COLLECT_ROUNDS):
            if cursor is None:
                break
            reply = await self._ask(member, "collect", user, cursor, COLLECT_PAD)
            if not isinstance(reply, Collected):
                break
            envelopes += reply.envelopes
            if reply.cursor is not None and reply.cursor <= cursor:
                break  # a reply that does not move on is not followed
            cursor = reply.cursor
        return envelopes

    async def _drop_everywhere(
        self, members: tuple[SupernodeInfo, ...], user: str, digests: list[bytes]
    ) -> None:
        asks: list[Deferred[Message]] = []
        for member in members:
            if member.node_id == self.sn.node_id:
                self.store.drop(user, digests)
                continue
            for at in range(0, len(digests), MAX_DROP_IDS):
                asks.append(self._ask(member, "drop", user, digests[at : at + MAX_DROP_IDS]))
        await DeferredList(asks, consumeErrors=True)

    def status(self) -> dict[str, int]:
        return {"held": len(self.store), **dict(self.store.counters)}
