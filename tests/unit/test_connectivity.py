"""Connectivity checks (client.connectivity) on an in-memory network with NATs (tools.memnat).

Two call sides each learn their reflexive address from a reflector (tools.checkpeer's, as the
NAT lab test uses), swap candidates and run the checks on an injected Clock.  The same
behaviour runs on real kernels and NATs in tests/nat/test_connectivity_nat.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import CancelledError
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from client.candidates import Address, Candidate
from client.checklist import pair_priority
from client.checkpacket import CheckPacket, CheckType
from client.connectivity import (
    NOMINATION_GRACE,
    ConnectivityChecker,
    NoDirectPath,
    SelectedPair,
    State,
)
from tools.checkpeer import Reflector, parse_reflect_reply, reflect_reply, reflect_request
from tools.memnat import MemoryNAT
from tools.memnet import MemoryNetwork

KEY = bytes(range(32))
TOKEN = b"call0001"
NONCE = b"nonce-01"
REFLECTOR = ("192.0.2.100", 3478)
EI, AD, APD = "endpoint-independent", "address-dependent", "address-and-port-dependent"
NATS = {
    "full-cone": (EI, EI),
    "restricted-cone": (EI, AD),
    "port-restricted": (EI, APD),
    "symmetric": (APD, APD),
}
STEP = 0.005


def pump(clock: Clock, seconds: float) -> None:
    """Advance ``seconds`` in small steps, ending exactly there (no float drift)."""
    end = clock.seconds() + seconds
    while clock.seconds() + STEP < end:
        clock.advance(STEP)
    clock.advance(max(0.0, end - clock.seconds()))


class CallSide(DatagramProtocol):
    """One side's call socket: checks go to the checker; anything else is kept."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.checker: ConnectivityChecker | None = None
        self.reflexive: Address | None = None
        self.outcome: SelectedPair | Failure | None = None
        self.finished_at: float | None = None
        self.others: list[tuple[bytes, Address]] = []
        self.host: Address = ("0.0.0.0", 0)

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        address = (addr[0], addr[1])
        if self.checker is not None and self.checker.datagram_received(datagram, address):
            return
        found = parse_reflect_reply(datagram, NONCE)
        if found is not None:
            self.reflexive = found
            return
        self.others.append((datagram, address))

    def send(self, data: bytes, address: Address) -> None:
        assert self.transport is not None
        self.transport.write(data, address)

    @property
    def candidates(self) -> list[Candidate]:
        found = [Candidate.make("host", self.host)]
        if self.reflexive is not None and self.reflexive != self.host:
            found.append(Candidate.make("srflx", self.reflexive))
        return found

    @property
    def selected(self) -> SelectedPair:
        assert isinstance(self.outcome, SelectedPair), self.outcome
        return self.outcome


