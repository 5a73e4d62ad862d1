"""Driving the probe (probe.py) in a running lab: start the probe servers, run a client in a node,
read its JSON answer. Every wait is bounded; every process goes through `Lab.spawn`, so the lab
stops it at teardown even when a caller forgets.
"""

from __future__ import annotations

import json
import secrets
import select
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

from tools.netlab.command import LabError
from tools.netlab.lab import Lab
from tools.netlab.probe_wire import ALT_PORT, PROBE_PORT
from tools.netlab.scenarios import PROBE1, PROBE2

PROBE_MODULE = "tools.netlab.probe"
SERVER1 = f"{PROBE1.link.address}:{PROBE_PORT}"
SERVER2 = f"{PROBE2.link.address}:{PROBE_PORT}"


class ProbeError(LabError):
    """The lab's probe did not answer as expected."""


def read_json_line(proc: subprocess.Popen[str], timeout: float, what: str) -> dict[str, Any]:
    """The next JSON line `proc` prints, within `timeout` seconds."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([proc.stdout], [], [], left)
        if not readable:
            break
        line = proc.stdout.readline()
        if not line:
            break
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict):
            return cast(dict[str, Any], data)
    err = ""
    if proc.poll() is not None and proc.stderr is not None:
        err = ": " + " ".join(proc.stderr.read().split())
    raise ProbeError(f"{what} gave no answer within {timeout:.0f} s{err}")


def run_probe(lab: Lab, node: str, *args: str, timeout: float) -> dict[str, Any]:
    """Run one probe client in `node` to completion; return its JSON answer."""
    proc = lab.spawn(node, lab.python(PROBE_MODULE, *args))
    try:
        return read_json_line(proc, timeout, f"probe {args[0]} in {node}")
    finally:
        lab.stop(proc)


@contextmanager
def probe_servers(lab: Lab) -> Iterator[None]:
    """Run the two probe servers (on probe1 and probe2) for the duration of the block."""
    procs = []
    try:
        for host, peer in ((PROBE1, PROBE2), (PROBE2, PROBE1)):
            proc = lab.spawn(
                host.name,
                lab.python(
                    PROBE_MODULE, "server", "--address", host.link.address,
                    "--peer", f"{peer.link.address}:{PROBE_PORT}",
                ),
            )  # fmt: skip
            procs.append(proc)
            read_json_line(proc, 5.0, f"probe server on {host.name}")
        yield
    finally:
        for proc in procs:
            lab.stop(proc)


def nat_test(lab: Lab, node: str) -> dict[str, Any]:
    """Mapping and filtering behaviour seen from `node` (probe servers must be running)."""
    args = ("nat-test", "--server", SERVER1, "--alt-port", str(ALT_PORT), "--server2", SERVER2)
    return run_probe(lab, node, *args, timeout=20.0)


def rtt(lab: Lab, node: str, count: int = 10) -> dict[str, Any]:
    return run_probe(lab, node, "rtt", "--server", SERVER1, "--count", str(count),
                     timeout=5.0 + 1.1 * count)  # fmt: skip


def answer_rate(lab: Lab, node: str, count: int = 200) -> float:
    """The share of `count` quick requests from `node` to probe1 that got an answer."""
    got = run_probe(lab, node, "burst", "--server", SERVER1, "--count", str(count),
                    timeout=10.0 + 0.01 * count)  # fmt: skip
    return int(got["received"]) / count


def late_reply(lab: Lab, node: str, delay: float) -> bool:
    """Does an answer sent `delay` s after a single outbound packet still reach `node`?"""
    got = run_probe(lab, node, "late", "--server", SERVER1, "--delay", f"{delay:g}",
                    timeout=delay + 10.0)  # fmt: skip
    return bool(got["received"])


@dataclass(frozen=True)
class PunchResult:
    """A hole punching attempt between two nodes, each punching toward the other's mapping."""

    mapped: tuple[str | None, str | None]
    received: tuple[bool, bool]
    peer_seen: tuple[list[str], list[str]]

    @property
    def success(self) -> bool:
        return all(self.received)


def punch(lab: Lab, a: str, b: str, duration: float = 3.0) -> PunchResult:
    """Both nodes learn their mapping from probe1, swap them, and punch for up to `duration`."""
    session = secrets.token_hex(4)
    procs = [
        lab.spawn(
            node,
            lab.python(
                PROBE_MODULE,
                "punch",
                "--server",
                SERVER1,
                "--session",
                session,
                "--side",
                node,
                "--duration",
                f"{duration:g}",
            ),
            stdin=subprocess.PIPE,
        )
        for node in (a, b)
    ]
    try:
        mapped = [
            read_json_line(p, 8.0, f"punch in {n}")["mapped"]
            for p, n in zip(procs, (a, b), strict=True)
        ]
        if None in mapped:
            raise ProbeError(f"punch: no mapping from probe1 ({a}: {mapped[0]}, {b}: {mapped[1]})")
        for proc, peer in zip(procs, reversed(mapped), strict=True):
            assert proc.stdin is not None
            proc.stdin.write(f"{peer}\n")
            proc.stdin.flush()
        results = [
            read_json_line(p, duration + 5.0, f"punch in {n}")
            for p, n in zip(procs, (a, b), strict=True)
        ]
    finally:
        for proc in procs:
            lab.stop(proc)
    return PunchResult(
        mapped=(mapped[0], mapped[1]),
        received=(bool(results[0]["received"]), bool(results[1]["received"])),
        peer_seen=(list(results[0]["peer_seen"]), list(results[1]["peer_seen"])),
    )
