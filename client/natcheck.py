"""NAT discovery: how the outside sees one UDP socket (RFC 4787 terms, RFC 5780 tests).

``discover`` asks every given STUN server at once, over one socket (through a ``StunClient``),
for the socket's reflexive address, and compares the answers:

    no answer at all                         udp_works False, mapping "unknown", "UDP blocked"
    a reflexive address equal to the local   mapping "none", "public"
    different addresses from different       mapping "address-dependent", "symmetric NAT"
      servers
    one address from servers on >= 2 hosts   mapping "endpoint-independent", "cone NAT"
    otherwise (one server, or one host)      mapping "unknown", "NAT (type unknown)"

When a server names an alternate address (RFC 5780 OTHER-ADDRESS, or RFC 3489 CHANGED-ADDRESS),
the classic tests follow: two concurrent Bindings with CHANGE-REQUEST tell the filtering (answered
from another host and port -> "endpoint-independent"; only from another port ->
"address-dependent"; neither -> "address-and-port-dependent"), then a Binding to the alternate
host adds a mapping comparison (after, or it would open the NAT to that host).  Each round takes
at most one transaction timeout (3.1 s), so at most three.  Our supernodes have one address, so
``filtering`` is mostly "unknown".  Nothing here blocks the reactor: the queries are Deferreds
on the client's clock.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, gatherResults

from client.callsocket import route_source
from overlay.errors import VoipError
from overlay.stun import CHANGED_ADDRESS, OTHER_ADDRESS, Address, ChangeRequest
from overlay.stun_client import StunClient, mapped_address

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class ServerProbe:
    server: Address
    mapped: Address | None = None
    #: Seconds from the first transmission to the answer.
    rtt: float | None = None
    error: str | None = None
    #: The server's alternate address (OTHER-ADDRESS / CHANGED-ADDRESS), when it has one.
    other: Address | None = None
    #: Where the answer came from (another address after CHANGE-REQUEST).
    source: Address | None = None


@dataclass(frozen=True)
class NatReport:
    local: Address
    udp_works: bool
    reflexive: Address | None
    mapping: str
    filtering: str
    kind: str
    probes: tuple[ServerProbe, ...]
    #: The RFC 5780 mapping probe of a server's alternate host, when one was made.
    alternate: ServerProbe | None = None

    @property
    def rtts(self) -> dict[Address, float]:
        return {p.server: p.rtt for p in self.probes if p.rtt is not None}

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "udp_works": self.udp_works,
            "local": _show(self.local),
            "reflexive": _show(self.reflexive) if self.reflexive else None,
            "mapping": self.mapping,
            "filtering": self.filtering,
            "kind": self.kind,
            "servers": [
                {
                    "address": _show(p.server),
                    "mapped": _show(p.mapped) if p.mapped else None,
                    "rtt_ms": round(p.rtt * 1000, 1) if p.rtt is not None else None,
                    "error": p.error,
                }
                for p in self.probes
            ],
        }


def _show(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _probe(
    client: StunClient, server: Address, timeout: float | None, change: ChangeRequest | None = None
) -> ServerProbe:
    try:
        response = await client.binding_response(server, timeout=timeout, change=change)
        mapped = mapped_address(response)
    except VoipError as exc:
        return ServerProbe(server, error=str(exc))
    other = response.message.get(OTHER_ADDRESS) or response.message.get(CHANGED_ADDRESS)
    return ServerProbe(server, mapped, response.rtt, other=other, source=response.source)


def _all(*coroutines: Any) -> Deferred[list[ServerProbe]]:
    return gatherResults([Deferred.fromCoroutine(c) for c in coroutines])


async def discover(
    client: StunClient,
    local: Address,
    servers: list[Address],
    *,
    timeout: float | None = None,
    resolve: Callable[[Address], str | None] = route_source,
) -> NatReport:
    """Ask ``servers`` (concurrently) how they see ``client``'s socket bound to ``local``.

    When ``local`` has an unspecified host (0.0.0.0 or ::), ``resolve(server)`` says which local
    address the system sends from to reach that server.
    """
    unique = list(dict.fromkeys((host, port) for host, port in servers))
    probes = tuple(await _all(*(_probe(client, s, timeout) for s in unique)))
    answered = [p for p in probes if p.mapped is not None]
    alternate, filtering = None, "unknown"
    offering = next((p for p in answered if p.other is not None), None)
    if offering is not None and offering.other is not None:
        other_host = (offering.other[0], offering.server[1])
        # Filtering first: a packet to the alternate host would open the NAT to it.
        both, port_only = await _all(
            _probe(client, offering.server, timeout, ChangeRequest(True, True)),
            _probe(client, offering.server, timeout, ChangeRequest(False, True)),
        )
        (alternate,) = await _all(_probe(client, other_host, timeout))
        filtering = _filtering(offering.server, both, port_only)
    mapping, kind = _classify(local, answered, alternate, resolve)
    return NatReport(
        local=local,
        udp_works=bool(answered),
        reflexive=answered[0].mapped if answered else None,
        mapping=mapping,
        filtering=filtering,
        kind=kind,
        probes=probes,
        alternate=alternate,
    )


def _filtering(server: Address, both: ServerProbe, port_only: ServerProbe) -> str:
    """RFC 5780 s.4.4 from the answers to CHANGE-REQUEST (ip and port) and (port only)."""
    if both.source is not None:
        # A server that ignored the change answered from its own address: that proves nothing.
        return "endpoint-independent" if both.source[0] != server[0] else "unknown"
    if port_only.source is not None:
        return "address-dependent" if port_only.source != server else "unknown"
    return "address-and-port-dependent"


def _classify(
    local: Address,
    answered: list[ServerProbe],
    alternate: ServerProbe | None,
    resolve: Callable[[Address], str | None],
) -> tuple[str, str]:
    if not answered:
        return "unknown", "UDP blocked"
    if any(p.mapped == _local_towards(local, p.server, resolve) for p in answered):
        return "none", "public"
    evidence = answered + ([alternate] if alternate and alternate.mapped else [])
    if len({p.mapped for p in evidence}) > 1:
        return "address-dependent", "symmetric NAT"
    if len({p.server[0] for p in evidence}) > 1:
        return "endpoint-independent", "cone NAT"
    return "unknown", "NAT (type unknown)"


def _local_towards(
    local: Address, server: Address, resolve: Callable[[Address], str | None]
) -> Address | None:
    host, port = local
    try:
        unspecified = ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return local
    if not unspecified:
        return (str(ipaddress.ip_address(host)), port)
    source = resolve(server)
    return (source, port) if source is not None else None
