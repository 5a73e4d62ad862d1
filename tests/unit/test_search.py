"""The iterative search, against a fake in-memory overlay driven by a Clock."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.task import Clock

from overlay.errors import CertificateError, ProtocolError
from overlay.search import (
    Found,
    NotFound,
    Referral,
    Reply,
    SearchResult,
    iterative_search,
)
from overlay.slotmap import SupernodeInfo

TIMEOUT = 2.0


def sn(n: int) -> SupernodeInfo:
    return SupernodeInfo(
        node_id=n.to_bytes(32, "big"), host=f"198.51.100.{n}", tcp_port=7000, udp_port=7001
    )


def number(node_id: bytes) -> int:
    return int.from_bytes(node_id, "big")


@dataclass(frozen=True)
class Presence:
    username: str
    sequence: int
    status: str


def record(
    username: str = "bob", sequence: int = 1, status: str = "online", *, forged: bool = False
) -> bytes:
    signature = "forged" if forged else "good"
    document = {"u": username, "seq": sequence, "status": status, "sig": signature}
    return json.dumps(document).encode()


def verify_for(username: str) -> Any:
    def verify(data: bytes) -> Presence:
        try:
            document = json.loads(data)
        except ValueError:
            raise ProtocolError("The presence record is not valid CBOR.") from None
        if document["sig"] != "good":
            raise CertificateError(f"The presence record for {document['u']} has a bad signature.")
        if document["u"] != username:
            raise CertificateError(f"The presence record is for {document['u']}, not {username}.")
        return Presence(document["u"], document["seq"], document["status"])

    return verify


def classify(presence: Presence) -> str:
    return "offline" if presence.status == "offline" else "found"


class FakeOverlay:
    """Supernodes by number; each answers after its delay, or never (unknown numbers too)."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.nodes: dict[int, tuple[Reply | Exception | object, float]] = {}
        self.asks: list[int] = []
        self.usernames: set[str] = set()
        self.outstanding = 0
        self.peak = 0
        #: The supernodes whose answer reached the search (not cancelled, not timed out).
        self.answered: set[int] = set()

    def serve(self, n: int, *records: bytes, delay: float = 0.05) -> None:
        self.nodes[n] = (Found(records=records), delay)

    def refer(self, n: int, *targets: int, level: str = "block", delay: float = 0.05) -> None:
        self.nodes[n] = (Referral(contacts=tuple(sn(t) for t in targets), level=level), delay)

    def not_found(self, n: int, *replicas: int, delay: float = 0.05) -> None:
        self.nodes[n] = (NotFound(tuple(sn(r) for r in replicas)), delay)

    def fail(self, n: int, error: Exception | object, delay: float = 0.05) -> None:
        self.nodes[n] = (error, delay)

    def ask(self, target: SupernodeInfo, username: str) -> Deferred[Reply]:
        n = number(target.node_id)
        self.asks.append(n)
        self.usernames.add(username)
        self.outstanding += 1
        self.peak = max(self.peak, self.outstanding)
        asking: Deferred[Reply] = Deferred(lambda _: self._settled())
        if n in self.nodes:
            answer, delay = self.nodes[n]

            def fire() -> None:
                if asking.called:
                    return
                self._settled()
                self.answered.add(n)
                if isinstance(answer, Exception):
                    asking.errback(answer)
                else:
                    asking.callback(answer)  # type: ignore[arg-type]

            self.clock.callLater(delay, fire)
        return asking

    def _settled(self) -> None:
        self.outstanding -= 1

    def search(self, *start: int, username: str = "bob", **options: Any) -> Deferred[SearchResult]:
        return ensureDeferred(
            iterative_search(
                self.clock,
                username,
                [sn(n) for n in start],
                self.ask,
                verify_for(username),
                classify,
                timeout=TIMEOUT,
                **options,
            )
        )

    def run(self, searching: Deferred[SearchResult]) -> None:
        """Advance the clock event by event until the search is over."""
        while not searching.called:
            calls = self.clock.getDelayedCalls()
            assert calls, "the search stalled with nothing scheduled"
            self.clock.advance(min(c.getTime() for c in calls) - self.clock.seconds())
        assert self.outstanding == 0


