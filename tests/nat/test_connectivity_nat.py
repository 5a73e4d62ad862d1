"""The connectivity checks (client.connectivity) between real processes behind real NATs.

Each side is `python -m tools.checkpeer peer` in its own namespace: one UDP socket, its
reflexive address learned from a reflector on probe1 over that socket, candidates swapped
through this test, then ConnectivityChecker on the real reactor.  Two port-restricted cone NATs
punch through; a public host reaches a symmetric NAT through a peer-reflexive candidate;
symmetric against port-restricted gives NoDirectPath (that call needs the relay).
"""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Callable
from typing import Any

import pytest

from client.candidates import Candidate, format_address
from tools.netlab.lab import Lab
from tools.netlab.probing import read_json_line
from tools.netlab.scenario import NatKind
from tools.netlab.scenarios import PROBE1, pair

BuildLab = Callable[..., Lab]
REFLECTOR = f"{PROBE1.link.address}:3478"
TIMEOUT = 5.0

pytestmark = pytest.mark.nat


def start_reflector(lab: Lab) -> None:
    proc = lab.spawn("probe1", lab.python("tools.checkpeer", "reflect", "--listen", REFLECTOR))
    read_json_line(proc, 10.0, "reflector on probe1")


def check_between(lab: Lab, a: str, b: str) -> dict[str, dict[str, Any]]:
    """Run one side in each of `a` (the caller) and `b`; return each side's last JSON line."""
    start_reflector(lab)
    key, call_id = secrets.token_hex(32), secrets.token_hex(16)
    procs = {
        node: lab.spawn(
            node,
            lab.python(
                "tools.checkpeer", "peer", "--role", role, "--key", key, "--call-id", call_id,
                "--reflector", REFLECTOR, "--timeout", f"{TIMEOUT:g}", "--linger", "1.5",
                "--name", peer,
            ),
            stdin=subprocess.PIPE,
        )
        for node, role, peer in ((a, "controlling", b), (b, "controlled", a))
    }  # fmt: skip
    candidates = {
        node: read_json_line(proc, 10.0, f"checkpeer in {node}")["candidates"]
        for node, proc in procs.items()
    }
    for node, other in ((a, b), (b, a)):
        stdin = procs[node].stdin
        assert stdin is not None
        stdin.write(json.dumps(candidates[other]) + "\n")
        stdin.flush()
    results = {
        node: read_json_line(proc, TIMEOUT + 10.0, f"checkpeer in {node}")
        for node, proc in procs.items()
    }
    for node, proc in procs.items():
        code = proc.wait(10.0)
        assert code == (0 if results[node]["event"] == "selected" else 1), results[node]
        results[node]["candidates"] = candidates[node]
    return results


def assert_same_path(results: dict[str, dict[str, Any]], a: str, b: str) -> None:
    for node, other in ((a, b), (b, a)):
        assert results[node]["event"] == "selected", results
        own = Candidate.from_wire(results[node]["local"])
        assert format_address(own.address) == results[other]["remote"], results


def test_two_port_restricted_cones_select_a_direct_pair(netlab: BuildLab) -> None:
    lab = netlab("two-cones", probes=False)
    results = check_between(lab, "a", "b")
    assert_same_path(results, "a", "b")
    # Both meet on the reflexive addresses exchanged up front (hole punching).
    for node in ("a", "b"):
        assert Candidate.from_wire(results[node]["local"]).kind == "srflx", results
        assert results[node]["remote_kind"] == "srflx", results


def test_a_public_host_reaches_a_symmetric_nat_through_a_peer_reflexive_candidate(
    netlab: BuildLab,
) -> None:
    lab = netlab(pair(None, NatKind.SYMMETRIC, "public-symmetric"), probes=False)
    results = check_between(lab, "a", "b")
    assert_same_path(results, "a", "b")
    assert results["a"]["remote_kind"] == "prflx", results
    srflx_b = [c for c in results["b"]["candidates"] if c[0] == "srflx"]
    assert srflx_b and format_address((srflx_b[0][1], srflx_b[0][2])) != results["a"]["remote"]


def test_symmetric_against_port_restricted_reports_no_direct_path(netlab: BuildLab) -> None:
    lab = netlab("cone-symmetric", probes=False)
    results = check_between(lab, "a", "b")
    for node, peer in (("a", "b"), ("b", "a")):
        assert results[node]["event"] == "failed", results
        assert results[node]["error"].startswith(f"No direct path to {peer}'s node: "), results
