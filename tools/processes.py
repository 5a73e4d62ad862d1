"""Run the real programs as processes: start, wait until ready, run to completion, stop.

Shared by the integration tests and the demo.

Programs are started as ``python -m MODULE`` with this checkout on ``PYTHONPATH``, so they work
from any virtualenv that has the dependencies.  A started program's standard output and error
go to files (never to a pipe nobody drains, which would stall a chatty server), so a failure can
show everything it printed.  Every started program is stopped by its PID: SIGTERM, then SIGKILL
when it has not exited after a few seconds.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

REPO = Path(__file__).resolve().parents[1]
READY_TIMEOUT = 20.0
STOP_GRACE = 5.0
RUN_TIMEOUT = 30.0
_POLL = 0.02

LOGIN_SERVER = "login_server.cli"
VOIPD = "client.daemon"
VOIPCTL = "client.voipctl"
RELAY = "relay.cli"

#: ``voip-login-server: serving on 127.0.0.1:PORT (registration open); Ctrl-C stops.``
SERVING = re.compile(r"^voip-login-server: serving on (?P<host>[^\s:]+):(?P<port>\d+) ", re.M)
#: ``voipd: ready on SOCKET (state DIR, log FILE, pid N)``
VOIPD_READY = re.compile(r"^voipd: ready on (?P<socket>\S+) \(", re.M)


class ProcessFailure(AssertionError):
    """A program died, never got ready, or did not finish in time; the message shows its output."""


def program_env(extra: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """The environment for a program: this checkout importable, no VOIP_SOCKET leaking in."""
    env = dict(os.environ)
    env.pop("VOIP_SOCKET", None)
    env["PYTHONPATH"] = str(REPO)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    for name, value in (extra or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def module_argv(module: str, *args: str | os.PathLike[str]) -> list[str]:
    return [sys.executable, "-m", module, *(os.fspath(a) for a in args)]


class Result(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def run(
    module: str,
    *args: str | os.PathLike[str],
    input: str | None = None,
    env: Mapping[str, str | None] | None = None,
    timeout: float = RUN_TIMEOUT,
    preexec_fn: Callable[[], Any] | None = None,
) -> Result:
    """Run ``python -m MODULE ARGS`` to completion; its exit status, stdout and stderr."""
    argv = module_argv(module, *args)
    try:
        done = subprocess.run(
            argv,
            input=input if input is not None else "",
            capture_output=True,
            text=True,
            cwd=REPO,
            env=program_env(env),
            timeout=timeout,
            check=False,
            preexec_fn=preexec_fn,
        )
    except subprocess.TimeoutExpired as exc:  # subprocess.run has killed it
        raise ProcessFailure(
            f"{' '.join(argv)} did not finish within {timeout:g} s (it hangs).\n"
            f"--- stdout ---\n{_text(exc.stdout)}\n--- stderr ---\n{_text(exc.stderr)}"
        ) from None
    return Result(done.returncode, done.stdout, done.stderr)


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


class Process:
    """A started program, its output files, and what its readiness line said."""

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str], logs: Path) -> None:
        self.name = name
        self.argv = list(argv)
        logs.mkdir(parents=True, exist_ok=True)
        fd, stdout = tempfile.mkstemp(dir=logs, prefix=f"{name}-", suffix=".out")
        os.close(fd)
        self.stdout_path = Path(stdout)
        self.stderr_path = self.stdout_path.with_suffix(".err")
        self.match: re.Match[str] | None = None
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.popen = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=REPO, env=env
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def describe(self) -> str:
        status = self.popen.poll()
        state = "still running" if status is None else f"exited with status {status}"
        return (
            f"{self.name} (pid {self.pid}, {state}): {' '.join(self.argv)}\n"
            f"--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"
        )

    def wait_ready(self, pattern: re.Pattern[str], timeout: float = READY_TIMEOUT) -> re.Match[str]:
        """Wait until ``pattern`` appears on stderr; fail (and stop it) if it dies or takes long."""
        deadline = time.monotonic() + timeout
        while True:
            match = pattern.search(self.stderr)
            if match is not None:
                self.match = match
                return match
            if self.popen.poll() is not None:
                raise ProcessFailure(f"{self.name} exited before it was ready.\n{self.describe()}")
            if time.monotonic() > deadline:
                description = self.describe()
                self.stop()
                raise ProcessFailure(
                    f"{self.name} was not ready within {timeout:g} s.\n{description}"
                )
            time.sleep(_POLL)

    def wait_exit(self, timeout: float = READY_TIMEOUT) -> int:
        """Wait for the program to exit by itself; its exit status."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            description = self.describe()
            self.stop()
            raise ProcessFailure(
                f"{self.name} did not exit within {timeout:g} s.\n{description}"
            ) from None

    def signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def stop(self, grace: float = STOP_GRACE) -> int:
        """SIGTERM by PID, SIGKILL after ``grace`` seconds; the exit status (negative: signal)."""
        if self.popen.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.popen.wait(grace)
        return self.popen.returncode