def path(result: SearchResult) -> list[list[int]]:
    return [[number(i) for i in ids] for ids in result.path]


@pytest_twisted.ensureDeferred
async def test_found_in_one_round_at_the_own_supernode() -> None:
    net = FakeOverlay()
    net.serve(1, record(sequence=4))
    searching = net.search(1)
    net.run(searching)
    result = await searching
    assert (result.outcome, result.record) == ("found", Presence("bob", 4, "online"))
    assert (result.rounds, result.asked, path(result)) == (1, 1, [[1]])
    assert result.elapsed == pytest.approx(0.05)
    assert net.usernames == {"bob"}


@pytest_twisted.ensureDeferred
async def test_found_in_two_rounds_through_a_slot_referral() -> None:
    net = FakeOverlay()
    net.refer(1, 11, 12, 13, level="slot")
    for n in (11, 12, 13):
        net.serve(n, record(sequence=2))
    searching = net.search(1)
    net.run(searching)
    result = await searching
    assert (result.outcome, result.rounds, result.asked) == ("found", 2, 4)
    assert path(result) == [[1], [11, 12, 13]]
    assert result.elapsed == pytest.approx(0.1)


@pytest_twisted.ensureDeferred
async def test_found_in_three_rounds_block_then_slot() -> None:
    net = FakeOverlay()
    net.refer(1, 21, 22)
    net.refer(21, 31, 32, level="slot")
    net.refer(22, 32, 33, level="slot")
    net.serve(31, record(sequence=3))
    net.serve(32, record(sequence=3))
    net.serve(33, record(sequence=3))
    searching = net.search(1)
    net.run(searching)
    result = await searching
    assert (result.outcome, result.rounds) == ("found", 3)
    assert path(result) == [[1], [21, 22], [31, 32, 33]]  # merged, duplicates dropped


@pytest_twisted.ensureDeferred
async def test_offline_is_the_callers_verdict_on_the_record() -> None:
    net = FakeOverlay()
    net.serve(1, record(status="offline", sequence=9))
    searching = net.search(1)
    net.run(searching)
    result = await searching
    assert (result.outcome, result.record) == ("offline", Presence("bob", 9, "offline"))


@pytest.mark.parametrize(
    ("max_rounds", "outcome", "asked"),
    [(1, "failed", [1]), (3, "failed", [1, 2, 3]), (5, "found", [1, 2, 3, 4, 5])],
)
@pytest_twisted.ensureDeferred
async def test_never_more_than_max_rounds(max_rounds: int, outcome: str, asked: list[int]) -> None:
    net = FakeOverlay()
    for n in range(1, 5):
        net.refer(n, n + 1)
    net.serve(5, record())
    searching = net.search(1, max_rounds=max_rounds)
    net.run(searching)
    result = await searching
    assert (result.outcome, result.rounds) == (outcome, min(max_rounds, 5))
    assert net.asks == asked


@pytest_twisted.ensureDeferred
async def test_silent_own_supernode_fails_at_its_timeout() -> None:
    net = FakeOverlay()
    searching = net.search(1)
    net.clock.advance(1.5)
    assert not searching.called
    net.clock.advance(0.5)
    assert searching.called
    result = await searching
    assert (result.outcome, result.timeouts, result.asked, result.elapsed) == ("failed", 1, 1, 2.0)
    assert net.outstanding == 0  # the unanswered ask was cancelled


@pytest_twisted.ensureDeferred
async def test_a_silent_replica_costs_one_timeout_not_a_stall() -> None:
    net = FakeOverlay()
    net.refer(1, 11, 12, 13, level="slot")
    net.serve(11, record(sequence=5))
    net.serve(13, record(sequence=5), delay=3.0)  # answers too late: a timeout as well
    searching = net.search(1)
    net.clock.advance(0.05)
    net.clock.advance(1.9)
    assert not searching.called
    net.clock.advance(0.1)
    assert searching.called
    result = await searching
    assert (result.outcome, result.timeouts, result.record.sequence) == ("found", 2, 5)
    assert result.elapsed == pytest.approx(2.05)