class World:
    """Alice (the caller, controlling) and Bob, each public or behind a NAT of some kind."""

    def __init__(
        self,
        kind_a: str | None,
        kind_b: str | None,
        *,
        latency: float = 0.02,
        lifetime: float | None = None,
    ) -> None:
        self.clock = Clock()
        self.net = MemoryNetwork(self.clock, latency=latency)
        self.net.attach(Reflector(), REFLECTOR)
        self.nats: dict[str, MemoryNAT] = {}
        self.a = self._side("alice", kind_a, "10.0.1.2", "203.0.113.1", lifetime)
        self.b = self._side("bob", kind_b, "10.0.2.2", "198.51.100.1", lifetime)
        self.run(0.2)  # both learn their reflexive address

    def _side(
        self, name: str, kind: str | None, private: str, public: str, lifetime: float | None
    ) -> CallSide:
        side = CallSide(name)
        if kind is None:
            side.host = (public, 5000)
            transport: Any = self.net.attach(side, side.host)
        else:
            mapping, filtering = NATS[kind]
            nat = MemoryNAT(
                self.net, public, mapping=mapping, filtering=filtering, lifetime=lifetime
            )
            self.nats[name] = nat
            side.host = (private, 5000)
            transport = nat.attach(side, side.host)
        transport.write(reflect_request(NONCE), REFLECTOR)
        return side

    def checkers(
        self,
        *,
        remote_a: list[Candidate] | None = None,
        a_controlling: bool = True,
        b_controlling: bool = False,
        **options: Any,
    ) -> tuple[ConnectivityChecker, ConnectivityChecker]:
        a, b = self.a, self.b
        remote = b.candidates if remote_a is None else remote_a
        a.checker = ConnectivityChecker(
            self.clock,
            a.send,
            KEY,
            TOKEN,
            a_controlling,
            a.candidates,
            remote,
            peer="bob",
            **options,
        )
        b.checker = ConnectivityChecker(
            self.clock,
            b.send,
            KEY,
            TOKEN,
            b_controlling,
            b.candidates,
            a.candidates,
            peer="alice",
            **options,
        )
        return a.checker, b.checker

    def start(self, callee_ahead: float = 0.0) -> float:
        """Start both; the callee ``callee_ahead`` seconds first (it starts on sending ACCEPT)."""
        for side in (self.b, self.a):
            assert side.checker is not None
            side.checker.start().addBoth(self._finished, side)
            if side is self.b:
                self.run(callee_ahead)
        return self.clock.seconds()

    def _finished(self, outcome: SelectedPair | Failure, side: CallSide) -> None:
        side.outcome = outcome
        side.finished_at = self.clock.seconds()

    def run(self, seconds: float) -> None:
        pump(self.clock, seconds)

    def call(self, seconds: float = 10.0, callee_ahead: float = 0.0, **options: Any) -> float:
        self.checkers(**options)
        started = self.start(callee_ahead)
        self.run(seconds)
        return started

    def assert_direct_path(self) -> None:
        """Both selected the same path, and media now flows on it both ways."""
        pa, pb = self.a.selected, self.b.selected
        assert pa.remote == pb.local.address
        assert pb.remote == pa.local.address
        self.a.send(b"\x80from alice", pa.remote)
        self.b.send(b"\x80from bob", pb.remote)
        self.run(0.1)
        assert (b"\x80from alice", pb.remote) in self.b.others
        assert (b"\x80from bob", pa.remote) in self.a.others


# -- who can reach whom ------------------------------------------------------------------------


def test_two_public_hosts_use_their_host_candidates() -> None:
    world = World(None, None)
    world.call()
    world.assert_direct_path()
    assert world.a.selected.local.kind == "host" and world.b.selected.local.kind == "host"
    assert world.a.selected.rtt == pytest.approx(0.04)


@pytest.mark.parametrize("kind", list(NATS))
@pytest.mark.parametrize("behind", ["caller", "callee"])
def test_one_side_behind_any_nat_reaches_a_public_host(kind: str, behind: str) -> None:
    world = World(kind, None) if behind == "caller" else World(None, kind)
    world.call()
    world.assert_direct_path()


@pytest.mark.parametrize(
    ("kind_a", "kind_b"),
    [
        ("port-restricted", "port-restricted"),
        ("restricted-cone", "port-restricted"),
        ("full-cone", "symmetric"),
        ("full-cone", "full-cone"),
    ],
)
def test_hole_punching_between_two_nats(kind_a: str, kind_b: str) -> None:
    world = World(kind_a, kind_b)
    world.call()
    world.assert_direct_path()


def test_two_port_restricted_cones_meet_on_their_reflexive_addresses() -> None:
    world = World("port-restricted", "port-restricted")
    world.call(callee_ahead=0.5)
    world.assert_direct_path()
    pa, pb = world.a.selected, world.b.selected
    assert (pa.local.kind, pa.remote_candidate.kind) == ("srflx", "srflx")
    assert pa.remote == world.b.reflexive and pb.remote == world.a.reflexive
    # Bob's early checks were dropped by Alice's NAT until her own check opened the hole.
    assert world.nats["alice"].counters["filtered"] >= 3


