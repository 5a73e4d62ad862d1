"""Fetching the records of a slot: what a supernode does when its slot changes.

When a supernode joins a slot, or its slot merges or it moves to another slot, it lacks the
records of some key ranges of its slot (``missing_ranges``).  ``SlotSync`` pulls them (``pull``
requests, ``overlay.overlay_protocol``) from the sources that hold them:

1. the slot peers, then the members of the slots that held the range in the views the
   supernode left (after a merge or a move a range's only holders may serve other slots now);
   only ranges a source holds in full count (``holds-part`` / ``holds-none`` otherwise);
2. sources are asked ``PROBE_PARALLEL`` at a time for the range's first record; the first that
   holds all of it is pulled from, ``PULL_WINDOW`` requests (consecutive cursors) at a time, one
   record per reply (a reply may not be larger than its request);
3. a range that only some sources hold in part is asked for in halves, of those;
4. a range nobody holds now is asked for once more with ``retired``: copies of ranges sources
   left, those who left it most recently first (the copies are as of when they left it);
5. ranges whose sources did not answer are tried again ``SYNC_RETRY`` seconds later, up to
   ``SYNC_ATTEMPTS`` times; then the supernode serves without them (users republish).

Until all is pulled the supernode refers searches for the rest of its slot to its peers
("not ready") instead of answering "none".  ``pull_from`` is also what anti-entropy
(``overlay.antientropy``) repairs with.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from twisted.internet import defer
from twisted.internet.defer import Deferred, DeferredSemaphore, FirstError, gatherResults
from twisted.logger import Logger
from twisted.python.failure import Failure

from overlay.errors import ProtocolError, VoipError
from overlay.keyspace import KEY_BITS, Prefix
from overlay.messages import Error, Message
from overlay.overlay_protocol import SEARCH_PAD, Pull, Records
from overlay.slotmap import RoutingView, SupernodeInfo

if TYPE_CHECKING:
    from overlay.supernode import Supernode

PULL_TIMEOUT = 2.0
#: Pull requests a puller keeps out at once (one record comes per reply).
PULL_WINDOW = 8
#: Sources asked at once whether they hold a range.
PROBE_PARALLEL = 2
SYNC_RETRY = 2.0
SYNC_ATTEMPTS = 5
#: How many times a range nobody holds whole is halved before we conclude nobody holds it.
PULL_SPLIT_DEPTH = 6


class HoldsNone(VoipError):
    """This supernode holds none of that key range."""

    code = "holds-none"


class HoldsPart(VoipError):
    """This supernode holds only a part of that key range; ask for less."""

    code = "holds-part"


def missing_ranges(prefix: Prefix, held: Prefix | None) -> list[Prefix]:
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


class SlotSync:
    """Pulls the ranges a supernode lacks of its slot (see the module's docstring)."""

    log = Logger()

    def __init__(self, supernode: Supernode) -> None:
        self.sn = supernode
        self.running: Deferred[None] | None = None

    def pull(self, view: RoutingView, missing: list[Prefix]) -> None:
        """Start pulling ``missing`` (ranges of ``view``'s slot); ``sn.synced`` when done."""
        self._start(view, missing, 1)

    def _start(self, view: RoutingView, missing: list[Prefix], attempt: int) -> None:
        self.running = Deferred.fromCoroutine(self._pull_ranges(view, missing, attempt))
        self.running.addErrback(lambda f: self.log.failure("pulling the slot failed", f))

    async def _pull_ranges(self, view: RoutingView, missing: list[Prefix], attempt: int) -> None:
        done = await gatherResults(
            [Deferred.fromCoroutine(self._pull_range(view, wanted)) for wanted in missing]
        ).addErrback(_first_error)
        still = [wanted for wanted, ok in zip(missing, done, strict=True) if not ok]
        if not self.sn.serves(view):
            return
        if still and attempt < SYNC_ATTEMPTS:
            self.sn.clock.callLater(SYNC_RETRY, self._retry_sync, view, still, attempt + 1)
            return
        if still:
            self.log.warn(
                "no slot peer holds {count} ranges of {prefix}; serving without them "
                "(their users republish within minutes)",
                count=len(still),
                prefix=view.prefix,
            )
        self.sn.held = view.prefix
        self.sn.synced = True

    def _retry_sync(self, view: RoutingView, missing: list[Prefix], attempt: int) -> None:
        if self.sn.serves(view) and not self.sn.synced:
            self._start(view, missing, attempt)

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
        if not self.sn.serves(view):
            return True  # not ours any more: nothing to do
        # Ask the sources, a few at a time, for the range's first record: in the current map
        # any full holder will do (the first to answer); of copies of ranges left, the one
        # first in order (the most recently left).
        probe = await self._probe(peers, wanted, retired=retired, first_wins=not retired)
        if probe.full:
            peer, first = probe.full[0]
            self.sn.index.import_records(first.records)
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
        while self.sn.serves(view):
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
                self.sn.index.import_records(reply.records)
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

        return self.sn.udp.request(
            (peer.host, peer.udp_port),
            functools.partial(
                Pull, start=wanted.start, end=wanted.end, cursor=position, retired=retired
            ),
            timeout=PULL_TIMEOUT,
            pad_to=SEARCH_PAD,  # room for a record in the reply
        ).addCallback(check)

    def _sources(
        self, view: RoutingView, wanted: Prefix, *, retired: bool = False
    ) -> list[SupernodeInfo]:
        """Whom to pull ``wanted`` from: slot peers, then members of slots that held part of
        it in views we left (the view left last first) and that our view still knows (the
        others may well be dead); with ``retired``, those former holders first."""
        peers = list(view.peers)
        self.sn.rng.shuffle(peers)
        alive = {s.node_id for s in view.known_supernodes()}
        seen = {p.node_id for p in peers} | {self.sn.node_id}
        former: list[SupernodeInfo] = []
        for slots, _ in reversed(self.sn.former):
            group = [
                member
                for slot in slots
                if slot.prefix.start < wanted.end and wanted.start < slot.prefix.end
                for member in slot.members
                if member.node_id in alive and member.node_id not in seen
            ]
            self.sn.rng.shuffle(group)
            seen.update(m.node_id for m in group)
            former += group
        return former + peers if retired else peers + former
