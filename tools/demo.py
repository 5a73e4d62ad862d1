"""The demo: a local network on this machine, driven the way a user would drive it.

Today it starts a login server and one node (voipd), registers and logs in a user with
voipctl, shows the status, stays logged in across a daemon restart, and logs out.  Later steps
of the project extend it to supernodes and a real call.  Everything runs on 127.0.0.1 in a
temporary directory; every process is stopped by its PID and the directory removed, also on
failure or Ctrl-C.

    tools/demo              (installs what it needs first)
    python -m tools.demo [--keep] [--json]
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

        step("logout", VOIPCTL, "--socket", sock, "logout")
        return {
            "ok": True,
            "login_server": server.address,
            "user": USER,
            "certificate_serial": status["account"]["certificate"]["serial"],
            "stayed_logged_in": True,
        }
    except ProcessFailure as exc:
        raise DemoFailed(str(exc)) from None
    finally:
        processes.stop_all()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    parser.add_argument("--json", action="store_true", help="also print a JSON summary")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="voip-demo-", dir="/tmp"))
    started = time.monotonic()
    try:
        summary = demo(work)
    except DemoFailed as exc:
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
