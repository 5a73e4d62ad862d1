"""Real calls through real NATs: two voipd processes in lab namespaces talk directly, and well.

One lab holds every scenario at once (building it and starting the overlay is the slow part):
the login server and two supernodes on public hosts, and users on public hosts, behind a full
cone, a port-restricted cone, a second port-restricted cone, a symmetric NAT, a carrier-grade
double NAT, and two pairs behind one NAT (without and with hairpinning).  Each test is one call:
``voipctl call`` against ``voipctl answer --wait``, speech (espeak-ng) both ways for a few
seconds.  It asserts what a user would notice: the call connects directly, over the path the
topology implies ("direct host" when both sides share a network, else "direct reflexive"),
reported the same by both sides, and the speech arrives with PESQ-WB >= 3.5 each way.

A table of scenario, path and PESQ is printed at the end of the module (``pytest -s`` shows
each row as it comes).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from tools.netlab.calls import CallLab, CallRecord, username
from tools.netlab.lab import Lab
from tools.netlab.scenario import WAN, Host, Link, NatKind, Router, Scenario
from tools.processes import Processes

pytestmark = pytest.mark.nat

CALL_SECONDS = 5.5
MIN_PESQ = 3.5
HOST_PATH, REFLEXIVE_PATH = "direct host", "direct reflexive"
PRC = NatKind.PORT_RESTRICTED


def _router(name: str, public: str, lan: int, nat: NatKind, hairpin: bool = False) -> Router:
    return Router(name, Link(WAN, public), f"198.18.{lan}.0/24", nat, hairpin=hairpin)


def _lan_host(name: str, router: str, lan: int, index: int = 0) -> Host:
    return Host(name, Link(router, f"198.18.{lan}.{10 + index}"))


SCENARIO = Scenario(
    "calls",
    "login server and two supernodes on the wan; users public and behind every NAT kind",
    routers=(
        _router("nat-fc", "203.0.113.21", 1, NatKind.FULL_CONE),
        _router("nat-prc", "203.0.113.22", 2, PRC),
        _router("nat-prc2", "198.51.100.22", 8, PRC),
        _router("nat-sym", "198.51.100.23", 3, NatKind.SYMMETRIC),
        Router("cgn", Link(WAN, "198.51.100.25"), "198.19.0.0/24", PRC),
        Router("home", Link("cgn", "198.19.0.2"), "198.18.5.0/24", PRC),
        _router("nat-same", "203.0.113.26", 6, PRC),
        _router("nat-hp", "203.0.113.27", 7, PRC, hairpin=True),
    ),
    hosts=(
        Host("login", Link(WAN, "203.0.113.10")),
        Host("sn1", Link(WAN, "203.0.113.11")),
        Host("sn2", Link(WAN, "198.51.100.11")),
        Host("pub1", Link(WAN, "203.0.113.12")),
        Host("pub2", Link(WAN, "198.51.100.12")),
        _lan_host("fc", "nat-fc", 1),
        _lan_host("prc", "nat-prc", 2),
        _lan_host("prc2", "nat-prc2", 8),
        _lan_host("sym", "nat-sym", 3),
        _lan_host("cg", "home", 5),
        _lan_host("s1", "nat-same", 6),
        _lan_host("s2", "nat-same", 6, 1),
        _lan_host("h1", "nat-hp", 7),
        _lan_host("h2", "nat-hp", 7, 1),
    ),
)
SUPERNODES = ("sn1", "sn2")
USERS = ("pub1", "pub2", "fc", "prc", "prc2", "sym", "cg", "s1", "s2", "h1", "h2")


@dataclass(frozen=True)
class Case:
    name: str
    caller: str
    callee: str
    path: str


CASES = (
    Case("both-public", "pub1", "pub2", HOST_PATH),
    Case("public-full-cone", "fc", "pub1", REFLEXIVE_PATH),
    Case("public-port-restricted", "pub2", "prc", REFLEXIVE_PATH),
    Case("public-symmetric", "sym", "pub1", REFLEXIVE_PATH),
    Case("public-cgn", "pub2", "cg", REFLEXIVE_PATH),
    Case("two-port-restricted", "prc", "prc2", REFLEXIVE_PATH),  # hole punching
    Case("same-nat", "s1", "s2", HOST_PATH),
    Case("same-nat-hairpin", "h1", "h2", HOST_PATH),
)


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


#: The SIGTERM handler ours replaced, put back after the module.
_replaced: list[Any] = []


def sigterm_interrupts() -> None:
    """Make SIGTERM unwind through the module's teardown (as the netlab fixture does).

    pytest-twisted's reactor installs its own SIGTERM handler (it only stops the reactor) when
    it first runs, which may be after our fixture ran: so each test body takes SIGTERM back.
    """
    previous = signal.getsignal(signal.SIGTERM)
    if previous is not _interrupt:
        _replaced[:] = [signal.SIG_DFL if previous is None else previous]
        signal.signal(signal.SIGTERM, _interrupt)


@pytest.fixture(scope="module")
def results(request: pytest.FixtureRequest) -> Iterator[list[tuple[str, str, float, float]]]:
    """Rows (scenario, path, PESQ caller->callee, callee->caller), printed after the module."""
    rows: list[tuple[str, str, float, float]] = []
    yield rows
    if not rows:
        return
    lines = [f"{'scenario':<24} {'path':<17} {'PESQ ->':>8} {'PESQ <-':>8}"]
    lines += [f"{n:<24} {p:<17} {a:>8.2f} {b:>8.2f}" for n, p, a, b in rows]
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print("\n\nCalls through the NAT lab (PESQ-WB caller->callee, callee->caller):")
        print("\n".join(lines))


@contextlib.contextmanager
def running_overlay(
    scenario: Scenario, supernodes: tuple[str, ...], users: tuple[str, ...], prefix: str
) -> Iterator[CallLab]:
    """The lab, the login server, the supernodes and every user, logged in and published;
    everything stopped by PID and every namespace deleted afterwards, also on failure."""
    workdir = Path(tempfile.mkdtemp(dir="/tmp", prefix=prefix))
    sigterm_interrupts()
    try:
        with contextlib.ExitStack() as stack:
            lab = stack.enter_context(Lab(scenario))
            processes = Processes(workdir / "logs")
            stack.callback(processes.stop_all)
            calls = CallLab(lab, processes, workdir)
            calls.start_login_server("login", "--min-supernodes", str(len(supernodes)))
            calls.start_supernodes(supernodes)
            calls.start_users(users)
            yield calls
    finally:
        if _replaced:
            signal.signal(signal.SIGTERM, _replaced.pop())
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def overlay(netlab_host: None) -> Iterator[CallLab]:
    with running_overlay(SCENARIO, SUPERNODES, USERS, "vc-") as calls:
        yield calls


def speech_files() -> tuple[Path, Path]:
    speech = pytest.importorskip("tools.audio.speech")
    try:
        return speech.caller_speech(16000), speech.callee_speech(16000)
    except speech.SpeechToolMissing as exc:  # pragma: no cover - setup-env installs them
        pytest.skip(f"cannot make speech: {exc}")


def _describe(record: CallRecord) -> str:
    return f"caller: {record.caller_summary}\ncallee: {record.callee_summary}"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_call_is_direct_with_good_audio(
    overlay: CallLab, results: list[tuple[str, str, float, float]], case: Case
) -> None:
    sigterm_interrupts()
    quality: Any = pytest.importorskip("tools.audio.quality")
    caller_says, callee_says = speech_files()
    overlay.wait_findable([(case.caller, case.callee), (case.callee, case.caller)])

    record = overlay.call(
        case.caller,
        case.callee,
        seconds=CALL_SECONDS,
        caller_wav=caller_says,
        callee_wav=callee_says,
        label=case.name,
    )

    for summary, peer in (
        (record.caller_summary, username(case.callee)),
        (record.callee_summary, username(case.caller)),
    ):
        assert summary["outcome"] == "completed" and summary["peer"] == peer, _describe(record)
        assert summary["duration"] > CALL_SECONDS - 1.0, _describe(record)
    # Both sides name the path the topology implies, and agree on the addresses used.
    for side in (case.caller, case.callee):
        assert record.path_kind(side) == case.path, (side, _describe(record))
    caller_path, callee_path = record.caller_summary["path"], record.callee_summary["path"]
    assert caller_path["remote"] == callee_path["local"], _describe(record)
    assert callee_path["remote"] == caller_path["local"], _describe(record)
    # Each side is seen at its own address on a shared LAN, else at its outermost NAT's.
    for side, path in ((case.caller, caller_path), (case.callee, callee_path)):
        seen = path["local"].rsplit(":", 1)[0]
        if case.path == HOST_PATH:
            assert seen == SCENARIO.node(side).link.address, (side, _describe(record))
        else:
            assert seen == str(SCENARIO.public_address(side)), (side, _describe(record))

    to_callee = quality.pesq_wb(caller_says, record.callee_heard)
    to_caller = quality.pesq_wb(callee_says, record.caller_heard)
    results.append((case.name, case.path, to_callee, to_caller))
    print(
        f"{case.name}: {case.path} {caller_path['local']} <-> {caller_path['remote']}, "
        f"PESQ-WB {case.caller}->{case.callee} {to_callee:.2f}, back {to_caller:.2f}"
    )
    assert to_callee >= MIN_PESQ and to_caller >= MIN_PESQ, (
        f"PESQ-WB {to_callee:.2f} / {to_caller:.2f}\n{_describe(record)}"
    )
