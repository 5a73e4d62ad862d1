"""The real programs, as a user runs them: voip-login-server, voipd and voipctl on 127.0.0.1.

Every failing command is checked for its exit status and its one-line reason on standard error
(after any "...ing..." progress lines), and no command may print a Python traceback.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import signal
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from client.state import SavedSession, StateDir
from overlay import certificate
from overlay.channel import ClientHandshake, HelloReply, Sealed, Session
from overlay.framing import HEADER, MAX_PAYLOAD, WIRE_VERSION, Frame, FrameDecoder
from overlay.identity import MIN_COST, IdentityKey, read_trust_anchor
from overlay.messages import Error, decode
from tools.processes import (
    LOGIN_SERVER,
    RELAY,
    VOIPD,
    DaemonProcess,
    LoginServerProcess,
    Processes,
    Result,
    init_login_data,
    run,
    start_login_server,
    start_voipd,
)

pytestmark = pytest.mark.integration

PASSWORD = "correct horse battery"
WRONG = "wrong horse battery"
START_HINT = "Start it with: voipd --state DIR --login-server HOST:PORT --ca PATH/TO/ca.pub &"
SHORT_TIMEOUT = 10.0
ShortDir = Callable[[], Path]
Voipctl = Callable[..., Result]


# -- checks --------------------------------------------------------------------------------------


def assert_no_traceback(result: Result) -> None:
    assert "Traceback" not in result.stdout, result
    assert "Traceback" not in result.stderr, result


def succeeded(result: Result) -> str:
    """The command exited 0 without a traceback; its standard output."""
    assert_no_traceback(result)
    assert result.returncode == 0, result
    return result.stdout


def failure_line(result: Result) -> str:
    """The command exited 1 with one reason line, after progress lines only; that line."""
    assert_no_traceback(result)
    assert result.returncode == 1, result
    lines = result.stderr.splitlines()
    assert lines, result
    *progress, last = lines
    assert all(line.endswith("...") for line in progress), result
    return last


def only_line(result: Result) -> str:
    """The command exited 1 and printed exactly one line (on stderr) and nothing else."""
    assert_no_traceback(result)
    assert result.returncode == 1, result
    assert result.stdout == "", result
    assert result.stderr.count("\n") == 1 and result.stderr.endswith("\n"), result
    return result.stderr.rstrip("\n")


def register(
    voipctl: Voipctl, name: str = "alice", password: str = PASSWORD, **options: Any
) -> Result:
    return voipctl("register", name, "--password-stdin", input=password + "\n", **options)


def login(
    voipctl: Voipctl, name: str = "alice", password: str = PASSWORD, *extra: str, **options: Any
) -> Result:
    return voipctl("login", name, "--password-stdin", *extra, input=password + "\n", **options)


def status_json(voipctl: Voipctl, **options: Any) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(succeeded(voipctl("status", "--json", **options)))
    assert document["schema_version"] == 1
    return document


def status_lines(voipctl: Voipctl, **options: Any) -> list[str]:
    return succeeded(voipctl("status", **options)).splitlines()


# -- 1. the everyday flow ------------------------------------------------------------------------


def test_register_login_status_logout(
    login_server: LoginServerProcess, voipd: DaemonProcess, voipctl: Voipctl
) -> None:
    at = login_server.address
    result = register(voipctl)
    assert succeeded(result) == "Registered alice. Log in with: voipctl login alice\n"
    assert result.stderr == f"Registering alice at the login server {at}...\n"

    result = login(voipctl)
    assert re.fullmatch(
        r"Logged in as alice; certificate valid until \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC\.\n",
        succeeded(result),
    )
    assert result.stderr == f"Logging in to the login server at {at}...\n"

    lines = status_lines(voipctl)
    assert lines[0] == "Logged in as alice."
    assert lines[1].startswith("Certificate valid until ")
    assert "(in 23 h 59 min), serial 1, key " in lines[1]
    assert "Stay logged in: no." in lines
    assert f"Login server: {at}." in lines

    document = status_json(voipctl)
    account = document["account"]
    assert account["state"] == "logged-in"
    assert account["username"] == "alice"
    assert account["certificate"]["serial"] == 1
    assert account["certificate"]["role"] == "user"
    assert account["renewals"] == 0
    assert document["daemon"]["pid"] == voipd.process.pid

    # The identity key is stored encrypted, readable by its owner only; so is the socket.
    key = voipd.state / "keys" / "alice.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert PASSWORD.encode() not in key.read_bytes()
    assert stat.S_IMODE(voipd.socket.stat().st_mode) == 0o600

    assert succeeded(voipctl("logout")) == "Logged out alice.\n"
    lines = status_lines(voipctl)
    assert lines[0] == "Not logged in."
    assert lines[1] == f"Login server: {at}."
    assert status_json(voipctl)["account"]["state"] == "logged-out"
    assert failure_line(voipctl("logout")) == (
        "voipctl: Not logged in; run 'voipctl login NAME' first."
    )


def test_voip_socket_environment_variable(
    login_server: LoginServerProcess, voipd: DaemonProcess, voipctl: Voipctl
) -> None:
    env = {"VOIP_SOCKET": str(voipd.socket)}
    succeeded(register(voipctl))
    succeeded(voipctl("login", "alice", "--password-stdin", input=PASSWORD, socket=None, env=env))
    assert status_lines(voipctl, socket=None, env=env)[0] == "Logged in as alice."
    # --socket wins over the environment.
    elsewhere = {"VOIP_SOCKET": "/tmp/vi-nowhere/voipd.sock"}
    assert status_lines(voipctl, env=elsewhere)[0] == "Logged in as alice."


# -- 2. refusals from the login server and the daemon -------------------------------------------


def test_account_errors(voipd: DaemonProcess, voipctl: Voipctl) -> None:
    succeeded(register(voipctl))
    assert failure_line(register(voipctl)) == "voipctl: The username alice is taken."
    assert failure_line(register(voipctl, "ALICE")) == "voipctl: The username alice is taken."
    assert failure_line(register(voipctl, "a")) == (
        "voipctl: 'a' is not a valid username: use 3-32 characters of a-z, 0-9, '.', '_' and '-'."
    )
    assert failure_line(register(voipctl, "bobby", "short")) == (
        "voipctl: Passwords need at least 8 characters."
    )
    assert failure_line(login(voipctl, "alice", WRONG)) == "voipctl: Wrong password for alice."
    assert status_lines(voipctl)[0] == "Not logged in."
    assert failure_line(login(voipctl, "bob")) == "voipctl: There is no account named bob."
    assert failure_line(voipctl("login", "alice", "--password-stdin", input="")) == (
        "voipctl: No password on standard input (--password-stdin)."
    )
    # A refused login leaves no key behind.
    assert list((voipd.state / "keys").iterdir()) == []

    succeeded(login(voipctl))
    assert failure_line(login(voipctl, "carol")) == (
        "voipctl: alice is logged in on this daemon; log out first."
    )
    # A wrong password while logged in does not log alice out.
    assert failure_line(login(voipctl, "alice", WRONG)) == "voipctl: Wrong password for alice."
    assert status_lines(voipctl)[0] == "Logged in as alice."


def test_json_errors(voipd: DaemonProcess, voipctl: Voipctl) -> None:
    result = voipctl("--json", "login", "bob", "--password-stdin", input=PASSWORD)
    assert failure_line(result) == "voipctl: There is no account named bob."
    document = json.loads(result.stdout)
    assert document == {
        "schema_version": 1,
        "ok": False,
        "error": {"code": "unknown-user", "message": "There is no account named bob."},
    }


def test_registration_closed(
    processes: Processes, login_data: Path, short_dir: ShortDir, voipctl: Voipctl
) -> None:
    server = start_login_server(processes, login_data, open_registration=False)
    daemon = start_voipd(
        processes, short_dir(), "--login-server", server.address, "--ca", server.ca_pub
    )
    assert "(registration closed)" in server.process.stderr
    result = register(voipctl, socket=daemon.socket)
    assert failure_line(result) == (
        "voipctl: Registration is closed on this login server; ask its operator for an account."
    )
    # The operator adds the account instead, while the server runs.
    added = run(
        LOGIN_SERVER,
        *("adduser", "--data", login_data, "alice", "--password-stdin", "--hash-cost", "min"),
        input=PASSWORD + "\n",
    )
    assert succeeded(added) == "Added alice.\n"
    succeeded(login(voipctl, socket=daemon.socket))
    assert status_lines(voipctl, socket=daemon.socket)[0] == "Logged in as alice."


def test_rate_limited_after_failed_logins(voipd: DaemonProcess, voipctl: Voipctl) -> None:
    succeeded(register(voipctl))
    lines = [failure_line(login(voipctl, "alice", WRONG)) for _ in range(6)]
    assert lines[:5] == ["voipctl: Wrong password for alice."] * 5
    limited = re.compile(r"voipctl: Too many failed logins for alice; try again in (\d+) s\.")
    match = limited.fullmatch(lines[5])
    assert match is not None, lines[5]
    assert 1 <= int(match[1]) <= 300
    # Even the right password is refused until the wait is over.
    match = limited.fullmatch(failure_line(login(voipctl)))
    assert match is not None
    assert 1 <= int(match[1]) <= 300
    assert status_lines(voipctl)[0] == "Not logged in."


# -- 3. and 4. the login server cannot be reached or is not the one we trust ---------------------


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def test_login_server_unreachable(
    processes: Processes, login_data: Path, short_dir: ShortDir, voipctl: Voipctl
) -> None:
    port = _closed_port()
    daemon = start_voipd(
        processes,
        short_dir(),
        *("--login-server", f"127.0.0.1:{port}", "--ca", login_data / "ca.pub"),
    )
    expected = f"voipctl: Cannot reach the login server at 127.0.0.1:{port}: connection refused."
    assert failure_line(login(voipctl, socket=daemon.socket)) == expected
    assert failure_line(register(voipctl, socket=daemon.socket)) == expected
    assert status_lines(voipctl, socket=daemon.socket)[0] == "Not logged in."


def test_login_server_with_another_ca_key(
    processes: Processes,
    login_server: LoginServerProcess,
    short_dir: ShortDir,
    voipctl: Voipctl,
) -> None:
    other = init_login_data(short_dir() / "other")
    daemon = start_voipd(
        processes,
        short_dir(),
        *("--login-server", login_server.address, "--ca", other / "ca.pub"),
    )
    line = failure_line(login(voipctl, socket=daemon.socket))
    assert line == (
        f"voipctl: The server at {login_server.address} did not prove it holds the CA key you "
        "trust (wrong --ca, or not our login server)."
    )
    assert "--ca" in line
    assert list((daemon.state / "keys").iterdir()) == []
    assert not (daemon.state / "session").exists()


# -- 5. certificates: renewal, and saved ones that must not be believed --------------------------


def test_short_certificate_is_renewed(
    processes: Processes, login_data: Path, short_dir: ShortDir, voipctl: Voipctl
) -> None:
    server = start_login_server(processes, login_data, "--cert-lifetime", "5s")
    daemon = start_voipd(
        processes, short_dir(), "--login-server", server.address, "--ca", server.ca_pub
    )
    succeeded(register(voipctl, socket=daemon.socket))
    succeeded(login(voipctl, socket=daemon.socket))
    first = status_json(voipctl, socket=daemon.socket)["account"]
    assert first["certificate"]["not_after"] - first["certificate"]["not_before"] == 5
    assert first["renewals"] == 0

    # Renewal is due at two thirds of the lifetime: about 3.3 s after login.
    deadline = time.monotonic() + 12.0
    while True:
        account = status_json(voipctl, socket=daemon.socket)["account"]
        if account["renewals"] >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert account["renewals"] >= 1, account
    assert account["state"] == "logged-in"
    assert account["last_error"] is None
    assert account["certificate"]["serial"] > first["certificate"]["serial"]
    assert account["certificate"]["not_after"] > first["certificate"]["not_after"]
    assert account["certificate"]["key_fingerprint"] == first["certificate"]["key_fingerprint"]


def _saved_session(
    state: Path, make_cert: Callable[[bytes], certificate.SignedCertificate]
) -> None:
    """A stay-logged-in session for alice, as a previous voipd would have left it."""
    directory = StateDir(state)
    directory.prepare()
    identity = IdentityKey.generate()
    file_key = identity.save(directory.key_path("alice"), PASSWORD, MIN_COST)
    directory.save_session(SavedSession("alice", file_key, make_cert(identity.public_key)))


def _tampered(ca_key: IdentityKey, public_key: bytes) -> certificate.SignedCertificate:
    genuine = certificate.issue(ca_key, "alice", public_key, serial=1, now=time.time())
    longer = dataclasses.replace(genuine.cert, not_after=genuine.cert.not_after + 365 * 86400)
    return certificate.SignedCertificate(longer, genuine.signature)


SAVED_CERTIFICATES: dict[str, tuple[Callable[[IdentityKey, bytes], Any], str]] = {
    "foreign": (
        lambda _ca, key: certificate.issue(
            IdentityKey.generate(), "alice", key, serial=1, now=time.time()
        ),
        "The certificate was not signed by our login server.",
    ),
    "tampered": (_tampered, "The certificate was not signed by our login server."),
    "expired": (
        lambda ca, key: certificate.issue(
            ca, "alice", key, serial=1, now=time.time() - 3 * 3600, lifetime=3600
        ),
        "The certificate has expired.",
    ),
    "for another key": (
        lambda ca, _key: certificate.issue(
            ca, "alice", IdentityKey.generate().public_key, serial=1, now=time.time()
        ),
        "the saved certificate is for another key; log in again.",
    ),
}


@pytest.mark.parametrize("kind", sorted(SAVED_CERTIFICATES))
def test_saved_certificate_not_believed(
    kind: str,
    processes: Processes,
    login_data: Path,
    short_dir: ShortDir,
    voipctl: Voipctl,
) -> None:
    make, reason = SAVED_CERTIFICATES[kind]
    ca_key = IdentityKey.load_plain(login_data / "ca.key")
    state = short_dir()
    _saved_session(state, lambda key: make(ca_key, key))
    daemon = start_voipd(
        processes,
        state,
        *("--login-server", f"127.0.0.1:{_closed_port()}", "--ca", login_data / "ca.pub"),
    )
    lines = status_lines(voipctl, socket=daemon.socket)
    assert lines[0] == "Not logged in."
    assert lines[1] == f"Could not stay logged in as alice: {reason}"
    account = status_json(voipctl, socket=daemon.socket)["account"]
    assert account["state"] == "logged-out"
    assert account["last_error"] == f"Could not stay logged in as alice: {reason}"
    assert "certificate" not in account
    assert not (state / "session").exists()


# -- 6. staying logged in across a restart -------------------------------------------------------


@pytest.mark.parametrize("stay", [True, False], ids=["stay-logged-in", "not-staying"])
def test_restart_keeps_login_only_when_asked(
    stay: bool, processes: Processes, voipd: DaemonProcess, voipctl: Voipctl
) -> None:
    succeeded(register(voipctl))
    succeeded(login(voipctl, "alice", PASSWORD, *(["--stay-logged-in"] if stay else [])))
    before = status_json(voipctl)["account"]
    assert before["stay_logged_in"] is stay
    assert f"Stay logged in: {'yes' if stay else 'no'}." in status_lines(voipctl)
    assert (voipd.state / "session").exists() is stay

    assert voipd.process.stop() == 0  # SIGTERM: a clean exit
    assert not voipd.socket.exists()
    # No --login-server and no --ca: both were saved at the first start.
    again = start_voipd(processes, voipd.state)
    assert again.socket == voipd.socket

    if stay:
        assert status_lines(voipctl)[0] == "Logged in as alice."
        after = status_json(voipctl)["account"]
        assert after["state"] == "logged-in"
        assert after["certificate"] == before["certificate"]
        assert after["stay_logged_in"] is True
        # Logging out also forgets the saved session.
        succeeded(voipctl("logout"))
        assert not (voipd.state / "session").exists()
    else:
        assert status_lines(voipctl)[:2] == [
            "Not logged in.",
            f"Login server: {before['login_server']}.",
        ]
        assert status_json(voipctl)["account"]["last_error"] is None


# -- 7. voipctl without a daemon ----------------------------------------------------------------


def test_daemon_not_running(short_dir: ShortDir, voipctl: Voipctl) -> None:
    path = short_dir() / "nonexistent" / "voipd.sock"
    result = voipctl("status", socket=path)
    assert failure_line(result) == (
        f"voipctl: voipd is not running (no socket at {path}). {START_HINT}"
    )
    result = voipctl("--json", "status", socket=path)
    failure_line(result)
    document = json.loads(result.stdout)
    assert document["ok"] is False
    assert document["error"]["code"] == "daemon-not-running"
    # The default socket comes from VOIP_SOCKET.
    result = voipctl("status", socket=None, env={"VOIP_SOCKET": str(path)})
    assert failure_line(result).startswith(f"voipctl: voipd is not running (no socket at {path})")


def test_stale_socket_after_daemon_was_killed(
    processes: Processes, voipd: DaemonProcess, voipctl: Voipctl
) -> None:
    voipd.process.signal(signal.SIGKILL)
    voipd.process.wait_exit()
    assert voipd.socket.exists()
    line = failure_line(voipctl("status"))
    assert line == f"voipctl: voipd is not running (stale socket at {voipd.socket}). {START_HINT}"
    # A new voipd clears the stale socket and serves again.
    start_voipd(processes, voipd.state)
    assert status_lines(voipctl)[0] == "Not logged in."


def test_socket_of_another_user(short_dir: ShortDir, voipctl: Voipctl) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to give a socket to another user (uid 65534)")
    path = short_dir() / "voipd.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen()
        os.chown(path, 65534, 65534)
        line = failure_line(voipctl("status", socket=path))
    assert line == (
        f"voipctl: The socket {path} belongs to another user (uid 65534); "
        "start your own voipd and use its socket."
    )


def test_path_that_is_not_a_socket(short_dir: ShortDir, voipctl: Voipctl) -> None:
    path = short_dir() / "voipd.sock"
    path.write_text("not a socket")
    assert failure_line(voipctl("status", socket=path)) == f"voipctl: {path} is not a voipd socket."


# -- 8. voipd refusing to start -----------------------------------------------------------------


def _voipd(*args: str | os.PathLike[str]) -> Result:
    return run(VOIPD, *args, timeout=SHORT_TIMEOUT)


def test_second_voipd_on_same_state(voipd: DaemonProcess, voipctl: Voipctl) -> None:
    line = only_line(_voipd("--state", voipd.state))
    assert line == f"voipd: Another voipd (pid {voipd.process.pid}) is running on {voipd.state}."
    # The first one is unharmed.
    assert status_lines(voipctl)[0] == "Not logged in."
    assert voipd.socket.exists()


def test_voipd_start_errors(short_dir: ShortDir, login_data: Path) -> None:
    ca = login_data / "ca.pub"
    assert only_line(_voipd("--state", short_dir())) == (
        "voipd: voipd needs --login-server HOST:PORT the first time it runs."
    )
    assert only_line(_voipd("--state", short_dir(), "--login-server", "127.0.0.1:7000")) == (
        "voipd: voipd needs --ca PATH/TO/ca.pub (the login server's key) the first time it runs."
    )
    assert only_line(_voipd("--state", short_dir(), "--login-server", "nohost", "--ca", ca)) == (
        "voipd: 'nohost' is not an address like 127.0.0.1:7000."
    )
    bad = short_dir() / "ca.pub"
    bad.write_text("not a key\n")
    result = _voipd("--state", short_dir(), "--login-server", "127.0.0.1:7000", "--ca", bad)
    assert only_line(result) == (
        f"voipd: The CA key file {bad} is not a CA public key "
        "(expected 'voip-ca-ed25519 <base64>')."
    )
    missing = short_dir() / "missing.pub"
    result = _voipd("--state", short_dir(), "--login-server", "127.0.0.1:7000", "--ca", missing)
    assert only_line(result) == (
        f"voipd: Cannot read the CA key file {missing}: No such file or directory."
    )
    long_socket = short_dir() / ("x" * 120) / "voipd.sock"
    result = _voipd(
        *("--state", short_dir(), "--login-server", "127.0.0.1:7000", "--ca", ca),
        *("--socket", long_socket),
    )
    assert only_line(result) == (
        f"voipd: The socket path {long_socket} is longer than 107 bytes; "
        "use a shorter --state or --socket."
    )


def test_voipd_socket_and_log_file_errors(short_dir: ShortDir, login_data: Path) -> None:
    first_start = ("--login-server", "127.0.0.1:7000", "--ca", login_data / "ca.pub")
    notes = short_dir() / "notes.txt"
    notes.write_text("precious\n")
    result = _voipd("--state", short_dir(), *first_start, "--socket", notes)
    assert only_line(result) == f"voipd: {notes} exists and is not a socket; not replacing it."
    assert notes.read_text() == "precious\n"

    inside_file = notes / "voipd.sock"
    result = _voipd("--state", short_dir(), *first_start, "--socket", inside_file)
    assert only_line(result) == f"voipd: Cannot make the socket {inside_file}: File exists."

    state = short_dir()
    log = short_dir() / "missing" / "voipd.log"
    result = _voipd("--state", state, *first_start, "--log-file", log)
    assert (
        only_line(result) == f"voipd: Cannot write the log file {log}: No such file or directory."
    )
    assert not (state / "voipd.sock").exists()

    (state / "config.json").write_text('{"login_server": 5}')
    assert only_line(_voipd("--state", state)) == (
        f"voipd: {state / 'config.json'} is damaged; run voipd with --login-server."
    )


# -- 9. the login server survives hostile input -------------------------------------------------


class RawConnection:
    """A plain TCP connection to the login server, read with a timeout."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5.0)
        self.decoder = FrameDecoder()
        self.frames: list[Frame] = []
        self.closed = False

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _read(self) -> None:
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            raise AssertionError("The login server neither answered nor closed in 5 s.") from None
        except ConnectionResetError:
            data = b""
        if not data:
            self.closed = True
            return
        self.frames.extend(self.decoder.feed(data))

    def next_frame(self) -> Frame:
        while not self.frames:
            assert not self.closed, "The login server closed the connection without a reply."
            self._read()
        return self.frames.pop(0)

    def until_closed(self) -> list[Frame]:
        while not self.closed:
            self._read()
        frames, self.frames = self.frames, []
        return frames

    def handshake(self, ca_key: bytes) -> Session:
        client = ClientHandshake(ca_key)
        self.send(bytes(client.hello()))
        reply = decode(self.next_frame())
        assert isinstance(reply, HelloReply)
        return client.finish(reply)


