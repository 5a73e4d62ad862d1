"""Whole calls between call managers on an in-memory network, driven by a test clock.

The parts are the real ones (envelopes, signals, call keys, the state machine, connectivity
checks, the Opus media engine); only the overlay delivery and the UDP network are in memory,
so busy, no-answer, replays, strangers and a vanished peer are quick to test.  The same calls
run between real processes in tests/integration/test_call.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from client.callmanager import CallManager
from client.callparts import _checker, _media
from client.calls import AudioOptions, CalleeUnavailable, CallEnded, Environment, NoCall
from client.callsocket import CallSocket
from client.media.audio import ToneSource
from overlay.certificate import issue
from overlay.errors import VoipError
from overlay.identity import IdentityKey
from overlay.presence import Status
from overlay.search import SearchResult
from tools.memnet import MemoryNetwork

CA = IdentityKey.from_seed(b"c" * 32)


class RecordingSink:
    sample_rate = 16000

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.closed = False

    def write_frame(self, pcm: bytes) -> None:
        self.frames.append(pcm)

    def close(self) -> None:
        self.closed = True


class Record:
    def __init__(self, status: Status, issued_at: int) -> None:
        self.status, self.issued_at = status, issued_at


class World:
    """An overlay in memory: envelopes delivered after 10 ms, UDP on a MemoryNetwork."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.network = MemoryNetwork(self.clock, latency=0.005)
        self.managers: dict[str, CallManager] = {}
        self.sinks: dict[str, RecordingSink] = {}
        self.online: set[str] = set()
        self.next_port = 40000
        self.delivered: list[tuple[str, bytes]] = []

    def user(self, name: str) -> CallManager:
        key = IdentityKey.from_seed(name.encode().ljust(32, b"."))
        cert = issue(CA, name, key.public_key, serial=1, now=self.clock.seconds() - 10)
        sink = RecordingSink()
        self.sinks[name] = sink

        def listen(protocol: CallSocket) -> Any:
            self.next_port += 1
            return self.network.attach(protocol, ("127.0.0.1", self.next_port))

        def open_audio(options: AudioOptions) -> tuple[Any, Any]:
            return ToneSource(440.0 if name == "alice" else 660.0, 16000), sink

        env = Environment(
            reactor=self.clock,
            listen_udp=listen,
            stun_server=lambda: None,
            stun_client=lambda r, s: None,
            checker=_checker,
            media=_media,
            open_audio=open_audio,
        )

        async def send(to: str, envelope: bytes) -> None:
            if to not in self.online:
                from overlay.supernode import NotDelivered

                raise NotDelivered(f"{to} is offline.")
            self.delivered.append((to, envelope))
            self.clock.callLater(0.01, self.managers[to].received, envelope)

        async def search(peer: str) -> SearchResult:
            if peer in self.online:
                return SearchResult("found", Record(Status.ONLINE, 0), rounds=1)
            if peer == "dave":
                return SearchResult(
                    "offline", Record(Status.OFFLINE, int(self.clock.seconds()) - 7200)
                )
            return SearchResult("not-found", rounds=1)

        manager = CallManager(env, CA.public_key, lambda: (key, cert), send, search)
        self.managers[name] = manager
        self.online.add(name)
        return manager

    def run(self, seconds: float, step: float = 0.01) -> None:
        for _ in range(round(seconds / step)):
            self.clock.advance(step)


def start(work: Any) -> Deferred[Any]:
    return Deferred.fromCoroutine(work)


