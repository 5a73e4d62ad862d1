"""Each NAT kind behaves as claimed, in RFC 4787 terms, on real kernels (one test per kind)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tools.netlab import probing, selfcheck
from tools.netlab.lab import Lab
from tools.netlab.scenario import Host, Impairment, Link, Scenario
from tools.netlab.scenarios import KIND_SCENARIOS, PROBES

BuildLab = Callable[..., Lab]

pytestmark = pytest.mark.nat


@pytest.mark.parametrize("kind", selfcheck.KINDS)
def test_nat_kind_behaves_as_claimed(netlab: BuildLab, kind: str) -> None:
    lab = netlab(KIND_SCENARIOS[kind])
    result = selfcheck.check(lab, selfcheck.CLAIM_BY_KIND[kind])
    assert result.ok, result.line()


def test_a_delayed_link_adds_its_delay_in_each_direction(netlab: BuildLab) -> None:
    slow = Host("slow", Link("wan", "203.0.113.11", Impairment(delay_ms=30.0)))
    lab = netlab(Scenario("slow-link", "one delayed public host", hosts=(*PROBES, slow)))
    result = selfcheck.check_impairment(lab, "slow")
    assert result.ok, result.line()


def test_jitter_spreads_round_trip_times(netlab: BuildLab) -> None:
    jittery = Host("jit", Link("wan", "203.0.113.12", Impairment(delay_ms=20.0, jitter_ms=10.0)))
    lab = netlab(Scenario("jitter", "one jittery public host", hosts=(*PROBES, jittery)))
    samples = probing.rtt(lab, "jit", count=20)["rtt_ms"]
    assert len(samples) == 20
    assert min(samples) >= 20.0 and max(samples) <= 60.0 + 15.0, samples
    assert max(samples) - min(samples) >= 5.0, samples


def test_loss_drops_packets_in_each_direction(netlab: BuildLab) -> None:
    lossy = Host("lossy", Link("wan", "203.0.113.13", Impairment(loss_pct=30.0)))
    lab = netlab(Scenario("lossy", "one lossy public host", hosts=(*PROBES, lossy)))
    rate = probing.answer_rate(lab, "lossy", count=200)
    # A request and its answer each survive with p = 0.7: 0.49 expected, +-5 standard deviations.
    assert 0.31 <= rate <= 0.67, rate