def _error(message: Any) -> tuple[str, str, str]:
    assert isinstance(message, Error), message
    return (message.request, message.code, message.message)


def test_login_server_survives_bad_input(
    login_server: LoginServerProcess, voipd: DaemonProcess, voipctl: Voipctl
) -> None:
    port = login_server.port
    ca_key = read_trust_anchor(login_server.ca_pub)

    with RawConnection(port) as raw:
        raw.send(b"GET / HTTP/1.1\r\nHost: login\r\n\r\n")
        replies = [decode(frame) for frame in raw.until_closed()]
    assert [_error(m) for m in replies] == [("frame", "bad-frame", "Unsupported wire version 71.")]

    with RawConnection(port) as raw:
        raw.send(HEADER.pack(WIRE_VERSION, 0x0010, 100_000_000))
        replies = [decode(frame) for frame in raw.until_closed()]
    assert [_error(m) for m in replies] == [
        ("frame", "bad-frame", f"Frame of 100000000 bytes exceeds the limit of {MAX_PAYLOAD}.")
    ]

    with RawConnection(port) as raw:
        session = raw.handshake(ca_key)
        raw.send(b"\xff" + random.Random(9).randbytes(511))
        replies = [session.open(decode(frame)) for frame in raw.until_closed()]
    assert [_error(m) for m in replies] == [("frame", "bad-frame", "Unsupported wire version 255.")]

    with RawConnection(port) as raw:
        session = raw.handshake(ca_key)
        raw.send(bytes(Sealed(random.Random(10).randbytes(64))))
        replies = [session.open(decode(frame)) for frame in raw.until_closed()]
    assert [_error(m) for m in replies] == [
        ("frame", "channel-error", "A sealed frame failed to decrypt (altered or replayed).")
    ]

    # A connection that only ever sends half a header is not answered yet, and does not block
    # others: a real login goes through meanwhile.
    with RawConnection(port) as stalled:
        stalled.send(b"\x01\x00")
        succeeded(register(voipctl))
        succeeded(login(voipctl))
    assert status_lines(voipctl)[0] == "Logged in as alice."
    assert login_server.process.popen.poll() is None
    assert "Traceback" not in login_server.process.stderr


