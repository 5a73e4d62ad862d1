"""Choosing relays and paths (client.relaypath, client.mediapath), with a Clock.

The parts here are driven with small stand-ins for the TURN client and the call; the same
behaviour runs against real relays in tests/integration/test_relay_call.py (supernode relay,
coturn, a relay killed mid-call) and through real NATs in tests/nat/test_relay_matrix.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from client.mediapath import PATH_SILENCE, RELAY_GRACE, WATCH_EVERY, MediaPaths
from client.relaypath import (
    TCP_PENALTY_MS,
    Choice,
    Probe,
    RelayLeg,
    choose,
    direct_possible,
    probe,
)
from client.signalling import CandidateInfo
from overlay.errors import VoipError
from overlay.overlay_protocol import RelayOffer


def offer(host: str, port: int = 3478) -> RelayOffer:
    return RelayOffer(host, port, port, "100:alice", "secret", 100, 10)


@pytest.mark.parametrize(
    ("mine", "theirs", "possible"),
    [
        ("public", "symmetric-nat", True),
        ("cone-nat", "symmetric-nat", True),
        ("symmetric-nat", "symmetric-nat", False),
        ("udp-blocked", "public", False),
        ("public", "udp-blocked", False),
        (None, None, True),
        ("nat-type-unknown", "symmetric-nat", True),
    ],
)
def test_direct_is_skipped_only_where_it_cannot_work(
    mine: str | None, theirs: str | None, possible: bool
) -> None:
    assert direct_possible(mine, theirs)[0] is possible


def test_the_relay_with_the_lowest_combined_round_trip_is_primary() -> None:
    offers = [offer("203.0.113.1"), offer("203.0.113.2"), offer("203.0.113.3")]
    mine = [Probe(10, "udp"), Probe(30, "udp"), Probe(5, "udp")]
    theirs = [40, 10, 50]
    choice = choose(offers, mine, theirs)
    assert choice is not None
    assert choice.legs == (1, 0)  # 40 ms, then 50 ms; 55 ms is left out
    assert "203.0.113.2:3478" in choice.reason and "40 ms" in choice.reason


def test_tcp_costs_more_and_unreachable_relays_are_not_chosen() -> None:
    offers = [offer("203.0.113.1"), offer("203.0.113.2"), offer("203.0.113.3")]
    mine = [Probe(10, "tcp"), Probe(-1, "none"), Probe(100, "udp")]
    theirs = [10, 5, 10]
    choice = choose(offers, mine, theirs)
    assert choice is not None
    # 10 + 10 ms over TCP costs 20 + TCP_PENALTY_MS: more than 100 + 10 ms over UDP
    assert 20 + TCP_PENALTY_MS > 110
    assert choice.legs == (2, 0)
    assert choose(offers, [Probe(-1, "none")] * 3, theirs) is None
    assert choose(offers, mine, [-1, -1, -1]) is None


def test_the_same_relay_offered_twice_counts_once() -> None:
    offers = [offer("203.0.113.1"), offer("203.0.113.1")]
    choice = choose(offers, [Probe(1, "udp"), Probe(1, "udp")], [1, 1])
    assert choice is not None and choice.legs == (0,)


class FakeStun:
    def __init__(self, clock: Clock, answer_after: float | None) -> None:
        self.clock = clock
        self.answer_after = answer_after

    def binding(self, server: Any, timeout: float) -> Deferred[Any]:
        if self.answer_after is None:
            return fail(VoipError("no answer"))
        answered: Deferred[Any] = Deferred()
        self.clock.callLater(self.answer_after, answered.callback, ("198.51.100.1", 1))
        return answered


def test_a_relay_is_probed_over_udp_then_tcp() -> None:
    clock = Clock()
    result: list[Probe] = []
    Deferred.fromCoroutine(
        probe(clock, FakeStun(clock, 0.025), offer("203.0.113.1"), None)
    ).addCallback(result.append)
    clock.advance(0.025)
    assert result == [Probe(25, "udp")]

    def tcp(address: Any, timeout: float) -> Deferred[float]:
        return succeed(0.04)

    Deferred.fromCoroutine(
        probe(clock, FakeStun(clock, None), offer("203.0.113.1"), tcp)
    ).addCallback(result.append)
    assert result[-1] == Probe(40, "tcp")

    def refused(address: Any, timeout: float) -> Deferred[float]:
        return fail(ConnectionRefusedError())

    Deferred.fromCoroutine(
        probe(clock, FakeStun(clock, None), offer("203.0.113.1"), refused)
    ).addCallback(result.append)
    assert result[-1] == Probe(-1, "none") and result[-1].cost is None


class FakeTurn:
    """Stands in for client.turnclient.TurnClient (the real one: test_turnclient*.py)."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []
        self.on_data: Any = None
        self.on_failed: Any = None
        self.closed = 0

    def send(self, data: bytes, peer: Any) -> None:
        self.sent.append((data, peer))

    def close(self) -> None:
        self.closed += 1


