"""Candidates: the addresses a call side may be reached at, as exchanged in the call set-up.

A candidate is (kind, host, port, priority), ICE's idea (RFC 8445 5.1.1) without the
foundation and component: we have one component (the call socket) and no frozen check lists.

    kind    what it is                                          type preference
    host    an address of the call socket on a local interface       126
    prflx   learned from a check: the peer saw us at this address      110
    srflx   learned from STUN on a supernode: our NAT's mapping        100
    relay   an address on a relay (TURN) that forwards to us             0

Priority (RFC 8445 5.1.2.1, component 1) is ``type_pref << 24 | local_pref << 8 | 255``: higher
is tried first.  On the wire (inside the signed INVITE/ACCEPT, CBOR) a candidate is the plain
list ``[kind, host, port, priority]``; ``from_wire`` checks everything and raises only
``CandidateError``: the host must be an IPv4 or IPv6 literal (no names, no zone ids, not
unspecified, multicast or broadcast), the port 1-65535, the priority 0 to 2**32-1, and a list
holds at most ``MAX_CANDIDATES``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from overlay.errors import ProtocolError

Address = tuple[str, int]
MAX_CANDIDATES = 16
MAX_HOST_TEXT = 45  # the longest IPv6 literal with an embedded IPv4 address
KINDS = ("host", "srflx", "prflx", "relay")
TYPE_PREFERENCE = {"host": 126, "prflx": 110, "srflx": 100, "relay": 0}
LOCAL_PREFERENCE = 65535


class CandidateError(ProtocolError):
    """A candidate address from the peer is not valid."""

    code = "bad-candidate"


class CandidateLike(Protocol):
    """Anything with a candidate's four fields (``client.signalling.CandidateInfo`` too)."""

    @property
    def kind(self) -> str: ...
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def priority(self) -> int: ...


def priority(kind: str, local_preference: int = LOCAL_PREFERENCE) -> int:
    """RFC 8445 5.1.2.1 priority of a ``kind`` candidate of our single component."""
    if kind not in TYPE_PREFERENCE:
        raise CandidateError(f"Unknown candidate kind {kind[:20]!r}.")
    if not 0 <= local_preference <= 65535:
        raise CandidateError("A local preference is 0 to 65535.")
    return TYPE_PREFERENCE[kind] << 24 | local_preference << 8 | 255


def check_host(host: object) -> str:
    """The canonical text of an IP literal usable as a candidate address."""
    if not isinstance(host, str) or not host or len(host) > MAX_HOST_TEXT:
        raise CandidateError("A candidate address is not an IP address.")
    if "%" in host:
        raise CandidateError("A candidate address carries a zone id.")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise CandidateError("A candidate address is not an IP address.") from None
    if address.is_unspecified or address.is_multicast:
        raise CandidateError(f"A candidate address cannot be {address}.")
    if address == ipaddress.IPv4Address("255.255.255.255"):
        raise CandidateError("A candidate address cannot be the broadcast address.")
    return str(address)


def family(host: str) -> int:
    """4 or 6."""
    return 6 if ":" in host else 4


def _int(value: object, low: int, high: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise CandidateError(f"A candidate {what} is out of range.")
    return value


@dataclass(frozen=True)
class Candidate:
    """One address of a call side. Construction validates (``CandidateError``)."""

    kind: str
    host: str
    port: int
    priority: int

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or self.kind not in KINDS:
            raise CandidateError("A candidate has an unknown kind.")
        object.__setattr__(self, "host", check_host(self.host))
        _int(self.port, 1, 65535, "port")
        _int(self.priority, 0, 2**32 - 1, "priority")

    @classmethod
    def make(
        cls, kind: str, address: Address, local_preference: int = LOCAL_PREFERENCE
    ) -> Candidate:
        """A candidate of ``kind`` at ``address`` with the standard priority."""
        return cls(kind, address[0], address[1], priority(kind, local_preference))

    @classmethod
    def of(cls, other: CandidateLike) -> Candidate:
        """A ``Candidate`` from anything with the four fields (checked)."""
        if isinstance(other, Candidate):
            return other
        return cls(other.kind, other.host, other.port, other.priority)

    @property
    def address(self) -> Address:
        return (self.host, self.port)

    @property
    def family(self) -> int:
        return family(self.host)

    def to_wire(self) -> list[str | int]:
        return [self.kind, self.host, self.port, self.priority]

    @classmethod
    def from_wire(cls, value: object) -> Candidate:
        """Decode ``[kind, host, port, priority]``; raises only ``CandidateError``."""
        if not isinstance(value, list | tuple) or len(value) != 4:
            raise CandidateError("A candidate is not a list of kind, host, port and priority.")
        kind, host, port, prio = value
        return cls(kind, host, port, prio)

    def __str__(self) -> str:
        host = f"[{self.host}]" if self.family == 6 else self.host
        return f"{self.kind} {host}:{self.port}"


def to_wire(candidates: Iterable[Candidate]) -> list[list[str | int]]:
    return [c.to_wire() for c in candidates]


def from_wire(value: object) -> list[Candidate]:
    """Decode a list of candidates (at most ``MAX_CANDIDATES``, duplicates dropped)."""
    if not isinstance(value, list | tuple):
        raise CandidateError("The candidates are not a list.")
    if len(value) > MAX_CANDIDATES:
        raise CandidateError(f"More than {MAX_CANDIDATES} candidates.")
    return dedupe(Candidate.from_wire(item) for item in value)


def dedupe(candidates: Iterable[Candidate]) -> list[Candidate]:
    """One candidate per address, the highest priority kept, in first-seen order."""
    best: dict[Address, Candidate] = {}
    for candidate in candidates:
        seen = best.get(candidate.address)
        if seen is None or candidate.priority > seen.priority:
            best[candidate.address] = candidate
    return list(best.values())


def parse_address(text: str) -> Address:
    """``"203.0.113.5:4000"`` or ``"[2001:db8::1]:4000"`` -> (host, port); raises CandidateError."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or len(port) > 5:
        raise CandidateError(f"{text[:60]!r} is not host:port.")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return (check_host(host), _int(int(port), 1, 65535, "port"))


def format_address(address: Sequence[object]) -> str:
    host, port = str(address[0]), address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