@pytest_twisted.ensureDeferred
async def test_a_forged_record_is_ignored_and_the_valid_replica_wins() -> None:
    net = FakeOverlay()
    net.refer(1, 11, 12, level="slot")
    net.serve(11, record(sequence=50, forged=True), delay=0.01)  # first, newest-looking, forged
    net.serve(12, record(sequence=7))
    searching = net.search(1)
    net.run(searching)
    result = await searching
    assert (result.outcome, result.record, result.bad_records) == (
        "found",
        Presence("bob", 7, "online"),
        1,
    )


@pytest_twisted.ensureDeferred
async def test_the_same_forged_record_from_two_replicas_counts_once() -> None:
    net = FakeOverlay()
    net.refer(1, 11, 12, 13, level="slot")
    net.serve(11, record(sequence=50, forged=True))
    net.serve(12, record(sequence=50, forged=True))
    net.serve(13, record(sequence=8))
    searching = net.search(1)
    net.run(searching)
    result = await searching
    assert (result.record.sequence, result.bad_records) == (8, 1)


@pytest_twisted.ensureDeferred
async def test_records_of_another_user_or_garbage_count_as_bad() -> None:
    net = FakeOverlay()
    net.serve(1, record("mallory"), b"\xff not a record", record(sequence=2))
    searching = net.search(1)
    net.run(searching)
    result = await searching
    assert (result.outcome, result.record.sequence, result.bad_records) == ("found", 2, 2)


@pytest_twisted.ensureDeferred
async def test_only_forged_records_teach_nothing() -> None:
    net = FakeOverlay()
    net.serve(1, record(forged=True))
    searching = net.search(1)
    net.run(searching)
    result = await searching
    assert (result.outcome, result.record, result.bad_records) == ("failed", None, 1)


@pytest_twisted.ensureDeferred
async def test_newest_sequence_preferred_among_replicas() -> None:
    net = FakeOverlay()
    net.refer(1, 11, 12, 13, level="slot")
    net.serve(11, record(sequence=5, status="away"), delay=0.01)  # the stale one answers first
    net.serve(12, record(sequence=7, status="busy"), delay=0.02)
    net.serve(13, record(sequence=6))
    searching = net.search(1)
    net.run(searching)
    result = await searching
    assert result.record == Presence("bob", 7, "busy")


@pytest_twisted.ensureDeferred
async def test_a_slow_replica_is_not_waited_for_once_another_answered() -> None:
    net = FakeOverlay()
    net.refer(1, 11, 12, level="slot")
    net.serve(11, record(sequence=5), delay=0.01)
    net.serve(12, record(sequence=9), delay=1.5)  # newer, but far slower than the grace period
    searching = net.search(1)
    net.run(searching)
    result = await searching
    assert result.record == Presence("bob", 5, "online")
    assert result.elapsed < 0.5
    assert net.outstanding == 0  # the slow ask was cancelled, not left behind


@pytest_twisted.ensureDeferred
async def test_not_found_needs_a_supernode_that_serves_the_key() -> None:
    net = FakeOverlay()
    net.refer(1, 11, 12, level="slot")
    net.not_found(11)
    searching = net.search(1)  # 12 never answers, and is not waited for
    net.run(searching)
    result = await searching
    assert (result.outcome, result.timeouts, result.rounds) == ("not-found", 0, 2)
    assert result.elapsed < 0.5


# -- one replica's "none" is not believed on its own -------------------------------------------


async def run(net: FakeOverlay, *start: int, **options: Any) -> SearchResult:
    searching = net.search(*start, **options)
    net.run(searching)
    return await searching


@pytest_twisted.ensureDeferred
async def test_a_replica_saying_none_is_checked_with_the_replicas_it_names() -> None:
    net = FakeOverlay()
    net.not_found(1, 2, 3)  # the own supernode lags behind its slot
    net.serve(2, record(sequence=3))
    net.not_found(3, 1, 2)
    result = await run(net, 1)
    assert (result.outcome, result.record) == ("found", Presence("bob", 3, "online"))
    assert (result.rounds, path(result)) == (2, [[1], [2, 3]])


@pytest_twisted.ensureDeferred
async def test_two_replicas_saying_none_make_not_found_without_waiting_for_a_third() -> None:
    net = FakeOverlay()
    net.refer(1, 11, 12, 13, level="slot")
    net.not_found(11, 12, 13)
    net.not_found(12, 11, 13)  # 13 never answers
    result = await run(net, 1)
    assert (result.outcome, result.rounds, result.timeouts) == ("not-found", 2, 0)
    assert result.elapsed < 0.5


