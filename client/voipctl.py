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
    timeout: float | None = DEFAULT_TIMEOUT,
) -> dict[str, Any]:
    """Send one request to voipd and return its result; raises ``VoipError`` on failure.

    ``timeout=None`` waits as long as the daemon works (a call lasts until someone hangs up).
    """
    _check_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout if timeout is not None else QUICK_TIMEOUT)
    deadline = time.monotonic() + timeout if timeout is not None else None
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
            sock.settimeout(None if deadline is None else max(0.1, deadline - time.monotonic()))
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
    shown_as = overlay.get("presence", "online")
    if shown_as != "online":
        lines.append(
            "Others see you as offline (invisible)."
            if shown_as == "invisible"
            else f"Others see you as {shown_as}."
        )
    role = result.get("supernode") or {}
    if role.get("active"):
        lines.append(
            f"Role: supernode, slot {role.get('slot')} of {role.get('slots')}, "
            f"block {role.get('block')}, {role.get('attached')} attached nodes, "
            f"{role.get('records')} records."
        )
        relay = role.get("relay")
        if relay:
            lines.append(
                f"Relay on {relay.get('udp')} (UDP and TCP): {relay.get('allocations')} "
                f"allocations, {relay.get('spare')} spare."
            )
        elif "relay" in role:
            lines.append("Relay: off.")
    elif role.get("allowed"):
        why = role.get("refusal") or "checking eligibility"
        lines.append(f"Role: ordinary node (may become a supernode; {why}).")
    else:
        lines.append("Role: ordinary node.")
    current = result.get("call")
    if current:
        lines.append(_call_line(current))
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
        if "last_seen" not in result:
            return f"{name} is offline, found in {how}."
        seen = _ago(now - float(result["last_seen"]))
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


def format_call(result: dict[str, Any]) -> str:
    """The end-of-call summary, in a few lines."""
    peer = result.get("peer", "?")
    lines = [f"Call with {peer} ended: {result.get('reason') or result.get('outcome')}"]
    path = result.get("path") or {}
    media = result.get("media") or {}
    if path:
        lines.append(
            f"Talked {_span(float(result.get('duration') or 0))} over a {path.get('kind')} path "
            f"({path.get('local')} <-> {path.get('remote')})."
        )
        lines += _path_why(path)
    if media:
        lines.append(_media_line(media))
    return "\n".join(lines)


def _call_line(current: dict[str, Any]) -> str:
    peer, state = current.get("peer"), current.get("state")
    if state == "incoming":
        return f"{peer} is calling you: voipctl answer (or voipctl hangup to decline)."
    if state in ("ringing", "connecting"):
        return f"Calling {peer} ({state})."
    path = current.get("path") or {}
    text = (
        f"In a call with {peer} for {_span(float(current.get('duration') or 0))}, "
        f"{path.get('kind')} path to {path.get('remote')}."
    )
    media = current.get("media")
    lines = [text, *_path_why(path)]
    if media:
        lines.append(_media_line(media))
    return "\n".join(lines)


def _path_why(path: dict[str, Any]) -> list[str]:
    """Why this path: the reason it was chosen, and any switch since."""
    lines = [f"Why: {path['why']}."] if path.get("why") else []
    lines += [f"Switched: {note}." for note in path.get("switches") or []]
    return lines


def _media_line(media: dict[str, Any]) -> str:
    def number(name: str, unit: str, digits: int = 0) -> str:
        value = media.get(name)
        return f"{value:.{digits}f} {unit}" if isinstance(value, int | float) else "?"

    return (
        f"{media.get('codec', 'opus')} {number('send_kbps', 'kbit/s')}, "
        f"RTT {number('rtt_ms', 'ms')}, loss {number('loss_percent', '%', 1)}, "
        f"jitter {number('jitter_ms', 'ms', 1)}, jitter buffer {number('jitter_buffer_ms', 'ms')}; "
        f"packets sent {media.get('packets_sent', '?')}, received "
        f"{media.get('packets_received', '?')}."
    )


