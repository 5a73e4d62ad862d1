"""The call state machine: every transition, every timeout (with an injected clock)."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock

from client import callmachine
from client.callmachine import CallCore, new_call_machine


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def send_signal(self, kind: str, reason: str | None = None) -> None:
        self.events.append(("send", kind, reason))

    def start_checks(self) -> None:
        self.events.append(("checks",))

    def start_media(self, path: Any) -> None:
        self.events.append(("media", path))

    def finish(self, outcome: str, reason: str) -> None:
        self.events.append(("finish", outcome, reason))

    @property
    def outcome(self) -> tuple[str, str] | None:
        ends = [e for e in self.events if e[0] == "finish"]
        assert len(ends) <= 1, "a call finished twice"
        return (ends[0][1], ends[0][2]) if ends else None


def make(side: str) -> tuple[Clock, Recorder, Any, list[tuple[str, str, str]]]:
    clock, actions, trace = Clock(), Recorder(), []
    core = CallCore(clock, actions, "bob", trace=lambda *t: trace.append(t))
    return clock, actions, new_call_machine(core, side), trace


def test_caller_happy_path() -> None:
    clock, actions, call, trace = make("caller")
    call.ringing()
    call.accepted("accept-signal")
    call.connected("pair")
    call.hangup()
    assert actions.events == [
        ("checks",),
        ("media", "pair"),
        ("send", "bye", None),
        ("finish", "completed", "You hung up."),
    ]
    assert [t[2] for t in trace] == ["ringing_out", "connecting", "active", "ended"]
    assert not clock.getDelayedCalls()


def test_callee_happy_path_and_peer_bye() -> None:
    clock, actions, call, _ = make("callee")
    call.answer()
    call.connected("pair")
    call.bye("")
    assert actions.events[:3] == [("send", "accept", None), ("checks",), ("media", "pair")]
    assert actions.outcome == ("completed", "bob hung up.")
    assert not clock.getDelayedCalls()


def test_no_response_times_out_and_cancels() -> None:
    clock, actions, _call, _ = make("caller")
    clock.advance(callmachine.RESPONSE_TIMEOUT - 0.1)
    assert actions.outcome is None
    clock.advance(0.2)
    assert ("send", "cancel", "no response") in actions.events
    assert actions.outcome == ("no-response", "bob's node did not respond.")


def test_no_answer_after_ringing() -> None:
    clock, actions, call, _ = make("caller")
    clock.advance(5)
    call.ringing()
    clock.advance(callmachine.NO_ANSWER - 0.1)
    assert actions.outcome is None  # the ringing timer restarted at RINGING
    clock.advance(0.2)
    assert actions.outcome == ("no-answer", "bob did not answer.")
    assert ("send", "cancel", "no answer") in actions.events


def test_callee_misses_a_call_whose_cancel_never_came() -> None:
    clock, actions, _call, _ = make("callee")
    clock.advance(callmachine.INCOMING_TIMEOUT + 0.1)
    assert actions.outcome == ("missed", "Missed call from bob.")
    assert not [e for e in actions.events if e[0] == "send"]


def test_connecting_times_out_without_a_path() -> None:
    clock, actions, call, _ = make("callee")
    call.answer()
    clock.advance(callmachine.CONNECT_TIMEOUT + 0.1)
    assert actions.outcome == ("failed", "No media path to bob could be opened.")
    assert ("send", "bye", "no media path") in actions.events


def test_active_call_has_no_timer() -> None:
    clock, actions, call, _ = make("caller")
    call.accepted("a")  # an ACCEPT overtaking the RINGING is fine
    call.connected("p")
    clock.advance(3600)
    assert actions.outcome is None


@pytest.mark.parametrize(
    ("kind", "reason", "outcome"),
    [
        ("busy", "", ("busy", "bob is busy on another call.")),
        ("decline", "", ("declined", "bob declined the call.")),
        ("decline", "in a meeting", ("declined", "bob declined the call: in a meeting")),
    ],
)
def test_refusals(kind: str, reason: str, outcome: tuple[str, str]) -> None:
    _, actions, call, _ = make("caller")
    call.ringing()
    call.refused(kind, reason)
    assert actions.outcome == outcome


def test_callee_declines_and_caller_cancels() -> None:
    _, actions, call, _ = make("callee")
    call.hangup()
    assert actions.events[0] == ("send", "decline", None)
    _, actions, call, _ = make("callee")
    call.cancelled("")
    assert actions.outcome == ("missed", "Missed call from bob.")


def test_failure_sends_bye_with_reason() -> None:
    _, actions, call, _ = make("caller")
    call.accepted("a")
    call.connected("p")
    call.failed("Lost the connection to bob.")
    assert ("send", "bye", "Lost the connection to bob.") in actions.events
    assert actions.outcome == ("failed", "Lost the connection to bob.")


INPUTS: list[tuple[str, tuple[Any, ...]]] = [
    ("ringing", ()),
    ("accepted", ("a",)),
    ("refused", ("busy", "")),
    ("cancelled", ("",)),
    ("answer", ()),
    ("hangup", ()),
    ("bye", ("",)),
    ("connected", ("p",)),
    ("failed", ("x",)),
    ("timeout", ()),
]
WALKS: dict[str, tuple[str, list[tuple[str, tuple[Any, ...]]]]] = {
    "calling": ("caller", []),
    "ringing_out": ("caller", [("ringing", ())]),
    "incoming": ("callee", []),
    "connecting": ("callee", [("answer", ())]),
    "active": ("callee", [("answer", ()), ("connected", ("p",))]),
    "ended": ("callee", [("hangup", ())]),
}


@pytest.mark.parametrize("state", list(WALKS))
@pytest.mark.parametrize(("name", "args"), INPUTS)
def test_every_input_is_handled_in_every_state(
    state: str, name: str, args: tuple[Any, ...]
) -> None:
    side, walk = WALKS[state]
    _, actions, call, trace = make(side)
    for step, step_args in walk:
        getattr(call, step)(*step_args)
    assert (trace[-1][2] if trace else {"caller": "calling", "callee": "incoming"}[side]) == state
    getattr(call, name)(*args)  # never NoTransition
    assert actions.outcome is None or actions.outcome[0]


def test_the_documented_diagram_is_the_machine() -> None:
    from pathlib import Path

    documented = Path(__file__).parents[2] / "docs" / "callmachine.dot"
    assert documented.read_text() == callmachine.to_dot(), "regenerate docs/callmachine.dot"