@pytest_twisted.ensureDeferred
async def test_the_only_replica_is_believed_at_once() -> None:
    net = FakeOverlay()
    net.not_found(1)
    result = await run(net, 1)
    assert (result.outcome, result.rounds, path(result)) == ("not-found", 1, [[1]])


@pytest_twisted.ensureDeferred
async def test_a_replica_saying_none_whose_peers_are_all_silent_is_believed_after_asking() -> None:
    net = FakeOverlay()
    net.not_found(1, 2, 3)  # 2 and 3 are dead
    result = await run(net, 1)
    assert (result.outcome, result.rounds, result.timeouts) == ("not-found", 2, 2)
    assert path(result) == [[1], [2, 3]]


@pytest_twisted.ensureDeferred
async def test_none_from_one_and_not_ready_from_the_other_replica_is_a_failed_search() -> None:
    net = FakeOverlay()
    net.not_found(1, 2)
    net.refer(2, 1, level="not-ready")  # still pulling its slot: cannot confirm
    result = await run(net, 1)
    assert (result.outcome, result.rounds) == ("failed", 2)


@pytest_twisted.ensureDeferred
async def test_replicas_not_ready_do_not_end_the_round_and_the_next_candidates_are_asked() -> None:
    net = FakeOverlay()
    net.refer(1, 11, 12, 13, 14, 15, level="slot")
    for n in (11, 12, 13, 14):
        net.refer(n, 11, 12, 13, 14, 15, level="not-ready")
    net.serve(15, record(sequence=2), delay=0.3)
    result = await run(net, 1)
    assert (result.outcome, result.rounds) == ("found", 2)
    assert path(result) == [[1], [11, 12, 13, 14, 15]]  # 15 in the same round, as a fallback


@pytest_twisted.ensureDeferred
async def test_a_quick_lone_none_does_not_cut_short_a_slower_replica_with_the_record() -> None:
    net = FakeOverlay()
    net.refer(1, 11, 12, level="slot")
    net.not_found(11, 12, delay=0.01)
    net.serve(12, record(sequence=2), delay=0.5)
    result = await run(net, 1)
    assert (result.outcome, result.rounds) == ("found", 2)


@pytest_twisted.ensureDeferred
async def test_in_the_last_round_a_referral_does_not_cut_short_a_replica_with_the_record() -> None:
    # Views differ while slots change: a supernode with an older view refers on, but there is
    # no round left to follow it.
    net = FakeOverlay()
    net.refer(1, 11, 12, level="slot")
    net.refer(11, 21, 22, level="slot", delay=0.01)
    net.serve(12, record(sequence=2), delay=0.5)
    result = await run(net, 1, max_rounds=2)
    assert (result.outcome, result.rounds) == ("found", 2)
    # ... while in an earlier round the referral ends the round as before.
    net = FakeOverlay()
    net.refer(1, 11, 12, level="slot")
    net.refer(11, 21, level="slot", delay=0.01)
    net.serve(12, record(sequence=2), delay=0.5)
    net.serve(21, record(sequence=2))
    result = await run(net, 1, max_rounds=3)
    assert (result.outcome, result.rounds, path(result)) == ("found", 3, [[1], [11, 12], [21]])


@pytest_twisted.ensureDeferred
async def test_failed_when_nobody_definitive_answered() -> None:
    net = FakeOverlay()
    net.refer(1, 11, 12, level="slot")
    net.fail(11, ProtocolError("The supernode reply is not valid CBOR."))
    net.fail(12, b"not a reply")
    searching = net.search(1)
    net.run(searching)
    result = await searching
    assert (result.outcome, result.errors, result.timeouts, result.rounds) == ("failed", 2, 0, 2)


