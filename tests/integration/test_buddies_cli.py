"""voipctl buddies and verify through real voipd processes on 127.0.0.1.

tests/integration/test_presence_cli.py covers away/busy, the refresh bound and ``--watch``;
here: a buddy going invisible and logging out is seen offline, the buddy's key is pinned by the
polling, and ``verify`` prints the same safety number on both sides.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_overlay_cli import ctl, wait_for
from tests.integration.test_relay_call import _overlay
from tools.processes import Processes

pytestmark = pytest.mark.integration

SAFETY_NUMBER = re.compile(r"(?:\d{5} ){11}\d{5}")


def test_a_buddy_seen_online_invisible_and_logged_out_and_verified(
    processes: Processes, login_data: Path, short_dir: Any
) -> None:
    sn, alice, bob = _overlay(
        processes,
        login_data,
        short_dir,
        sn_options=(),
        alice_options=("--buddy-refresh", "1"),
    )
    code, _, err = ctl(sn, "buddies")  # the supernode's own daemon is not logged in
    assert code == 1 and "Not logged in" in err, err

    assert ctl(alice, "buddies", "add", "bob")[0] == 0

    def bob_line() -> str:
        code, out, err = ctl(alice, "buddies")
        assert code == 0, err
        return next((line for line in out.splitlines() if line.startswith("bob ")), "")

    wait_for(lambda: re.match(r"bob\s+online", bob_line()), "alice seeing bob online")
    # The polling pinned bob's key; verify shows it, the same number on both sides.
    code, mine, err = ctl(alice, "verify", "bob")
    assert code == 0 and "the same as first seen" in mine, (mine, err)
    code, theirs, err = ctl(bob, "verify", "alice")
    assert code == 0 and "pinned now (first seen)" in theirs, (theirs, err)
    number = SAFETY_NUMBER.findall(mine)
    assert len(number) == 1 and number == SAFETY_NUMBER.findall(theirs), (mine, theirs)
    code, _, err = ctl(alice, "verify", "nobody")
    assert code == 1 and "No key known for nobody" in err, err

    assert ctl(bob, "presence", "invisible")[0] == 0
    wait_for(lambda: re.match(r"bob\s+offline", bob_line()), "bob appearing offline", timeout=10)
    assert "direct-capable" not in bob_line()
    assert ctl(bob, "presence", "online")[0] == 0
    wait_for(lambda: re.match(r"bob\s+online", bob_line()), "bob online again", timeout=10)

    assert ctl(bob, "logout")[0] == 0
    wait_for(lambda: re.match(r"bob\s+offline", bob_line()), "bob logged out", timeout=10)
    assert "last seen now" in bob_line()
    assert "KEY CHANGED" not in bob_line()
