"""``voipctl``: the user's command line.  It talks only to the local ``voipd``.

Every command exits 0 on success and 1 with one line on standard error on failure; commands
that print data take ``--json`` (``"schema_version": 1``).  Progress from slow steps goes to
standard error, so standard output stays clean for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from client.paths import default_socket_path
from overlay.errors import VoipError
from overlay.terminal import print_json, read_password, run_command

PROGRAM = "voipctl"
DEFAULT_TIMEOUT = 120.0
#: Commands that only read the daemon's state answer at once; a daemon that does not is stuck.
QUICK_TIMEOUT = 10.0
START_HINT = "voipd --state DIR --login-server HOST:PORT --ca PATH/TO/ca.pub &"


class DaemonNotRunning(VoipError):
    """voipd is not running."""

    code = "daemon-not-running"


class DaemonError(VoipError):
    """voipd reported an error."""

    code = "daemon-error"

    def __init__(self, message: str, code: str = "daemon-error") -> None:
        super().__init__(message)
        self.code = code


def _check_socket(path: Path) -> None:
    try:
        info = path.stat()
    except FileNotFoundError:
        raise DaemonNotRunning(
            f"voipd is not running (no socket at {path}). Start it with: {START_HINT}"
        ) from None
    except PermissionError:
        raise DaemonNotRunning(f"Cannot reach {path}: permission denied.") from None
    if not stat.S_ISSOCK(info.st_mode):
        raise DaemonNotRunning(f"{path} is not a voipd socket.")
    if info.st_uid != os.getuid():
        raise DaemonNotRunning(
            f"The socket {path} belongs to another user (uid {info.st_uid}); "
            "start your own voipd and use its socket."
        )


def call(
    path: Path,
    command: str,
    args: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> dict[str, Any]:
    """Send one request to voipd and return its result; raises ``VoipError`` on failure."""
    _check_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        try:
            sock.connect(str(path))
        except ConnectionRefusedError:
            raise DaemonNotRunning(
                f"voipd is not running (stale socket at {path}). Start it with: {START_HINT}"
            ) from None
        except PermissionError:
            raise DaemonNotRunning(f"Cannot connect to {path}: permission denied.") from None
        sock.sendall(json.dumps({"cmd": command, "args": args or {}}).encode() + b"\n")
        reader = sock.makefile("rb")
        while True:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                line = reader.readline()
            except TimeoutError:
                raise DaemonError(
                    f"voipd did not finish '{command}' within {timeout:g} s."
                ) from None
            if not line:
                raise DaemonError(f"voipd closed the connection during '{command}' (see its log).")
            try:
                reply = json.loads(line)
            except ValueError:
                raise DaemonError("voipd sent something that is not JSON.") from None
            if "progress" in reply:
                if progress is not None:
                    progress(str(reply["progress"]))
                continue
            if reply.get("ok"):
                result = reply.get("result")
                return result if isinstance(result, dict) else {}
            error = reply.get("error") or {}
            raise DaemonError(
                str(error.get("message", "voipd failed.")), str(error.get("code", ""))
            )
    except OSError as exc:
        raise DaemonNotRunning(f"Cannot talk to voipd at {path}: {exc.strerror or exc}.") from None
    finally:
        sock.close()


# -- output --------------------------------------------------------------------------------------


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def _span(seconds: float) -> str:
    seconds = int(max(0, seconds))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    if seconds >= 60:
        return f"{seconds // 60} min"
    return f"{seconds} s"


def format_status(result: dict[str, Any], now: float) -> str:
    account = result.get("account", {})
    lines = []
    if account.get("state") == "logged-in":
        cert = account.get("certificate", {})
        until = float(cert.get("not_after", 0))
        lines.append(f"Logged in as {account.get('username')}.")
        lines.append(
            f"Certificate valid until {_when(until)} (in {_span(until - now)}), "
            f"serial {cert.get('serial')}, key {cert.get('key_fingerprint')}."
        )
        if "next_renewal" in account:
            lines.append(f"Renews at {_when(float(account['next_renewal']))}.")
        lines.append(f"Stay logged in: {'yes' if account.get('stay_logged_in') else 'no'}.")
    else:
        lines.append("Not logged in.")
    if account.get("last_error"):
        lines.append(str(account["last_error"]))
    lines.append(f"Login server: {account.get('login_server')}.")
    overlay = result.get("overlay") or {}
    if account.get("state") == "logged-in":
        sn = overlay.get("supernode")
        if sn:
            rtt = sn.get("rtt")
            shown = f", RTT {rtt * 1000:.0f} ms" if isinstance(rtt, int | float) else ""
            lines.append(f"Attached to supernode {sn['host']}:{sn['port']}{shown}.")
        else:
            reason = overlay.get("last_error") or "looking for one"
            lines.append(f"Not attached to a supernode ({reason}).")
    role = result.get("supernode") or {}
    if role.get("active"):
        lines.append(
            f"Role: supernode, slot {role.get('slot')} of {role.get('slots')}, "
            f"block {role.get('block')}, {role.get('attached')} attached nodes, "
            f"{role.get('records')} records."
        )
    elif role.get("allowed"):
        why = role.get("refusal") or "checking eligibility"
        lines.append(f"Role: ordinary node (may become a supernode; {why}).")
    else:
        lines.append("Role: ordinary node.")
    daemon = result.get("daemon", {})
    lines.append(
        f"voipd {daemon.get('version')} (pid {daemon.get('pid')}), "
        f"up {_span(daemon.get('uptime', 0))}."
    )
    return "\n".join(lines)


# -- commands ------------------------------------------------------------------------------------


def _progress(args: argparse.Namespace) -> Callable[[str], None]:
    def show(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    return show


def cmd_status(args: argparse.Namespace) -> int:
    result = call(args.socket, "status", timeout=QUICK_TIMEOUT)
    if args.json:
        print_json(result)
    else:
        print(format_status(result, time.time()))
    return 0


def _ago(seconds: float) -> str:
    return "just now" if seconds < 60 else f"{_span(seconds)} ago"


def format_search(result: dict[str, Any], now: float) -> str:
    name = result["username"]
    rounds = result["rounds"]
    how = f"{rounds} round{'s' if rounds != 1 else ''}, {result['elapsed'] * 1000:.0f} ms"
    outcome = result["outcome"]
    if outcome == "found":
        where = f" (attached to SN {result['supernode']})" if "supernode" in result else ""
        status = result.get("status", "online")
        state = "online" if status == "online" else f"online, {status}"
        return f"{name} is {state}{where}, found in {how}."
    if outcome == "offline":
        seen = _ago(now - float(result.get("last_seen", now)))
        return f"{name} is offline (last seen {seen}), found in {how}."
    if outcome == "not-found":
        return f"No such user, or {name} has not been online in the last 72 h ({how})."
    raise DaemonError(
        f"Search for {name} failed: no supernode gave an answer ({result['asked']} asked, "
        f"{result['timeouts']} did not answer).",
        "search-failed",
    )


def cmd_search(args: argparse.Namespace) -> int:
    result = call(args.socket, "search", {"username": args.username}, _progress(args))
    if args.json:
        print_json(result)
        return 0 if result["outcome"] != "failed" else 1
    print(format_search(result, time.time()))
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    password = read_password(
        f"New password for {args.username}: ", confirm=True, from_stdin=args.password_stdin
    )
    result = call(
        args.socket, "register", {"username": args.username, "password": password}, _progress(args)
    )
    if args.json:
        print_json(result)
    else:
        print(f"Registered {result['username']}. Log in with: voipctl login {result['username']}")
    return 0


def cmd_login(args: argparse.Namespace) -> int:
    password = read_password(f"Password for {args.username}: ", from_stdin=args.password_stdin)
    request = {
        "username": args.username,
        "password": password,
        "stay_logged_in": args.stay_logged_in,
    }
    result = call(args.socket, "login", request, _progress(args))
    if args.json:
        print_json(result)
    else:
        until = float(result.get("certificate", {}).get("not_after", 0))
        print(f"Logged in as {result['username']}; certificate valid until {_when(until)}.")
    return 0


def cmd_logout(args: argparse.Namespace) -> int:
    result = call(args.socket, "logout", timeout=QUICK_TIMEOUT)
    if args.json:
        print_json(result)
    else:
        print(f"Logged out {result.get('username')}.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--socket",
        type=Path,
        default=argparse.SUPPRESS,
        help="voipd's control socket (default $VOIP_SOCKET or the runtime directory)",
    )
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    parser = argparse.ArgumentParser(
        prog=PROGRAM, description="Control your voipd.", parents=[common]
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("status", parents=[common], help="who is logged in, certificate, daemon")
    for name, text in (("register", "create an account"), ("login", "log in")):
        p = sub.add_parser(name, parents=[common], help=text)
        p.add_argument("username")
        p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
        if name == "login":
            p.add_argument(
                "--stay-logged-in",
                action="store_true",
                help="stay logged in when voipd restarts (keeps a key in the state directory)",
            )
    sub.add_parser("logout", parents=[common], help="log out")
    search = sub.add_parser("search", parents=[common], help="find a user in the overlay")
    search.add_argument("username")
    return parser


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "status": cmd_status,
    "register": cmd_register,
    "login": cmd_login,
    "logout": cmd_logout,
    "search": cmd_search,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not hasattr(args, "socket"):
        args.socket = default_socket_path()
    args.json = getattr(args, "json", False)
    return run_command(PROGRAM, lambda: COMMANDS[args.command](args), json_errors=args.json)


if __name__ == "__main__":
    sys.exit(main())