def test_a_symmetric_nat_is_learned_as_peer_reflexive() -> None:
    world = World(None, "symmetric")
    world.call()
    world.assert_direct_path()
    pa, pb = world.a.selected, world.b.selected
    assert pa.remote_candidate.kind == "prflx" and pb.local.kind == "prflx"
    assert pa.remote != world.b.reflexive  # a new mapping toward alice, not the reflector's
    assert world.a.checker is not None and world.a.checker.counters["prflx-learned"] == 1


@pytest.mark.parametrize(
    ("kind_a", "kind_b"),
    [
        ("symmetric", "port-restricted"),
        ("port-restricted", "symmetric"),
        ("symmetric", "symmetric"),
    ],
)
def test_symmetric_against_port_restricted_needs_a_relay(kind_a: str, kind_b: str) -> None:
    world = World(kind_a, kind_b)
    started = world.call(seconds=9.0)
    for side, peer in ((world.a, "bob"), (world.b, "alice")):
        assert isinstance(side.outcome, Failure)
        error = side.outcome.value
        assert isinstance(error, NoDirectPath)
        assert str(error).startswith(f"No direct path to {peer}'s node: no answer on 2 ")
        assert "within 8 s" in str(error)
        assert side.finished_at == pytest.approx(started + 8.0, abs=STEP)
    world.run(1.0)
    assert world.clock.getDelayedCalls() == []


@pytest.mark.parametrize("seed", range(5))
def test_a_lossy_link_still_gets_through(seed: int) -> None:
    world = World("port-restricted", "port-restricted")
    world.net.loss = 0.3
    world.net.rng.seed(seed)
    world.call()
    assert world.net.counters["lost"] > 0
    world.net.loss = 0.0
    world.assert_direct_path()


# -- nomination and roles ------------------------------------------------------------------------


def test_both_sides_end_on_the_pair_the_caller_nominated() -> None:
    world = World("port-restricted", None)
    a, b = world.checkers()
    world.start()
    world.run(10.0)
    world.assert_direct_path()
    nominated = [p for p in a.pairs.values() if p.nominated]
    assert [p.remote.address for p in nominated] == [world.a.selected.remote]
    assert a.state is State.SELECTED and b.state is State.SELECTED
    assert b.pairs[world.b.selected.remote].nominated


@pytest.mark.parametrize("controlling", [True, False])
def test_a_role_conflict_is_settled_by_the_tie_breaker(controlling: bool) -> None:
    world = World("port-restricted", "full-cone")
    world.checkers(a_controlling=controlling, b_controlling=controlling)
    assert world.a.checker is not None and world.b.checker is not None
    world.a.checker.tie_breaker, world.b.checker.tie_breaker = 1, 2
    world.start()
    world.run(10.0)
    world.assert_direct_path()
    assert world.a.checker.counters["role-switches"] == 1
    assert world.b.checker.counters["role-switches"] == 0
    assert world.a.checker.controlling != world.b.checker.controlling


def test_trickled_candidates_are_checked_when_they_arrive() -> None:
    world = World("port-restricted", "port-restricted")
    a, _ = world.checkers(remote_a=[])
    started = world.start()
    world.run(1.0)
    assert world.a.outcome is None and world.b.outcome is None
    a.add_remote(world.b.candidates)
    world.run(5.0)
    world.assert_direct_path()
    assert world.a.finished_at is not None and world.a.finished_at > started + 1.0


# -- keep-alive --------------------------------------------------------------------------------