@pytest_twisted.ensureDeferred
async def test_an_ask_that_raises_is_a_failed_ask() -> None:
    net = FakeOverlay()
    net.serve(2, record())

    def ask(target: SupernodeInfo, username: str) -> Deferred[Reply]:
        if target == sn(1):
            raise ConnectionRefusedError("no route")
        return net.ask(target, username)

    searching = ensureDeferred(
        iterative_search(net.clock, "bob", [sn(1), sn(2)], ask, verify_for("bob"), classify)
    )
    net.run(searching)
    result = await searching
    assert (result.outcome, result.errors, result.asked) == ("found", 1, 2)


@pytest_twisted.ensureDeferred
async def test_no_supernode_is_asked_twice() -> None:
    net = FakeOverlay()
    net.refer(1, 2, 3, 4)
    net.refer(2, 1, 3, 5)
    net.refer(3, 2, 5, 6)
    net.refer(4, 1, 4)
    net.not_found(5, 6)
    net.not_found(6, 5)
    searching = net.search(1, 1, 2)
    net.run(searching)
    result = await searching
    assert path(result) == [[1, 2], [3, 4, 5], [6]]
    assert sorted(net.asks) == [1, 2, 3, 4, 5, 6]
    assert result.outcome == "not-found"


@pytest_twisted.ensureDeferred
async def test_a_referral_loop_terminates() -> None:
    net = FakeOverlay()
    net.refer(1, 2)
    net.refer(2, 1)
    searching = net.search(1, max_rounds=10)
    net.run(searching)
    result = await searching
    assert (result.outcome, result.rounds, net.asks) == ("failed", 2, [1, 2])


@pytest_twisted.ensureDeferred
async def test_at_most_parallel_asks_then_fallback_when_all_fail() -> None:
    net = FakeOverlay()
    net.refer(1, *range(10, 30))  # twenty contacts, none answers
    searching = net.search(1)
    net.run(searching)
    result = await searching
    assert net.peak == 4
    assert path(result) == [[1], list(range(10, 22))]  # 4, then 8 more
    assert (result.outcome, result.timeouts, result.rounds) == ("failed", 12, 2)
    assert result.elapsed == pytest.approx(0.05 + 3 * TIMEOUT)  # 4 at a time: three waves


@pytest.mark.parametrize(("parallel", "fallback"), [(1, 0), (2, 3), (3, 8)])
@pytest_twisted.ensureDeferred
async def test_parallel_and_fallback_are_parameters(parallel: int, fallback: int) -> None:
    net = FakeOverlay()
    net.refer(1, *range(10, 30))
    searching = net.search(1, parallel=parallel, fallback=fallback)
    net.run(searching)
    result = await searching
    assert net.peak == parallel
    assert path(result)[1] == list(range(10, 10 + parallel + fallback))


@pytest_twisted.ensureDeferred
async def test_fallback_stops_asking_once_an_answer_is_useful() -> None:
    net = FakeOverlay()
    net.refer(1, *range(10, 30))
    net.serve(14, record(sequence=3))  # the first of the fallback batch
    searching = net.search(1)
    net.run(searching)
    result = await searching
    assert result.outcome == "found"
    assert path(result) == [[1], list(range(10, 18))]  # 14..17 were in flight, 18.. not asked


@pytest_twisted.ensureDeferred
async def test_no_fallback_when_one_of_the_first_batch_answered() -> None:
    net = FakeOverlay()
    net.refer(1, *range(10, 30))
    net.not_found(12)
    searching = net.search(1)
    net.run(searching)
    result = await searching
    assert (result.outcome, path(result)) == ("not-found", [[1], [10, 11, 12, 13]])


@pytest_twisted.ensureDeferred
async def test_cancelling_the_search_cancels_its_asks() -> None:
    net = FakeOverlay()
    net.refer(1, *range(10, 20))  # none answers
    searching = net.search(1)
    net.clock.advance(1.0)
    assert net.outstanding == 4
    searching.cancel()
    assert net.outstanding == 0
    with pytest.raises(CancelledError):
        await searching
    net.clock.advance(10 * TIMEOUT)
    assert net.asks == [1, 10, 11, 12, 13]  # and nothing more is asked afterwards


@pytest_twisted.ensureDeferred
async def test_bug_in_verify_is_not_hidden() -> None:
    net = FakeOverlay()
    net.serve(1, record())

    def broken(data: bytes) -> Any:
        raise KeyError("sig")

    searching = ensureDeferred(
        iterative_search(net.clock, "bob", [sn(1)], net.ask, broken, classify)
    )
    net.run(searching)
    with pytest.raises(KeyError, match="sig"):
        await searching


