"""Smoke test of the relay load benchmark (``tools/bench/relay_load.py``) in its smallest form.

Two calls for two seconds through our relay (and coturn's when it is installed) and the direct
baseline, as a real program: it must print its side-by-side table and write figures that make
sense (every path sent and received packets, loss is a percentage, CPU was read).  No timing or
speed figure is asserted: a benchmark reports, it does not judge.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools.bench.relay_load import (
    DATAGRAM,
    PAD,
    STAMP,
    Run,
    percentile,
    process_cpu,
    report,
    sustained,
    udp_drops,
)
from tools.coturn import turnserver_installed
from tools.processes import run

pytestmark = pytest.mark.integration


def test_smallest_run_prints_the_table_and_sane_figures(tmp_path: Path) -> None:
    figures = tmp_path / "figures.json"
    relay = "both" if turnserver_installed() else "ours"
    result = run(
        "tools.bench.relay_load",
        "--calls",
        "2",
        "--seconds",
        "2",
        "--relay",
        relay,
        "--json",
        figures,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "cpu%/c  loss%    p50     p99" in result.stdout
    assert "Largest N with under 1 % loss" in result.stdout
    document = json.loads(figures.read_text())
    assert document["schema_version"] == 1
    paths = {r["path"] for r in document["runs"]}
    assert paths == ({"ours", "coturn", "direct"} if relay == "both" else {"ours", "direct"})
    for figures_of_run in document["runs"]:
        assert figures_of_run["calls"] == 2
        assert figures_of_run["sent"] > 0
        assert 0 < figures_of_run["received"] <= figures_of_run["sent"]
        assert 0.0 <= figures_of_run["loss_pct"] <= 100.0
        assert figures_of_run["delay_p50_ms"] <= figures_of_run["delay_p99_ms"]
        assert figures_of_run["relay_cpu_s"] >= 0.0
    relayed = [r for r in document["runs"] if r["path"] != "direct"]
    assert all(r["relay_cpu_s"] > 0.0 for r in relayed), "the relay's CPU was not read"


def test_the_largest_sustained_n_stops_at_the_first_lossy_step() -> None:
    runs = [
        Run("ours", 10, 1.0, 1, sent=100, received=100, loss_pct=0.0),
        Run("ours", 25, 1.0, 1, sent=100, received=98, loss_pct=2.0),
        Run("ours", 50, 1.0, 1, sent=100, received=100, loss_pct=0.0),
        Run("coturn", 10, 1.0, 1, sent=100, received=100, loss_pct=0.5),
    ]
    assert sustained(runs, "ours") == (10, True)
    assert sustained(runs, "coturn") == (10, False)
    text = report(runs, ["ours", "coturn"])
    assert "  ours    10" in text
    assert "  coturn  >=10" in text


def test_packets_are_voice_sized_and_helpers_read_this_machine() -> None:
    assert DATAGRAM == 104 and STAMP.size + len(PAD) == 100
    assert percentile([], 0.5) != percentile([], 0.5)  # nan: no samples
    assert percentile(list(range(100)), 0.99) == 99.0
    assert process_cpu(0) == 0.0
    import os

    assert process_cpu(os.getpid()) > 0.0
    assert udp_drops() >= 0
