"""The control protocol between voipctl and voipd, over a real unix socket.

The server side is ``ControlFactory`` listening on the real reactor; the client is the real
``client.voipctl.call`` run in a thread (it blocks, as it does in the CLI).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from client import voipctl
from client.control import ControlFactory, Handler, Progress, uid_allowed
from client.daemon import VERSION, Daemon, DaemonConfig
from client.voipctl import DaemonError, DaemonNotRunning
from overlay.errors import VoipError
from overlay.identity import MIN_COST, IdentityKey

TIMEOUT = 10.0


class LineBusy(VoipError):
    """The line is busy."""

    code = "line-busy"


async def echo(args: dict[str, Any], progress: Progress) -> dict[str, Any]:
    return {"echo": args}


async def chatty(args: dict[str, Any], progress: Progress) -> dict[str, Any]:
    progress("Searching for bob...")
    await deferLater(reactor, 0, lambda: None)  # the reply is written on a later turn
    progress("Ringing bob...")
    progress("Trying relay...")
    return {"done": True}


async def busy(args: dict[str, Any], progress: Progress) -> dict[str, Any]:
    raise LineBusy("bob is busy on another call.")


async def broken(args: dict[str, Any], progress: Progress) -> dict[str, Any]:
    raise RuntimeError("boom")


HANDLERS: dict[str, Handler] = {"echo": echo, "chatty": chatty, "busy": busy, "broken": broken}


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A fresh directory with a short path (sun_path holds at most 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="vc-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def listen(path: Path, handlers: dict[str, Handler] = HANDLERS) -> IListeningPort:
    endpoint = UNIXServerEndpoint(reactor, str(path), mode=0o600, wantPID=False)
    port: IListeningPort = await endpoint.listen(ControlFactory(handlers))
    return port


async def call(
    path: Path,
    command: str,
    args: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    result: dict[str, Any] = await deferToThread(
        voipctl.call, path, command, args, progress, TIMEOUT
    )
    return result


def raw_exchange(path: Path, data: bytes) -> list[dict[str, Any]]:
    """Send raw bytes and read every reply line until voipd closes the connection."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(str(path))
        sock.sendall(data)
        with sock.makefile("rb") as reader:
            return [json.loads(line) for line in reader]


# -- requests and replies -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_result_comes_back(short_dir: Path) -> None:
    path = short_dir / "s"
    port = await listen(path)
    try:
        result = await call(path, "echo", {"to": "bob", "n": 3})
    finally:
        await port.stopListening()
    assert result == {"echo": {"to": "bob", "n": 3}}


@pytest_twisted.ensureDeferred
async def test_progress_lines_arrive_in_order_before_the_result(short_dir: Path) -> None:
    path = short_dir / "s"
    port = await listen(path)
    progress: list[str] = []
    try:
        result = await call(path, "chatty", progress=progress.append)
    finally:
        await port.stopListening()
    assert progress == ["Searching for bob...", "Ringing bob...", "Trying relay..."]
    assert result == {"done": True}


@pytest_twisted.ensureDeferred
async def test_a_voip_error_reaches_the_client_with_its_message_and_code(short_dir: Path) -> None:
    path = short_dir / "s"
    port = await listen(path)
    try:
        with pytest.raises(DaemonError, match=r"^bob is busy on another call\.$") as info:
            await call(path, "busy")
    finally:
        await port.stopListening()
    assert info.value.code == "line-busy"


@pytest_twisted.ensureDeferred
async def test_an_unknown_command_is_named(short_dir: Path) -> None:
    path = short_dir / "s"
    port = await listen(path)
    try:
        with pytest.raises(DaemonError, match=r"^voipd does not know the command 'x'\.$") as info:
            await call(path, "x")
    finally:
        await port.stopListening()
    assert info.value.code == "unknown-command"


@pytest.mark.parametrize(
    "line",
    [
        b"hello voipd\n",
        b"\xff\xfe\n",
        b'"just a string"\n',
        b"[1, 2]\n",
        b'{"args": {}}\n',
        b'{"cmd": 5}\n',
        b'{"cmd": "echo", "args": [1]}\n',
    ],
)
@pytest_twisted.ensureDeferred
async def test_garbage_is_not_a_control_request(short_dir: Path, line: bytes) -> None:
    path = short_dir / "s"
    port = await listen(path)
    try:
        replies = await deferToThread(raw_exchange, path, line)
    finally:
        await port.stopListening()
    assert replies == [
        {"ok": False, "error": {"code": "bad-request", "message": "Not a control request."}}
    ]


@pytest_twisted.ensureDeferred
async def test_an_unexpected_failure_is_reported_and_logged(
    short_dir: Path, no_logged_errors: Any
) -> None:
    no_logged_errors.expect(1)
    path = short_dir / "s"
    port = await listen(path)
    try:
        with pytest.raises(
            DaemonError, match=re.escape("voipd failed: RuntimeError('boom') (see its log).")
        ) as info:
            await call(path, "broken")
        # The daemon goes on serving after the failure.
        assert await call(path, "echo") == {"echo": {}}
    finally:
        await port.stopListening()
    assert info.value.code == "internal"
    assert len(no_logged_errors.events) == 1
    failure = no_logged_errors.events[0]["log_failure"]
    assert isinstance(failure.value, RuntimeError)
    assert str(failure.value) == "boom"