class Processes:
    """The programs one test started; ``stop_all`` stops every one still running."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[Process] = []

    def start(
        self,
        name: str,
        module: str,
        *args: str | os.PathLike[str],
        ready: re.Pattern[str] | None = None,
        env: Mapping[str, str | None] | None = None,
        timeout: float = READY_TIMEOUT,
    ) -> Process:
        """Start ``python -m MODULE ARGS``; with ``ready``, return once it printed that line."""
        process = Process(name, module_argv(module, *args), program_env(env), self.logs)
        self.started.append(process)
        if ready is not None:
            process.wait_ready(ready, timeout)
        return process

    def start_in_namespace(
        self,
        namespace: str,
        name: str,
        module: str,
        *args: str | os.PathLike[str],
        ready: re.Pattern[str] | None = None,
        env: Mapping[str, str | None] | None = None,
        timeout: float = READY_TIMEOUT,
    ) -> Process:
        """Like ``start``, inside a network namespace (``ip netns exec``, which needs root and
        runs the program in place of itself, so the PID is the program's)."""
        argv = ["ip", "netns", "exec", namespace, *module_argv(module, *args)]
        process = Process(name, argv, program_env(env), self.logs)
        self.started.append(process)
        if ready is not None:
            process.wait_ready(ready, timeout)
        return process

    def stop_all(self) -> None:
        for process in reversed(self.started):
            process.stop()


# -- the programs of this project --------------------------------------------------------------


def init_login_data(path: Path) -> Path:
    """``voip-login-server init --data PATH``; fails the test unless it worked."""
    result = run(LOGIN_SERVER, "init", "--data", path)
    if result.returncode != 0 or not (path / "ca.pub").is_file():
        raise ProcessFailure(f"voip-login-server init failed: {result}")
    return path


@dataclass(frozen=True)
class LoginServerProcess:
    process: Process
    data: Path
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def ca_pub(self) -> Path:
        return self.data / "ca.pub"


def start_login_server(
    processes: Processes,
    data: Path,
    *args: str,
    open_registration: bool = True,
    hash_cost: str = "min",
) -> LoginServerProcess:
    """``voip-login-server run`` on a free port of 127.0.0.1, once it says where it serves."""
    options = ["--data", str(data), "--port", "0", "--interface", "127.0.0.1"]
    options += ["--hash-cost", hash_cost, *args]
    if open_registration:
        options.append("--open-registration")
    process = processes.start("login-server", LOGIN_SERVER, "run", *options, ready=SERVING)
    assert process.match is not None
    return LoginServerProcess(process, data, process.match["host"], int(process.match["port"]))


@dataclass(frozen=True)
class DaemonProcess:
    process: Process
    state: Path
    socket: Path


def start_voipd(
    processes: Processes,
    state: Path,
    *args: str | os.PathLike[str],
    env: Mapping[str, str | None] | None = None,
) -> DaemonProcess:
    """``voipd --state STATE ARGS``, once it says it is ready on its control socket."""
    process = processes.start("voipd", VOIPD, "--state", state, *args, ready=VOIPD_READY, env=env)
    assert process.match is not None
    return DaemonProcess(process, state, Path(process.match["socket"]))