def outcome(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "not finished"
    return results[0]


def test_a_call_connects_carries_audio_and_ends_on_both_sides() -> None:
    world = World()
    alice, bob = world.user("alice"), world.user("bob")
    said: list[str] = []
    placing = start(alice.place("bob", AudioOptions(), said.append))
    world.run(0.2)
    assert bob.status() is not None and bob.status()["state"] == "incoming"
    assert "Ringing bob..." in said
    answering = start(bob.answer(AudioOptions(), 0, lambda _: None))
    world.run(1.0)
    status = alice.status()
    assert status is not None and status["state"] == "active"
    assert status["path"]["kind"] == "direct host"
    world.run(2.0)
    summary = alice.hangup()
    world.run(0.2)
    mine, theirs = outcome(placing), outcome(answering)
    assert mine["outcome"] == theirs["outcome"] == "completed"
    assert theirs["reason"] == "alice hung up."
    assert mine is summary and mine["media"]["packets_received"] > 50
    assert len(world.sinks["bob"].frames) > 50 and world.sinks["bob"].closed
    assert alice.call is None and bob.call is None


def test_a_second_caller_gets_busy() -> None:
    world = World()
    alice, bob, carol = world.user("alice"), world.user("bob"), world.user("carol")
    start(alice.place("bob", AudioOptions(), lambda _: None))
    world.run(0.2)
    placing = start(carol.place("bob", AudioOptions(), lambda _: None))
    world.run(0.2)
    failure = outcome(placing)
    assert isinstance(failure.value, CallEnded) and failure.value.code == "busy"
    assert str(failure.value) == "bob is busy on another call."
    assert bob.status()["peer"] == "alice"  # the first call rings on


def test_nobody_answers() -> None:
    world = World()
    alice, bob = world.user("alice"), world.user("bob")
    placing = start(alice.place("bob", AudioOptions(), lambda _: None))
    world.run(31.0, step=0.1)
    failure = outcome(placing)
    assert str(failure.value) == "bob did not answer."
    assert bob.call is None and bob.history[-1]["outcome"] == "missed"  # the CANCEL arrived


def test_offline_and_unknown_callees_and_answer_without_a_call() -> None:
    world = World()
    alice = world.user("alice")
    failure = outcome(start(alice.place("dave", AudioOptions(), lambda _: None)))
    assert isinstance(failure.value, CalleeUnavailable)
    assert str(failure.value) == "dave is offline (last seen 2 h ago)."
    failure = outcome(start(alice.place("erin", AudioOptions(), lambda _: None)))
    assert "No such user, or erin" in str(failure.value)
    failure = outcome(start(alice.answer(AudioOptions(), 0, lambda _: None)))
    assert isinstance(failure.value, NoCall)
    waiting = start(alice.answer(AudioOptions(), 5, lambda _: None))
    world.run(5.1, step=0.1)
    assert str(outcome(waiting).value) == "No call came in 5 s."


def test_replays_and_strangers_are_ignored() -> None:
    world = World()
    alice, bob, mallory = world.user("alice"), world.user("bob"), world.user("mallory")
    start(alice.place("bob", AudioOptions(), lambda _: None))
    world.run(0.2)
    invite = next(e for to, e in world.delivered if to == "bob")
    bob.received(invite)  # the same envelope again
    assert bob.status()["peer"] == "alice" and bob.rejected == 1
    # mallory knows the call id (say, a supernode told her) and sends a BYE of her own.
    from client.signalling import signal

    call_id = bob.call.call_id if bob.call else b""
    mallory.send("bob", bytes(signal("bye", call_id)))
    world.run(0.1)
    assert bob.ignored == 1 and bob.status()["state"] == "incoming"
    bob.received(b"\x00garbage")
    assert bob.rejected == 2


def test_a_vanished_peer_ends_the_call_with_a_reason() -> None:
    world = World()
    alice, bob = world.user("alice"), world.user("bob")
    placing = start(alice.place("bob", AudioOptions(), lambda _: None))
    world.run(0.2)
    start(bob.answer(AudioOptions(), 0, lambda _: None))
    world.run(1.0)
    assert alice.status()["state"] == "active"
    world.network.loss = 1.0  # bob's machine is gone
    world.online.discard("bob")
    world.run(12.0, step=0.1)
    summary = outcome(placing)
    assert summary["outcome"] == "failed"
    assert summary["reason"] == "Lost the connection to bob (no audio for 10 s)."


@pytest.mark.parametrize("late", [False, True])
def test_caller_hangs_up_while_ringing(late: bool) -> None:
    world = World()
    alice, bob = world.user("alice"), world.user("bob")
    placing = start(alice.place("bob", AudioOptions(), lambda _: None))
    world.run(0.2 if late else 0.0)
    assert alice.call is not None and alice.call.machine is not None
    alice.hangup()
    world.run(0.2)
    assert str(outcome(placing).value) == "You cancelled the call."
    assert bob.call is None


def test_a_changed_key_refuses_the_call_on_either_side() -> None:
    """``key_check`` is the daemon's KeyPins.check (tested in test_keypins and end to end)."""
    world = World()
    alice, bob = world.user("alice"), world.user("bob")
    changed = {"alice": False, "bob": False}

    def check_for(owner: str) -> Any:
        def check(username: str, public_key: bytes) -> None:
            if changed[owner]:
                raise VoipError(f"{username}'s key has CHANGED since you last talked.")

        return check

    alice.key_check, bob.key_check = check_for("alice"), check_for("bob")
    changed["bob"] = True  # bob's pins say alice's key changed: her INVITE does not ring
    placing = start(alice.place("bob", AudioOptions(), lambda _: None))
    world.run(11.0, step=0.1)
    assert bob.call is None and bob.refused_key == "alice's key has CHANGED since you last talked."
    assert str(outcome(placing).value) == "bob's node did not respond."
    # Accepted on bob's side; now alice's pins say bob's key changed: bob's first signal back
    # (RINGING) ends the call with the warning.
    changed["bob"], changed["alice"] = False, True
    placing = start(alice.place("bob", AudioOptions(), lambda _: None))
    world.run(0.3)
    assert alice.call is None
    assert "CHANGED" in str(outcome(placing).value)
