"""Real calls in the NAT lab: the real programs in namespaces, calls placed with ``voipctl``.

    with Lab(scenario) as lab:
        overlay = CallLab(lab, Processes(workdir / "logs"), workdir)
        overlay.start_login_server("login")
        overlay.start_supernodes(["sn1", "sn2"])
        overlay.start_users(["a", "b"])
        record = overlay.call("a", "b", seconds=5.5, caller_wav=..., callee_wav=...)

The login server and every ``voipd`` run inside the lab's namespaces (``ip netns exec``, which
replaces itself with the program, so each PID is the program's own and ``/proc/PID/stat`` counts
its CPU).  ``voipctl`` talks to its daemon over the daemon's unix socket, which namespaces do not
separate, so it runs here.  A call is ``voipctl answer --wait`` on the callee's daemon and
``voipctl call`` on the caller's, both with WAV files in and out and ``--json``; ``CallRecord``
holds both summaries, the recordings and the CPU each daemon spent meanwhile.

Every program goes through the ``Processes`` given, which stops it by PID; the lab's teardown
stops anything left in its namespaces.  Waits are bounded and fail with what was last seen.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools.netlab.lab import Lab
from tools.processes import (
    LOGIN_SERVER,
    SERVING,
    VOIPCTL,
    VOIPD,
    VOIPD_READY,
    Process,
    Processes,
    ProcessFailure,
    Result,
    init_login_data,
    run,
)

LOGIN_PORT = 7000
#: Supernode volunteers: no waiting, and a busy test machine must not make them decline.
SUPERNODE_OPTIONS = (
    "--allow-supernode", "--min-uptime", "0.5", "--heartbeat", "2", "--max-load", "1000",
    # the lab's "public" addresses are documentation ranges, not globally routable ones
    "--relay-allow-peers", "203.0.113.0/24", "--relay-allow-peers", "198.51.100.0/24",
)  # fmt: skip
WAIT_S = 30.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")


class CallLabError(AssertionError):
    """Something in the lab's overlay did not come up or behave (the message says what)."""


