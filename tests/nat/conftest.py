"""Fixtures for NAT lab tests (docs/netlab.md).

`netlab` builds scenarios for one test and always tears them down: when the test passes, fails,
raises, or is interrupted (Ctrl-C, or SIGTERM, which is turned into the same interrupt so that
pytest's teardown runs). Tests that use it are skipped, with the reason, when the machine cannot
run the lab (not root, no `ip netns`, no iptables/nft); they never pass silently.

    @pytest.mark.nat
    def test_something(netlab):
        lab = netlab("two-cones")          # a built-in name, or a Scenario
        result = probing.punch(lab, "a", "b")
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from types import FrameType

import pytest

from tools.netlab import probing
from tools.netlab.lab import Lab, preflight, remove_stale
from tools.netlab.scenario import Scenario
from tools.netlab.scenarios import PROBES, builtin

BuildLab = Callable[..., Lab]


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="session")
def netlab_host() -> Iterator[None]:
    """The machine can run the lab; stale `vnl-` namespaces of an earlier run are gone."""
    problems = preflight()
    if problems:
        pytest.skip("NAT lab unavailable: " + "; ".join(problems))
    stale = remove_stale()
    if stale:
        print(f"\nnetlab: removed {len(stale)} stale namespaces: {' '.join(stale)}")
    try:
        yield
    finally:
        remove_stale()  # the safety net: nothing of the lab outlives the session


@pytest.fixture
def netlab(netlab_host: None) -> Iterator[BuildLab]:
    """A factory: `netlab(scenario_or_name, probes=None) -> Lab`, built now, torn down after
    the test. With `probes` (default: when the scenario has probe1 and probe2), the two probe
    servers run while the test runs."""
    with contextlib.ExitStack() as stack:

        def build(scenario: Scenario | str, *, probes: bool | None = None) -> Lab:
            # pytest-twisted runs each test inside the reactor, which installs its own SIGTERM
            # handler (it only stops the reactor) when it first runs; so ours goes in here, in
            # the test body, and the previous one comes back after teardown.
            previous = signal.getsignal(signal.SIGTERM)
            if previous is not _interrupt:
                signal.signal(signal.SIGTERM, _interrupt)
                restore = signal.SIG_DFL if previous is None else previous
                stack.callback(signal.signal, signal.SIGTERM, restore)
            chosen = builtin(scenario) if isinstance(scenario, str) else scenario
            if probes is None:
                probes = all(p in chosen.hosts for p in PROBES)
            lab = stack.enter_context(Lab(chosen))
            if probes:
                stack.enter_context(probing.probe_servers(lab))
            return lab

        yield build
