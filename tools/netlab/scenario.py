"""Declarations of a NAT lab topology: hosts, routers, links, NAT kinds, impairments.

A scenario is plain, frozen data. It is validated when it is made, so a `Scenario` that exists is
one the lab can build: names are unique and short enough for interface names, every address is in
the lab's ranges, and every router's LAN is reachable only through that router.

The topology is a tree. The root is the "wan" segment (the internet, a bridge in its own
namespace). Each node (host or router) has exactly one uplink `Link` into a segment: the wan, or
the LAN of a router. A router owns a LAN segment (a bridge inside the router's namespace) and
translates between its LAN and its uplink according to its `NatKind`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from enum import StrEnum

#: The "internet" of the lab: RFC 5737 documentation ranges, nothing else.
PUBLIC_PREFIXES: tuple[ipaddress.IPv4Network, ...] = (
    ipaddress.IPv4Network("203.0.113.0/24"),
    ipaddress.IPv4Network("198.51.100.0/24"),
)
#: Private LANs and carrier-grade NAT segments: RFC 2544 benchmarking range.
PRIVATE_PREFIX = ipaddress.IPv4Network("198.18.0.0/15")

#: Name of the root segment, and of the namespace that holds its bridge (with the prefix).
WAN = "wan"
#: Every namespace the lab makes starts with this; nothing else does.
NS_PREFIX = "vnl-"

_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,10}$")
_SCENARIO_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,39}$")
_RESERVED_NAMES = frozenset({WAN, "lo", "eth0", "wan0", "lan0", "all", "default"})
_MAX_DELAY_MS = 10_000.0


class ScenarioError(ValueError):
    """The scenario cannot be built as declared."""


class NatKind(StrEnum):
    """How a router translates, in RFC 4787 terms (mapping / filtering).

    A public host (no NAT) is a `Host` whose link is on the wan, not a router kind.
    """

    #: Endpoint-independent mapping and filtering: 1:1 DNAT/SNAT to the router's address.
    FULL_CONE = "full-cone"
    #: Endpoint-independent mapping, address-and-port-dependent filtering.
    PORT_RESTRICTED = "port-restricted"
    #: Address-and-port-dependent mapping and filtering.
    SYMMETRIC = "symmetric"
    #: UDP from the LAN is dropped; TCP is translated like port-restricted.
    UDP_BLOCKED = "udp-blocked"


@dataclass(frozen=True)
class Impairment:
    """What a link does to each packet, in each direction (like `tc netem` on both ends)."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_pct: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.delay_ms <= _MAX_DELAY_MS:
            raise ScenarioError(f"delay {self.delay_ms} ms is outside 0..{_MAX_DELAY_MS:.0f} ms")
        if not 0.0 <= self.jitter_ms <= _MAX_DELAY_MS:
            raise ScenarioError(f"jitter {self.jitter_ms} ms is outside 0..{_MAX_DELAY_MS:.0f} ms")
        if not 0.0 <= self.loss_pct <= 100.0:
            raise ScenarioError(f"loss {self.loss_pct}% is outside 0..100%")

    @property
    def active(self) -> bool:
        return self.delay_ms > 0 or self.jitter_ms > 0 or self.loss_pct > 0


NO_IMPAIRMENT = Impairment()


@dataclass(frozen=True)
class Link:
    """A node's uplink: the segment it plugs into, its address there, and the link's impairment.

    `network` is `"wan"` or the name of the router whose LAN the node sits on.
    """

    network: str
    address: str
    impairment: Impairment = NO_IMPAIRMENT

    @property
    def ip(self) -> ipaddress.IPv4Address:
        return ipaddress.IPv4Address(self.address)


@dataclass(frozen=True)
class Host:
    """An end system: one interface `eth0`, routes to the public prefixes, no default route."""

    name: str
    link: Link


@dataclass(frozen=True)
class Router:
    """A NAT router: uplink `wan0`, LAN bridge `lan0` holding the first address of `lan`.

    `udp_timeout_s` / `udp_stream_timeout_s` set the router's conntrack UDP timeouts
    (`nf_conntrack_udp_timeout` / `_stream`, per network namespace); None keeps the kernel's
    defaults (30 s / 120 s). `hairpin` makes the router translate LAN traffic sent to its own
    public mappings back into the LAN.
    """

    name: str
    link: Link
    lan: str
    nat: NatKind
    hairpin: bool = False
    udp_timeout_s: int | None = None
    udp_stream_timeout_s: int | None = None

    @property
    def lan_network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.lan)

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        """The router's own address on its LAN (the first usable one)."""
        return self.lan_network.network_address + 1


