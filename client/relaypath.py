"""Relayed media paths: which relay, allocating on it, checking the relayed pair.

A call tries a direct path and a relayed one at once (``client.mediapath`` decides between
them).  This module is the relayed side:

- **Offers.** Each side's supernode offers its own TURN relay (``relay-offer``) with a
  time-limited credential; a node may add a relay of its own configuration (``--relay``).  The
  INVITE carries the caller's offers, the ACCEPT the callee's, so both sides know every relay
  and may use each (``client.signalling``).
- **Probes.** Each side measures its round-trip time to every offered relay with a STUN Binding
  over the call socket (``probe``); a relay that does not answer over UDP is timed by a TCP
  connect instead, and used over TCP (UDP blocked).  The ACCEPT carries the callee's figures.
- **Choice** (``choose``, by the caller, which controls): the relay with the lowest combined
  round-trip time (the caller's plus the callee's) is the primary; the next best other relay,
  when there is one, is the backup, allocated too so that a relay dying mid-call costs only the
  switch.  The caller says so in a ``relay`` signal with its relayed addresses; the callee
  allocates on the same relays and answers with its own.
- **Legs** (``RelayLeg``): one TURN allocation (``client.turnclient``) and one connectivity
  checker (``client.connectivity``) whose packets travel through the allocation: our relayed
  address to the peer's relayed address.  What arrives from the peer through the relay is
  passed on by its first byte: check packets to the leg's checker, RTP to the media.

When the NAT kinds of both sides already say direct cannot work (``direct_possible``: UDP
blocked on a side, or address-dependent mapping on both), no direct checks are made at all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from client.callsocket import Address
from client.signalling import CandidateInfo
from overlay.errors import VoipError
from overlay.overlay_protocol import RelayOffer

log = Logger()

RELAY_PRIORITY = 0
#: How long a relay probe waits for a STUN answer over UDP, then for a TCP connect.
PROBE_TIMEOUT = 1.5
#: The round-trip time a relay reachable only over TCP counts as, against UDP ones (ms).
TCP_PENALTY_MS = 200
UNREACHABLE = -1


@dataclass(frozen=True)
class Probe:
    """One side's round trip to one relay: milliseconds (-1: unreachable) and transport."""

    rtt_ms: int
    transport: str  # "udp" | "tcp" | "none"

    @property
    def cost(self) -> int | None:
        if self.rtt_ms < 0:
            return None
        return self.rtt_ms + (TCP_PENALTY_MS if self.transport == "tcp" else 0)


def direct_possible(mine: str | None, theirs: str | None) -> tuple[bool, str]:
    """Can a direct path work at all, by the two sides' NAT kinds (``voipctl netcheck``)?"""
    kinds = (mine or "unknown", theirs or "unknown")
    if "udp-blocked" in kinds:
        return False, "UDP is blocked on one side"
    if kinds == ("symmetric-nat", "symmetric-nat"):
        return False, "both sides are behind symmetric NATs"
    return True, ""


@dataclass(frozen=True)
class Choice:
    #: Indexes into the offers (the caller's, then the callee's): primary first.
    legs: tuple[int, ...]
    reason: str


def choose(offers: list[RelayOffer], mine: list[Probe], theirs: list[int]) -> Choice | None:
    """The primary (and backup) relay by lowest combined round-trip time; None: no relay."""
    scored: list[tuple[int, int, str]] = []
    seen: set[str] = set()
    for index, offer in enumerate(offers):
        if offer.label in seen or index >= len(mine):
            continue
        seen.add(offer.label)
        own = mine[index].cost
        other = theirs[index] if index < len(theirs) else UNREACHABLE
        if own is None or other is None or other < 0:
            continue
        scored.append((own + other, index, offer.label))
    if not scored:
        return None
    scored.sort()
    total, first, label = scored[0]
    legs = (first,) if len(scored) == 1 else (first, scored[1][1])
    reason = (
        f"relay {label} has the lowest combined round trip, {total} ms "
        f"({mine[first].rtt_ms} + {theirs[first]} ms), of {len(scored)} usable"
    )
    return Choice(legs, reason)


