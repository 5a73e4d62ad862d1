"""The state machine of one call, on either side (Automat).

    caller:  calling --ringing--> ringing_out --accepted--> connecting --connected--> active
    callee:  incoming --answer--> connecting --connected--> active
    any:     ... --hangup/bye/refused/cancelled/failed/timeout--> ended

Every input is handled in every state; an input that means nothing in a state is written down
as ignored (a late RINGING after ACCEPT, a second BYE).  Each waiting state has one timer, from
the injected reactor:

    calling      RESPONSE_TIMEOUT  no RINGING: "bob's node did not respond"      (sends CANCEL)
    ringing_out  NO_ANSWER         nobody answered: "bob did not answer"          (sends CANCEL)
    incoming     INCOMING_TIMEOUT  the caller gave up without a CANCEL reaching us: missed call
    connecting   CONNECT_TIMEOUT   no media path both ways                        (sends BYE)

The machine decides; the ``CallActions`` it is given do the work (send a signal, start the
connectivity checks, start the media, report the end).  ``trace`` sees every transition, for
``voipd --debug-state call``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from automat import TypeMachineBuilder
from twisted.internet.interfaces import IDelayedCall

RESPONSE_TIMEOUT = 10.0
NO_ANSWER = 30.0
INCOMING_TIMEOUT = NO_ANSWER + 10.0
CONNECT_TIMEOUT = 15.0

Trace = Callable[[str, str, str], None]


class CallActions(Protocol):
    """What the machine asks of the call it runs."""

    def send_signal(self, kind: str, reason: str | None = None) -> None: ...
    def start_checks(self) -> None: ...
    def start_media(self, path: Any) -> None: ...
    def finish(self, outcome: str, reason: str) -> None: ...


class CallInputs(Protocol):
    def ringing(self) -> None:
        "The callee's node rings (caller side)."

    def accepted(self, accept: Any) -> None:
        "The callee answered; ``accept`` is its ACCEPT signal (caller side)."

    def refused(self, kind: str, reason: str) -> None:
        "DECLINE or BUSY arrived (caller side)."

    def cancelled(self, reason: str) -> None:
        "The caller gave up before we answered (callee side)."

    def answer(self) -> None:
        "The local user answers (callee side)."

    def hangup(self) -> None:
        "The local user hangs up, cancels or declines."

    def bye(self, reason: str) -> None:
        "The peer hung up."

    def connected(self, path: Any) -> None:
        "A media path works both ways."

    def failed(self, reason: str) -> None:
        "Something fatal: no path, the peer vanished, a signal could not be delivered."

    def timeout(self) -> None:
        "The state's timer ran out."


@dataclass
class CallCore:
    reactor: Any
    actions: CallActions
    peer: str
    trace: Trace | None = None
    machine: CallInputs | None = None
    timer: IDelayedCall | None = field(default=None, repr=False)

    def set_timer(self, seconds: float) -> None:
        self.cancel_timer()
        self.timer = self.reactor.callLater(seconds, self._fire)

    def cancel_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def _fire(self) -> None:
        self.timer = None
        if self.machine is not None:
            self.machine.timeout()

    def end(self, outcome: str, reason: str) -> None:
        self.cancel_timer()
        self.actions.finish(outcome, reason)


builder = TypeMachineBuilder(CallInputs, CallCore)
calling = builder.state("calling")
ringing_out = builder.state("ringing_out")
incoming = builder.state("incoming")
connecting = builder.state("connecting")
active = builder.state("active")
ended = builder.state("ended")


# -- caller, before the answer ---------------------------------------------------------------


@calling.upon(CallInputs.ringing).to(ringing_out)
def _ringing(machine: CallInputs, core: CallCore) -> None:
    core.set_timer(NO_ANSWER)


@calling.upon(CallInputs.accepted).to(connecting)
@ringing_out.upon(CallInputs.accepted).to(connecting)
def _accepted(machine: CallInputs, core: CallCore, accept: Any) -> None:
    core.set_timer(CONNECT_TIMEOUT)
    core.actions.start_checks()


@calling.upon(CallInputs.refused).to(ended)
@ringing_out.upon(CallInputs.refused).to(ended)
def _refused(machine: CallInputs, core: CallCore, kind: str, reason: str) -> None:
    if kind == "busy":
        core.end("busy", f"{core.peer} is busy on another call.")
    else:
        core.end("declined", f"{core.peer} declined the call" + (f": {reason}" if reason else "."))


@calling.upon(CallInputs.hangup).to(ended)
@ringing_out.upon(CallInputs.hangup).to(ended)
def _cancel(machine: CallInputs, core: CallCore) -> None:
    core.actions.send_signal("cancel")
    core.end("cancelled", "You cancelled the call.")


@calling.upon(CallInputs.timeout).to(ended)
def _no_response(machine: CallInputs, core: CallCore) -> None:
    core.actions.send_signal("cancel", "no response")
    core.end("no-response", f"{core.peer}'s node did not respond.")


@ringing_out.upon(CallInputs.timeout).to(ended)
def _no_answer(machine: CallInputs, core: CallCore) -> None:
    core.actions.send_signal("cancel", "no answer")
    core.end("no-answer", f"{core.peer} did not answer.")


# -- callee, before the answer ---------------------------------------------------------------


@incoming.upon(CallInputs.answer).to(connecting)
def _answer(machine: CallInputs, core: CallCore) -> None:
    core.set_timer(CONNECT_TIMEOUT)
    core.actions.send_signal("accept")
    core.actions.start_checks()


@incoming.upon(CallInputs.hangup).to(ended)
def _decline(machine: CallInputs, core: CallCore) -> None:
    core.actions.send_signal("decline")
    core.end("declined", f"You declined the call from {core.peer}.")


@incoming.upon(CallInputs.cancelled).to(ended)
def _missed(machine: CallInputs, core: CallCore, reason: str) -> None:
    core.end("missed", f"Missed call from {core.peer}.")


@incoming.upon(CallInputs.timeout).to(ended)
def _missed_silently(machine: CallInputs, core: CallCore) -> None:
    core.end("missed", f"Missed call from {core.peer}.")


# -- both sides, once answered ---------------------------------------------------------------


@connecting.upon(CallInputs.connected).to(active)
def _connected(machine: CallInputs, core: CallCore, path: Any) -> None:
    core.cancel_timer()
    core.actions.start_media(path)


@connecting.upon(CallInputs.hangup).to(ended)
@active.upon(CallInputs.hangup).to(ended)
def _hangup(machine: CallInputs, core: CallCore) -> None:
    core.actions.send_signal("bye")
    core.end("completed", "You hung up.")


@connecting.upon(CallInputs.bye).to(ended)
@active.upon(CallInputs.bye).to(ended)
def _peer_hung_up(machine: CallInputs, core: CallCore, reason: str) -> None:
    core.end("completed", f"{core.peer} hung up" + (f" ({reason})." if reason else "."))


@connecting.upon(CallInputs.cancelled).to(ended)
def _cancelled_late(machine: CallInputs, core: CallCore, reason: str) -> None:
    core.end("cancelled", f"{core.peer} cancelled the call.")


@connecting.upon(CallInputs.timeout).to(ended)
def _no_path(machine: CallInputs, core: CallCore) -> None:
    core.actions.send_signal("bye", "no media path")
    core.end("failed", f"No media path to {core.peer} could be opened.")


# -- failures, in every live state -------------------------------------------------------------


@calling.upon(CallInputs.failed).to(ended)
@ringing_out.upon(CallInputs.failed).to(ended)
@incoming.upon(CallInputs.failed).to(ended)
@connecting.upon(CallInputs.failed).to(ended)
@active.upon(CallInputs.failed).to(ended)
def _failed(machine: CallInputs, core: CallCore, reason: str) -> None:
    core.actions.send_signal("bye", reason[:200])
    core.end("failed", reason)


# -- inputs that mean nothing where they arrive (written down, so nothing is unhandled) ------

_IGNORED: dict[Any, list[Callable[..., Any]]] = {
    calling: [
        CallInputs.cancelled,
        CallInputs.answer,
        CallInputs.bye,
        CallInputs.connected,
    ],
    ringing_out: [
        CallInputs.ringing,
        CallInputs.cancelled,
        CallInputs.answer,
        CallInputs.bye,
        CallInputs.connected,
    ],
    incoming: [
        CallInputs.ringing,
        CallInputs.accepted,
        CallInputs.refused,
        CallInputs.bye,
        CallInputs.connected,
    ],
    connecting: [
        CallInputs.ringing,
        CallInputs.accepted,
        CallInputs.refused,
        CallInputs.answer,
    ],
    active: [
        CallInputs.ringing,
        CallInputs.accepted,
        CallInputs.refused,
        CallInputs.cancelled,
        CallInputs.answer,
        CallInputs.connected,
        CallInputs.timeout,
    ],
    ended: [
        CallInputs.ringing,
        CallInputs.accepted,
        CallInputs.refused,
        CallInputs.cancelled,
        CallInputs.answer,
        CallInputs.hangup,
        CallInputs.bye,
        CallInputs.connected,
        CallInputs.failed,
        CallInputs.timeout,
    ],
}
for _state, _inputs in _IGNORED.items():
    for _input in _inputs:
        _state.upon(_input).loop().returns(None)

_Machine = builder.build()
#: The first state of each side, and the timer it starts with.
_START = {"caller": (calling, RESPONSE_TIMEOUT), "callee": (incoming, INCOMING_TIMEOUT)}


def new_call_machine(core: CallCore, side: str) -> CallInputs:
    """A machine for ``side`` ("caller" or "callee"), wired to ``core``, its first timer set."""
    state, timeout = _START[side]
    machine = _Machine(core, state)
    core.machine = machine
    if core.trace is not None:
        trace = core.trace
        machine.__automat_transitioner__.setTrace(  # type: ignore[attr-defined]
            lambda old, input, new: trace(old.name, input, new.name)
        )
    core.set_timer(timeout)
    return machine


def to_dot() -> str:
    """The machine as a Graphviz digraph (``docs/callmachine.dot``; ignored inputs left out)."""
    edges: dict[tuple[str, str], list[str]] = {}
    for old, event, new, _outputs in _Machine.__automat_automaton__.allTransitions():
        if old != new:
            edges.setdefault((old.name, new.name), []).append(event)
    lines = ["digraph call {", "    rankdir=LR;", '    node [shape=box, fontname="sans"];']
    lines += [
        f'    {a} -> {b} [label="{", ".join(sorted(e))}"];' for (a, b), e in sorted(edges.items())
    ]
    lines.append("}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(to_dot(), end="")
