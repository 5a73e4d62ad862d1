"""voipctl presence: how others see you, through real voipd processes on 127.0.0.1."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_overlay_cli import ctl, wait_for
from tests.integration.test_relay_call import _overlay
from tools.processes import VOIPCTL, Processes

pytestmark = pytest.mark.integration


def test_presence_is_what_others_find(
    processes: Processes, login_data: Path, short_dir: Any
) -> None:
    _, alice, bob = _overlay(processes, login_data, short_dir, sn_options=(), alice_options=())

    def seen_by_bob() -> dict[str, Any]:
        code, out, _ = ctl(bob, "search", "alice", "--json")
        assert code == 0
        result: dict[str, Any] = json.loads(out)
        return result

    code, out, err = ctl(alice, "presence", "away")
    assert code == 0 and out.strip() == "You now appear away to others.", (out, err)
    wait_for(lambda: seen_by_bob().get("status") == "away", "bob seeing alice away")
    assert "alice is online, away" in ctl(bob, "search", "alice")[1]
    assert "Others see you as away." in ctl(alice, "status")[1]

    assert ctl(alice, "presence", "invisible")[0] == 0
    wait_for(lambda: seen_by_bob()["outcome"] == "offline", "alice appearing offline")
    assert "alice is offline, found in" in ctl(bob, "search", "alice")[1]  # no "last seen now"
    # Invisible, alice can still call out: bob's node answers her ping.
    code, out, err = ctl(alice, "ping", "bob", "-c", "1")
    assert code == 0, err

    assert ctl(alice, "presence", "online")[0] == 0
    wait_for(lambda: seen_by_bob().get("status") == "online", "alice online again")
    code, _, err = ctl(alice, "presence", "asleep")
    assert code == 2 and "invalid choice" in err


def test_buddies_see_presence_changes_within_the_refresh_bound(
    processes: Processes, login_data: Path, short_dir: Any
) -> None:
    refresh = 1.0
    _, alice, bob = _overlay(
        processes,
        login_data,
        short_dir,
        sn_options=(),
        alice_options=(),
        bob_options=("--buddy-refresh", str(refresh)),
    )
    code, out, err = ctl(bob, "buddies")
    assert code == 0 and "No buddies yet" in out, err
    assert ctl(bob, "buddies", "add", "alice")[0] == 0
    wait_for(lambda: re.search(r"^alice\s+online", ctl(bob, "buddies")[1], re.M), "alice online")
    # Once alice's NAT check (public, on loopback) is in her record: direct-capable.
    wait_for(lambda: "(direct-capable)" in ctl(bob, "buddies")[1], "alice direct-capable")
    assert ctl(alice, "presence", "busy")[0] == 0
    started = time.monotonic()
    wait_for(lambda: " busy " in ctl(bob, "buddies")[1] + " ", "bob seeing alice busy", timeout=10)
    # Within the refresh bound, plus a search and the polling of this test.
    assert time.monotonic() - started < refresh + 3.0
    # --watch-for streams each change as one line.
    watching = processes.start(
        "watch", VOIPCTL, "--socket", bob.socket, "buddies", "--watch-for", "6"
    )
    time.sleep(1.0)
    assert ctl(alice, "presence", "away")[0] == 0
    assert watching.wait_exit(20) == 0, watching.describe()
    assert re.search(r"^alice\s+away", watching.stdout, re.M), watching.stdout
    code, out, _ = ctl(bob, "buddies", "--json")
    assert json.loads(out)["buddies"][0]["status"] == "away"
    code, _, err = ctl(bob, "buddies", "add", "bob")
    assert code == 1 and "You cannot add yourself" in err
    assert ctl(bob, "buddies", "remove", "alice")[0] == 0
    code, _, err = ctl(bob, "buddies", "remove", "alice")
    assert code == 1 and "alice is not on your buddy list." in err
