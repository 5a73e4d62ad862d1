"""The commands that build a scenario: namespaces, bridges, veth links, addresses, routes,
router rules and link impairments. Pure functions from a `Scenario` to a list of `Command`s.

Isolation: every interface the lab makes lives in a lab namespace. A veth pair is created with
both ends placed straight into their namespaces (`ip link add ... netns A ... peer ... netns B`),
the wan bridge lives in `vnl-wan`, and no namespace has a default route: hosts and routers know
only the two public prefixes (on-link on the wan, or via their router). A packet to any other
address fails with "network unreachable" inside the lab; there is no path to the real network.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from tools.netlab import nat
from tools.netlab.command import Command, in_ns, ip, sysctl
from tools.netlab.scenario import (
    PUBLIC_PREFIXES,
    WAN,
    Host,
    Impairment,
    Node,
    Router,
    Scenario,
    namespace_of,
)

#: The bridge that is the internet, inside namespace `vnl-wan`.
WAN_BRIDGE = "wan"
#: A host's only interface.
HOST_IF = "eth0"
#: NFQUEUE number the userspace impairer listens on (queues are per network namespace).
IMPAIR_QUEUE = 7


class ImpairBackend(StrEnum):
    """How link impairments are made: `tc netem` when the kernel has it, else NFQUEUE."""

    NETEM = "netem"
    NFQUEUE = "nfqueue"


@dataclass(frozen=True)
class ImpairerSpec:
    """One userspace impairer process (nfqueue backend): where it runs and what it does."""

    namespace: str
    interface: str
    impairment: Impairment


def uplink_if(node: Node) -> str:
    return nat.UPLINK if isinstance(node, Router) else HOST_IF


def segment_of(node: Node) -> tuple[str, str]:
    """(namespace, bridge) of the segment `node`'s uplink plugs into."""
    if node.link.network == WAN:
        return namespace_of(WAN), WAN_BRIDGE
    return namespace_of(node.link.network), nat.LAN


def prefix_len(scenario: Scenario, node: Node) -> int:
    if node.link.network == WAN:
        return next(p.prefixlen for p in PUBLIC_PREFIXES if node.link.ip in p)
    return scenario.router(node.link.network).lan_network.prefixlen


def plan_up(scenario: Scenario, backend: ImpairBackend | None = None) -> list[Command]:
    """Every command that builds `scenario`, in order. `backend` is needed only if a link is
    impaired; with the nfqueue backend the impairer processes are started separately
    (see `impairers`)."""
    commands: list[Command] = [Command(("ip", "netns", "add", ns)) for ns in scenario.namespaces]
    for ns in scenario.namespaces:
        commands += [
            # No IPv6 in the lab: no router solicitations, no surprise second address family.
            sysctl(ns, "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"),
            ip(ns, "link", "set", "dev", "lo", "up"),
        ]
    wan_ns = namespace_of(WAN)
    commands += _bridge(wan_ns, WAN_BRIDGE)
    for router in scenario.routers:
        ns = namespace_of(router.name)
        commands += _bridge(ns, nat.LAN)
        commands.append(
            ip(ns, "addr", "add", f"{router.gateway}/{router.lan_network.prefixlen}",
               "dev", nat.LAN)
        )  # fmt: skip
    for node in scenario.nodes:
        commands += _link(scenario, node)
    for router in scenario.routers:
        commands += nat.router_commands(scenario, router)
    if any(n.link.impairment.active for n in scenario.nodes):
        if backend is None:
            raise ValueError("an impaired link needs an impairment backend")
        for node in scenario.nodes:
            if node.link.impairment.active:
                commands += impairment_commands(node, backend)
    return commands


def _bridge(ns: str, name: str) -> list[Command]:
    return [
        ip(ns, "link", "add", name, "type", "bridge"),
        ip(ns, "link", "set", "dev", name, "up"),
        # Bridged frames must not walk through this namespace's iptables/conntrack.
        sysctl(ns, "net.bridge.bridge-nf-call-iptables=0", "net.bridge.bridge-nf-call-arptables=0"),
    ]


