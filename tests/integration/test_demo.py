"""The README's main job: the demo places a real call and reports what happened."""

from __future__ import annotations

import json

import pytest

from tools.processes import module_argv, program_env

pytestmark = pytest.mark.integration


def test_the_demo_places_a_real_call() -> None:
    import subprocess

    result = subprocess.run(
        module_argv("tools.demo", "--json"),
        env=program_env(),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["ok"] and summary["stayed_logged_in"]
    assert summary["call"]["path"].startswith("direct")
    assert min(summary["call"]["pesq_wb"].values()) >= 3.5
    for line in ("Ringing bob...", "Connected to bob (direct", "Call with bob ended: You hung up."):
        assert line in result.stdout
    assert "Wrong password for alice." in result.stdout
    assert "all processes stopped" in result.stdout
