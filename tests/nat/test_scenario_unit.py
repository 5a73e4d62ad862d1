"""Scenario validation and the generated command lists (no root needed)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tools.netlab import build, nat
from tools.netlab.build import ImpairBackend
from tools.netlab.command import Command
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
from tools.netlab.scenarios import BUILTIN, KIND_SCENARIOS, builtin, pair


def _router(name: str = "nat", kind: NatKind = NatKind.PORT_RESTRICTED, **kw: object) -> Router:
    fields: dict[str, object] = {
        "link": Link(WAN, "203.0.113.2"),
        "lan": "198.18.1.0/24",
        "nat": kind,
    }
    fields.update(kw)
    return Router(name, **fields)  # type: ignore[arg-type]


def _host(name: str = "a", network: str = "nat", address: str = "198.18.1.10") -> Host:
    return Host(name, Link(network, address))


# -- validation ----------------------------------------------------------------------------------


def test_every_builtin_scenario_is_valid_and_uses_only_lab_namespaces() -> None:
    for name, scenario in BUILTIN.items():
        assert scenario.name == name
        assert all(ns.startswith("vnl-") for ns in scenario.namespaces)
        assert len(set(scenario.namespaces)) == len(scenario.namespaces)


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("10.0.0.5", "outside the public ranges"),
        ("192.0.2.5", "outside the public ranges"),  # documentation, but not a lab range
        ("203.0.113.0", "network or broadcast"),
        ("198.51.100.255", "network or broadcast"),
        ("not-an-ip", "bad address"),
    ],
)
def test_rejects_wan_addresses_outside_the_public_ranges(address: str, message: str) -> None:
    with pytest.raises(ScenarioError, match=message):
        Scenario("s", "", hosts=(Host("a", Link(WAN, address)),))


@pytest.mark.parametrize("lan", ["192.168.1.0/24", "10.0.0.0/24", "198.20.0.0/24"])
def test_rejects_lans_outside_198_18_slash_15(lan: str) -> None:
    with pytest.raises(ScenarioError, match="outside the private range"):
        Scenario("s", "", (_router(lan=lan),))


def test_rejects_a_lan_address_outside_its_lan_or_taken_by_the_gateway() -> None:
    with pytest.raises(ScenarioError, match="outside the LAN"):
        Scenario("s", "", (_router(),), (_host(address="198.18.2.10"),))
    with pytest.raises(ScenarioError, match="already used by 'nat'"):
        Scenario("s", "", (_router(),), (_host(address="198.18.1.1"),))


def test_rejects_duplicate_names_and_addresses() -> None:
    with pytest.raises(ScenarioError, match="duplicate node name 'a'"):
        Scenario("s", "", (_router(),), (_host("a"), _host("a", address="198.18.1.11")))
    with pytest.raises(ScenarioError, match="already used by 'a'"):
        Scenario("s", "", (_router(),), (_host("a"), _host("b")))
    with pytest.raises(ScenarioError, match="already used"):
        Scenario("s", "", hosts=(Host("a", Link(WAN, "203.0.113.5")),
                                 Host("b", Link(WAN, "203.0.113.5"))))  # fmt: skip


@pytest.mark.parametrize("name", ["A", "1a", "wan", "eth0", "a_b", "abcdefghijkl", ""])
def test_rejects_bad_node_names(name: str) -> None:
    with pytest.raises(ScenarioError, match="bad node name"):
        Scenario("s", "", hosts=(Host(name, Link(WAN, "203.0.113.5")),))


def test_rejects_links_to_unknown_segments_and_router_loops() -> None:
    with pytest.raises(ScenarioError, match="neither 'wan' nor a router"):
        Scenario("s", "", hosts=(_host(network="nowhere"),))
    r1 = _router("r1", link=Link("r2", "198.18.2.10"), lan="198.18.1.0/24")
    r2 = _router("r2", link=Link("r1", "198.18.1.10"), lan="198.18.2.0/24")
    with pytest.raises(ScenarioError, match="loop"):
        Scenario("s", "", (r1, r2))


def test_a_lan_must_not_overlap_an_upstream_lan_but_may_repeat_elsewhere() -> None:
    cgn = _router("cgn", lan="198.19.0.0/24")
    home = _router("home", link=Link("cgn", "198.19.0.2"), lan="198.19.0.0/25")
    with pytest.raises(ScenarioError, match=r"overlaps LAN 198\.19\.0\.0/24 of its upstream"):
        Scenario("s", "", (cgn, home))
    # Two unrelated NATs may both use 198.18.1.0/24, as two homes often use 192.168.1.0/24.
    other = _router("other", link=Link(WAN, "203.0.113.3"))
    Scenario("s", "", (_router(), other), (_host("a"), _host("b", network="other")))


def test_full_cone_needs_exactly_one_node_behind_it() -> None:
    fc = _router(kind=NatKind.FULL_CONE)
    with pytest.raises(ScenarioError, match="exactly one node"):
        Scenario("s", "", (fc,), (_host("a"), _host("b", address="198.18.1.11")))
    with pytest.raises(ScenarioError, match="exactly one node"):
        Scenario("s", "", (fc,))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"delay_ms": -1.0}, "delay"),
        ({"jitter_ms": 20_000.0}, "jitter"),
        ({"loss_pct": 101.0}, "loss"),
    ],
)
def test_rejects_impossible_impairments(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ScenarioError, match=message):
        Impairment(**kwargs)


def test_rejects_bad_udp_timeouts() -> None:
    with pytest.raises(ScenarioError, match="udp_timeout_s 0"):
        Scenario("s", "", (_router(udp_timeout_s=0),))


def test_topology_queries() -> None:
    cgn = KIND_SCENARIOS["cgn"]
    assert [r.name for r in cgn.upstream_chain("cg")] == ["home", "cgn"]
    assert str(cgn.public_address("cg")) == "198.51.100.25"
    assert str(cgn.public_address("probe1")) == "203.0.113.200"
    assert [n.name for n in cgn.nodes][:2] == ["cgn", "home"]  # upstream routers first
    assert cgn.router("home").gateway.exploded == "198.18.5.1"


def test_merge_and_with_impairment() -> None:
    both = merge("both", "", KIND_SCENARIOS["symmetric"], KIND_SCENARIOS["full-cone"])
    assert {h.name for h in both.hosts} == {"probe1", "probe2", "sym", "fc"}
    slow = with_impairment(both, "sym", Impairment(delay_ms=5.0))
    assert slow.node("sym").link.impairment.delay_ms == 5.0
    assert both.node("sym").link.impairment.active is False
    clash = replace(KIND_SCENARIOS["public"], hosts=(Host("probe1", Link(WAN, "203.0.113.99")),))
    with pytest.raises(ScenarioError, match="differs"):
        merge("x", "", KIND_SCENARIOS["public"], clash)


def test_unknown_builtin_names_the_choices() -> None:
    with pytest.raises(ScenarioError, match="two-cones"):
        builtin("nope")


# -- command lists -------------------------------------------------------------------------------


def _argvs(commands: list[Command]) -> list[str]:
    return [" ".join(c.argv) for c in commands]


def test_plan_only_touches_lab_namespaces_and_adds_no_default_route() -> None:
    for scenario in BUILTIN.values():
        for command in build.plan_up(scenario, ImpairBackend.NFQUEUE):
            argv = command.argv
            assert argv[0] == "ip"
            text = " ".join(argv)
            if "route" in argv:
                assert "default" not in argv and "0.0.0.0/0" not in argv, text
            if argv[1] == "-n" or argv[1:3] == ("netns", "exec"):
                ns = argv[2] if argv[1] == "-n" else argv[3]
                assert ns.startswith("vnl-"), text
            elif argv[1:3] == ("link", "add"):  # a veth pair, both ends placed in namespaces
                assert argv.count("netns") == 2, text
                assert all(
                    argv[i + 1].startswith("vnl-") for i, a in enumerate(argv) if a == "netns"
                )
            else:
                assert argv[1:3] == ("netns", "add") and argv[3].startswith("vnl-"), text


def test_ip_forward_is_enabled_only_in_routers() -> None:
    scenario = BUILTIN["all"]
    forwarding = [c.argv[3] for c in build.plan_up(scenario, ImpairBackend.NFQUEUE)
                  if "net.ipv4.ip_forward=1" in c.argv]  # fmt: skip
    assert sorted(forwarding) == sorted(f"vnl-{r.name}" for r in scenario.routers)


def test_port_restricted_rules() -> None:
    scenario = KIND_SCENARIOS["port-restricted"]
    rules = _argvs(nat.nat_rules(scenario, scenario.router("nat-prc")))
    prefix = "ip netns exec vnl-nat-prc iptables-nft -w "
    assert rules == [
        prefix + "-t nat -A POSTROUTING -o wan0 -s 198.18.2.0/24 -j MASQUERADE",
        prefix + "-A INPUT -i wan0 -m conntrack --ctstate NEW -j DROP",
        prefix + "-A FORWARD -i wan0 -m conntrack --ctstate NEW -j DROP",
    ]


def test_symmetric_rules_randomize_ports_fully() -> None:
    scenario = KIND_SCENARIOS["symmetric"]
    rules = _argvs(nat.nat_rules(scenario, scenario.router("nat-sym")))
    assert rules[0].endswith("-s 198.18.3.0/24 -j MASQUERADE --random-fully")
    assert sum("--ctstate NEW -j DROP" in r for r in rules) == 2


def test_full_cone_rules_are_a_one_to_one_nat() -> None:
    scenario = KIND_SCENARIOS["full-cone"]
    rules = _argvs(nat.nat_rules(scenario, scenario.router("nat-fc")))
    assert [r.split(" -w ")[1] for r in rules] == [
        "-t nat -A PREROUTING -i wan0 -d 203.0.113.21 -j DNAT --to-destination 198.18.1.10",
        "-t nat -A POSTROUTING -o wan0 -s 198.18.1.10 -j SNAT --to-source 203.0.113.21",
    ]


def test_udp_blocked_drops_udp_from_the_lan_only() -> None:
    scenario = KIND_SCENARIOS["udp-blocked"]
    rules = _argvs(nat.nat_rules(scenario, scenario.router("nat-blk")))
    assert rules[0].endswith("-A FORWARD -i lan0 -o wan0 -p udp -j DROP")
    assert any(r.endswith("-j MASQUERADE") for r in rules)


def test_hairpin_is_an_nft_table_only_where_asked() -> None:
    scenario = BUILTIN["all"]
    loaded = {c.argv[3]: c.stdin for c in build.plan_up(scenario, ImpairBackend.NFQUEUE)
              if c.argv[4:5] == ("nft",)}  # fmt: skip
    assert list(loaded) == ["vnl-nat-hp"]
    table = loaded["vnl-nat-hp"] or ""
    assert "update @mapped { meta l4proto . th sport : ct original ip saddr" in table
    assert 'iifname "lan0" ip daddr 203.0.113.27' in table
    assert "snat ip to 203.0.113.27" in table


def test_udp_timeouts_are_set_in_the_router_namespace() -> None:
    scenario = pair(NatKind.SYMMETRIC, None)
    router = replace(scenario.routers[0], udp_timeout_s=5, udp_stream_timeout_s=60)
    commands = _argvs(nat.router_commands(scenario, router))
    assert (
        "ip netns exec vnl-nat-a sysctl -q -w net.netfilter.nf_conntrack_udp_timeout=5 "
        "net.netfilter.nf_conntrack_udp_timeout_stream=60"
    ) in commands


def test_impairments_with_netem_and_with_nfqueue() -> None:
    scenario = BUILTIN["two-cones-lossy"]
    node = scenario.node("a")
    assert build.netem_args(node.link.impairment) == [
        "netem", "delay", "40ms", "10ms", "loss", "2%",
    ]  # fmt: skip
    assert build.netem_args(Impairment(loss_pct=0.5)) == ["netem", "loss", "0.5%"]
    netem = _argvs(build.impairment_commands(node, ImpairBackend.NETEM))
    assert netem == [
        "ip netns exec vnl-a tc qdisc add dev eth0 root netem delay 40ms 10ms loss 2%",
        "ip netns exec vnl-nat-a tc qdisc add dev a root netem delay 40ms 10ms loss 2%",
    ]
    queued = _argvs(build.impairment_commands(node, ImpairBackend.NFQUEUE))
    assert queued == [
        "ip netns exec vnl-a iptables-nft -w -t mangle -A POSTROUTING -o eth0 -j NFQUEUE "
        "--queue-num 7",
        "ip netns exec vnl-a iptables-nft -w -t mangle -A PREROUTING -i eth0 -j NFQUEUE "
        "--queue-num 7",
    ]
    assert [s.namespace for s in build.impairers(scenario)] == ["vnl-a", "vnl-b"]
    with pytest.raises(ValueError, match="backend"):
        build.plan_up(scenario)


def test_routes_on_the_wan_are_on_link_and_behind_a_router_go_via_it() -> None:
    scenario = KIND_SCENARIOS["cgn"]
    plan = _argvs(build.plan_up(scenario))
    assert "ip -n vnl-probe1 route add 198.51.100.0/24 dev eth0" in plan
    assert "ip -n vnl-cg route add 203.0.113.0/24 via 198.18.5.1" in plan
    assert "ip -n vnl-home route add 203.0.113.0/24 via 198.19.0.1" in plan
    assert "ip -n vnl-cgn route add 203.0.113.0/24 dev wan0" in plan
    assert "ip link add name wan0 netns vnl-home type veth peer name home netns vnl-cgn" in plan
