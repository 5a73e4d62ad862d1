"""The netfilter rules that make a router namespace behave as a given NAT kind.

Interfaces in a router namespace: `wan0` (uplink, holds the router's outside address P) and
`lan0` (LAN bridge, holds the gateway address). L is the router's LAN prefix.

| kind            | RFC 4787 mapping / filtering | rules                                      |
| --------------- | ---------------------------- | ------------------------------------------ |
| full-cone       | EIM / EIF                    | DNAT P -> host, SNAT host -> P (1:1)       |
| port-restricted | EIM / APDF                   | MASQUERADE L, drop NEW inbound on wan0     |
| symmetric       | APDM / APDF                  | MASQUERADE --random-fully, drop NEW in     |
| udp-blocked     | no UDP; TCP as above         | drop UDP lan0->wan0, MASQUERADE, drop NEW  |

(EIM/EIF: endpoint-independent mapping/filtering; APDM/APDF: address-and-port-dependent.)

Why the "drop NEW inbound" rules: an unsolicited packet to P:port that nobody forwards still
creates a conntrack entry when the router's stack answers it (ICMP port unreachable). A later
outbound packet from the LAN host that would map to P:port then clashes with that entry, and
conntrack picks another source port, so the punch answers through a different port. Dropping the
packet in the filter table keeps the entry unconfirmed, so it vanishes.

Hairpinning (optional, any kind) is done with nftables, because iptables cannot look up an
existing dynamic mapping: a dynamic map learns "protocol . mapped port -> LAN address . port"
from packets leaving wan0 after NAT, a DNAT rule sends LAN traffic for P:port back to the LAN
host through that map, and an SNAT rule makes the hairpinned packet come from P (RFC 4787 REQ-9:
the receiver sees the sender's external address).
"""

from __future__ import annotations

from tools.netlab.command import Command, in_ns, sysctl
from tools.netlab.scenario import NatKind, Router, Scenario, namespace_of

#: Our iptables binary: the nf_tables backend (also Debian's default `iptables`); see docs.
IPTABLES = "iptables-nft"
HAIRPIN_TABLE = "vnl_hairpin"
UPLINK = "wan0"
LAN = "lan0"


def _ipt(ns: str, *rule: str) -> Command:
    return in_ns(ns, IPTABLES, "-w", *rule)


def _drop_new_inbound(ns: str) -> list[Command]:
    return [
        _ipt(ns, "-A", chain, "-i", UPLINK, "-m", "conntrack", "--ctstate", "NEW", "-j", "DROP")
        for chain in ("INPUT", "FORWARD")
    ]


def router_commands(scenario: Scenario, router: Router) -> list[Command]:
    """Everything that makes `router` a router of its kind: sysctls, NAT and filter rules."""
    ns = namespace_of(router.name)
    commands = [sysctl(ns, "net.ipv4.ip_forward=1")]
    timeouts = []
    if router.udp_timeout_s is not None:
        timeouts.append(f"net.netfilter.nf_conntrack_udp_timeout={router.udp_timeout_s}")
    if router.udp_stream_timeout_s is not None:
        timeouts.append(
            f"net.netfilter.nf_conntrack_udp_timeout_stream={router.udp_stream_timeout_s}"
        )
    if timeouts:
        # Without -e: a kernel where these are not per-namespace must fail loudly, not be ignored.
        commands.append(in_ns(ns, "sysctl", "-q", "-w", *timeouts))
    commands.extend(nat_rules(scenario, router))
    if router.hairpin:
        commands.append(in_ns(ns, "nft", "-f", "-", stdin=hairpin_ruleset(router)))
    return commands


def nat_rules(scenario: Scenario, router: Router) -> list[Command]:
    """The iptables rules for `router`'s NAT kind."""
    ns = namespace_of(router.name)
    public = router.link.address
    lan = router.lan
    masquerade = ("-t", "nat", "-A", "POSTROUTING", "-o", UPLINK, "-s", lan, "-j", "MASQUERADE")
    if router.nat is NatKind.FULL_CONE:
        (inside,) = scenario.members(router.name)
        host = inside.link.address
        return [
            _ipt(ns, "-t", "nat", "-A", "PREROUTING", "-i", UPLINK, "-d", public,
                 "-j", "DNAT", "--to-destination", host),
            _ipt(ns, "-t", "nat", "-A", "POSTROUTING", "-o", UPLINK, "-s", host,
                 "-j", "SNAT", "--to-source", public),
        ]  # fmt: skip
    if router.nat is NatKind.PORT_RESTRICTED:
        return [_ipt(ns, *masquerade), *_drop_new_inbound(ns)]
    if router.nat is NatKind.SYMMETRIC:
        return [_ipt(ns, *masquerade, "--random-fully"), *_drop_new_inbound(ns)]
    if router.nat is NatKind.UDP_BLOCKED:
        return [
            _ipt(ns, "-A", "FORWARD", "-i", LAN, "-o", UPLINK, "-p", "udp", "-j", "DROP"),
            _ipt(ns, *masquerade),
            *_drop_new_inbound(ns),
        ]
    raise AssertionError(f"unhandled NAT kind {router.nat}")


def hairpin_ruleset(router: Router) -> str:
    """The nftables table that hairpins LAN traffic addressed to the router's own mappings."""
    public = router.link.address
    timeout = max(router.udp_stream_timeout_s or 120, router.udp_timeout_s or 30, 120)
    return f"""\
table ip {HAIRPIN_TABLE} {{
  map mapped {{
    type inet_proto . inet_service : ipv4_addr . inet_service
    flags dynamic,timeout
    timeout {timeout}s
  }}
  chain learn {{
    type filter hook postrouting priority srcnat + 10; policy accept;
    oifname "{UPLINK}" ct direction original meta l4proto {{ tcp, udp }} \
update @mapped {{ meta l4proto . th sport : ct original ip saddr . ct original proto-src }}
  }}
  chain dnat_in {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname "{LAN}" ip daddr {public} meta l4proto {{ tcp, udp }} \
dnat ip to meta l4proto . th dport map @mapped
  }}
  chain snat_back {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname "{LAN}" ip saddr {router.lan} ct status dnat snat ip to {public}
  }}
}}
"""