@pytest.mark.parametrize("keepalive", [2.5, None])
def test_keepalives_hold_the_nat_mappings_open(keepalive: float | None) -> None:
    world = World("port-restricted", "port-restricted", lifetime=5.0)
    a, b = world.checkers(keepalive=keepalive)
    world.start()
    world.run(2.0)
    selected_at = b.last_heard
    sent = a.counters["requests-sent"]
    world.run(60.0)
    world.b.send(b"\x80after a minute of silence", world.b.selected.remote)
    world.run(0.1)
    arrived = any(data == b"\x80after a minute of silence" for data, _ in world.a.others)
    if keepalive:
        assert arrived
        assert a.counters["requests-sent"] - sent == 24  # one every 2.5 s
        assert b.last_heard is not None and selected_at is not None
        assert b.last_heard > selected_at + 55
        assert a.last_heard is not None and a.last_heard > selected_at + 55
    else:
        assert not arrived
        assert a.counters["requests-sent"] == sent


# -- the schedule, with a recording socket -----------------------------------------------------


class Recorder:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.sent: list[tuple[float, CheckPacket, Address]] = []

    def __call__(self, data: bytes, address: Address) -> None:
        self.sent.append((self.clock.seconds(), CheckPacket.parse(data, KEY), address))

    def times(self, address: Address) -> list[float]:
        return [t for t, _, a in self.sent if a == address]


LOCAL = Candidate.make("host", ("203.0.113.1", 5000))
HOST_B = Candidate.make("host", ("198.51.100.1", 5000))
SRFLX_B = Candidate.make("srflx", ("198.51.100.2", 6000))


def lone(
    controlling: bool = False, remote: list[Candidate] | None = None, **options: Any
) -> tuple[Clock, Recorder, ConnectivityChecker, list[Any]]:
    clock = Clock()
    recorder = Recorder(clock)
    checker = ConnectivityChecker(
        clock,
        recorder,
        KEY,
        TOKEN,
        controlling,
        [LOCAL],
        [SRFLX_B, HOST_B] if remote is None else remote,
        peer="bob",
        **options,
    )
    return clock, recorder, checker, []


def test_every_pair_is_checked_at_once_paced_and_retransmitted_until_the_timeout() -> None:
    clock, recorder, checker, outcome = lone()
    checker.start().addErrback(outcome.append)
    pump(clock, 9.0)
    schedule = [0.0, 0.1, 0.3, 0.7, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5]
    # The host pair has the higher priority: it goes first, the reflexive pair one pace later.
    assert recorder.times(HOST_B.address) == pytest.approx(schedule, abs=STEP)
    assert recorder.times(SRFLX_B.address) == pytest.approx([t + 0.02 for t in schedule], abs=STEP)
    assert len(outcome) == 1 and outcome[0].check(NoDirectPath)
    assert "no answer on 2 candidate pairs within 8 s" in outcome[0].getErrorMessage()
    assert clock.getDelayedCalls() == []


def test_pairs_follow_the_rfc_priority_formula() -> None:
    assert pair_priority(1, 2) == (1 << 32) + 4
    assert pair_priority(2, 1) == (1 << 32) + 4 + 1
    _, _, controlled, _ = lone()
    _, _, controlling, _ = lone(controlling=True)
    for checker in (controlled, controlling):
        ranked = sorted(checker.pairs.values(), key=lambda p: p.priority, reverse=True)
        assert [p.remote for p in ranked] == [HOST_B, SRFLX_B]


def answer(request: CheckPacket, observed: Address, *, key: bytes = KEY) -> bytes:
    return CheckPacket(
        CheckType.RESPONSE,
        request.call_token,
        request.transaction_id,
        7,
        1,
        controlling=not request.controlling,
        nominate=request.nominate,
        observed=observed,
    ).to_bytes(key)


def check_from_peer(*, nominate: bool = False, controlling: bool = True, key: bytes = KEY) -> bytes:
    return CheckPacket(CheckType.REQUEST, TOKEN, b"t" * 12, 7, 99, controlling, nominate).to_bytes(
        key
    )


