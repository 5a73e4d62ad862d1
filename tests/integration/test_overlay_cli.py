"""The overlay with real processes: voipd --allow-supernode promotes, voipctl search finds."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from tools.processes import (
    VOIPCTL,
    DaemonProcess,
    LoginServerProcess,
    Processes,
    run,
    start_login_server,
    start_voipd,
)

pytestmark = pytest.mark.integration


def ctl(daemon: DaemonProcess, *args: str, input: str | None = None) -> tuple[int, str, str]:
    result = run(VOIPCTL, "--socket", daemon.socket, *args, input=input)
    assert "Traceback" not in result.stdout + result.stderr
    return result.returncode, result.stdout, result.stderr


def status(daemon: DaemonProcess) -> dict:
    code, out, _ = ctl(daemon, "status", "--json")
    assert code == 0
    return json.loads(out)


def wait_for(condition, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:g} s")
        time.sleep(0.2)


def node(
    processes: Processes, state: Path, server: LoginServerProcess, *extra: str
) -> DaemonProcess:
    return start_voipd(
        processes,
        state,
        "--login-server",
        server.address,
        "--ca",
        server.ca_pub,
        "--interface",
        "127.0.0.1",
        *extra,
    )


def log_in(daemon: DaemonProcess, name: str) -> None:
    password = f"pw-{name}-12345\n"
    assert ctl(daemon, "register", name, "--password-stdin", input=password)[0] == 0
    assert ctl(daemon, "login", name, "--password-stdin", input=password)[0] == 0


def test_supernodes_promote_and_users_find_each_other(
    processes: Processes, login_data: Path, short_dir
) -> None:
    server = start_login_server(processes, login_data, "--min-supernodes", "2")
    # --max-load: a loaded test machine must not make the volunteers decline.
    volunteer = ("--allow-supernode", "--min-uptime", "1", "--heartbeat", "2", "--max-load", "1000")
    sn1 = node(processes, short_dir() / "sn1", server, *volunteer)
    sn2 = node(processes, short_dir() / "sn2", server, *volunteer)
    plain = node(processes, short_dir() / "plain", server)
    wait_for(
        lambda: status(sn1)["supernode"].get("active") and status(sn2)["supernode"].get("active"),
        "both volunteers becoming supernodes",
    )
    assert status(plain)["supernode"] == {"allowed": False}  # never without the flag
    code, out, _ = ctl(sn1, "status")
    assert re.search(r"^Role: supernode, slot 0 of 1, block 0, \d+ attached nodes", out, re.M)

    alice = node(processes, short_dir() / "alice", server)
    log_in(alice, "alice")
    log_in(plain, "bob")
    wait_for(lambda: status(alice)["overlay"]["published_replicas"] > 0, "alice publishing")
    wait_for(lambda: status(plain)["overlay"]["published_replicas"] > 0, "bob publishing")
    code, out, _ = ctl(alice, "status")
    assert re.search(r"^Attached to supernode 127\.0\.0\.1:\d+, RTT \d+ ms\.$", out, re.M)
    assert "Role: ordinary node." in out

    # A record published while the slot was still growing reaches the newest replica within
    # one heartbeat (the older member pushes its records to it when its view shows it).
    wait_for(lambda: "is online" in ctl(alice, "search", "bob")[1], "bob's record at every replica")
    code, out, err = ctl(alice, "search", "bob")
    assert code == 0 and "Searching for bob..." in err
    assert re.fullmatch(
        r"bob is online \(attached to SN 127\.0\.0\.1:\d+\), found in 1 round, \d+ ms\.\n", out
    )
    code, out, _ = ctl(alice, "search", "bob", "--json")
    found = json.loads(out)
    assert (found["schema_version"], found["outcome"], found["status"]) == (1, "found", "online")

    code, out, _ = ctl(alice, "search", "carol")
    assert code == 0
    assert out.startswith("No such user, or carol has not been online in the last 72 h")

    assert ctl(plain, "logout")[0] == 0
    wait_for(lambda: "offline" in ctl(alice, "search", "bob")[1], "bob showing as offline")
    code, out, _ = ctl(alice, "search", "bob")
    assert re.match(r"bob is offline \(last seen just now\), found in 1 round", out)


def test_search_needs_a_login(voipd: DaemonProcess) -> None:
    code, _, err = ctl(voipd, "search", "bob")
    assert code == 1
    assert err.strip().splitlines()[-1] == "voipctl: Not logged in; run 'voipctl login NAME' first."
    code, _, err = ctl(voipd, "search", "x")
    assert code == 1 and "is not a valid username" in err
