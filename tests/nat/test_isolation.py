"""The lab cannot reach the real network: no default routes, no interfaces in the root
namespace, forwarding only in routers, unreachable errors for any other address."""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest

from tools.netlab.command import Command, run
from tools.netlab.lab import Lab
from tools.netlab.scenario import Router

BuildLab = Callable[..., Lab]

pytestmark = pytest.mark.nat

SEND_OUTSIDE = (
    "import socket\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "try:\n"
    "    s.sendto(b'x', ('192.0.2.1', 9))\n"  # TEST-NET-1: not a lab address
    "except OSError as e:\n"
    "    print(e.errno)\n"
)


def test_no_route_leads_out_of_the_lab(netlab: BuildLab) -> None:
    root_links_before = run(Command(("ip", "-o", "link", "show")))
    lab = netlab("all", probes=False)
    assert run(Command(("ip", "-o", "link", "show"))) == root_links_before
    for node in lab.scenario.nodes:
        routes = lab.exec(node.name, ["ip", "-4", "route", "show", "table", "all"]).stdout
        assert "default" not in routes, (node.name, routes)
        forward = lab.exec(node.name, ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip()
        assert forward == ("1" if isinstance(node, Router) else "0"), node.name
    for name in ("pub", "prc", "cg"):
        sent = lab.exec(name, [sys.executable, "-c", SEND_OUTSIDE])
        assert sent.stdout.strip() == "101", (name, sent)  # ENETUNREACH: nothing was sent
