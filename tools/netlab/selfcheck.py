"""The lab proves its NATs: for each kind, what the probe observes must equal what we claim.

Mapping (RFC 4787 section 4.1): the host sends from one socket to probe1, to probe1's other port
and to probe2; the same external address:port for all three is endpoint-independent, one per
server address is address-dependent, one per address and port is address-and-port-dependent.
Filtering (section 5): from a fresh socket the host sends to probe1 only; then probe2 (another
address) and probe1's other port send to its mapping. Whoever gets in tells the filtering.
Hairpinning (section 6): two hosts behind one NAT punch toward each other's external mapping.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from tools.netlab import probing
from tools.netlab.lab import Lab
from tools.netlab.probe_wire import APDM, EIM, NO_NAT, parse_addr
from tools.netlab.scenario import Scenario
from tools.netlab.scenarios import BUILTIN, KIND_SCENARIOS, SLOW_HOST

Value = str | bool | None
EIF = EIM  # the same RFC 4787 words for filtering
APDF = APDM
RTT_SLACK_MS = 25.0


@dataclass(frozen=True)
class Claim:
    """What one NAT kind must look like from `node` (and, for hairpinning, from `peer`)."""

    kind: str
    node: str
    expect: dict[str, Value]
    peer: str | None = None
    rfc4787: str = ""


CLAIMS: tuple[Claim, ...] = (
    Claim("public", "pub", {"mapping": NO_NAT, "filtering": EIF, "tcp": True},
          rfc4787="no NAT: the host's own address is public; nothing filters"),
    Claim("full-cone", "fc", {"mapping": EIM, "filtering": EIF, "tcp": True},
          rfc4787="endpoint-independent mapping and filtering"),
    Claim("port-restricted", "prc", {"mapping": EIM, "filtering": APDF, "tcp": True},
          rfc4787="endpoint-independent mapping, address-and-port-dependent filtering"),
    Claim("symmetric", "sym", {"mapping": APDM, "filtering": APDF, "tcp": True},
          rfc4787="address-and-port-dependent mapping and filtering"),
    Claim("udp-blocked", "blk", {"udp": False, "tcp": True},
          rfc4787="no UDP at all; TCP is translated like port-restricted"),
    Claim("cgn", "cg", {"mapping": EIM, "filtering": APDF, "tcp": True},
          rfc4787="two port-restricted NATs in a row: still EIM/APDF, seen from the CGN's address"),
    Claim("same-nat", "s1", {"mapping": EIM, "filtering": APDF, "hairpin": False}, peer="s2",
          rfc4787="two hosts behind one port-restricted NAT without hairpinning"),
    Claim("same-nat-hairpin", "h1",
          {"mapping": EIM, "filtering": APDF, "hairpin": True, "hairpin_source": "external"},
          peer="h2", rfc4787="hairpinning, with the sender's external address as source (REQ-9)"),
)  # fmt: skip
CLAIM_BY_KIND = {c.kind: c for c in CLAIMS}
KINDS = tuple(c.kind for c in CLAIMS)


@dataclass(frozen=True)
class Result:
    kind: str
    expect: dict[str, Value]
    observed: dict[str, Value]
    detail: str = ""
    error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    summary: str = ""  # replaces the key=value list in the printed line

    @property
    def ok(self) -> bool:
        return not self.error and all(self.observed.get(k) == v for k, v in self.expect.items())

    def line(self) -> str:
        shown = self.summary or " ".join(
            f"{k}={_word(k, self.observed.get(k))}" for k in self.expect
        )
        text = f"{'ok' if self.ok else 'FAIL':<4} {self.kind:<17} {shown}"
        if self.error:
            text += f"  error: {self.error}"
        elif not self.ok:
            claimed = " ".join(f"{k}={_word(k, v)}" for k, v in self.expect.items())
            text += f"  (claimed {claimed})"
        return text + (f"  [{self.detail}]" if self.detail else "")

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "ok": self.ok,
            "claimed": self.expect,
            "observed": self.observed,
            "detail": self.detail,
            "error": self.error or None,
            **self.extra,
        }


def _word(key: str, value: Value) -> str:
    if isinstance(value, bool):
        if key in ("udp", "tcp"):
            return ("passes" if key == "udp" else "connects") if value else "blocked"
        return "yes" if value else "no"
    return str(value)


def check(lab: Lab, claim: Claim) -> Result:
    """Run the probes for one claim in a running lab whose probe servers are up."""
    try:
        return _check(lab, claim)
    except Exception as e:
        return Result(claim.kind, claim.expect, {}, error=str(e))


def _check(lab: Lab, claim: Claim) -> Result:
    got = probing.nat_test(lab, claim.node)
    public = str(lab.scenario.public_address(claim.node))
    observed: dict[str, Value] = {
        "udp": bool(got.get("udp")),
        "tcp": bool(got.get("tcp")),
        "mapping": got.get("mapping"),
        "filtering": got.get("filtering"),
    }
    seen_from = got["mapped"][0] if got.get("udp") else got.get("tcp_mapped")
    if got.get("udp"):
        detail = (
            f"{claim.node} {got.get('local')} is seen as "
            + " / ".join(str(m) for m in got["mapped"])
            + " by probe1 / its other port / probe2"
        )
    else:
        detail = f"{claim.node}: no UDP answer; TCP seen as {seen_from}"
    error = ""
    if seen_from is not None and parse_addr(seen_from)[0] != public:
        error = f"seen from {seen_from}, expected the address {public}"
    if claim.peer is not None:
        result = probing.punch(lab, claim.node, claim.peer, duration=2.0)
        observed["hairpin"] = result.success
        if result.success:
            external = result.mapped[0] in result.peer_seen[1]
            observed["hairpin_source"] = "external" if external else "internal"
        saw = ", ".join(result.peer_seen[1]) or "nothing"
        detail += (
            f"; hairpin: {claim.node} (mapped {result.mapped[0]}) punched {claim.peer}'s "
            f"mapping {result.mapped[1]}, {claim.peer} received from {saw}"
        )
    return Result(claim.kind, claim.expect, observed, detail, error, {"probe": got})


def check_impairment(lab: Lab, node: str = SLOW_HOST.name, count: int = 10) -> Result:
    """A delayed link shows up as round-trip time: 2 x delay, give or take scheduling."""
    delay = lab.scenario.node(node).link.impairment.delay_ms
    expect: dict[str, Value] = {"rtt_within_bounds": True}
    try:
        got = probing.rtt(lab, node, count)
    except Exception as e:
        return Result("impairment", expect, {}, error=str(e))
    samples = list(got["rtt_ms"])
    median = statistics.median(samples) if samples else float("inf")
    fits = 2 * delay <= median <= 2 * delay + RTT_SLACK_MS and len(samples) == count
    summary = (
        f"rtt={median:.1f}ms (expected {2 * delay:g}-{2 * delay + RTT_SLACK_MS:g}) for "
        f"delay={delay:g}ms each way"
    )
    detail = f"{node}, {len(samples)}/{count} answers, {lab.impair_backend} backend"
    observed: dict[str, Value] = {"rtt_within_bounds": fits}
    return Result(
        "impairment", expect, observed, detail, extra={"rtt_ms": samples}, summary=summary
    )


def scenario_for(kinds: Sequence[str]) -> Scenario:
    """The one scenario that has every node the claims for `kinds` need."""
    if len(kinds) == 1 and kinds[0] in KIND_SCENARIOS:
        return KIND_SCENARIOS[kinds[0]]
    return BUILTIN["all"]


def run(
    kinds: Sequence[str] = KINDS,
    *,
    impairment: bool = True,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[Result], Lab]:
    """Build the scenario, run every claim in parallel, tear everything down. Returns results
    in the order of `kinds` (then the impairment check) and the (now down) lab."""
    unknown = [k for k in kinds if k not in CLAIM_BY_KIND]
    if unknown:
        raise ValueError(f"unknown kind(s) {', '.join(unknown)}; choose from {', '.join(KINDS)}")
    scenario = scenario_for(kinds)
    lab = Lab(scenario)
    jobs: list[Callable[[], Result]] = [partial(check, lab, CLAIM_BY_KIND[k]) for k in kinds]
    if impairment and SLOW_HOST in scenario.hosts:
        jobs.append(partial(check_impairment, lab))
    executor = ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="selfcheck")
    try:
        if progress:
            progress(
                f"Building scenario {scenario.name!r} ({len(scenario.namespaces)} namespaces)..."
            )
        start = time.monotonic()
        lab.up()
        if progress:
            progress(f"Running {len(jobs)} checks (built in {time.monotonic() - start:.1f} s)...")
        with probing.probe_servers(lab):
            futures = [executor.submit(job) for job in jobs]
            results = [f.result() for f in futures]
    finally:
        lab.down()  # first: it ends the probes the worker threads may still be waiting on
        executor.shutdown(wait=True, cancel_futures=True)
    return results, lab
