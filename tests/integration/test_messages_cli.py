"""voipctl msg and inbox through real voipd processes on 127.0.0.1: three supernodes (one slot
of three), alice and bob.  A message to bob online is delivered at once and its receipt comes
back; three messages while bob is logged out are queued at the slot, the supernode alice sent
them through is killed, and bob's next login still gets all three, once each, in order."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_overlay_cli import ctl, log_in, node, status, wait_for
from tests.integration.test_relay_call import VOLUNTEER
from tools.processes import DaemonProcess, Processes, start_login_server

pytestmark = pytest.mark.integration


def inbox(daemon: DaemonProcess, *extra: str) -> list[dict[str, Any]]:
    code, out, err = ctl(daemon, "inbox", "--json", *extra)
    assert code == 0, err
    document = json.loads(out)
    assert document["schema_version"] == 1
    return list(document["sent" if "--sent" in extra else "messages"])


def texts(daemon: DaemonProcess) -> list[str]:
    return [m["text"] for m in inbox(daemon)]


def test_messages_online_then_held_through_a_dead_supernode(
    processes: Processes, login_data: Path, short_dir: Any
) -> None:
    server = start_login_server(processes, login_data, "--min-supernodes", "3")
    sns = [node(processes, short_dir() / f"sn{i}", server, *VOLUNTEER) for i in range(3)]
    wait_for(
        lambda: all(status(sn)["supernode"].get("active") for sn in sns),
        "three volunteers becoming supernodes",
    )
    alice = node(processes, short_dir() / "alice", server)
    bob = node(processes, short_dir() / "bob", server)
    code, _, err = ctl(alice, "msg", "bob", "hi")
    assert code == 1 and "Not logged in" in err, err
    log_in(alice, "alice")
    log_in(bob, "bob")
    for daemon in (alice, bob):
        wait_for(lambda d=daemon: status(d)["overlay"]["published_replicas"] >= 3, "publishing")
    wait_for(lambda: "is online" in ctl(alice, "search", "bob")[1], "bob being findable")

    # Online: delivered at once, and the receipt marks it delivered on alice's side.
    code, out, err = ctl(alice, "msg", "bob", "are you free?")
    assert (code, out) == (0, "Delivered to bob.\n"), err
    assert texts(bob) == ["are you free?"]
    assert inbox(bob)[0]["from"] == "alice" and not inbox(bob)[0]["key_changed"]
    code, out, _ = ctl(bob, "inbox")
    assert out.endswith("  alice: are you free?\n")
    wait_for(lambda: inbox(alice, "--sent")[0]["state"] == "delivered", "the receipt", 10)

    code, _, err = ctl(alice, "msg", "bob", "x" * 501)
    assert code == 1 and "too long: 501 bytes; at most 500" in err, err
    code, _, err = ctl(alice, "msg", "nobody", "hello?")
    assert code == 1 and "No such user, or nobody has not been online" in err, err

    # Offline: held at the slot.
    assert ctl(bob, "logout")[0] == 0
    wait_for(lambda: "offline" in ctl(alice, "search", "bob")[1], "bob showing as offline")
    for i in (1, 2, 3):
        code, out, err = ctl(alice, "msg", "bob", f"queued {i}")
        assert (code, out) == (0, "bob is offline: queued; delivered at bob's next login.\n"), err
    held = [(status(sn)["supernode"].get("ports") or {}).get("tcp") for sn in sns]
    # The supernode alice sent them through dies: the other replicas still hold them.
    port = status(alice)["overlay"]["supernode"]["port"]
    victim = sns[held.index(port)]
    victim.process.signal(signal.SIGKILL)
    victim.process.wait_exit()

    code, _, err = ctl(bob, "login", "bob", "--password-stdin", input="pw-bob-12345\n")
    assert code == 0, err
    wait_for(lambda: len(texts(bob)) >= 4, "the held messages reaching bob", 15)
    assert texts(bob) == ["are you free?", "queued 1", "queued 2", "queued 3"]
    # A later collect (each publish, or another login) does not show them again.
    assert ctl(bob, "presence", "away")[0] == 0
    wait_for(lambda: status(bob)["overlay"]["published_replicas"] >= 2, "republishing")
    assert texts(bob) == ["are you free?", "queued 1", "queued 2", "queued 3"]
    wait_for(
        lambda: [m["state"] for m in inbox(alice, "--sent")] == ["delivered"] * 4,
        "receipts for the held messages",
        15,
    )
    code, out, _ = ctl(bob, "inbox", "--clear")
    assert code == 0 and "queued 3" in out
    assert texts(bob) == []
