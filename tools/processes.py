"""Start the project's programs as child processes, wait until they are ready, stop them by PID.

Used by the demo and the integration tests.  A program is ready when a line of its standard
error matches ``ready`` (the login server prints "serving on HOST:PORT", voipd "ready on
SOCKET").  Output is collected in a file so a failure can show it.  ``stop`` sends SIGTERM,
then SIGKILL after a grace period, and always reaps the child.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parent.parent


class ProcessError(Exception):
    """A child process failed to start or become ready."""


def module_command(module: str, *args: str) -> list[str]:
    """Run one of our programs with the current interpreter: ``python -m MODULE ARGS``."""
    return [sys.executable, "-m", module, *args]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if "PYTHONPATH" in env else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if extra:
        env.update(extra)
    return env


class Child:
    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        ready: str | None = None,
        timeout: float = 20.0,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self._log: IO[bytes] = tempfile.NamedTemporaryFile(prefix=f"{name}-", suffix=".log")  # noqa: SIM115
        self.process = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=child_env(env),
            cwd=cwd or REPO,
            start_new_session=True,
        )
        self.match: re.Match[str] | None = None
        if ready is not None:
            self.match = self.wait_for(ready, timeout)

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        self._log.flush()
        return Path(self._log.name).read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """Wait until the output matches ``pattern``; raise with the output if it never does."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.output())
            if match is not None:
                return match
            if self.process.poll() is not None:
                raise ProcessError(
                    f"{self.name} exited with status {self.process.returncode} before it was "
                    f"ready:\n{self.output()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise ProcessError(
                    f"{self.name} was not ready within {timeout:g} s:\n{self.output()}"
                )
            time.sleep(0.05)

    def stop(self, grace: float = 5.0) -> int:
        """SIGTERM, then SIGKILL after ``grace`` seconds; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def close(self) -> None:
        self.stop()
        self._log.close()


def run(
    argv: Sequence[str],
    *,
    input: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    """Run a short command to completion and capture its output."""
    return subprocess.run(
        list(argv),
        input=input,
        capture_output=True,
        text=True,
        env=child_env(env),
        cwd=REPO,
        timeout=timeout,
        check=False,
    )
