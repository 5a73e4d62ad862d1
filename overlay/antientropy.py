"""Anti-entropy between the replicas of a slot: notice what a replica lacks, and pull it.

Every member of a slot should hold every record of the slot's key range, but a record can miss
a replica: a store lost on the way, a record that arrived at the slot while the replica was
pulling elsewhere, a hand-off after a split or merge that reached only some members.  Users
republish every few minutes, which heals that slowly; anti-entropy heals it within a round.

Every ``every`` seconds (jittered to 0.5-1.5 times that, on the supernode's injected clock) a
supernode that holds its whole slot picks one slot peer at random and asks it for the digest
(``PresenceIndex.digest``: how many records, and the XOR of their hashes) of the slot's range
(``digest`` request, ``overlay.overlay_protocol``).  Where the digests differ it halves the range
and compares the halves, depth first, down to ranges where the peer holds at most
``LEAF_RECORDS`` records (or where we hold none), and pulls those ranges from the peer with
``pull`` (the mechanism a joining supernode uses: ``overlay.slotsync``).  Where the peer holds
fewer records than we do it is behind: it pulls from us in its own rounds, and we learn what it
has then.  The index keeps the newest record of each user, so a pull only adds or updates.

A round is bounded: at most ``MAX_DIGESTS`` digest requests and ``MAX_PULLED`` pulled records;
what it did not reach, a later round reaches (perhaps with another peer).  It is pull-only: a
peer that lacks what we hold finds out in its own rounds.  No reply is larger than its request
(digest requests are padded to ``DIGEST_PAD``; pulls to ``SEARCH_PAD``), so the exchange cannot
be turned into an amplifier.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from overlay.errors import ProtocolError, VoipError
from overlay.index import FINGERPRINT_SIZE, Digest
from overlay.keyspace import KEY_BITS, Prefix
from overlay.messages import Error
from overlay.overlay_protocol import DIGEST_PAD, DigestReply, DigestRequest
from overlay.slotmap import RoutingView, SupernodeInfo

if TYPE_CHECKING:
    from overlay.supernode import Supernode

#: Seconds between rounds, on average.
ANTI_ENTROPY_EVERY = 30.0
#: Each wait is ``every`` times a factor drawn from [1 - JITTER, 1 + JITTER].
JITTER = 0.5
#: A differing range where the peer holds at most this many records is pulled whole.
LEAF_RECORDS = 4
#: Per round: digest requests, and records pulled.
MAX_DIGESTS = 32
MAX_PULLED = 64
DIGEST_TIMEOUT = 2.0


class PeerDisagrees(VoipError):
    """The slot peer does not hold the range we compare (views differ); try again later."""

    code = "holds-other"


@dataclass
class Round:
    """What one anti-entropy round did (for the counters, the logs and the tests)."""

    peer: SupernodeInfo | None = None
    digests: int = 0
    #: ranges whose digests differed and that were pulled
    pulled_ranges: list[Prefix] | None = None
    received: int = 0
    accepted: int = 0


class AntiEntropy:
    log = Logger()

    def __init__(
        self,
        supernode: Supernode,
        *,
        every: float = ANTI_ENTROPY_EVERY,
        max_digests: int = MAX_DIGESTS,
        max_pulled: int = MAX_PULLED,
    ) -> None:
        if every <= 0 or max_digests < 1 or max_pulled < 1:
            raise ValueError("every must be > 0, max_digests and max_pulled >= 1")
        self.supernode = supernode
        self.every = every
        self.max_digests = max_digests
        self.max_pulled = max_pulled
        self._timer: IDelayedCall | None = None
        self._running: Deferred[Round] | None = None
        self._stopped = True

    # -- the timer ------------------------------------------------------------------------------

    @property
    def scheduled(self) -> bool:
        return self._timer is not None and self._timer.active()

    @property
    def next_round_at(self) -> float | None:
        """When the next round is due (clock seconds), if one is scheduled."""
        return self._timer.getTime() if self._timer is not None and self.scheduled else None

    def start(self) -> None:
        """Run rounds from now on, the first one ``every`` seconds (jittered) from now."""
        self._stopped = False
        self._schedule()

    def stop(self) -> None:
        """No more rounds; a round under way is cancelled."""
        self._stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._running is not None:
            self._running.cancel()

    def _schedule(self) -> None:
        if self._stopped or self.scheduled or self._running is not None:
            return
        delay = self.every * self.supernode.rng.uniform(1 - JITTER, 1 + JITTER)
        self._timer = self.supernode.clock.callLater(delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        sn = self.supernode
        if sn.view is None or sn.udp.transport is None:
            self._stopped = True  # demoted, or the port is closed: ``admitted`` starts us again
            return
        running = Deferred.fromCoroutine(self.run_round())
        self._running = running

        def done(result: Round | Failure) -> None:
            self._running = None
            if isinstance(result, Failure):
                if isinstance(result.value, VoipError):
                    sn.counters["anti-entropy-failed"] += 1
                    self.log.debug("anti-entropy round failed: {error}", error=result.value)
                elif not isinstance(result.value, CancelledError):
                    self.log.failure("anti-entropy round failed", result)
            self._schedule()

        running.addBoth(done)

    # -- one round ------------------------------------------------------------------------------

    async def run_round(self) -> Round:
        """Compare digests with one random slot peer and pull what differs (bounded)."""
        sn = self.supernode
        view = sn.view
        report = Round()
        if view is None or not sn.synced or sn.held != view.prefix or not view.peers:
            return report  # nothing whole to compare yet (or nobody to compare with)
        sn.index.expire()  # compare what both sides would serve
        peer = sn.rng.choice(view.peers)
        report.peer = peer
        sn.counters["anti-entropy-rounds"] += 1
        differing = await self._differing(view, peer, report)
        report.pulled_ranges = []
        for part, count in differing:
            room = self.max_pulled - report.received
            if room <= 0 or not self._serving(view):
                break
            before = sn.index.stats.accepted
            # More there than we may pull: start at a random record, so rounds cover it all.
            offset = sn.rng.randrange(count - room + 1) if count > room else 0
            report.received += await sn.sync.pull_from(view, peer, part, limit=room, cursor=offset)
            report.accepted += sn.index.stats.accepted - before
            report.pulled_ranges.append(part)
        sn.counters["anti-entropy-pulled"] += report.accepted
        if report.accepted:
            self.log.info(
                "anti-entropy: {count} records pulled from a slot peer", count=report.accepted
            )
        return report

    async def _differing(
        self, view: RoutingView, peer: SupernodeInfo, report: Round
    ) -> list[tuple[Prefix, int]]:
        """Ranges where ``peer`` has records we lack (or newer ones), with how many records
        the peer holds there, found depth first within the digest budget: ranges where the
        peer holds at most ``LEAF_RECORDS`` records, or where we hold none (all of it is news);
        out of budget before that, the smallest range seen to differ.  Halves are visited in
        random order, so rounds that cannot reach every difference reach different ones."""
        sn = self.supernode
        stack = [view.prefix]
        found: list[tuple[Prefix, int]] = []
        smallest: tuple[Prefix, int] | None = None  # the smallest range seen to differ
        expected = 0  # records the found ranges hold at the peer
        while stack and report.digests < self.max_digests and self._serving(view):
            part = stack.pop()
            theirs = await self.ask_digest(peer, part)
            report.digests += 1
            mine = sn.index.digest(part.start, part.end)
            if theirs == mine or theirs.count == 0 or theirs.count < mine.count:
                # The same, or nothing there for us, or the peer is behind us there: it will
                # pull from us in its own rounds, and what it has that we lack comes after.
                continue
            if theirs.count <= LEAF_RECORDS or mine.count == 0 or part.length >= KEY_BITS:
                found.append((part, theirs.count))
                expected += theirs.count
                if expected >= self.max_pulled:
                    break
                continue
            smallest = (part, theirs.count)
            halves = list(part.children())
            sn.rng.shuffle(halves)
            stack.extend(halves)
        if not found and smallest is not None:
            found.append(smallest)  # out of budget before a small range: pull from this one
        return found

    async def ask_digest(self, peer: SupernodeInfo, part: Prefix) -> Digest:
        """``peer``'s digest of ``part``; ``PeerDisagrees`` when it does not hold all of it."""
        reply = await self.supernode.udp.request(
            (peer.host, peer.udp_port),
            lambda rid: DigestRequest(rid, part.start, part.end),
            timeout=DIGEST_TIMEOUT,
            pad_to=DIGEST_PAD,
        )
        if isinstance(reply, Error):
            raise PeerDisagrees(f"The slot peer answered the digest with {reply.code}.")
        if not isinstance(reply, DigestReply):
            raise ProtocolError(f"digest answered with {reply.NAME}")
        if len(reply.fingerprint) != FINGERPRINT_SIZE or reply.count < 0:
            raise ProtocolError("The digest reply's count or fingerprint is malformed.")
        return Digest(reply.count, int.from_bytes(reply.fingerprint, "big"))

    def _serving(self, view: RoutingView) -> bool:
        return self.supernode.serves(view)
