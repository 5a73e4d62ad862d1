"""The asking node's iterative search for a user's presence record.

Transport-agnostic: the caller supplies ``ask(sn, username)``, which returns a Deferred firing
with the supernode's reply.  The search runs in rounds, like an iterative DNS resolution:

======  ============================================================================
round   what happens
======  ============================================================================
1       ask ``start`` (normally the node's own supernode), up to ``parallel`` at once
2, 3    ask the contacts the previous round's referrals named, up to ``parallel`` at once
======  ============================================================================

Each reply is one of:

- ``Found(records)``: the supernode serves the key; every record is checked with ``verify``
  (a bad one raises ``ProtocolError``, is counted in ``bad_records`` and ignored);
- ``Referral(contacts, level)``: supernodes closer to the key ("block", then "slot" level);
  a replica still pulling its slot refers to its slot peers with level "not-ready": that
  settles nothing (neither "none" nor a step closer), its peers are asked like any referral;
- ``NotFound(replicas)``: the supernode serves the key, holds its whole slot and has no record
  for it; ``replicas`` are the slot's other members (none: it is the only one).

A round waits for all its asks (each bounded by ``timeout`` on the clock), so that when several
replicas answer, the record with the highest ``sequence`` wins; it ends sooner, a little after
the first answer that settles it (a record, an agreed "none", or a referral except in the last
round, where there is no next round to follow it).  If none of a round's first ``parallel``
asks settles anything (all failed, timed out, sent only bad records, said "not ready", or one
replica said "none" alone), up to ``fallback`` more of that round's candidates are tried, still
at most ``parallel`` at a time.  The search ends at the first round with a valid record
(``classify`` then says "found" or "offline"), when "not found" is agreed, when there is nobody
new to ask, or after ``max_rounds`` rounds.  No supernode is asked twice.

One replica's "none" is not believed on its own: a replica can lag behind its slot (a record
stored while it was away, a slot that just merged).  The outcome is "not-found" only when two
replicas said so, or the one that did has no other replica, or every other replica it named was
asked and none answered; until then the replicas it named are asked in the next round (a round
with a lone "none" also waits for the rest of its asks instead of ending early).  A search that
learned nothing definitive has "failed".
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    DeferredSemaphore,
    TimeoutError,
    maybeDeferred,
    succeed,
)
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from overlay.errors import ProtocolError
from overlay.messages import Record, record
from overlay.slotmap import SupernodeInfo

#: A round ends this many times the time to its first settling answer after it (at least
#: MIN_GRACE seconds), without waiting for the slowest (maybe dead) supernode of the round.
GRACE_FACTOR = 3.0
MIN_GRACE = 0.05
LEVEL_BLOCK = "block"
LEVEL_SLOT = "slot"
#: A replica that serves the key but is still pulling its slot: ask its peers instead.
LEVEL_NOT_READY = "not-ready"
Outcome: TypeAlias = Literal["found", "offline", "not-found", "failed"]


@record
class Found(Record):
    """The supernode serves the key: here are the records it holds (normally one)."""

    records: tuple[bytes, ...]


@record
class Referral(Record):
    """The supernode does not serve the key: ask these, which are closer to it."""

    contacts: tuple[SupernodeInfo, ...]
    level: str


@record
class NotFound(Record):
    """The supernode serves the key, holds its whole slot and no record for it; ``replicas``
    are the slot's other members (empty: it is the only replica)."""

    replicas: tuple[SupernodeInfo, ...] = ()


Reply: TypeAlias = Found | Referral | NotFound
Ask: TypeAlias = Callable[[SupernodeInfo, str], Deferred[Reply]]


@dataclass
class SearchResult:
    outcome: Outcome
    record: Any | None = None
    rounds: int = 0
    asked: int = 0
    elapsed: float = 0.0
    bad_records: int = 0
    timeouts: int = 0
    #: asks that failed otherwise (connection lost, error reply, unexpected reply)
    errors: int = 0
    #: the node ids asked, one list per round, in the order asked
    path: list[list[bytes]] = field(default_factory=list)


@dataclass
class _Answer:
    sn: SupernodeInfo
    reply: Reply | None = None  # None: the ask failed or timed out (so far)
    valid: list[tuple[bytes, Any]] = field(default_factory=list)  # (blob, verified record)


