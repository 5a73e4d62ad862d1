"""UDP mapping timeouts are set per router: conntrack's UDP timeouts are per network namespace."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest

from tools.netlab import probing
from tools.netlab.command import Command, run
from tools.netlab.lab import Lab
from tools.netlab.scenario import NatKind
from tools.netlab.scenarios import pair

BuildLab = Callable[..., Lab]

pytestmark = pytest.mark.nat

UDP_TIMEOUT = "net.netfilter.nf_conntrack_udp_timeout"


def _sysctl(lab: Lab | None, node: str, key: str) -> str:
    argv = ("sysctl", "-n", key)
    if lab is None:
        return run(Command(argv)).strip()
    return lab.exec(node, argv).stdout.strip()


def test_a_short_udp_timeout_closes_only_that_routers_mappings(netlab: BuildLab) -> None:
    root_before = _sysctl(None, "", UDP_TIMEOUT)
    scenario = pair(NatKind.PORT_RESTRICTED, NatKind.PORT_RESTRICTED, "timeouts")
    nat_a = replace(scenario.routers[0], udp_timeout_s=1, udp_stream_timeout_s=5)
    lab = netlab(replace(scenario, routers=(nat_a, scenario.routers[1])))

    assert _sysctl(lab, "nat-a", UDP_TIMEOUT) == "1"
    assert _sysctl(lab, "nat-a", UDP_TIMEOUT + "_stream") == "5"
    assert _sysctl(lab, "nat-b", UDP_TIMEOUT) == "30"  # a new namespace starts at the default
    assert _sysctl(None, "", UDP_TIMEOUT) == root_before  # the host is untouched

    # One packet out, the answer 2.5 s later: nat-a (1 s) has forgotten the mapping,
    # nat-b (30 s) still lets the answer in.
    assert probing.late_reply(lab, "a", 2.5) is False
    assert probing.late_reply(lab, "b", 2.5) is True
    assert probing.late_reply(lab, "a", 0.2) is True