def _audio_request(args: argparse.Namespace) -> dict[str, Any]:
    request: dict[str, Any] = {}
    for name in ("play", "record"):
        value = getattr(args, name, None)
        if value is not None:
            request[name] = str(Path(value).resolve())
    if getattr(args, "duration", None) is not None:
        request["duration"] = args.duration
    if request.get("play") and not Path(request["play"]).is_file():
        raise DaemonError(f"{args.play}: no such file.", "no-such-file")
    return request


def _in_call(args: argparse.Namespace, command: str, request: dict[str, Any]) -> int:
    """Run ``call`` or ``answer`` until the call ends; Ctrl-C hangs up."""
    try:
        result = call(args.socket, command, request, _progress(args), timeout=None)
    except KeyboardInterrupt:
        print("Hanging up...", file=sys.stderr, flush=True)
        try:
            result = call(args.socket, "hangup", timeout=QUICK_TIMEOUT)
        except DaemonError as exc:
            if exc.code != "no-call":
                raise
            return 1
    if args.json:
        print_json(result)
    else:
        print(format_call(result))
    return 0 if result.get("outcome") == "completed" else 1


def cmd_call(args: argparse.Namespace) -> int:
    return _in_call(args, "call", {"username": args.username, **_audio_request(args)})


def cmd_answer(args: argparse.Namespace) -> int:
    return _in_call(args, "answer", {"wait": args.wait, **_audio_request(args)})


def cmd_hangup(args: argparse.Namespace) -> int:
    result = call(args.socket, "hangup", timeout=QUICK_TIMEOUT)
    if args.json:
        print_json(result)
    else:
        print(format_call(result))
    return 0


def cmd_ping(args: argparse.Namespace) -> int:
    """Pings over the path a call would take; one line per reply, on standard output."""
    request = {
        "username": args.username,
        "count": args.count,
        "interval": args.interval,
        "until_direct": args.until_direct,
    }

    def line(text: str) -> None:
        stream = sys.stdout if text.startswith(("Reply", "No reply")) else sys.stderr
        if not args.json or stream is sys.stderr:
            print(text, file=stream, flush=True)

    result = call(args.socket, "ping-user", request, line, timeout=None)
    if args.json:
        print_json(result)
    else:
        rtt = result.get("rtt_ms") or {}
        path = result.get("path") or {}
        print(
            f"--- {result.get('peer')}: {result.get('sent')} sent, {result.get('received')} "
            f"received, {result.get('loss_percent')} % lost; path {path.get('kind')}"
            + (
                f"; rtt min/avg/max {rtt['min']}/{rtt['avg']}/{rtt['max']} ms"
                if rtt.get("min")
                else ""
            )
        )
    return 0 if result.get("received") else 1


def cmd_buddies(args: argparse.Namespace) -> int:
    from client.buddies import buddy_line

    request: dict[str, Any] = {"action": args.action or "list"}
    if args.action in ("add", "remove"):
        if not args.username:
            raise DaemonError(
                f"Say whom to {args.action}: voipctl buddies {args.action} NAME", "usage"
            )
        request["username"] = args.username
    watch = args.watch_for if args.watch_for is not None else (86_400.0 if args.watch else None)
    if watch is not None:
        request["watch_for"] = watch

    def line(text: str) -> None:
        print(text, flush=True)

    try:
        result = call(args.socket, "buddies", request, line, timeout=None)
    except KeyboardInterrupt:
        return 0
    if args.json:
        print_json(result)
        return 0
    buddies = result.get("buddies") or []
    if not buddies:
        print("No buddies yet: voipctl buddies add NAME")
    now = time.time()
    for buddy in buddies:
        print(buddy_line(buddy, now))
    return 0


def cmd_presence(args: argparse.Namespace) -> int:
    result = call(args.socket, "presence", {"status": args.status}, _progress(args))
    if args.json:
        print_json(result)
    elif args.status == "invisible":
        print("You now appear offline to others (you can still search and call).")
    else:
        print(f"You now appear {args.status} to others.")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    request = {"username": args.username, "accept": args.accept}
    result = call(args.socket, "verify", request, _progress(args))
    if args.json:
        print_json(result)
        return 0
    name = result.get("username")
    print(f"Safety number with {name} (compare it with {name} in person or on a call):")
    print(f"  {result.get('safety_number')}")
    state = result.get("state")
    print(f"{name}'s key {result.get('key')}: {state}.")
    if state == "CHANGED":
        print(f"If the numbers match, accept it: voipctl verify {name} --accept")
    return 0


