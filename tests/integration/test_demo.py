"""The README's main job: the demo places a real call and reports what happened."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from tools.processes import module_argv, program_env

pytestmark = pytest.mark.integration


def run_demo(*args: str) -> Any:
    return subprocess.run(
        module_argv("tools.demo", "--json", *args),
        env=program_env(),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_the_demo_through_the_nat_lab_relays_a_call_between_two_nats() -> None:
    """What ``tools/demo`` does as root: alice behind a port-restricted cone, bob behind a
    symmetric NAT, so the call is relayed by a supernode."""
    from tools.demo_nat import lab_available

    problems = lab_available()
    if problems:
        pytest.skip("NAT lab unavailable: " + "; ".join(problems))
    result = run_demo("--mode", "lab")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["ok"] and summary["mode"] == "lab"
    assert summary["call"]["path"].startswith("relay ") and summary["call"]["relay"]
    assert min(summary["call"]["pesq_wb"].values()) >= 3.5
    for line in (
        "NAT: cone NAT",
        "NAT: symmetric NAT",
        "user-bob is online",
        "Reply from user-bob over relay",
        "alice: call with user-bob ended: You hung up.",
        "why: ",
        "all processes stopped",
    ):
        assert line in result.stdout, line
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    assert "vnl-" not in listed.stdout  # every namespace of the lab is gone


def test_the_demo_places_a_real_call() -> None:
    result = run_demo("--mode", "loopback")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["ok"] and summary["stayed_logged_in"] and summary["mode"] == "loopback"
    assert summary["call"]["path"].startswith("direct")
    assert min(summary["call"]["pesq_wb"].values()) >= 3.5
    for line in ("Ringing bob...", "Connected to bob (direct", "Call with bob ended: You hung up."):
        assert line in result.stdout
    assert "Wrong password for alice." in result.stdout
    assert "all processes stopped" in result.stdout