Node = Host | Router


@dataclass(frozen=True)
class Scenario:
    """A whole topology. Validated on creation; see the module docstring for the rules."""

    name: str
    description: str
    routers: tuple[Router, ...] = ()
    hosts: tuple[Host, ...] = ()
    _by_name: dict[str, Node] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        by_name: dict[str, Node] = {}
        for node in self.all_nodes:
            if node.name in by_name:
                raise ScenarioError(f"duplicate node name {node.name!r}")
            by_name[node.name] = node
        object.__setattr__(self, "_by_name", by_name)
        _validate(self)

    # -- queries ---------------------------------------------------------------------------

    @property
    def all_nodes(self) -> list[Node]:
        """Routers then hosts, in declaration order."""
        return [*self.routers, *self.hosts]

    @property
    def nodes(self) -> tuple[Node, ...]:
        """Routers first, each after its upstream router, then hosts: a safe build order."""
        ordered: list[Node] = []
        placed: set[str] = {WAN}
        pending = list(self.routers)
        while pending:
            ready = [r for r in pending if r.link.network in placed]
            if not ready:
                break  # a loop or a dangling uplink; validation reports it
            for router in ready:
                ordered.append(router)
                placed.add(router.name)
                pending.remove(router)
        return (*ordered, *self.hosts)

    def node(self, name: str) -> Node:
        try:
            return self._by_name[name]
        except KeyError:
            raise ScenarioError(f"scenario {self.name!r} has no node {name!r}") from None

    def router(self, name: str) -> Router:
        node = self.node(name)
        if not isinstance(node, Router):
            raise ScenarioError(f"{name!r} is a host, not a router")
        return node

    def members(self, segment: str) -> tuple[Node, ...]:
        """The nodes whose uplink is on `segment` ("wan" or a router name)."""
        return tuple(n for n in self.nodes if n.link.network == segment)

    def upstream_chain(self, name: str) -> tuple[Router, ...]:
        """The routers between `name` and the wan, nearest first."""
        chain: list[Router] = []
        network = self.node(name).link.network
        while network != WAN:
            router = self.router(network)
            chain.append(router)
            network = router.link.network
        return tuple(chain)

    def public_address(self, name: str) -> ipaddress.IPv4Address:
        """The address the internet sees for traffic from `name` (its outermost router's)."""
        chain = self.upstream_chain(name)
        outermost: Node = chain[-1] if chain else self.node(name)
        return outermost.link.ip

    def namespace(self, name: str) -> str:
        if name != WAN:
            self.node(name)
        return namespace_of(name)

    @property
    def namespaces(self) -> tuple[str, ...]:
        return (namespace_of(WAN), *(namespace_of(n.name) for n in self.nodes))


def namespace_of(name: str) -> str:
    return NS_PREFIX + name


def _walk_segments(scenario: Scenario) -> Iterator[tuple[str, ipaddress.IPv4Network | None]]:
    yield WAN, None
    for router in scenario.routers:
        yield router.name, router.lan_network


def _validate(scenario: Scenario) -> None:
    if not _SCENARIO_NAME_RE.match(scenario.name):
        raise ScenarioError(f"bad scenario name {scenario.name!r}")
    if not scenario.routers and not scenario.hosts:
        raise ScenarioError(f"scenario {scenario.name!r} has no nodes")
    for node in scenario.all_nodes:
        _check_name(node.name)
    _check_tree(scenario)
    for router in scenario.routers:
        _check_router(scenario, router)
    for segment, lan in _walk_segments(scenario):
        _check_segment(scenario, segment, lan)
    for router in scenario.routers:
        for upstream in scenario.upstream_chain(router.name):
            if router.lan_network.overlaps(upstream.lan_network):
                raise ScenarioError(
                    f"LAN {router.lan} of {router.name!r} overlaps LAN {upstream.lan} of its "
                    f"upstream router {upstream.name!r}"
                )


