"""The named, built-in scenarios (`python -m tools.netlab up NAME`) and helpers to make more.

Address plan (see docs/netlab.md):

- probe servers: probe1 203.0.113.200, probe2 198.51.100.200 (two public addresses on two
  different prefixes, so the self-check can tell address-dependent behaviour apart);
- public hosts 203.0.113.10-19; routers' public addresses 203.0.113.21-39 and 198.51.100.21-39;
- LAN N: 198.18.N.0/24, router .1, hosts .10, .11; the CGN inner segment 198.19.0.0/24.
"""

from __future__ import annotations

from dataclasses import replace

from tools.netlab.scenario import (
    WAN,
    Host,
    Impairment,
    Link,
    NatKind,
    Router,
    Scenario,
    ScenarioError,
    merge,
    with_impairment,
)

PROBE1 = Host("probe1", Link(WAN, "203.0.113.200"))
PROBE2 = Host("probe2", Link(WAN, "198.51.100.200"))
PROBES = (PROBE1, PROBE2)


def _behind(
    router: str,
    public: str,
    lan: int,
    nat: NatKind,
    hosts: tuple[str, ...],
    *,
    hairpin: bool = False,
) -> tuple[Router, tuple[Host, ...]]:
    r = Router(router, Link(WAN, public), f"198.18.{lan}.0/24", nat, hairpin=hairpin)
    return r, tuple(Host(h, Link(router, f"198.18.{lan}.{10 + i}")) for i, h in enumerate(hosts))


def _single(name: str, description: str, router: Router, hosts: tuple[Host, ...]) -> Scenario:
    return Scenario(name, description, (router,), (*PROBES, *hosts))


def _kind_scenarios() -> dict[str, Scenario]:
    fc = _behind("nat-fc", "203.0.113.21", 1, NatKind.FULL_CONE, ("fc",))
    prc = _behind("nat-prc", "203.0.113.22", 2, NatKind.PORT_RESTRICTED, ("prc",))
    sym = _behind("nat-sym", "198.51.100.23", 3, NatKind.SYMMETRIC, ("sym",))
    blk = _behind("nat-blk", "203.0.113.24", 4, NatKind.UDP_BLOCKED, ("blk",))
    same = _behind("nat-same", "203.0.113.26", 6, NatKind.PORT_RESTRICTED, ("s1", "s2"))
    hp = _behind("nat-hp", "203.0.113.27", 7, NatKind.PORT_RESTRICTED, ("h1", "h2"), hairpin=True)
    cgn = Router("cgn", Link(WAN, "198.51.100.25"), "198.19.0.0/24", NatKind.PORT_RESTRICTED)
    home = Router("home", Link("cgn", "198.19.0.2"), "198.18.5.0/24", NatKind.PORT_RESTRICTED)
    return {
        "public": Scenario(
            "public", "a public host (no NAT) and the two probe servers",
            hosts=(*PROBES, Host("pub", Link(WAN, "203.0.113.10"))),
        ),
        "full-cone": _single("full-cone", "host fc behind a full-cone NAT", *fc),
        "port-restricted": _single(
            "port-restricted", "host prc behind a port-restricted cone NAT", *prc
        ),
        "symmetric": _single("symmetric", "host sym behind a symmetric NAT", *sym),
        "udp-blocked": _single("udp-blocked", "host blk behind a NAT that drops UDP", *blk),
        "cgn": Scenario(
            "cgn", "host cg behind a home NAT behind a carrier-grade NAT",
            (cgn, home), (*PROBES, Host("cg", Link("home", "198.18.5.10"))),
        ),
        "same-nat": _single(
            "same-nat", "hosts s1 and s2 behind one port-restricted NAT, no hairpinning", *same
        ),
        "same-nat-hairpin": _single(
            "same-nat-hairpin", "hosts h1 and h2 behind one port-restricted NAT that hairpins", *hp
        ),
    }  # fmt: skip


#: One small scenario per NAT kind the self-check proves, keyed by the kind's name.
KIND_SCENARIOS: dict[str, Scenario] = _kind_scenarios()

#: A public host whose link delays each packet 25 ms each way: the self-check's impairment check.
SLOW_HOST = Host("slow", Link(WAN, "203.0.113.11", Impairment(delay_ms=25.0)))


def pair(kind_a: NatKind | None, kind_b: NatKind | None, name: str = "") -> Scenario:
    """Host `a` behind `nat-a` (kind_a) and host `b` behind `nat-b` (kind_b), plus the probes.

    None for a kind puts that host directly on the wan (public).
    """
    nodes: list[Router] = []
    hosts: list[Host] = list(PROBES)
    for side, kind, public, lan in (
        ("a", kind_a, "203.0.113.31", 11),
        ("b", kind_b, "198.51.100.32", 12),
    ):
        if kind is None:
            hosts.append(Host(side, Link(WAN, public)))
            continue
        router, behind = _behind(f"nat-{side}", public, lan, kind, (side,))
        nodes.append(router)
        hosts.extend(behind)
    label = name or f"pair-{kind_a or 'public'}-{kind_b or 'public'}"
    description = f"host a ({kind_a or 'public'}) and host b ({kind_b or 'public'})"
    return Scenario(label, description, tuple(nodes), tuple(hosts))


def _builtins() -> dict[str, Scenario]:
    found: dict[str, Scenario] = dict(KIND_SCENARIOS)
    found["all"] = merge(
        "all",
        "every self-checked kind at once, plus a host on a slow (25 ms) link",
        *KIND_SCENARIOS.values(),
        Scenario("slow", "", hosts=(SLOW_HOST,)),
    )
    found["two-cones"] = pair(NatKind.PORT_RESTRICTED, NatKind.PORT_RESTRICTED, "two-cones")
    found["cone-symmetric"] = pair(NatKind.PORT_RESTRICTED, NatKind.SYMMETRIC, "cone-symmetric")
    found["two-symmetric"] = pair(NatKind.SYMMETRIC, NatKind.SYMMETRIC, "two-symmetric")
    found["full-cone-symmetric"] = pair(NatKind.FULL_CONE, NatKind.SYMMETRIC, "full-cone-symmetric")
    lossy = pair(NatKind.PORT_RESTRICTED, NatKind.PORT_RESTRICTED, "two-cones-lossy")
    lossy = with_impairment(lossy, "a", Impairment(delay_ms=40.0, jitter_ms=10.0, loss_pct=2.0))
    lossy = with_impairment(lossy, "b", Impairment(delay_ms=15.0, jitter_ms=5.0, loss_pct=1.0))
    found["two-cones-lossy"] = replace(
        lossy, description="two-cones, a's link 40+-10 ms 2% loss, b's 15+-5 ms 1% loss"
    )
    return found


#: Every scenario the CLI knows by name.
BUILTIN: dict[str, Scenario] = _builtins()


def builtin(name: str) -> Scenario:
    try:
        return BUILTIN[name]
    except KeyError:
        raise ScenarioError(
            f"no built-in scenario {name!r}; choose one of: {', '.join(sorted(BUILTIN))}"
        ) from None
