"""A running lab: build a scenario, run things in its namespaces, and always tear it down.

    with Lab(builtin("two-cones")) as lab:
        lab.exec("a", ["ip", "addr"])
        proc = lab.spawn("b", lab.python("tools.netlab.probe", "rtt", "--server", ...))

Teardown (`down`, and `remove_stale` for leftovers of any earlier run) stops every process the
lab started and every process still inside a `vnl-` namespace, by PID, then deletes the
namespaces; deleting a namespace destroys its veth ends. SIGINT/SIGTERM/SIGHUP during teardown
are held back until it is done. Only one lab exists at a time on a machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from tools.netlab import build
from tools.netlab.build import IMPAIR_QUEUE, ImpairBackend
from tools.netlab.command import Command, CommandFailed, LabError, in_ns, run, run_all
from tools.netlab.nat import IPTABLES
from tools.netlab.scenario import NS_PREFIX, Scenario

REPO_ROOT = Path(__file__).resolve().parents[2]
STATE_FILE = Path("/run/vnl-netlab/state.json")
REQUIRED_TOOLS = ("ip", IPTABLES, "nft", "tc", "sysctl")
STOP_WAIT_S = 2.0
READY_WAIT_S = 10.0


class LabBusy(LabError):
    """A lab is already up."""


class ProcessFailed(LabError):
    """A process the lab started did not come up."""


def lab_namespaces() -> list[str]:
    """The `vnl-` namespaces that exist now."""
    names = [line.split()[0] for line in run(Command(("ip", "netns", "list"))).splitlines() if line]
    return sorted(n for n in names if n.startswith(NS_PREFIX))


def namespace_pids(ns: str) -> list[int]:
    out = run(Command(("ip", "netns", "pids", ns)), check=False)
    return [int(p) for p in out.split() if p.isdigit()]


def stop_pids(pids: Sequence[int], wait: float = STOP_WAIT_S) -> None:
    """SIGTERM each PID, then SIGKILL those still alive after `wait` seconds."""
    live = list(pids)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while live and time.monotonic() < deadline:
            live = [p for p in live if _alive(p)]
            if live:
                time.sleep(0.02)
        if not live:
            return


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def remove_namespaces(namespaces: Sequence[str]) -> None:
    """Stop every process inside `namespaces`, then delete them."""
    pids = [pid for ns in namespaces for pid in namespace_pids(ns)]
    stop_pids(pids)
    for command in build.plan_down(list(namespaces)):
        run(command, check=False)


def remove_stale() -> list[str]:
    """Remove every `vnl-` namespace (and stray `vnl` links in this namespace); return names."""
    with held_signals():
        stale = lab_namespaces()
        remove_namespaces(stale)
        for line in run(Command(("ip", "-o", "link", "show")), check=False).splitlines():
            parts = line.split(":")
            if len(parts) > 1 and parts[1].strip().split("@")[0].startswith("vnl"):
                run(
                    Command(("ip", "link", "del", "dev", parts[1].strip().split("@")[0])),
                    check=False,
                )
        STATE_FILE.unlink(missing_ok=True)
        for log in STATE_FILE.parent.glob("impair-*.log"):
            log.unlink(missing_ok=True)
        left = lab_namespaces()
    if left:
        raise LabError(f"could not remove namespaces: {', '.join(left)}")
    return stale


def preflight() -> list[str]:
    """Why the lab cannot run here (empty when it can)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("the NAT lab needs root (network namespaces, iptables)")
        return problems
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        packages = "apt-get install $(cat tools/netlab/APT_PACKAGES)"
        problems.append(f"missing tools: {', '.join(missing)} ({packages})")
        return problems
    ns = NS_PREFIX + "preflight"
    try:
        run(Command(("ip", "netns", "add", ns)))
        run(in_ns(ns, IPTABLES, "-w", "-t", "nat", "-S"))
        run(in_ns(ns, "nft", "list", "ruleset"))
    except CommandFailed as e:
        problems.append(f"network namespaces or netfilter unusable: {e}")
    finally:
        run(Command(("ip", "netns", "del", ns)), check=False)
    return problems


