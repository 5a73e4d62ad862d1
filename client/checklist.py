"""The check list of one call's connectivity checks: candidate pairs, their order, their state.

Every local candidate is an address of the one call socket, so a pair on a reflexive local
candidate is redundant with the pair on its base (RFC 8445 6.1.2.4 prunes it): the list holds one
pair per remote address of a family we have locally, at most ``MAX_PAIRS``.  A pair's priority is
RFC 8445 6.1.2.3's, from the controlling side's candidate (G) and the controlled side's (D),
with our best local candidate of the family standing for the (single) local base.  The local half
of a pair is learned from a response: the address the peer saw us at, which is one of our host
or server-reflexive candidates, or a new peer-reflexive one.  ``client.connectivity`` runs the
checks on this list.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IDelayedCall

from client.candidates import Address, Candidate, check_host, priority

MAX_PAIRS = 40


def pair_priority(controlling: int, controlled: int) -> int:
    """RFC 8445 6.1.2.3: G is the controlling side's candidate priority, D the other's."""
    g, d = controlling, controlled
    return (min(g, d) << 32) + 2 * max(g, d) + (1 if g > d else 0)


@dataclass
class Pair:
    """One remote address and what the checks found out about it."""

    remote: Candidate
    priority: int
    sends: int = 0
    #: When the next check on this pair is due (retransmissions keep to the plan, not drift).
    due: float = 0.0
    timer: IDelayedCall | None = None
    #: A check on it got an answer from the address it went to.
    valid: bool = False
    #: Our address as the peer saw it on this pair (known once valid).
    local: Candidate | None = None
    rtt: float = 0.0
    nominated: bool = False


@dataclass(frozen=True)
class SelectedPair:
    """The path both sides agreed on."""

    #: Our address as the peer sees it on this path (host, srflx or prflx).
    local: Candidate
    #: Where to send media.
    remote: Address
    #: Round-trip time of the last check on this pair, in seconds.
    rtt: float
    remote_candidate: Candidate


class CheckList:
    def __init__(
        self, local: Sequence[Candidate], controlling: bool, counters: Counter[str]
    ) -> None:
        self.local = list(local)
        self.controlling = controlling
        self.counters = counters
        self.families = {c.family for c in self.local}
        self.pairs: dict[Address, Pair] = {}

    def add(self, remote: Candidate) -> Pair | None:
        """The new pair for ``remote`` (None: known already, another family, or list full)."""
        if remote.family not in self.families:
            self.counters["unusable-candidates"] += 1
            return None
        known = self.pairs.get(remote.address)
        if known is not None:
            if known.remote.kind == "prflx" and remote.kind != "prflx":
                known.remote = remote  # signalled after we learned it from a check
            return None
        if len(self.pairs) >= MAX_PAIRS:
            self.counters["too-many-pairs"] += 1
            return None
        pair = Pair(remote, self._priority(remote))
        self.pairs[remote.address] = pair
        return pair

    def _priority(self, remote: Candidate) -> int:
        local = max(c.priority for c in self.local if c.family == remote.family)
        if self.controlling:
            return pair_priority(local, remote.priority)
        return pair_priority(remote.priority, local)

    def set_role(self, controlling: bool) -> None:
        """After a role switch: new priorities, and no nomination stands."""
        self.controlling = controlling
        for pair in self.pairs.values():
            pair.priority = self._priority(pair.remote)
            pair.nominated = False

    def local_for(self, observed: Address) -> Candidate:
        """Our candidate at the address the peer saw (a new peer-reflexive one if unknown)."""
        address = (check_host(observed[0]), observed[1])
        for candidate in self.local:
            if candidate.address == address:
                return candidate
        learned = Candidate("prflx", address[0], address[1], priority("prflx"))
        self.local.append(learned)
        return learned

    def ranked(self) -> list[Pair]:
        return sorted(self.pairs.values(), key=lambda p: p.priority, reverse=True)

    def failure_text(self, peer: str, timeout: float, heard_peer: bool) -> str:
        """What ``NoDirectPath`` says: what the checks saw before the timeout."""
        where = f"No direct path to {peer}'s node"
        within = f"within {timeout:g} s"
        if not self.pairs:
            families = " and ".join(f"IPv{f}" for f in sorted(self.families)) or "no address"
            return f"{where}: it offered no address we can reach (we have {families})."
        count = f"{len(self.pairs)} candidate pair{'s' if len(self.pairs) != 1 else ''}"
        if any(p.valid for p in self.pairs.values()):
            return f"{where}: checks on {count} succeeded, but no pair was confirmed {within}."
        if heard_peer:
            return (
                f"{where}: its checks reached us, but none of ours on {count} was answered "
                f"{within} (its NAT filters us)."
            )
        return f"{where}: no answer on {count} {within}, and none of its checks reached us."

    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                "remote": str(p.remote),
                "local": str(p.local) if p.local is not None else None,
                "valid": p.valid,
                "nominated": p.nominated,
                "sends": p.sends,
                "rtt_ms": round(p.rtt * 1000, 1) if p.valid else None,
            }
            for p in self.ranked()
        ]