# -- 10. voip-login-server's own failures -------------------------------------------------------


def test_init_twice_keeps_the_ca_key(login_data: Path) -> None:
    key = (login_data / "ca.key").read_bytes()
    result = run(LOGIN_SERVER, "init", "--data", login_data)
    assert only_line(result) == (
        f"voip-login-server: {login_data} is already initialised; not overwriting its CA key."
    )
    assert (login_data / "ca.key").read_bytes() == key


def test_run_without_init(short_dir: ShortDir) -> None:
    missing = short_dir() / "missing"
    result = run(LOGIN_SERVER, "run", "--data", missing, "--port", "0", timeout=SHORT_TIMEOUT)
    assert only_line(result) == (
        f"voip-login-server: {missing} is not a login server data directory; "
        f"run 'voip-login-server init --data {missing}' first."
    )


def test_run_on_a_port_in_use(login_server: LoginServerProcess, short_dir: ShortDir) -> None:
    other = init_login_data(short_dir() / "other")
    result = run(
        LOGIN_SERVER,
        *("run", "--data", other, "--port", str(login_server.port)),
        *("--interface", "127.0.0.1"),
        timeout=SHORT_TIMEOUT,
    )
    assert only_line(result) == (
        f"voip-login-server: Cannot listen on tcp:{login_server.port}:interface=127.0.0.1: "
        "Address already in use."
    )


PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2


def _without_file_override() -> None:
    """In the child: root loses the power to write files it has no write permission for."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def test_adduser_when_database_is_read_only(login_data: Path) -> None:
    db = login_data / "accounts.db"
    os.chmod(db, 0o444)
    os.chmod(login_data, 0o555)
    try:
        try:
            result = run(
                LOGIN_SERVER,
                *("adduser", "--data", login_data, "alice", "--password-stdin"),
                *("--hash-cost", "min"),
                input=PASSWORD + "\n",
                preexec_fn=_without_file_override if os.getuid() == 0 else None,
            )
        except Exception as exc:  # subprocess reports a failed preexec_fn this way
            pytest.skip(f"cannot drop CAP_DAC_OVERRIDE here: {exc}")
    finally:
        os.chmod(login_data, 0o700)
        os.chmod(db, 0o600)
    line = only_line(result)
    assert line.startswith(f"voip-login-server: Cannot write the account database {db}: "), line
    assert line.endswith(".")
    users = run(LOGIN_SERVER, "users", "--data", login_data, "--json")
    assert json.loads(succeeded(users)) == {"schema_version": 1, "users": []}


# -- 11. voip-relay -----------------------------------------------------------------------------


def test_relay_without_a_command_says_what_it_takes() -> None:
    result = run(RELAY, timeout=SHORT_TIMEOUT)
    assert result.returncode == 2
    assert "the following arguments are required: command" in result.stderr
    assert "{serve,credential}" in result.stderr
