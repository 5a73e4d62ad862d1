"""voipctl presence: how others see you, through real voipd processes on 127.0.0.1."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_overlay_cli import ctl, wait_for
from tests.integration.test_relay_call import _overlay
from tools.processes import Processes

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
    assert "alice is offline" in ctl(bob, "search", "alice")[1]
    # Invisible, alice can still call out: bob's node answers her ping.
    code, out, err = ctl(alice, "ping", "bob", "-c", "1")
    assert code == 0, err

    assert ctl(alice, "presence", "online")[0] == 0
    wait_for(lambda: seen_by_bob().get("status") == "online", "alice online again")
    code, _, err = ctl(alice, "presence", "asleep")
    assert code == 2 and "invalid choice" in err
