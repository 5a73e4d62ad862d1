"""The demo: a local network on this machine, driven the way a user would drive it.

It starts a login server, a volunteer that becomes a supernode, and two users' daemons; alice
registers and logs in (and stays logged in across a restart of her daemon), bob too; alice finds
bob in the overlay and calls him: each side sends a sentence of synthetic speech (espeak-ng) and
records what it hears, and the demo prints both ends' call summaries and the PESQ score of the
audio each side received.  Everything runs on 127.0.0.1 in a temporary directory; every process
is stopped by its PID and the directory removed, also on failure or Ctrl-C.

Run as root (where network namespaces work), the demo instead builds the NAT lab and calls
between two users behind NATs that no hole punching can join, so the call is relayed by a
supernode (``tools/demo_nat.py``); ``--mode loopback`` keeps it on 127.0.0.1.

    tools/demo              (installs what it needs first)
    python -m tools.demo [--mode auto|lab|loopback] [--keep] [--json]
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tools.processes import (
    LOGIN_SERVER,
    VOIPCTL,
    VOIPD,
    Processes,
    ProcessFailure,
    init_login_data,
    run,
    start_login_server,
    start_voipd,
)

USER = "alice"
PEER = "bob"
CALL_SECONDS = 6


class DemoFailed(Exception):
    pass


def say(text: str) -> None:
    print(text, flush=True)


def step(title: str, module: str, *args: str, input: str | None = None) -> str:
    shown = {LOGIN_SERVER: "voip-login-server", VOIPCTL: "voipctl", VOIPD: "voipd"}[module]
    say(f"\n$ {shown} " + " ".join(a if "/" not in a else Path(a).name for a in args))
    result = run(module, *args, input=input)
    output = (result.stderr + result.stdout).rstrip()
    if output:
        say("  " + output.replace("\n", "\n  "))
    if result.returncode != 0:
        raise DemoFailed(f"{title} failed (exit {result.returncode})")
    return result.stdout


def demo(work: Path) -> dict[str, Any]:
    processes = Processes(work)
    password = secrets.token_urlsafe(12)
    state = work / "alice"
    try:
        say("== A login server (the CA that vouches for users)")
        data = init_login_data(work / "ls")
        server = start_login_server(processes, data, hash_cost="interactive")
        say(f"  voip-login-server pid {server.process.pid} serving on {server.address}")

        say(f"\n== {USER}'s node: voipd holds her keys; voipctl talks only to it")
        daemon = start_voipd(
            processes, state, "--login-server", server.address, "--ca", server.ca_pub
        )
        sock = str(daemon.socket)
        say(f"  voipd pid {daemon.process.pid}, control socket {daemon.socket.name} (mode 0600)")
        step(
            "register",
            VOIPCTL,
            "--socket",
            sock,
            "register",
            USER,
            "--password-stdin",
            input=password + "\n",
        )
        step(
            "login",
            VOIPCTL,
            "--socket",
            sock,
            "login",
            USER,
            "--password-stdin",
            "--stay-logged-in",
            input=password + "\n",
        )
        step("status", VOIPCTL, "--socket", sock, "status")

        say("\n== Restart voipd: she chose to stay logged in, so no password is asked")
        daemon.process.stop()
        daemon = start_voipd(processes, state)
        status = json.loads(step("status", VOIPCTL, "--socket", sock, "status", "--json"))
        if status["account"]["state"] != "logged-in":
            raise DemoFailed("voipd did not stay logged in across the restart")

        say("\n== A wrong password is refused with one clear line")
        wrong = run(
            VOIPCTL, "--socket", sock, "login", USER, "--password-stdin", input="not-the-password\n"
        )
        say("  " + (wrong.stderr + wrong.stdout).strip().replace("\n", "\n  "))

        call = call_bob(processes, work, server, sock, password)
        step("logout", VOIPCTL, "--socket", sock, "logout")
        return {
            "ok": True,
            "login_server": server.address,
            "user": USER,
            "certificate_serial": status["account"]["certificate"]["serial"],
            "stayed_logged_in": True,
            **call,
        }
    except ProcessFailure as exc:
        raise DemoFailed(str(exc)) from None
    finally:
        processes.stop_all()


def wait_until(what: str, check: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise DemoFailed(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(0.2)


def ctl_json(sock: str, *args: str) -> dict[str, Any]:
    result = run(VOIPCTL, "--socket", sock, *args, "--json")
    return json.loads(result.stdout) if result.returncode == 0 else {}


def call_bob(
    processes: Processes, work: Path, server: Any, alice: str, password: str
) -> dict[str, Any]:
    from tools.audio import quality, speech

    say("\n== A volunteer supernode: it indexes users and answers searches and STUN")
    volunteer = start_voipd(
        processes,
        work / "sn",
        "--login-server",
        server.address,
        "--ca",
        server.ca_pub,
        "--interface",
        "127.0.0.1",
        "--allow-supernode",
        "--min-uptime",
        "1",
        "--max-load",
        "1000",  # a demo on a busy machine must not make the volunteer decline
        "--relay-allow-peers",
        "127.0.0.0/8",  # its relay serves this machine's users
    )
    sn = str(volunteer.socket)
    wait_until(
        "the volunteer becoming a supernode",
        lambda: ctl_json(sn, "status").get("supernode", {}).get("active"),
    )
    step("supernode status", VOIPCTL, "--socket", sn, "status")

    say(f"\n== {PEER} joins with his own voipd")
    bob_daemon = start_voipd(
        processes, work / "bob", "--login-server", server.address, "--ca", server.ca_pub
    )
    bob = str(bob_daemon.socket)
    for command in ("register", "login"):
        step(
            command,
            VOIPCTL,
            "--socket",
            bob,
            command,
            PEER,
            "--password-stdin",
            input=password + "\n",
        )
    wait_until(
        f"{PEER} being findable", lambda: ctl_json(alice, "search", PEER).get("status") == "online"
    )
    wait_until(
        f"{USER} being findable", lambda: ctl_json(bob, "search", USER).get("status") == "online"
    )
    step("search", VOIPCTL, "--socket", alice, "search", PEER)

    say(f"\n== {USER} calls {PEER}; both send speech and record what they hear")
    alice_says, bob_says = speech.caller_speech(16000), speech.callee_speech(16000)
    alice_heard, bob_heard = work / "alice-heard.wav", work / "bob-heard.wav"
    answering = processes.start(
        "answer",
        VOIPCTL,
        "--socket",
        bob,
        "answer",
        "--wait",
        "30",
        "--play",
        str(bob_says),
        "--record",
        str(bob_heard),
        "--json",
    )
    step(
        "call",
        VOIPCTL,
        "--socket",
        alice,
        "call",
        PEER,
        "--play",
        str(alice_says),
        "--record",
        str(alice_heard),
        "--duration",
        str(CALL_SECONDS),
    )
    if answering.wait_exit(30) != 0:
        raise DemoFailed(f"{PEER}'s side of the call failed: {answering.stderr.strip()}")
    bob_summary = json.loads(answering.stdout)
    say(
        f"  ({PEER}'s side: {bob_summary['reason'].rstrip('.')}; "
        f"path {bob_summary['path']['kind']})"
    )
    to_bob = quality.pesq_wb(alice_says, bob_heard)
    to_alice = quality.pesq_wb(bob_says, alice_heard)
    say(
        f"\n== Audio quality (PESQ-WB, 1 = bad .. 4.6 = transparent): {USER} -> {PEER} "
        f"{to_bob:.2f}, {PEER} -> {USER} {to_alice:.2f}"
    )
    return {
        "call": {
            "path": bob_summary["path"]["kind"],
            "duration": bob_summary["duration"],
            "pesq_wb": {f"{USER}->{PEER}": round(to_bob, 2), f"{PEER}->{USER}": round(to_alice, 2)},
        }
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    parser.add_argument("--json", action="store_true", help="also print a JSON summary")
    parser.add_argument(
        "--mode",
        choices=["auto", "lab", "loopback"],
        default="auto",
        help="lab: both users behind NATs in network namespaces (needs root); "
        "loopback: all on 127.0.0.1; auto (default): lab where it can run",
    )
    args = parser.parse_args(argv)
    from tools.demo_nat import lab_available, nat_demo

    problems = lab_available() if args.mode != "loopback" else ["loopback asked for"]
    if args.mode == "lab" and problems:
        print(f"demo: the NAT lab cannot run here: {'; '.join(problems)}.", file=sys.stderr)
        return 2
    lab = not problems
    if args.mode == "auto" and not lab:
        say(f"(The NAT lab cannot run here: {'; '.join(problems)}; the demo runs on 127.0.0.1.)")
    work = Path(tempfile.mkdtemp(prefix="voip-demo-", dir="/tmp"))
    started = time.monotonic()
    try:
        summary = nat_demo(work, say, DemoFailed) if lab else {"mode": "loopback", **demo(work)}
    except (DemoFailed, ProcessFailure, AssertionError) as exc:  # CallLab fails with what it saw
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("demo: interrupted; everything it started has been stopped.", file=sys.stderr)
        return 130
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    say(f"\nDemo finished in {time.monotonic() - started:.1f} s; all processes stopped.")
    if args.json:
        print(json.dumps({"schema_version": 1, **summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
