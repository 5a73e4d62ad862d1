"""Only nodes the world can reach become supernodes (real daemons in the NAT lab).

Volunteers (``voipd --allow-supernode``) behind a port-restricted and behind a symmetric NAT
apply, and the login server, connecting back to the address it saw them come from, cannot
reach them: each is refused, and ``voipctl status`` says why.  A public volunteer beside them
is admitted.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tools.netlab.lab import Lab
from tools.netlab.scenario import WAN, Host, Link, NatKind, Router, Scenario
from tools.processes import (
    LOGIN_SERVER,
    SERVING,
    VOIPCTL,
    VOIPD,
    VOIPD_READY,
    Process,
    Processes,
    init_login_data,
    run,
)

BuildLab = Callable[..., Lab]

pytestmark = pytest.mark.nat

LOGIN_HOST = "203.0.113.10"
LOGIN_PORT = 7000
#: Where each volunteer's traffic comes from, as the login server sees it.
OUTSIDE = {"pub": "203.0.113.11", "prc": "203.0.113.22", "sym": "198.51.100.23"}

SCENARIO = Scenario(
    "sn-behind-nat",
    "a login server and a volunteer on the wan; volunteers behind a port-restricted and "
    "behind a symmetric NAT",
    routers=(
        Router("nat-prc", Link(WAN, OUTSIDE["prc"]), "198.18.2.0/24", NatKind.PORT_RESTRICTED),
        Router("nat-sym", Link(WAN, OUTSIDE["sym"]), "198.18.3.0/24", NatKind.SYMMETRIC),
    ),
    hosts=(
        Host("login", Link(WAN, LOGIN_HOST)),
        Host("pub", Link(WAN, OUTSIDE["pub"])),
        Host("prc", Link("nat-prc", "198.18.2.10")),
        Host("sym", Link("nat-sym", "198.18.3.10")),
    ),
)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short directory under /tmp (unix socket paths are short), removed afterwards."""
    path = Path(tempfile.mkdtemp(dir="/tmp", prefix="vn-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def group(netlab: BuildLab, workdir: Path) -> Iterator[Processes]:
    """The programs a test starts, stopped by PID before the lab is torn down."""
    started = Processes(workdir / "logs")
    try:
        yield started
    finally:
        started.stop_all()


def status(daemon: Process) -> dict[str, Any]:
    assert daemon.match is not None
    result = run(VOIPCTL, "--socket", daemon.match["socket"], "status", "--json")
    assert result.returncode == 0, result
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:g} s")
        time.sleep(0.2)


def test_volunteers_behind_nats_are_refused_and_a_public_one_is_admitted(
    netlab: BuildLab, group: Processes, workdir: Path
) -> None:
    lab = netlab(SCENARIO, probes=False)
    data = init_login_data(workdir / "ls")
    server = group.start_in_namespace(
        lab.namespace("login"),
        "login-server",
        LOGIN_SERVER,
        "run",
        "--data",
        data,
        "--port",
        str(LOGIN_PORT),
        "--interface",
        LOGIN_HOST,
        "--hash-cost",
        "min",
        "--min-supernodes",
        "5",  # the overlay wants every volunteer it can reach
        ready=SERVING,
    )
    daemons = {
        name: group.start_in_namespace(
            lab.namespace(name),
            f"voipd-{name}",
            VOIPD,
            "--state",
            workdir / name,
            "--login-server",
            f"{LOGIN_HOST}:{LOGIN_PORT}",
            "--ca",
            data / "ca.pub",
            "--allow-supernode",
            "--min-uptime",
            "1",
            "--max-load",
            "1000",  # whatever else keeps the test machine busy
            ready=VOIPD_READY,
        )
        for name in OUTSIDE
    }

    def decided(name: str) -> bool:
        role = status(daemons[name])["supernode"]
        return bool(role.get("active") or (role.get("refusal") or "").startswith("The login"))

    wait_for(lambda: all(decided(name) for name in OUTSIDE), "every application decided")

    public = status(daemons["pub"])["supernode"]
    assert public["active"] is True and public["refusal"] is None, public
    for name in ("prc", "sym"):
        role = status(daemons[name])["supernode"]
        assert role["active"] is False, (name, role)
        # The login server connected back to the NAT's address, where nothing answers.
        assert re.fullmatch(
            rf"The login server could not reach {re.escape(OUTSIDE[name])}:(\d+) from outside "
            r"\(TCP port \1: no answer\); only reachable nodes become supernodes\.",
            role["refusal"],
        ), (name, role)
        assert daemons[name].match is not None
        shown = run(VOIPCTL, "--socket", daemons[name].match["socket"], "status")
        assert "Role: ordinary node (may become a supernode; The login server could not reach" in (
            shown.stdout
        ), shown
    # The login server admitted exactly the public volunteer.
    admitted = re.findall(r"admitted supernode sn-\S+ at ([\d.]+):", server.stderr)
    assert admitted == [OUTSIDE["pub"]], server.stderr