def netem_available() -> bool:
    """Does this kernel have the netem qdisc? Tried on the loopback of a scratch namespace."""
    ns = NS_PREFIX + "netemchk"
    try:
        run(Command(("ip", "netns", "add", ns)))
        run(in_ns(ns, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"))
        return True
    except CommandFailed:
        return False
    finally:
        run(Command(("ip", "netns", "del", ns)), check=False)


@contextlib.contextmanager
def held_signals() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP while tearing down; deliver SIGINT-style afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def hold(signum: int, _frame: FrameType | None) -> None:
        caught.append(signum)

    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, hold) for s in sigs}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if caught:
        raise KeyboardInterrupt(f"signal {caught[0]} during teardown")


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """Make SIGTERM and SIGHUP raise KeyboardInterrupt like SIGINT, so `finally` runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _impairer_log(ns: str) -> Path:
    return STATE_FILE.parent / f"impair-{ns}.log"


def write_state(state: dict[str, Any]) -> None:
    STATE_FILE.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    STATE_FILE.write_text(json.dumps(state, indent=2) + "\n")


def read_state() -> dict[str, Any] | None:
    try:
        data = json.loads(STATE_FILE.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class Lab:
    """One built scenario. `up()` builds it (tearing down what it made if building fails)."""

    def __init__(self, scenario: Scenario, impair_backend: ImpairBackend | None = None) -> None:
        self.scenario = scenario
        self.impair_backend = impair_backend
        self.processes: list[subprocess.Popen[str]] = []
        self.is_up = False

    # -- lifecycle -----------------------------------------------------------------------------

    def up(self) -> None:
        existing = lab_namespaces()
        if existing:
            raise LabBusy(
                f"a lab is already up ({', '.join(existing)}); "
                "run `python -m tools.netlab down` first"
            )
        impaired = build.impairers(self.scenario)
        if impaired and self.impair_backend is None:
            self.impair_backend = (
                ImpairBackend.NETEM if netem_available() else ImpairBackend.NFQUEUE
            )
        self.is_up = True
        try:
            run_all(build.plan_up(self.scenario, self.impair_backend))
            if self.impair_backend is ImpairBackend.NFQUEUE:
                for spec in impaired:
                    self._start_impairer(spec)
            write_state(
                {
                    "schema_version": 1,
                    "scenario": self.scenario.name,
                    "namespaces": list(self.scenario.namespaces),
                    "impair_backend": str(self.impair_backend) if impaired else None,
                    "created": time.time(),
                }
            )
        except BaseException:
            self.down()
            raise

    def down(self) -> None:
        """Stop our processes, then everything in our namespaces; delete the namespaces.

        A lab that never came up (e.g. `up` refused because another lab exists) touches nothing.
        """
        if not self.is_up and not self.processes:
            return
        with held_signals():
            processes = list(self.processes)  # other threads may still be spawning
            for proc in processes:
                if proc.poll() is None:
                    proc.terminate()
            deadline = time.monotonic() + STOP_WAIT_S
            for proc in processes:
                try:
                    proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                for stream in (proc.stdin, proc.stdout, proc.stderr):
                    if stream is not None:
                        with contextlib.suppress(OSError):
                            stream.close()
            self.processes.clear()
            present = set(lab_namespaces())
            remove_namespaces([ns for ns in self.scenario.namespaces if ns in present])
            state = read_state()
            if state is None or state.get("scenario") == self.scenario.name:
                STATE_FILE.unlink(missing_ok=True)
            for ns in self.scenario.namespaces:
                _impairer_log(ns).unlink(missing_ok=True)
            self.is_up = False

    def __enter__(self) -> Lab:
        self.up()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    # -- running things inside ------------------------------------------------------------------

    def namespace(self, node: str) -> str:
        return self.scenario.namespace(node)

    @staticmethod
    def python(module: str, *args: str) -> list[str]:
        """argv that runs one of our modules (cwd must be the repository root; spawn does that)."""
        return [sys.executable, "-m", module, *args]

    def exec(
        self, node: str, argv: Sequence[str], *, timeout: float = 30.0, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside `node`'s namespace and wait (bounded) for it."""
        return subprocess.run(
            ["ip", "netns", "exec", self.namespace(node), *argv],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=REPO_ROOT,
        )

    def spawn(self, node: str, argv: Sequence[str], **popen: Any) -> subprocess.Popen[str]:
        """Start `argv` inside `node`'s namespace; the lab stops it (by PID) at teardown."""
        popen.setdefault("stdin", subprocess.DEVNULL)
        popen.setdefault("stdout", subprocess.PIPE)
        popen.setdefault("stderr", subprocess.PIPE)
        popen.setdefault("cwd", REPO_ROOT)
        proc: subprocess.Popen[str] = subprocess.Popen(
            ["ip", "netns", "exec", self.namespace(node), *argv], text=True, **popen
        )
        self.processes.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[str]) -> None:
        """Stop one spawned process now (SIGTERM, then SIGKILL)."""
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _start_impairer(self, spec: build.ImpairerSpec) -> None:
        imp = spec.impairment
        argv = [
            "ip", "netns", "exec", spec.namespace,
            *self.python(
                "tools.netlab.impair", "--queue", str(IMPAIR_QUEUE),
                "--delay-ms", f"{imp.delay_ms:g}", "--jitter-ms", f"{imp.jitter_ms:g}",
                "--loss-pct", f"{imp.loss_pct:g}",
            ),
        ]  # fmt: skip
        log = _impairer_log(spec.namespace)
        log.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        with log.open("w") as errors:
            # Its own session: a Ctrl-C in the terminal must not kill it before teardown does.
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=errors,
                text=True,
                cwd=REPO_ROOT,
                start_new_session=True,
            )
        self.processes.append(proc)
        assert proc.stdout is not None
        readable, _, _ = select.select([proc.stdout], [], [], READY_WAIT_S)
        line = proc.stdout.readline() if readable else ""
        proc.stdout.close()
        if line.strip() != "ready":
            error = " ".join(log.read_text().split()) or "no answer"
            raise ProcessFailed(f"impairer in {spec.namespace} did not start: {error}")

    def detach(self) -> None:
        """Forget our processes without stopping them (the CLI's `up` leaves the lab running;
        `down` finds them by namespace)."""
        self.processes.clear()