def test_requests_are_answered_with_the_source_seen_and_teach_a_peer_reflexive_pair() -> None:
    _, recorder, checker, _ = lone()
    checker.start()
    source = ("198.51.100.9", 41234)
    assert checker.datagram_received(check_from_peer(), source)
    replies = [p for _, p, a in recorder.sent if p.type is CheckType.RESPONSE]
    assert len(replies) == 1 and replies[0].observed == source
    assert replies[0].transaction_id == b"t" * 12 and not replies[0].controlling
    assert checker.pairs[source].remote == Candidate("prflx", *source, 99)
    # ... and a triggered check goes to it at once.
    assert recorder.sent[-1][2] == source and recorder.sent[-1][1].type is CheckType.REQUEST


def test_forged_and_foreign_packets_are_dropped_and_counted() -> None:
    _, recorder, checker, _ = lone()
    checker.start()
    before = len(recorder.sent)
    source = ("198.51.100.1", 5000)
    assert checker.datagram_received(b"V" + bytes(71), source)
    bad_mac = bytearray(check_from_peer())
    bad_mac[-1] ^= 1
    assert checker.datagram_received(bytes(bad_mac), source)
    assert checker.datagram_received(check_from_peer(key=bytes(32)), source)
    assert checker.datagram_received(b"V\x01", source)
    other_call = CheckPacket(CheckType.REQUEST, b"othercal", b"t" * 12, 7, 9, True)
    assert checker.datagram_received(other_call.to_bytes(KEY), source)
    # A forged answer to our real check, and a real-keyed one from the wrong address:
    _, request, to = next((t, p, a) for t, p, a in recorder.sent if a == HOST_B.address)
    assert checker.datagram_received(answer(request, LOCAL.address, key=bytes(32)), to)
    assert checker.datagram_received(answer(request, LOCAL.address), ("198.51.100.66", 5000))
    assert len(recorder.sent) == before  # nothing answered, nothing triggered
    assert checker.counters["unauthenticated"] == 3
    assert checker.counters["malformed"] == 2
    assert checker.counters["wrong-call"] == 1
    assert checker.counters["asymmetric-responses"] == 1
    assert not any(p.valid for p in checker.pairs.values())
    # Other protocols on the call socket are not ours.
    assert not checker.datagram_received(b"\x00\x01\x00\x00", source)
    assert not checker.datagram_received(b"\x80\x78", source)


def test_controlled_side_selects_only_a_nominated_pair_its_own_check_proved() -> None:
    clock, recorder, checker, outcome = lone()
    checker.start().addBoth(outcome.append)
    pump(clock, 0.1)
    _, request, to = next((t, p, a) for t, p, a in recorder.sent if a == HOST_B.address)
    checker.datagram_received(answer(request, LOCAL.address), to)
    assert checker.pairs[to].valid and outcome == []  # valid, not nominated yet
    checker.datagram_received(check_from_peer(nominate=True), to)
    [selected] = outcome
    assert isinstance(selected, SelectedPair)
    assert (selected.local, selected.remote, selected.remote_candidate) == (LOCAL, to, HOST_B)
    assert selected.rtt == pytest.approx(0.1)
    assert clock.getDelayedCalls() == []  # the controlled side sends no keep-alives


def test_a_late_nomination_gets_a_grace_period_for_its_triggered_check() -> None:
    clock, recorder, checker, outcome = lone()
    checker.start().addBoth(outcome.append)
    pump(clock, 7.5)
    checker.datagram_received(check_from_peer(nominate=True), HOST_B.address)
    triggered = recorder.sent[-1][1]
    assert triggered.type is CheckType.REQUEST
    pump(clock, NOMINATION_GRACE - 0.5)  # beyond the 8 s timeout
    assert outcome == []
    checker.datagram_received(answer(triggered, LOCAL.address), HOST_B.address)
    assert isinstance(outcome[0], SelectedPair) and outcome[0].remote == HOST_B.address


