"""Plain UDP hole punching between hosts behind NATs does what theory says (the lab's own probe,
not the product): both port-restricted cones meet; a symmetric NAT defeats a port-restricted
one; a full cone meets anything that can send UDP."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tools.netlab import probing
from tools.netlab.lab import Lab
from tools.netlab.scenario import NatKind
from tools.netlab.scenarios import pair

BuildLab = Callable[..., Lab]

pytestmark = pytest.mark.nat


def test_two_port_restricted_cones_punch_through(netlab: BuildLab) -> None:
    lab = netlab("two-cones")
    result = probing.punch(lab, "a", "b")
    assert result.success, result
    # Endpoint-independent mapping: each side is reached at the mapping probe1 saw.
    assert result.peer_seen == ([result.mapped[1]], [result.mapped[0]])


def test_symmetric_and_port_restricted_cannot_punch(netlab: BuildLab) -> None:
    lab = netlab("cone-symmetric")
    result = probing.punch(lab, "a", "b", duration=2.0)
    assert result.received == (False, False), result


def test_two_symmetric_nats_cannot_punch(netlab: BuildLab) -> None:
    lab = netlab("two-symmetric")
    result = probing.punch(lab, "a", "b", duration=2.0)
    assert result.received == (False, False), result


@pytest.mark.parametrize(
    "other",
    [NatKind.FULL_CONE, NatKind.PORT_RESTRICTED, NatKind.SYMMETRIC, None],
    ids=["full-cone", "port-restricted", "symmetric", "public"],
)
def test_full_cone_punches_through_to_anything(netlab: BuildLab, other: NatKind | None) -> None:
    lab = netlab(pair(NatKind.FULL_CONE, other))
    result = probing.punch(lab, "a", "b")
    assert result.success, result


def test_punching_survives_delay_jitter_and_loss(netlab: BuildLab) -> None:
    lab = netlab("two-cones-lossy")
    result = probing.punch(lab, "a", "b")
    assert result.success, result