class FakeChecker:
    def __init__(self) -> None:
        self.got: list[bytes] = []
        self.stopped = False

    def datagram_received(self, data: bytes, address: Any) -> bool:
        self.got.append(data)
        return True

    def stop(self) -> None:
        self.stopped = True


def test_a_leg_passes_on_by_first_byte_and_only_from_the_peer() -> None:
    clock = Clock()
    turn = FakeTurn()
    media: list[bytes] = []
    failures: list[str] = []
    leg = RelayLeg(
        clock, 0, offer("203.0.113.1"), "udp", turn, media.append, lambda _, r: failures.append(r)
    )
    leg.remote = ("203.0.113.1", 50000)
    leg.checker = FakeChecker()
    clock.advance(3)
    turn.on_data(b"\x80rtp", ("203.0.113.1", 50000))
    turn.on_data(b"Vcheck", ("203.0.113.1", 50000))
    turn.on_data(b"\x80stranger", ("203.0.113.1", 50001))
    assert media == [b"\x80rtp"] and leg.checker.got == [b"Vcheck"]
    assert leg.last_heard == 3
    leg.send_media(b"\x80out")
    assert turn.sent == [(b"\x80out", ("203.0.113.1", 50000))]
    turn.on_failed("refresh refused")
    turn.on_failed("again")
    assert failures == ["refresh refused"]
    leg.send_media(b"\x80lost")  # a failed leg sends nothing
    assert len(turn.sent) == 1
    leg.close()
    assert turn.closed == 1 and leg.checker.stopped


# -- the decision, with a stand-in call --------------------------------------------------------


class Socket:
    def __init__(self) -> None:
        self.handlers: list[Any] = []
        self.sent: list[tuple[bytes, Any]] = []

    def send(self, data: bytes, address: Any) -> None:
        self.sent.append((data, address))


class Pair:
    def __init__(self, kind: str, remote: Any) -> None:
        self.local = CandidateInfo(kind, "198.51.100.5", 4000, 1)
        self.remote = remote
        self.rtt = 0.01
        self.remote_candidate = CandidateInfo(kind, remote[0], remote[1], 1)


class StandInCall:
    def __init__(self, clock: Clock) -> None:
        self.env = type("Env", (), {"reactor": clock, "relay_only": False})()
        self.socket = Socket()
        self.peer = "bob"
        self.side = "caller"
        self.ready: list[Any] = []
        self.failed: list[str] = []
        self.said: list[str] = []
        self.media: list[bytes] = []

    def path_ready(self, pair: Any) -> None:
        self.ready.append(pair)

    def no_path(self, reason: str) -> None:
        self.failed.append(reason)

    def say(self, text: str) -> None:
        self.said.append(text)

    def media_in(self, data: bytes) -> None:
        self.media.append(data)


def ready_leg(clock: Clock, index: int, host: str) -> RelayLeg:
    leg = RelayLeg(clock, index, offer(host), "udp", FakeTurn(), lambda _: None, lambda *_: None)
    leg.remote = (host, 50000 + index)
    leg.relayed = (host, 40000 + index)
    leg.selected = Pair("relay", leg.remote)
    return leg


def paths_on(clock: Clock) -> tuple[MediaPaths, StandInCall]:
    call = StandInCall(clock)
    paths = MediaPaths(call)  # type: ignore[arg-type]
    return paths, call


