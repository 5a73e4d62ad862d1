"""Fixtures that run the real programs on 127.0.0.1 (see ``tools/processes.py``).

    login_data       a data directory made by ``voip-login-server init``
    login_server     ``voip-login-server run`` on it: open registration, cheap hashing
    voipd            ``voipd`` with a fresh state directory, pointed at ``login_server``
    voipctl          ``voipctl(*args, input=None)`` -> (returncode, stdout, stderr), talking to
                     ``voipd`` unless given ``socket=`` (``socket=None``: no --socket at all)

Each test gets its own login server: its rate limits (per account and per source address, and
every source here is 127.0.0.1) must not carry over from one test to the next.  State
directories live under short /tmp paths because a unix socket path has at most 107 bytes.
Every process is stopped by PID and every directory removed at teardown, also on failure.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tools.processes import (
    VOIPCTL,
    DaemonProcess,
    LoginServerProcess,
    Processes,
    Result,
    init_login_data,
    run,
    start_login_server,
    start_voipd,
)

ShortDir = Callable[[], Path]


def _remove(path: Path) -> None:
    def make_writable(function: Any, name: str, _exc: Any) -> None:
        # A test may have made a directory read-only; give it back to its owner and retry.
        parent = os.path.dirname(name)
        os.chmod(parent, stat.S_IRWXU)
        if os.path.isdir(name) and not os.path.islink(name):
            os.chmod(name, stat.S_IRWXU)
        function(name)

    shutil.rmtree(path, onerror=make_writable)


@pytest.fixture
def short_dir() -> Iterator[ShortDir]:
    """Makes fresh directories under /tmp with short names; removes them at teardown."""
    made: list[Path] = []

    def make() -> Path:
        path = Path(tempfile.mkdtemp(dir="/tmp", prefix="vi-"))
        made.append(path)
        return path

    yield make
    for path in made:
        if path.exists():
            _remove(path)


@pytest.fixture
def processes(short_dir: ShortDir) -> Iterator[Processes]:
    """Starts programs for one test and stops every one of them (by PID) afterwards."""
    group = Processes(short_dir() / "logs")
    try:
        yield group
    finally:
        group.stop_all()


@pytest.fixture
def login_data(short_dir: ShortDir) -> Path:
    return init_login_data(short_dir() / "ls")


@pytest.fixture
def login_server(processes: Processes, login_data: Path) -> LoginServerProcess:
    return start_login_server(processes, login_data)


@pytest.fixture
def voipd(
    processes: Processes, short_dir: ShortDir, login_server: LoginServerProcess
) -> DaemonProcess:
    return start_voipd(
        processes,
        short_dir() / "state",
        "--login-server",
        login_server.address,
        "--ca",
        login_server.ca_pub,
    )


_DAEMON_SOCKET = object()


class Voipctl:
    """Runs ``voipctl`` as a process; by default against the test's ``voipd``."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        self._request = request

    def __call__(
        self,
        *args: str | os.PathLike[str],
        input: str | None = None,
        socket: Any = _DAEMON_SOCKET,
        env: Mapping[str, str | None] | None = None,
    ) -> Result:
        if socket is _DAEMON_SOCKET:
            daemon: DaemonProcess = self._request.getfixturevalue("voipd")
            socket = daemon.socket
        prefix: list[str | os.PathLike[str]] = [] if socket is None else ["--socket", socket]
        return run(VOIPCTL, *prefix, *args, input=input, env=env)


@pytest.fixture
def voipctl(request: pytest.FixtureRequest) -> Voipctl:
    return Voipctl(request)
