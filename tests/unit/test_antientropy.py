"""Anti-entropy between slot peers: the timer on an injected Clock, digest mismatch -> pull,
bounded rounds, and the ``digest`` request's handler (fuzzed), over the in-memory UDP network."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred

from overlay.antientropy import LEAF_RECORDS, AntiEntropy, Round
from overlay.datagram import encode
from overlay.errors import VoipError
from overlay.keyspace import KEY_SPACE
from overlay.messages import Error
from overlay.overlay_protocol import DIGEST_PAD, DigestReply, DigestRequest, Pull, Records
from overlay.supernode import HoldsNone, HoldsPart, Supernode
from tests.unit.test_supernode import ASKER, NOW, Overlay, pump, record_of, results

EVERY = 10.0


def slot_range(sn: Supernode) -> tuple[int, int]:
    assert sn.view is not None
    return sn.view.prefix.start, sn.view.prefix.end


def run_round(overlay: Overlay, ae: AntiEntropy, seconds: float = 1.0) -> Round:
    got = results(Deferred.fromCoroutine(ae.run_round()))
    pump(overlay.clock, seconds)
    [report] = got
    assert isinstance(report, Round), report
    return report


def stored_without(overlay: Overlay, slot: int, count: int, lagging: Supernode) -> list[str]:
    """``count`` users of ``slot`` whose records every member but ``lagging`` holds."""
    names = [overlay.name_in_slot(slot, skip=i) for i in range(count)]
    for name in names:
        for sn in overlay.members(slot):
            if sn is not lagging:
                assert sn.index.put(record_of(name))
    return names


def served(overlay: Overlay, name: str) -> int:
    return sum(sn.counters[name] for sn in overlay.sns.values())


# -- the timer -----------------------------------------------------------------------------------


def test_rounds_come_every_interval_jittered_and_compare_one_digest_when_in_agreement() -> None:
    overlay = Overlay(20, seed=11, anti_entropy_every=EVERY)  # admitted at NOW
    due = [sn.anti_entropy.next_round_at for sn in overlay.sns.values()]
    assert all(at is not None and NOW + 0.5 * EVERY <= at <= NOW + 1.5 * EVERY for at in due)
    assert len(set(due)) > 1  # jittered: the slot's members do not all ask at once
    assert served(overlay, "anti-entropy-rounds") == 0
    pulls = served(overlay, "pull")  # those of the set-up
    pump(overlay.clock, 0.5 * EVERY - 1, step=0.05)
    assert served(overlay, "anti-entropy-rounds") == 0
    pump(overlay.clock, EVERY + 2, step=0.05)  # past 1.5 x EVERY: each ran at least once
    rounds = [sn.counters["anti-entropy-rounds"] for sn in overlay.sns.values()]
    assert all(1 <= r <= 3 for r in rounds)
    # Every peer agreed: one digest request per round, and nothing pulled.
    assert served(overlay, "digest") == sum(rounds)
    assert served(overlay, "pull") == pulls
    assert all(sn.anti_entropy.scheduled for sn in overlay.sns.values())


def test_stop_ends_the_rounds_and_admission_starts_them_again() -> None:
    overlay = Overlay(20, seed=12, anti_entropy_every=EVERY)
    sn = overlay.members(0)[0]
    sn.stop()
    assert not sn.anti_entropy.scheduled and sn.anti_entropy.next_round_at is None
    pump(overlay.clock, 2 * EVERY, step=0.05)
    assert sn.counters["anti-entropy-rounds"] == 0
    assert sn.info is not None
    overlay.admit(overlay.map, sn.node_id)
    assert sn.anti_entropy.scheduled
    pump(overlay.clock, 1.5 * EVERY + 1, step=0.05)
    assert sn.counters["anti-entropy-rounds"] >= 1


def test_a_closed_port_ends_the_rounds_without_an_error() -> None:
    overlay = Overlay(20, seed=13, anti_entropy_every=EVERY)
    sn = overlay.members(0)[0]
    assert sn.udp.transport is not None
    sn.udp.transport.stopListening()
    pump(overlay.clock, 2 * EVERY, step=0.05)
    assert sn.counters["anti-entropy-rounds"] == 0
    assert not sn.anti_entropy.scheduled


def test_an_unanswered_digest_fails_the_round_quietly_and_the_next_one_comes() -> None:
    overlay = Overlay(20, seed=14, anti_entropy_every=EVERY)
    sn = overlay.members(0)[0]
    for peer in overlay.members(0)[1:]:
        assert peer.udp.transport is not None
        peer.udp.transport.stopListening()  # every peer dead
    pump(overlay.clock, 3 * EVERY, step=0.05)
    assert sn.counters["anti-entropy-failed"] >= 1
    assert sn.counters["anti-entropy-rounds"] >= 2
    assert sn.anti_entropy.scheduled


def test_bad_parameters_are_refused() -> None:
    overlay = Overlay(10, seed=15)
    sn = overlay.members(0)[0]
    for options in ({"every": 0.0}, {"max_digests": 0}, {"max_pulled": 0}):
        with pytest.raises(ValueError, match="every must be > 0"):
            AntiEntropy(sn, **options)


# -- a round -------------------------------------------------------------------------------------


def test_a_replica_that_missed_a_record_pulls_it_after_comparing_digests() -> None:
    overlay = Overlay(20, seed=16)
    members = overlay.members(0)
    lagging = members[0]
    names = stored_without(overlay, 0, 1, lagging)
    for i in range(1, 12):  # and records everybody has
        overlay.store_everywhere(record_of(overlay.name_in_slot(0, skip=i)))
    start, end = slot_range(lagging)
    assert lagging.index.digest(start, end) != members[1].index.digest(start, end)
    report = run_round(overlay, lagging.anti_entropy)
    assert report.peer is not None and report.accepted == 1
    assert names[0] in lagging.index
    assert report.received <= LEAF_RECORDS  # only the small range that differed came
    assert report.digests > 1  # found by halving the slot's range
    assert lagging.index.digest(start, end) == members[1].index.digest(start, end)
    assert lagging.counters["anti-entropy-pulled"] == 1
    # In agreement now: the next round asks one digest and pulls nothing.
    again = run_round(overlay, lagging.anti_entropy)
    assert (again.digests, again.received, again.pulled_ranges) == (1, 0, [])


def test_a_newer_record_at_the_peer_replaces_the_older_one() -> None:
    overlay = Overlay(20, seed=17)
    lagging, *others = overlay.members(0)
    name = overlay.name_in_slot(0)
    overlay.store_everywhere(record_of(name, sequence=1))
    for sn in others:
        assert sn.index.put(record_of(name, sequence=2))
    report = run_round(overlay, lagging.anti_entropy)
    assert report.accepted == 1
    lookup = lagging.index.get(name)
    assert lookup.record is not None and lookup.record.sequence == 2


def test_a_replica_with_newer_records_pulls_nothing_stale() -> None:
    overlay = Overlay(20, seed=18)
    ahead = overlay.members(0)[0]
    name = overlay.name_in_slot(0)
    overlay.store_everywhere(record_of(name, sequence=1))
    assert ahead.index.put(record_of(name, sequence=2))
    report = run_round(overlay, ahead.anti_entropy)
    assert report.received == 1 and report.accepted == 0  # the older one came, and was refused
    lookup = ahead.index.get(name)
    assert lookup.record is not None and lookup.record.sequence == 2


def test_a_round_is_bounded_and_rounds_converge() -> None:
    overlay = Overlay(20, seed=19)
    lagging = overlay.members(0)[0]
    missing = stored_without(overlay, 0, 40, lagging)
    for i in range(40, 50):
        overlay.store_everywhere(record_of(overlay.name_in_slot(0, skip=i)))
    ae = AntiEntropy(lagging, max_digests=6, max_pulled=5)
    rounds = 0
    while any(name not in lagging.index for name in missing):
        report = run_round(overlay, ae)
        rounds += 1
        assert report.digests <= 6
        assert report.received <= 5
        assert rounds <= 20, "40 records 5 at a time: no progress"
    start, end = slot_range(lagging)
    assert all(
        lagging.index.digest(start, end) == sn.index.digest(start, end) for sn in overlay.members(0)
    )


def test_no_round_while_the_slot_is_still_being_pulled_or_alone() -> None:
    overlay = Overlay(20, seed=20)
    sn = overlay.members(0)[0]
    sn.synced = False
    assert run_round(overlay, sn.anti_entropy) == Round()
    alone = Overlay(1, seed=21)
    [only] = alone.sns.values()
    assert run_round(alone, only.anti_entropy) == Round()


def test_a_peer_that_holds_another_range_fails_the_round() -> None:
    overlay = Overlay(20, seed=22)
    sn, *peers = overlay.members(0)
    for peer in peers:
        peer.held = None  # as if each had just moved here and not pulled yet
    got = results(Deferred.fromCoroutine(sn.anti_entropy.run_round()))
    pump(overlay.clock, 1.0)
    [failure] = got
    assert failure.check(VoipError)
    assert "holds-none" in str(failure.value)


# -- the digest request --------------------------------------------------------------------------


def test_the_digest_reply_is_the_index_digest_of_the_range() -> None:
    overlay = Overlay(20, seed=23)
    sn = overlay.members(0)[0]
    for i in range(5):
        overlay.store_everywhere(record_of(overlay.name_in_slot(0, skip=i)))
    start, end = slot_range(sn)
    reply = overlay.ask(sn, lambda rid: DigestRequest(rid, start, end), DIGEST_PAD)
    assert isinstance(reply, DigestReply)
    digest = sn.index.digest(start, end)
    assert (reply.count, reply.fingerprint) == (5, digest.fingerprint_bytes)
    outside = overlay.ask(sn, lambda rid: DigestRequest(rid, end, KEY_SPACE), DIGEST_PAD)
    assert isinstance(outside, Error) and outside.code == HoldsNone.code
    wider = overlay.ask(sn, lambda rid: DigestRequest(rid, 0, KEY_SPACE), DIGEST_PAD)
    assert isinstance(wider, Error) and wider.code == HoldsPart.code
    bad = overlay.ask(sn, lambda rid: DigestRequest(rid, end, start), DIGEST_PAD)
    assert isinstance(bad, Error) and bad.code == "protocol-error"
    assert bad.message == f"digest asks for keys [{end}, {start}), not a key range."
    assert sn.udp.counters["amplification-refused"] == 0


def test_a_padded_digest_request_has_room_for_any_reply() -> None:
    rid = 2**31
    request = len(encode(DigestRequest(rid, 0, 1), DIGEST_PAD))
    replies = [
        DigestReply(rid, 10**9, bytes(16)),
        Error(rid, "digest", HoldsPart.code, str(HoldsPart())),
        Error(rid, "digest", HoldsNone.code, str(HoldsNone())),
        Error(rid, "digest", "protocol-error", "digest asks for keys [1, 0), not a key range."),
    ]
    assert all(len(encode(reply)) <= request for reply in replies)


def test_an_unpadded_digest_request_is_not_answered() -> None:
    overlay = Overlay(20, seed=24)
    sn = overlay.members(0)[0]
    start, end = slot_range(sn)
    assert sn.info is not None
    ask = results(
        overlay.client.request(
            (sn.info.host, sn.info.udp_port),
            lambda rid: DigestRequest(rid, start, end),
            timeout=0.5,
        )
    )
    pump(overlay.clock, 1.0)
    # The reply (a 16-byte fingerprint) is larger than an unpadded request: never sent.
    assert sn.udp.counters["amplification-refused"] >= 1
    assert len(ask) == 1 and not isinstance(ask[0], DigestReply)


@pytest.fixture(scope="module")
def fuzzed() -> Supernode:
    overlay = Overlay(20, seed=25)
    for i in range(3):
        overlay.store_everywhere(record_of(overlay.name_in_slot(0, skip=i)))
    return overlay.members(0)[0]


# The key ranges of the range requests a supernode serves are fuzzed: the reply is a digest
# or records, or the request fails with one of our errors, never with anything else.
@settings(max_examples=200, deadline=None)
@given(
    st.integers(-(2**70), 2**70) | st.integers(0, KEY_SPACE),
    st.integers(-(2**70), 2**70) | st.integers(0, KEY_SPACE),
    st.integers(-(2**40), 2**40),
    st.booleans(),
)
def test_range_requests_raise_only_our_errors(
    fuzzed: Supernode, start: int, end: int, cursor: int, retired: bool
) -> None:
    for message in (
        DigestRequest(1, start, end),
        Pull(1, start, end, cursor, retired),
    ):
        got: list[Any] = results(Deferred.fromCoroutine(fuzzed.handle_datagram(message, ASKER)))
        [outcome] = got
        if isinstance(outcome, DigestReply | Records):
            assert 0 <= start < end <= KEY_SPACE
        else:
            assert outcome.check(VoipError), outcome
            outcome.trap(VoipError)