def wait_for(condition: Callable[[], Any], what: str, timeout: float = WAIT_S) -> Any:
    """Poll ``condition`` until it is truthy; its value. Fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise CallLabError(f"{what} did not happen within {timeout:g} s")
        time.sleep(0.2)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) process ``pid`` has used so far, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime (fields 14, 15)


def username(host: str) -> str:
    """The account of the user on ``host`` (usernames need 3 characters; hosts may have 2)."""
    return f"user-{host}"


@dataclass(frozen=True)
class Daemon:
    """One ``voipd`` in the lab."""

    host: str
    process: Process
    state: Path

    @property
    def socket(self) -> str:
        assert self.process.match is not None
        return self.process.match["socket"]

    def ctl(self, *args: str, input: str | None = None, timeout: float = 30.0) -> Result:
        result = run(VOIPCTL, "--socket", self.socket, *args, input=input, timeout=timeout)
        if "Traceback" in result.stdout + result.stderr:
            raise CallLabError(f"voipctl {' '.join(args)} on {self.host} crashed:\n{result}")
        return result

    def status(self) -> dict[str, Any]:
        result = self.ctl("status", "--json")
        if result.returncode != 0:
            raise CallLabError(f"voipctl status on {self.host} failed: {result}")
        document: dict[str, Any] = json.loads(result.stdout)
        return document

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = (self.state / "voipd.log").read_text(errors="replace")
        except OSError:
            return f"(no log of voipd on {self.host})"
        return "\n".join(text.splitlines()[-lines:])


def _is_supernode(daemon: Daemon) -> bool:
    return bool(daemon.status()["supernode"].get("active"))


def _has_published(daemon: Daemon) -> bool:
    return bool(daemon.status()["overlay"].get("published_replicas", 0) > 0)


def _finds_online(daemon: Daemon, name: str) -> bool:
    return "is online" in daemon.ctl("search", name).stdout


@dataclass
class CallRecord:
    """What one call through the lab gave: both summaries, the recordings, CPU and time."""

    caller: str
    callee: str
    caller_summary: dict[str, Any]
    callee_summary: dict[str, Any]
    #: What the caller heard (the callee's speech) and what the callee heard.
    caller_heard: Path
    callee_heard: Path
    #: Wall-clock seconds from placing the call to both sides having exited.
    wall_seconds: float
    #: CPU seconds each daemon spent over ``wall_seconds`` (host -> seconds).
    cpu: dict[str, float] = field(default_factory=dict)

    def path_kind(self, side: str) -> str | None:
        summary = self.caller_summary if side == self.caller else self.callee_summary
        path = summary.get("path") or {}
        kind = path.get("kind")
        return str(kind) if kind is not None else None


@dataclass
class PlacedCall:
    """A call placed with ``CallLab.start_call``, not yet finished."""

    caller: str
    callee: str
    seconds: float
    calling: Process
    answering: Process
    caller_heard: Path
    callee_heard: Path
    pids: dict[str, int]
    cpu_before: dict[str, float]
    started: float


class CallLab:
    """The overlay (a login server, supernodes, users) running in a lab, and calls through it."""

    def __init__(self, lab: Lab, processes: Processes, workdir: Path) -> None:
        self.lab = lab
        self.processes = processes
        self.workdir = workdir
        self.login_address = ""
        self.ca: Path | None = None
        self.daemons: dict[str, Daemon] = {}

    # -- the overlay -----------------------------------------------------------------------------

    def address(self, host: str) -> str:
        return self.lab.scenario.node(host).link.address

    def start_login_server(self, host: str, *options: str) -> None:
        data = init_login_data(self.workdir / "login")
        self.login_address = f"{self.address(host)}:{LOGIN_PORT}"
        self.ca = data / "ca.pub"
        self.processes.start_in_namespace(
            self.lab.namespace(host),
            "login-server",
            LOGIN_SERVER,
            "run",
            "--data",
            data,
            "--port",
            str(LOGIN_PORT),
            "--interface",
            self.address(host),
            "--hash-cost",
            "min",
            "--open-registration",
            *options,
            ready=SERVING,
        )

    def start_daemon(self, host: str, *options: str) -> Daemon:
        assert self.ca is not None, "start the login server first"
        state = self.workdir / host
        process = self.processes.start_in_namespace(
            self.lab.namespace(host),
            f"voipd-{host}",
            VOIPD,
            "--state",
            state,
            "--login-server",
            self.login_address,
            "--ca",
            self.ca,
            "--debug-state",
            "call",
            *options,
            ready=VOIPD_READY,
        )
        daemon = Daemon(host, process, state)
        self.daemons[host] = daemon
        return daemon

    def start_supernodes(self, hosts: Sequence[str]) -> None:
        """Volunteers on ``hosts`` (public ones), each serving on its own address; wait until
        every one is an active supernode."""
        for host in hosts:
            self.start_daemon(host, *SUPERNODE_OPTIONS, "--interface", self.address(host))
        for host in hosts:
            wait_for(
                functools.partial(_is_supernode, self.daemons[host]),
                f"voipd on {host} becoming a supernode",
            )

    def start_users(self, hosts: Sequence[str]) -> None:
        """A daemon on each host, its user registered and logged in, its record published."""
        daemons = [self.start_daemon(host) for host in hosts]
        with ThreadPoolExecutor(max_workers=4) as pool:  # argon2id at login: a few at a time
            list(pool.map(self._log_in, daemons))
        for daemon in daemons:
            wait_for(
                functools.partial(_has_published, daemon),
                f"{username(daemon.host)} publishing its record",
            )

    @staticmethod
    def _log_in(daemon: Daemon) -> None:
        name = username(daemon.host)
        password = f"pw-{name}-12345\n"
        for command in ("register", "login"):
            result = daemon.ctl(command, name, "--password-stdin", input=password)
            if result.returncode != 0:
                raise CallLabError(f"voipctl {command} {name} failed: {result}")

    def wait_findable(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Each (searcher, sought) pair: the searcher's search finds the other online."""
        for searcher, sought in pairs:
            name = username(sought)
            wait_for(
                functools.partial(_finds_online, self.daemons[searcher], name),
                f"{username(searcher)} finding {name} online",
            )

    # -- calls -----------------------------------------------------------------------------------

    def call(self, caller: str, callee: str, **options: Any) -> CallRecord:
        """``caller`` calls ``callee``, who answers; both play a WAV file and record what they
        hear; the caller hangs up after ``seconds`` of conversation (``start_call``'s options)."""
        return self.finish_call(self.start_call(caller, callee, **options))

    def start_call(
        self,
        caller: str,
        callee: str,
        *,
        seconds: float,
        caller_wav: Path,
        callee_wav: Path,
        label: str = "",
    ) -> PlacedCall:
        """Place a call and return at once (several may run together, each user in one)."""
        out = self.workdir / "calls" / (label or f"{caller}-{callee}")
        out.mkdir(parents=True, exist_ok=True)
        caller_heard, callee_heard = out / f"{caller}-heard.wav", out / f"{callee}-heard.wav"
        a, b = self.daemons[caller], self.daemons[callee]
        answering = self.processes.start(
            f"answer-{callee}", VOIPCTL, "--socket", b.socket, "answer", "--wait", "30",
            "--play", callee_wav, "--record", callee_heard, "--json",
        )  # fmt: skip
        # No need to wait for it: an INVITE that arrives first rings until it answers.
        pids = {caller: a.process.pid, callee: b.process.pid}
        before = {host: cpu_seconds(pid) for host, pid in pids.items()}
        started = time.monotonic()
        calling = self.processes.start(
            f"call-{caller}", VOIPCTL, "--socket", a.socket, "call", username(callee),
            "--play", caller_wav, "--record", caller_heard, "--duration", f"{seconds:g}",
            "--json",
        )  # fmt: skip
        return PlacedCall(
            caller, callee, seconds, calling, answering, caller_heard, callee_heard, pids,
            before, started,
        )  # fmt: skip

    def finish_call(self, placed: PlacedCall) -> CallRecord:
        """Wait for a placed call to end; its record, or ``CallLabError`` saying what failed."""
        caller, callee = placed.caller, placed.callee
        a, b = self.daemons[caller], self.daemons[callee]
        calling, answering = placed.calling, placed.answering
        try:
            caller_code = calling.wait_exit(placed.seconds + 40.0)
            callee_code = answering.wait_exit(20.0)
        except ProcessFailure as exc:
            answering.stop()
            calling.stop()
            raise CallLabError(
                f"the call {caller} -> {callee} did not end: {exc}\n"
                f"{calling.describe()}\n{answering.describe()}\n"
                f"--- voipd {caller} ---\n{a.log_tail(80)}\n"
                f"--- voipd {callee} ---\n{b.log_tail(80)}"
            ) from None
        wall = time.monotonic() - placed.started
        cpu = {
            host: cpu_seconds(pid) - placed.cpu_before[host] for host, pid in placed.pids.items()
        }
        if caller_code != 0 or callee_code != 0:
            raise CallLabError(
                f"the call {caller} -> {callee} failed (exit {caller_code} / {callee_code}).\n"
                f"{calling.describe()}\n{answering.describe()}\n"
                f"--- voipd {caller} ---\n{a.log_tail()}\n--- voipd {callee} ---\n{b.log_tail()}"
            )
        try:
            caller_summary = json.loads(calling.stdout)
            callee_summary = json.loads(answering.stdout)
        except ValueError as exc:
            raise ProcessFailure(
                f"no JSON summary: {exc}\n{calling.describe()}\n{answering.describe()}"
            ) from None
        return CallRecord(
            caller, callee, caller_summary, callee_summary, placed.caller_heard,
            placed.callee_heard, wall, cpu,
        )  # fmt: skip