def test_failure_texts_say_what_was_seen() -> None:
    clock, recorder, checker, outcome = lone(remote=[Candidate.make("host", ("2001:db8::1", 5))])
    checker.start().addErrback(outcome.append)
    pump(clock, 8.0)
    assert outcome[0].getErrorMessage() == (
        "No direct path to bob's node: it offered no address we can reach (we have IPv4)."
    )
    assert recorder.sent == []

    clock, recorder, checker, outcome = lone()
    checker.start().addErrback(outcome.append)
    checker.datagram_received(check_from_peer(), HOST_B.address)
    pump(clock, 8.0)
    assert "its checks reached us, but none of ours on 2 candidate pairs was answered" in (
        outcome[0].getErrorMessage()
    )

    clock, recorder, checker, outcome = lone()
    checker.start().addErrback(outcome.append)
    _, request, to = recorder.sent[0]
    checker.datagram_received(answer(request, LOCAL.address), to)
    pump(clock, 8.0)
    assert "checks on 2 candidate pairs succeeded, but no pair was confirmed" in (
        outcome[0].getErrorMessage()
    )
    # A side that gave up answers nothing more (the peer must not select a path alone).
    before = len(recorder.sent)
    assert checker.datagram_received(check_from_peer(), HOST_B.address)
    assert len(recorder.sent) == before and checker.counters["after-end"] == 1


def test_stop_cancels_everything() -> None:
    clock, recorder, checker, outcome = lone()
    checker.start().addErrback(outcome.append)
    pump(clock, 1.0)
    checker.stop()
    assert outcome[0].check(CancelledError)
    assert clock.getDelayedCalls() == []
    before = len(recorder.sent)
    assert checker.datagram_received(check_from_peer(), HOST_B.address)
    assert len(recorder.sent) == before


def test_stop_after_selection_ends_the_keepalives() -> None:
    world = World(None, None)
    a, b = world.checkers()
    world.start()
    world.run(1.0)
    assert world.clock.getDelayedCalls() != []
    a.stop()
    b.stop()
    world.run(0.1)
    assert world.clock.getDelayedCalls() == []


def test_trace_sees_every_transition() -> None:
    seen: list[tuple[str, str, str]] = []
    clock, _, checker, outcome = lone(trace=lambda *t: seen.append(t))
    checker.start().addErrback(outcome.append)
    pump(clock, 8.0)
    checker.stop()
    assert seen == [
        ("idle", "start", "checking"),
        ("checking", "timeout", "failed"),
        ("failed", "stop", "stopped"),
    ]


# -- the reflector of tools/checkpeer ----------------------------------------------------------


def test_the_reflector_tells_the_source_and_never_amplifies() -> None:
    request = reflect_request(NONCE)
    reply = reflect_reply(request, ("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", 65535))
    assert reply is not None and len(reply) <= len(request)
    assert parse_reflect_reply(reply, NONCE) == ("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", 65535)
    assert parse_reflect_reply(reply, b"other-no") is None
    assert reflect_reply(request[:-1], ("1.2.3.4", 5)) is None
    assert reflect_reply(b"V" * 64, ("1.2.3.4", 5)) is None


def test_a_probe_on_the_selected_pair_measures_its_round_trip_and_times_out() -> None:
    world = World("port-restricted", None, latency=0.03)
    a, b = world.checkers()
    early: list[Any] = []
    a.probe().addErrback(early.append)  # not selected yet: fails at once
    assert len(early) == 1 and early[0].check(NoDirectPath)
    world.start()
    world.run(2.0)
    rtts: list[float] = []
    a.probe(timeout=1.0).addCallback(rtts.append)
    world.run(0.5)
    assert rtts == [pytest.approx(0.06, abs=0.015)]  # two latencies (the pump steps 10 ms)
    # The peer gone: the probe fails after its timeout, and only then.
    b.stop()
    failures: list[Any] = []
    a.probe(timeout=1.0).addErrback(failures.append)
    world.run(0.9)
    assert failures == []
    world.run(0.2)
    assert len(failures) == 1