def test_a_ready_relay_waits_for_direct_a_moment_then_is_used() -> None:
    clock = Clock()
    paths, call = paths_on(clock)
    paths.direct_state = "checking"
    paths.legs = [ready_leg(clock, 0, "203.0.113.1")]
    paths.relay_state = "ready"
    paths._maybe_relay_now()
    assert call.ready == []
    clock.advance(RELAY_GRACE)
    assert call.ready == [paths.legs[0].selected]
    assert paths.describe_route() == "relay 203.0.113.1:3478 (UDP)"
    assert "no direct pair answered" in paths.why


def test_direct_wins_over_a_relay_even_later_and_the_relays_are_released() -> None:
    clock = Clock()
    paths, call = paths_on(clock)
    leg = ready_leg(clock, 0, "203.0.113.1")
    paths.legs = [leg]
    paths.direct_state = "failed"
    paths._maybe_relay_now()
    assert paths.route is leg and call.ready == [leg.selected]
    paths._direct_ready(Pair("srflx", ("198.51.100.9", 5000)))
    assert paths.route == "direct"
    assert paths.switches and "direct path opened" in paths.switches[0]
    assert leg.failed == "closed"
    paths.send(b"\x80media")
    assert call.socket.sent == [(b"\x80media", ("198.51.100.9", 5000))]


def test_a_silent_relay_is_left_for_the_backup_within_the_bound() -> None:
    clock = Clock()
    paths, _call = paths_on(clock)
    primary, backup = ready_leg(clock, 0, "203.0.113.1"), ready_leg(clock, 1, "203.0.113.2")
    paths.legs = [primary, backup]
    paths.direct_state = "skipped"
    paths._maybe_relay_now()
    assert paths.route is primary
    elapsed = 0.0
    while paths.route is primary and elapsed < 5:
        clock.advance(WATCH_EVERY)
        elapsed += WATCH_EVERY
        paths.watch()
    assert paths.route is backup
    assert PATH_SILENCE < elapsed <= PATH_SILENCE + WATCH_EVERY + 1e-9
    assert "carried nothing" in paths.switches[0]
    paths.send(b"\x80media")
    assert backup.turn.sent == [(b"\x80media", backup.remote)]


def test_a_lost_allocation_moves_the_call_at_once() -> None:
    clock = Clock()
    paths, _ = paths_on(clock)
    primary, backup = ready_leg(clock, 0, "203.0.113.1"), ready_leg(clock, 1, "203.0.113.2")
    for leg in (primary, backup):
        leg._on_failed = paths._leg_failed
    paths.legs = [primary, backup]
    paths.direct_state = "skipped"
    paths._maybe_relay_now()
    primary.turn.on_failed("The relay 203.0.113.1:3478 did not answer (UDP).")
    assert paths.route is backup and "lost" in paths.switches[0]


def test_no_path_at_all_is_one_clear_reason() -> None:
    clock = Clock()
    paths, call = paths_on(clock)
    paths.direct_state, paths.direct_reason = "failed", "No direct pair answered in 8 s."
    paths.relay_state, paths.relay_reason = "failed", "no relay was offered"
    paths._check_no_path()
    assert call.failed == [
        "No media path to bob could be opened (No direct pair answered in 8 s.; "
        "relay: no relay was offered)."
    ]


def test_both_sides_settle_on_the_primary_relay_whichever_was_ready_first() -> None:
    clock = Clock()
    paths, call = paths_on(clock)
    paths.direct_state = "skipped"
    primary, backup = ready_leg(clock, 3, "203.0.113.1"), ready_leg(clock, 0, "203.0.113.2")
    paths.choice = Choice((3, 0), "relay 203.0.113.1:3478 has the lowest combined round trip")
    primary.selected = None
    paths.legs = [backup, primary]  # allocated in the other order
    paths._leg_ready(backup)
    assert paths.route is backup
    primary.selected = Pair("relay", primary.remote)
    paths._leg_ready(primary)
    assert paths.route is primary
    assert "primary relay" in paths.switches[0]
    assert call.ready == [backup.selected]  # the call connected once