def _check_name(name: str) -> None:
    if not _NAME_RE.match(name) or name in _RESERVED_NAMES:
        raise ScenarioError(
            f"bad node name {name!r}: use 1-11 characters a-z, 0-9 and '-', starting with a "
            f"letter, and not one of {sorted(_RESERVED_NAMES)}"
        )


def _check_router(scenario: Scenario, router: Router) -> None:
    try:
        lan = ipaddress.IPv4Network(router.lan)
    except ValueError as e:
        raise ScenarioError(f"router {router.name!r}: bad LAN prefix {router.lan!r} ({e})") from e
    if not lan.subnet_of(PRIVATE_PREFIX):
        raise ScenarioError(
            f"router {router.name!r}: LAN {router.lan} is outside the private range "
            f"{PRIVATE_PREFIX}"
        )
    if not 16 <= lan.prefixlen <= 29:
        raise ScenarioError(f"router {router.name!r}: LAN {router.lan} must be /16 to /29")
    for label, value in (
        ("udp_timeout_s", router.udp_timeout_s),
        ("udp_stream_timeout_s", router.udp_stream_timeout_s),
    ):
        if value is not None and not 1 <= value <= 86_400:
            raise ScenarioError(f"router {router.name!r}: {label} {value} is outside 1..86400")
    if router.nat is NatKind.FULL_CONE and len(scenario.members(router.name)) != 1:
        raise ScenarioError(
            f"full-cone router {router.name!r} maps 1:1 and needs exactly one node on its LAN, "
            f"not {len(scenario.members(router.name))}"
        )


def _check_tree(scenario: Scenario) -> None:
    routers = {r.name for r in scenario.routers}
    for node in scenario.all_nodes:
        if node.link.network != WAN and node.link.network not in routers:
            raise ScenarioError(
                f"{node.name!r} links to {node.link.network!r}, which is neither 'wan' nor a router"
            )
    if len(scenario.nodes) != len(scenario.routers) + len(scenario.hosts):
        raise ScenarioError("routers form a loop; every router chain must end at the wan")


def _check_segment(scenario: Scenario, segment: str, lan: ipaddress.IPv4Network | None) -> None:
    seen: dict[ipaddress.IPv4Address, str] = {}
    if lan is not None:
        seen[scenario.router(segment).gateway] = segment
    for node in scenario.members(segment):
        try:
            ip = node.link.ip
        except ValueError as e:
            raise ScenarioError(f"{node.name!r}: bad address {node.link.address!r}") from e
        if lan is None:
            prefix = next((p for p in PUBLIC_PREFIXES if ip in p), None)
            if prefix is None:
                raise ScenarioError(
                    f"{node.name!r}: wan address {ip} is outside the public ranges "
                    f"{', '.join(str(p) for p in PUBLIC_PREFIXES)}"
                )
        else:
            prefix = lan
            if ip not in lan:
                raise ScenarioError(f"{node.name!r}: address {ip} is outside the LAN {lan}")
        if ip in (prefix.network_address, prefix.broadcast_address):
            raise ScenarioError(f"{node.name!r}: {ip} is the network or broadcast address")
        if ip in seen:
            raise ScenarioError(f"{node.name!r}: address {ip} is already used by {seen[ip]!r}")
        seen[ip] = node.name


# -- small helpers for declaring and deriving scenarios ------------------------------------------


def with_impairment(scenario: Scenario, node: str, impairment: Impairment) -> Scenario:
    """A copy of `scenario` where `node`'s uplink has `impairment`."""
    target = scenario.node(node)
    new_link = replace(target.link, impairment=impairment)
    return replace(
        scenario,
        routers=tuple(replace(r, link=new_link) if r is target else r for r in scenario.routers),
        hosts=tuple(replace(h, link=new_link) if h is target else h for h in scenario.hosts),
    )


def merge(name: str, description: str, *parts: Scenario) -> Scenario:
    """One scenario holding all nodes of `parts`; identical nodes that repeat are kept once."""
    routers: dict[str, Router] = {}
    hosts: dict[str, Host] = {}
    for part in parts:
        for router in part.routers:
            if routers.setdefault(router.name, router) != router:
                raise ScenarioError(f"router {router.name!r} differs between merged scenarios")
        for host in part.hosts:
            if hosts.setdefault(host.name, host) != host:
                raise ScenarioError(f"host {host.name!r} differs between merged scenarios")
    return Scenario(name, description, tuple(routers.values()), tuple(hosts.values()))