@pytest_twisted.ensureDeferred
async def test_nothing_to_ask() -> None:
    net = FakeOverlay()
    result = await net.search()
    assert (result.outcome, result.rounds, result.asked, result.elapsed) == ("failed", 0, 0, 0.0)


@pytest_twisted.ensureDeferred
async def test_bad_parameters_are_refused() -> None:
    net = FakeOverlay()
    with pytest.raises(ValueError, match="parallel and max_rounds must be >= 1"):
        await net.search(1, parallel=0)


# -- properties over random overlays ---------------------------------------------------------

DELAYS = st.sampled_from([0.01, 0.3, 1.0, 3.0])  # 3.0 > TIMEOUT: answers too late


@st.composite
def overlays(draw: st.DrawFn) -> tuple[FakeOverlay, dict[int, int]]:
    net = FakeOverlay()
    good: dict[int, int] = {}  # node -> sequence of the valid record it serves
    size = draw(st.integers(2, 14))
    for n in range(1, size + 1):
        kind = draw(st.sampled_from(["serve", "forged", "refer", "not-found", "silent", "error"]))
        delay = draw(DELAYS)
        if kind == "serve":
            sequence = draw(st.integers(1, 5))
            net.serve(n, record(sequence=sequence), delay=delay)
            if delay < TIMEOUT:
                good[n] = sequence
        elif kind == "forged":
            net.serve(n, record(sequence=99, forged=True), delay=delay)
        elif kind == "refer":
            targets = draw(st.lists(st.integers(1, size + 2), max_size=8))
            net.refer(n, *targets, delay=delay)
        elif kind == "not-found":
            replicas = draw(st.lists(st.integers(1, size + 2), max_size=4))
            net.not_found(n, *replicas, delay=delay)
        elif kind == "error":
            net.fail(n, ConnectionError("lost"), delay=delay)
    return net, good


@settings(max_examples=300, deadline=None)
@given(
    overlays(),
    st.integers(1, 4),
    st.integers(0, 8),
    st.integers(1, 4),
    st.lists(st.integers(1, 4), min_size=1, max_size=3),
)
def test_search_invariants(
    world: tuple[FakeOverlay, dict[int, int]],
    parallel: int,
    fallback: int,
    max_rounds: int,
    start: list[int],
) -> None:
    net, good = world
    searching = net.search(*start, parallel=parallel, fallback=fallback, max_rounds=max_rounds)
    net.run(searching)
    result: SearchResult = searching.result
    asked = [n for ids in path(result) for n in ids]
    assert sorted(asked) == sorted(net.asks)
    assert len(set(asked)) == len(asked) == result.asked
    assert result.rounds == len(result.path) <= max_rounds
    assert net.peak <= parallel
    waves = 1 + math.ceil(fallback / parallel)
    assert result.elapsed <= max_rounds * waves * TIMEOUT
    last_round = path(result)[-1] if result.path else []
    heard = [n for n in last_round if n in good and n in net.answered]
    if result.outcome == "found":
        # The newest of the replicas that answered in time (a slower one is not waited for).
        assert result.record.sequence == max(good[n] for n in heard)
    else:
        assert result.record is None
        assert not any(n in good and n in net.answered for n in asked)
    if result.outcome == "not-found":
        # Two replicas said "none", or one with no other replica, or one whose replicas were
        # all asked and did not answer.
        said_none = [n for n in asked if n in net.answered and not_found_at(net, n)]
        sole = [n for n in said_none if not not_found_at(net, n).replicas]
        named = {number(i.node_id) for n in said_none for i in not_found_at(net, n).replicas}
        unconfirmed = named - set(said_none)
        replied = {
            n for n in net.answered if isinstance(net.nodes[n][0], Found | Referral | NotFound)
        }
        assert (
            len(said_none) >= 2
            or sole
            or (said_none and unconfirmed <= set(asked) and not unconfirmed & replied)
        )


def not_found_at(net: FakeOverlay, n: int) -> Any:
    answer = net.nodes.get(n, (None,))[0]
    return answer if isinstance(answer, NotFound) else None