class _Search:
    def __init__(
        self,
        clock: IReactorTime,
        *,
        username: str,
        ask: Ask,
        verify: Callable[[bytes], Any],
        parallel: int,
        fallback: int,
        timeout: float,
        max_rounds: int,
    ) -> None:
        self.clock = clock
        self.max_rounds = max_rounds
        self.username = username
        self.ask = ask
        self.verify = verify
        self.parallel = parallel
        self.fallback = fallback
        self.timeout = timeout
        self.asked: set[bytes] = set()
        self.bad: set[bytes] = set()
        self.result = SearchResult(outcome="failed")
        #: the supernodes that said "none", and the other replicas they named
        self.none_from: set[bytes] = set()
        self.named: dict[bytes, SupernodeInfo] = {}
        self.sole_none = False
        #: the supernodes whose ask got a well-formed reply
        self.replied: set[bytes] = set()

    @property
    def not_found_agreed(self) -> bool:
        """Two replicas said "none", or one with no other replica."""
        return len(self.none_from) >= 2 or self.sole_none

    def settled(self, answers: list[_Answer]) -> bool:
        """Has the round learnt enough that its other candidates need not be asked?  In the
        last round a referral does not count: there is no next round to follow it."""
        last = self.result.rounds >= self.max_rounds
        return self.not_found_agreed or any(
            a.valid
            or (
                not last
                and isinstance(a.reply, Referral)
                and a.reply.level != LEVEL_NOT_READY
                and a.reply.contacts
            )
            for a in answers
        )

    def verdict(self) -> Outcome:
        """The outcome of a search that found no valid record."""
        if self.not_found_agreed:
            return "not-found"
        others = [n for n in self.named if n not in self.none_from]
        if (
            self.none_from
            and all(n in self.asked for n in others)
            and not any(n in self.replied for n in others)
        ):
            return "not-found"  # the only replica that could answer said "none"
        return "failed"

    async def round(self, candidates: list[SupernodeInfo]) -> tuple[list[Any], list[_Answer]]:
        """Ask one round's candidates; the valid records (in ask order) and all answers."""
        self.result.rounds += 1
        self.result.path.append([])
        answers: list[_Answer] = []
        first, rest = candidates[: self.parallel], candidates[self.parallel :]
        await self.first_batch(first, answers)
        if rest and not self.settled(answers):
            await self.batch(rest[: self.fallback], answers, stop_when_useful=True)
        valid: dict[bytes, Any] = {}
        for answer in answers:
            for blob, verified in answer.valid:
                valid.setdefault(blob, verified)
        return list(valid.values()), answers

    def first_batch(self, batch: list[SupernodeInfo], answers: list[_Answer]) -> Deferred[None]:
        """Ask ``batch`` at once; settle when all answered, or a little after the first settling
        answer (``GRACE_FACTOR`` times as long as it took, at least ``MIN_GRACE``): a dead
        supernode among them then costs the search nothing.  Asks still out are cancelled."""
        asks: list[Deferred[None]] = []
        started = self.clock.seconds()
        remaining = len(batch)
        grace: list[IDelayedCall] = []

        cancelling = False

        def cancel_all(_: Deferred[None]) -> None:
            nonlocal cancelling
            cancelling = True  # settled then fails with CancelledError, not "all answered"
            for ask in asks:
                if not ask.called:
                    ask.cancel()

        settled: Deferred[None] = Deferred(cancel_all)

        def finish() -> None:
            if not settled.called and not cancelling:
                settled.callback(None)

        def one_done(result: object) -> object:
            nonlocal remaining
            remaining -= 1
            if remaining == 0:
                for call in grace:
                    if call.active():
                        call.cancel()
                finish()
            elif not grace and self.settled(answers):
                wait = max(MIN_GRACE, GRACE_FACTOR * (self.clock.seconds() - started))
                grace.append(self.clock.callLater(min(wait, self.timeout), finish))
            return result

        for sn in batch:
            asks.append(self.ask_one(sn, answers).addBoth(one_done))
        if not batch:
            finish()

        def abandon(result: object) -> object:
            for call in grace:
                if call.active():
                    call.cancel()
            for ask in asks:
                if not ask.called:
                    ask.addErrback(_ignore_cancelled)
                    ask.cancel()
            for ask in asks:  # a bug in verify or classify is not hidden
                if ask.called and isinstance(ask.result, Failure):
                    failure = ask.result
                    ask.addErrback(lambda f: None)
                    if not isinstance(failure.value, CancelledError):
                        failure.raiseException()
            return result

        return settled.addBoth(abandon)

    async def batch(
        self, batch: list[SupernodeInfo], answers: list[_Answer], *, stop_when_useful: bool
    ) -> None:
        """Ask ``batch`` with at most ``parallel`` asks outstanding; fill ``answers``."""
        window = DeferredSemaphore(self.parallel)

        def one(sn: SupernodeInfo) -> Deferred[None]:
            if stop_when_useful and self.settled(answers):
                return succeed(None)
            return self.ask_one(sn, answers)

        outcomes = await DeferredList([window.run(one, sn) for sn in batch], consumeErrors=True)
        for _, value in outcomes:
            if isinstance(value, Failure):  # cancelled, or a bug in verify: not hidden
                value.raiseException()

    def ask_one(self, sn: SupernodeInfo, answers: list[_Answer]) -> Deferred[None]:
        self.asked.add(sn.node_id)
        self.result.asked += 1
        self.result.path[-1].append(sn.node_id)
        answer = _Answer(sn)
        answers.append(answer)
        asking: Deferred[Reply] = maybeDeferred(self.ask, sn, self.username)
        asking.addTimeout(self.timeout, self.clock)

        def replied(reply: object) -> None:
            if not isinstance(reply, Found | Referral | NotFound):
                self.result.errors += 1
                return
            answer.reply = reply
            self.replied.add(sn.node_id)
            if isinstance(reply, NotFound):
                self.none_from.add(sn.node_id)
                self.sole_none |= not reply.replicas
                for replica in reply.replicas:
                    self.named.setdefault(replica.node_id, replica)
            elif isinstance(reply, Found):
                for blob in reply.records:
                    ok, verified = self.check(blob)
                    if ok:
                        answer.valid.append((blob, verified))

        def failed(failure: Failure) -> Failure | None:
            if isinstance(failure.value, CancelledError):  # the search itself was cancelled
                return failure
            if isinstance(failure.value, TimeoutError):
                self.result.timeouts += 1
            else:
                self.result.errors += 1
            return None

        return asking.addCallbacks(replied, failed)

    def check(self, blob: bytes) -> tuple[bool, Any]:
        """(True, the verified record), or (False, None) for a bad one (counted once)."""
        if blob in self.bad:
            return False, None
        try:
            return True, self.verify(blob)
        except ProtocolError:
            self.bad.add(blob)
            self.result.bad_records += 1
            return False, None

    def next_candidates(self, answers: list[_Answer]) -> list[SupernodeInfo]:
        """The replicas named by "none" answers (to confirm them), then the referral contacts
        of a round, merged in order, without anyone asked already."""
        contacts = itertools.chain(
            self.named.values(),
            (
                contact
                for answer in answers
                if isinstance(answer.reply, Referral)
                for contact in answer.reply.contacts
            ),
        )
        return _unique(c for c in contacts if c.node_id not in self.asked)