def format_netcheck(result: dict[str, Any]) -> str:
    lines = [f"UDP: {'works' if result.get('udp_works') else 'blocked (no supernode answered)'}."]
    if result.get("reflexive"):
        lines.append(f"Seen from outside as {result['reflexive']}; local {result.get('local')}.")
    lines.append(f"NAT: {result.get('kind')} (mapping {result.get('mapping')}).")
    for server in result.get("servers", []):
        rtt = server.get("rtt_ms")
        shown = f"{rtt:.1f} ms" if isinstance(rtt, int | float) else "no answer"
        lines.append(f"  supernode {server.get('address')}: {shown}")
    return "\n".join(lines)


def cmd_netcheck(args: argparse.Namespace) -> int:
    result = call(args.socket, "netcheck", progress=_progress(args), timeout=30.0)
    if args.json:
        print_json(result)
    else:
        print(format_netcheck(result))
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
    for name, text in (("call", "call a user"), ("answer", "answer the ringing call")):
        p = sub.add_parser(name, parents=[common], help=text)
        if name == "call":
            p.add_argument("username")
        else:
            p.add_argument(
                "--wait", type=float, default=0.0, metavar="S", help="wait up to S s for a call"
            )
        p.add_argument("--play", metavar="WAV", help="send this WAV file instead of the microphone")
        p.add_argument("--record", metavar="WAV", help="record what you hear into this WAV file")
        p.add_argument(
            "--duration", type=float, metavar="S", help="hang up after S s of conversation"
        )
    sub.add_parser("hangup", parents=[common], help="hang up, cancel or decline the call")
    buddies = sub.add_parser("buddies", parents=[common], help="your buddy list and their presence")
    buddies.add_argument("action", nargs="?", choices=["list", "add", "remove"])
    buddies.add_argument("username", nargs="?")
    buddies.add_argument("--watch", action="store_true", help="print each change (Ctrl-C stops)")
    buddies.add_argument("--watch-for", type=float, metavar="S", help="watch for S seconds")
    presence = sub.add_parser("presence", parents=[common], help="how others see you")
    presence.add_argument("status", choices=["online", "away", "busy", "invisible"])
    verify = sub.add_parser(
        "verify", parents=[common], help="safety number with a user; accept a changed key"
    )
    verify.add_argument("username")
    verify.add_argument(
        "--accept", action="store_true", help="trust the user's current key (after comparing)"
    )
    ping = sub.add_parser("ping", parents=[common], help="path and round trip to a user")
    ping.add_argument("username")
    ping.add_argument("-c", "--count", type=int, default=4, help="replies to ask for (4)")
    ping.add_argument("-i", "--interval", type=float, default=1.0, help="seconds between (1)")
    ping.add_argument(
        "--until-direct", action="store_true", help="go on until the path is direct (at most 60)"
    )
    sub.add_parser(
        "netcheck", parents=[common], help="UDP, reflexive address, NAT kind, supernode RTTs"
    )
    from client.msgctl import add_parsers as add_message_parsers

    add_message_parsers(sub, common)
    return parser


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "status": cmd_status,
    "register": cmd_register,
    "login": cmd_login,
    "logout": cmd_logout,
    "search": cmd_search,
    "call": cmd_call,
    "answer": cmd_answer,
    "hangup": cmd_hangup,
    "ping": cmd_ping,
    "verify": cmd_verify,
    "presence": cmd_presence,
    "buddies": cmd_buddies,
    "netcheck": cmd_netcheck,
    "msg": lambda args: _messages().cmd_msg(args, call),
    "inbox": lambda args: _messages().cmd_inbox(args, call),
}


def _messages() -> Any:
    import client.msgctl

    return client.msgctl


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not hasattr(args, "socket"):
        args.socket = default_socket_path()
    args.json = getattr(args, "json", False)
    return run_command(PROGRAM, lambda: COMMANDS[args.command](args), json_errors=args.json)


if __name__ == "__main__":
    sys.exit(main())
