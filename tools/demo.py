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

from tools.processes import Child, ProcessError, module_command, run

USER = "alice"


class DemoFailed(Exception):
    pass


def say(text: str) -> None:
    print(text, flush=True)


def step(title: str, argv: list[str], *, input: str | None = None) -> str:
    shown = " ".join(a if "/" not in a else Path(a).name for a in argv[2:])
    say(f"\n$ {shown}")
    result = run(argv, input=input)
    output = (result.stderr + result.stdout).rstrip()
    if output:
        say("  " + output.replace("\n", "\n  "))
    if result.returncode != 0:
        raise DemoFailed(f"{title} failed (exit {result.returncode})")
    return result.stdout


def voipctl(sock: Path, *args: str) -> list[str]:
    return module_command("client.voipctl", "--socket", str(sock), *args)


def demo(work: Path) -> dict[str, Any]:
    children: list[Child] = []
    password = secrets.token_urlsafe(12)
    data, state = work / "ls", work / "alice"
    sock = state / "voipd.sock"
    try:
        say("== A login server (the CA that vouches for users)")
        step("init", module_command("login_server.cli", "init", "--data", str(data)))
        server = Child(
            "login-server",
            module_command(
                "login_server.cli",
                "run",
                "--data",
                str(data),
                "--port",
                "0",
                "--interface",
                "127.0.0.1",
                "--open-registration",
            ),
            ready=r"serving on (\S+):(\d+)",
        )
        children.append(server)
        assert server.match is not None
        address = f"{server.match.group(1)}:{server.match.group(2)}"
        say(f"  login server pid {server.pid} serving on {address}")

        say(f"\n== {USER}'s node: voipd holds her keys; voipctl talks only to it")
        daemon_argv = module_command(
            "client.daemon",
            "--state",
            str(state),
            "--login-server",
            address,
            "--ca",
            str(data / "ca.pub"),
        )
        daemon = Child("voipd", daemon_argv, ready=r"ready on")
        children.append(daemon)
        say(f"  voipd pid {daemon.pid}, control socket {sock.name} (mode 0600)")

        step("register", voipctl(sock, "register", USER, "--password-stdin"), input=password + "\n")
        step(
            "login",
            voipctl(sock, "login", USER, "--password-stdin", "--stay-logged-in"),
            input=password + "\n",
        )
        step("status", voipctl(sock, "status"))

        say("\n== Restart voipd: she chose to stay logged in, so no password is asked")
        daemon.stop()
        daemon = Child(
            "voipd", module_command("client.daemon", "--state", str(state)), ready=r"ready on"
        )
        children.append(daemon)
        status = json.loads(step("status --json", voipctl(sock, "status", "--json")))
        if status["account"]["state"] != "logged-in":
            raise DemoFailed("voipd did not stay logged in across the restart")

        say("\n== A wrong password is refused with one clear line")
        wrong = run(voipctl(sock, "login", USER, "--password-stdin"), input="not-the-password\n")
        say("  " + (wrong.stdout + wrong.stderr).strip().replace("\n", "\n  "))

        step("logout", voipctl(sock, "logout"))
        return {
            "ok": True,
            "login_server": address,
            "user": USER,
            "certificate_serial": status["account"]["certificate"]["serial"],
            "stayed_logged_in": True,
        }
    except ProcessError as exc:
        raise DemoFailed(str(exc)) from None
    finally:
        for child in reversed(children):
            child.close()


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