def _link(scenario: Scenario, node: Node) -> list[Command]:
    ns = namespace_of(node.name)
    dev = uplink_if(node)
    seg_ns, bridge = segment_of(node)
    port = node.name  # the segment-side end is named after the node (<= 11 characters)
    commands = [
        Command(("ip", "link", "add", "name", dev, "netns", ns, "type", "veth",
                 "peer", "name", port, "netns", seg_ns)),
        ip(seg_ns, "link", "set", "dev", port, "master", bridge),
        ip(seg_ns, "link", "set", "dev", port, "up"),
        ip(ns, "addr", "add", f"{node.link.address}/{prefix_len(scenario, node)}", "dev", dev),
        ip(ns, "link", "set", "dev", dev, "up"),
    ]  # fmt: skip
    for prefix in PUBLIC_PREFIXES:
        if node.link.network == WAN:
            if node.link.ip not in prefix:
                commands.append(ip(ns, "route", "add", str(prefix), "dev", dev))
        else:
            gateway = scenario.router(node.link.network).gateway
            commands.append(ip(ns, "route", "add", str(prefix), "via", str(gateway)))
    return commands


def netem_args(impairment: Impairment) -> list[str]:
    args = ["netem"]
    if impairment.delay_ms or impairment.jitter_ms:
        args += ["delay", f"{impairment.delay_ms:g}ms"]
        if impairment.jitter_ms:
            args.append(f"{impairment.jitter_ms:g}ms")
    if impairment.loss_pct:
        args += ["loss", f"{impairment.loss_pct:g}%"]
    return args


def impairment_commands(node: Node, backend: ImpairBackend) -> list[Command]:
    """Impair `node`'s uplink in both directions.

    netem: a netem qdisc on the egress of both veth ends. nfqueue: both directions are queued
    (mangle PREROUTING/POSTROUTING) inside the node's namespace to the impairer process.
    """
    ns = namespace_of(node.name)
    dev = uplink_if(node)
    if backend is ImpairBackend.NETEM:
        seg_ns, _ = segment_of(node)
        args = netem_args(node.link.impairment)
        return [
            in_ns(ns, "tc", "qdisc", "add", "dev", dev, "root", *args),
            in_ns(seg_ns, "tc", "qdisc", "add", "dev", node.name, "root", *args),
        ]
    queue = ("-j", "NFQUEUE", "--queue-num", str(IMPAIR_QUEUE))
    return [
        in_ns(ns, nat.IPTABLES, "-w", "-t", "mangle", "-A", "POSTROUTING", "-o", dev, *queue),
        in_ns(ns, nat.IPTABLES, "-w", "-t", "mangle", "-A", "PREROUTING", "-i", dev, *queue),
    ]


def impairers(scenario: Scenario) -> list[ImpairerSpec]:
    """The impairer processes the nfqueue backend needs, one per impaired node."""
    return [
        ImpairerSpec(namespace_of(n.name), uplink_if(n), n.link.impairment)
        for n in scenario.nodes
        if n.link.impairment.active
    ]


def plan_down(namespaces: list[str]) -> list[Command]:
    """Deleting a namespace destroys its interfaces, and so both ends of each veth pair."""
    return [Command(("ip", "netns", "del", ns)) for ns in namespaces]


def describe(scenario: Scenario) -> list[str]:
    """One line per node: namespace, address, segment, kind, impairment."""
    lines = []
    for node in scenario.nodes:
        kind = f"router ({node.nat})" if isinstance(node, Router) else "host"
        if isinstance(node, Host) and node.link.network == WAN:
            kind = "host (public)"
        extra = f" lan {node.lan}" if isinstance(node, Router) else ""
        imp = node.link.impairment
        if imp.active:
            extra += f" impaired {imp.delay_ms:g}ms+-{imp.jitter_ms:g}ms loss {imp.loss_pct:g}%"
        lines.append(
            f"{namespace_of(node.name):<16} {node.link.address:<15} on {node.link.network:<10} "
            f"{kind}{extra}"
        )
    return lines