@pytest.mark.parametrize(
    ("peer", "own", "allowed"),
    [
        (1000, 1000, True),  # the daemon's own user
        (0, 1000, True),  # root
        (1001, 1000, False),  # somebody else
        (None, 1000, False),  # the peer's uid could not be read
        (None, 0, False),
        (0, 0, True),
    ],
)
def test_uid_allowed(peer: int | None, own: int, allowed: bool) -> None:
    assert uid_allowed(peer, own) is allowed


# -- voipctl's view of a missing or foreign daemon ------------------------------------------


def test_no_socket_says_voipd_is_not_running_and_how_to_start_it(short_dir: Path) -> None:
    path = short_dir / "missing.sock"
    with pytest.raises(DaemonNotRunning) as info:
        voipctl.call(path, "status", timeout=TIMEOUT)
    message = str(info.value)
    assert message.startswith(f"voipd is not running (no socket at {path}).")
    assert "Start it with: voipd --state DIR --login-server HOST:PORT --ca PATH/TO/ca.pub &" in (
        message
    )


def test_a_stale_socket_is_recognised(short_dir: Path) -> None:
    path = short_dir / "stale.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()  # never listened, file left behind: a daemon that died
    with pytest.raises(DaemonNotRunning) as info:
        voipctl.call(path, "status", timeout=TIMEOUT)
    message = str(info.value)
    assert message.startswith(f"voipd is not running (stale socket at {path}).")
    assert "Start it with: voipd" in message


def test_a_plain_file_is_not_a_voipd_socket(short_dir: Path) -> None:
    path = short_dir / "file"
    path.write_text("")
    with pytest.raises(DaemonNotRunning, match=re.escape(f"{path} is not a voipd socket.")):
        voipctl.call(path, "status", timeout=TIMEOUT)


def test_a_socket_of_another_user_is_refused(short_dir: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to give the socket file to another user")
    path = short_dir / "other.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        sock.listen(1)
        os.chown(path, 65534, -1)
        with pytest.raises(DaemonNotRunning) as info:
            voipctl.call(path, "status", timeout=TIMEOUT)
    finally:
        sock.close()
    assert str(info.value) == (
        f"The socket {path} belongs to another user (uid 65534); "
        "start your own voipd and use its socket."
    )


# -- the daemon as a service ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_daemon_serves_status_on_a_private_socket(short_dir: Path) -> None:
    state = short_dir / "state"
    state.mkdir(mode=0o700)
    sock = state / "voipd.sock"
    config = DaemonConfig(
        state=state,
        login_server="127.0.0.1:1",
        ca_key=IdentityKey.generate().public_key,
        socket=sock,
        key_cost=MIN_COST,
    )
    daemon = Daemon(config, reactor)
    umask = os.umask(0o022)
    os.umask(umask)
    daemon.startService()
    try:
        info = sock.stat()
        assert stat.S_ISSOCK(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o600
        assert os.umask(umask) == umask  # startService put the caller's umask back

        status = await call(sock, "status")
        assert status["daemon"]["pid"] == os.getpid()
        assert status["daemon"]["version"] == VERSION
        assert status["daemon"]["state_dir"] == str(state)
        assert status["daemon"]["uptime"] >= 0
        assert status["account"] == {
            "state": "logged-out",
            "username": None,
            "login_server": "127.0.0.1:1",
            "stay_logged_in": False,
            "last_error": None,
        }
        assert (await call(sock, "ping"))["pong"] is True
        with pytest.raises(
            DaemonError, match=r"^Not logged in; run 'voipctl login NAME' first\.$"
        ) as info_logout:
            await call(sock, "logout")
        assert info_logout.value.code == "not-logged-in"
        with pytest.raises(DaemonError, match=r"^The request lacks 'password'\.$") as bad:
            await call(sock, "login", {"username": "alice"})
        assert bad.value.code == "bad-request"
    finally:
        stopped = await daemon.stopService()
    # Every part of the daemon stopped cleanly (a MultiService gives one (ok, result) each).
    assert [ok for ok, _ in stopped] == [True] * len(stopped)
    assert not sock.exists()
    with pytest.raises(DaemonNotRunning, match=r"^voipd is not running \(no socket at "):
        voipctl.call(sock, "status", timeout=TIMEOUT)


@pytest_twisted.ensureDeferred
async def test_a_cancellable_command_stops_when_its_client_goes_away(short_dir: Path) -> None:
    """``voipctl buddies --watch`` then Ctrl-C: the daemon drops the watch at once; a call
    (not cancellable) would run on until hung up."""
    stopped: list[str] = []

    async def watch(args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        progress("Watching...")
        try:
            await deferLater(reactor, 30, lambda: None)
        finally:
            stopped.append(args["name"])
        return {}

    path = short_dir / "s"
    endpoint = UNIXServerEndpoint(reactor, str(path), mode=0o600, wantPID=False)
    handlers: dict[str, Handler] = {"watch": watch, "call": watch}
    port = await endpoint.listen(ControlFactory(handlers, frozenset({"watch"})))
    try:
        for command in ("watch", "call"):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(str(path))
                request = {"cmd": command, "args": {"name": command}}
                sock.sendall(json.dumps(request).encode() + b"\n")
                await deferLater(reactor, 0.2, lambda: None)
        await deferLater(reactor, 0.2, lambda: None)
        assert stopped == ["watch"]  # the call's handler still runs
    finally:
        await port.stopListening()
        for call in reactor.getDelayedCalls():
            if call.getTime() - reactor.seconds() > 25 and call.active():
                call.cancel()  # the abandoned "call" handler's 30 s wait