def _ignore_cancelled(failure: Failure) -> Failure | None:
    return None if isinstance(failure.value, CancelledError) else failure


def _unique(infos: Iterable[SupernodeInfo]) -> list[SupernodeInfo]:
    """``infos`` without repeated node ids, first occurrence kept, order kept."""
    merged: dict[bytes, SupernodeInfo] = {}
    for info in infos:
        merged.setdefault(info.node_id, info)
    return list(merged.values())


def newest(records: Sequence[Any]) -> Any:
    """The record with the highest ``sequence`` (the first one on ties or without one)."""
    best = records[0]
    for candidate in records[1:]:
        mine, theirs = getattr(best, "sequence", None), getattr(candidate, "sequence", None)
        if isinstance(theirs, int) and (not isinstance(mine, int) or theirs > mine):
            best = candidate
    return best


async def iterative_search(  # noqa: PLR0917 - the signature its callers were promised
    clock: IReactorTime,
    username: str,
    start: Sequence[SupernodeInfo],
    ask: Ask,
    verify: Callable[[bytes], Any],
    classify: Callable[[Any], str],
    *,
    parallel: int = 4,
    fallback: int = 8,
    timeout: float = 2.0,
    max_rounds: int = 3,
) -> SearchResult:
    """Search ``username``'s presence record, starting at ``start``; never raises for the
    network's sake (a bug in ``verify`` or ``classify`` does propagate)."""
    if parallel < 1 or fallback < 0 or max_rounds < 1 or timeout <= 0:
        raise ValueError("parallel and max_rounds must be >= 1, fallback >= 0, timeout > 0")
    began = clock.seconds()
    search = _Search(
        clock,
        username=username,
        ask=ask,
        verify=verify,
        parallel=parallel,
        fallback=fallback,
        timeout=timeout,
        max_rounds=max_rounds,
    )
    result = search.result
    candidates = _unique(start)
    while candidates and result.rounds < max_rounds:
        valid, answers = await search.round(candidates)
        if valid:
            chosen = newest(valid)
            outcome = classify(chosen)
            if outcome not in ("found", "offline"):
                raise ValueError(f"classify returned {outcome!r}, not 'found' or 'offline'")
            result.outcome = "found" if outcome == "found" else "offline"
            result.record = chosen
            break
        if search.not_found_agreed:
            result.outcome = "not-found"
            break
        candidates = search.next_candidates(answers)
    else:
        result.outcome = search.verdict()
    result.elapsed = clock.seconds() - began
    return result