async def probe(
    reactor: Any,
    stun: Any,
    offer: RelayOffer,
    tcp_connect: Callable[[Address, float], Deferred[float]] | None,
    udp: bool = True,
) -> Probe:
    """Time a STUN Binding to the relay over the call socket; else a TCP connect."""
    if udp:
        start = reactor.seconds()
        try:
            await stun.binding(offer.udp_address, timeout=PROBE_TIMEOUT)
        except VoipError:
            pass
        else:
            return Probe(max(0, round((reactor.seconds() - start) * 1000)), "udp")
    if tcp_connect is not None and offer.tcp_port:
        try:
            seconds = await tcp_connect(offer.tcp_address, PROBE_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - any failure to connect means unreachable
            log.info("relay {relay} unreachable over TCP: {e}", relay=offer.label, e=exc)
        else:
            return Probe(max(0, round(seconds * 1000)), "tcp")
    return Probe(UNREACHABLE, "none")


class RelayLeg:
    """One relay of this call: our allocation there, and the checks of the relayed pair."""

    def __init__(  # noqa: PLR0917 - each part a leg is made of
        self,
        reactor: Any,
        index: int,
        offer: RelayOffer,
        transport: str,
        turn: Any,
        on_media: Callable[[bytes], None],
        on_failed: Callable[[RelayLeg, str], None],
    ) -> None:
        self.reactor = reactor
        self.index = index
        self.offer = offer
        self.transport = transport
        self.turn = turn
        self.on_media = on_media
        self.relayed: Address | None = None
        self.remote: Address | None = None
        self.checker: Any = None
        self.selected: Any = None
        self.failed: str | None = None
        self.last_heard: float | None = None
        self._on_failed = on_failed
        turn.on_data = self._data
        turn.on_failed = self._turn_failed

    @property
    def label(self) -> str:
        return f"{self.offer.label} ({self.transport.upper()})"

    async def open(self) -> CandidateInfo:
        """Allocate; our relayed address as a candidate for the peer."""
        relayed = await self.turn.allocate()
        self.relayed = (relayed[0], relayed[1])
        return CandidateInfo("relay", relayed[0], relayed[1], RELAY_PRIORITY)

    async def connect(self, remote: CandidateInfo, make_checker: Callable[..., Any]) -> Any:
        """Let the peer's relayed address in, and check the pair; fires with the pair."""
        self.remote = (remote.host, remote.port)
        await self.turn.permit(self.remote)
        try:
            await self.turn.bind(self.remote)
        except VoipError as exc:  # a channel saves 32 bytes a packet; Send works without
            log.info("no channel on relay {relay}: {error}", relay=self.label, error=exc)
        assert self.relayed is not None
        local = CandidateInfo("relay", self.relayed[0], self.relayed[1], RELAY_PRIORITY)
        self.checker = make_checker(self.turn.send, [local], [remote])
        self.selected = await self.checker.start()
        return self.selected

    def send_media(self, data: bytes) -> None:
        if self.remote is not None and self.failed is None:
            self.turn.send(data, self.remote)

    def _data(self, data: bytes, peer: Address) -> None:
        if self.remote is None or (peer[0], peer[1]) != self.remote or not data:
            return
        self.last_heard = self.reactor.seconds()
        if 0x80 <= data[0] <= 0xBF:
            self.on_media(data)
        elif self.checker is not None:
            self.checker.datagram_received(data, peer)

    def _turn_failed(self, reason: str) -> None:
        if self.failed is None:
            self.failed = reason
            self._on_failed(self, reason)

    def close(self) -> None:
        if self.checker is not None:
            self.checker.stop()
        self.failed = self.failed or "closed"
        closing = self.turn.close()
        if isinstance(closing, Deferred):
            closing.addErrback(lambda f: log.info("relay close: {e}", e=f.getErrorMessage()))
        elif closing is not None:
            Deferred.fromCoroutine(closing).addErrback(
                lambda f: log.info("relay close: {e}", e=f.getErrorMessage())
            )

    def describe(self) -> dict[str, Any]:
        return {
            "relay": self.offer.label,
            "transport": self.transport,
            "relayed": f"{self.relayed[0]}:{self.relayed[1]}" if self.relayed else None,
            "peer": f"{self.remote[0]}:{self.remote[1]}" if self.remote else None,
            "ready": self.selected is not None and self.failed is None,
            "failed": self.failed,
        }
