"""The state of one TURN allocation: permissions, channels, bandwidth, counters (RFC 8656 s.2-12).

An ``Allocation`` belongs to one client 5-tuple, written ``ClientKey = (transport, address)``
where transport is ``"udp"`` or ``"tcp"`` (the server's own address is implied by the listener).
It owns one relayed UDP socket (a ``RelayedSocket``, made by an injected ``RelayFactory`` so
unit tests use an in-memory one), the username that created it (every later request must use the
same one, RFC 8656 s.5), and three time tables, all read with the injected clock's ``now``:

    table           key            value                      lifetime (refreshed by)
    allocation      ClientKey      expiry time                600 s..3600 s (Refresh)
    permissions     peer IP        expiry time                300 s (CreatePermission,
                                                              ChannelBind)
    channels        0x4000-0x4FFF  (peer address, expiry)     600 s (ChannelBind); kept 300 s
                                                              more, unusable, so the number is
                                                              not rebound to another peer
                                                              (RFC 8656 s.12)

Expired entries are ignored at once and removed by ``expire(now)`` (the server's sweep).
Bandwidth is limited per direction by a ``TokenBucket`` (bytes per second, a burst of one
second or two full-size messages, whichever is larger); a packet that does not fit is dropped.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from twisted.internet.defer import Deferred

from overlay.stun import Address
from overlay.turn import MAX_MESSAGE

#: ("udp" | "tcp", client address): the 5-tuple of an allocation, seen from one listener.
ClientKey = tuple[str, Address]
#: Called by a relayed socket for each datagram from a peer: (data, peer address).
PeerHandler = Callable[[bytes, Address], None]

#: How long an expired channel number stays reserved for its peer (RFC 8656 s.12: 5 minutes).
CHANNEL_COOLDOWN = 300.0


class RelayedSocket(Protocol):
    """The UDP socket of one allocation on the relay address."""

    @property
    def address(self) -> Address: ...

    def send(self, data: bytes, peer: Address) -> None: ...

    def close(self) -> Deferred[None] | None: ...


#: Opens a relayed socket that hands what peers send to the handler; raises OSError when it
#: cannot (the server answers 508).
RelayFactory = Callable[[PeerHandler], RelayedSocket]


@dataclass
class TokenBucket:
    """Bytes per second with a burst; ``rate`` 0 means unlimited."""

    rate: float
    stamp: float
    tokens: float = 0.0

    def __post_init__(self) -> None:
        self.tokens = self.burst

    @property
    def burst(self) -> float:
        return max(self.rate, 2.0 * MAX_MESSAGE)

    def take(self, amount: int, now: float) -> bool:
        if self.rate <= 0:
            return True
        elapsed = max(0.0, now - self.stamp)
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        self.stamp = now
        if amount > self.tokens:
            return False
        self.tokens -= amount
        return True


@dataclass
class Channel:
    peer: Address
    expires: float


@dataclass(eq=False)
class Allocation:
    key: ClientKey
    username: str
    #: The user part of the username: quotas count allocations per user.
    user: str
    #: The MESSAGE-INTEGRITY key of ``username`` (signs the responses).
    integrity_key: bytes
    socket: RelayedSocket
    created: float
    expires: float
    to_peer: TokenBucket
    to_client: TokenBucket
    #: The Allocate transaction and its answer, resent for a retransmitted Allocate.
    allocate_tid: bytes = b""
    allocate_reply: bytes = b""
    last_relayed: float = 0.0
    permissions: dict[str, float] = field(default_factory=dict)
    channels: dict[int, Channel] = field(default_factory=dict)
    #: packets/bytes to-peer and to-client, dropped (any reason).
    stats: Counter[str] = field(default_factory=Counter)

    @property
    def relayed(self) -> Address:
        return self.socket.address

    # -- permissions -------------------------------------------------------------------------

    def permit(self, host: str, until: float) -> None:
        self.permissions[host] = max(until, self.permissions.get(host, 0.0))

    def permitted(self, host: str, now: float) -> bool:
        return self.permissions.get(host, 0.0) > now

    # -- channels ----------------------------------------------------------------------------

    def bind_conflict(self, number: int, peer: Address, now: float) -> str | None:
        """Why ``number`` cannot be bound to ``peer`` now (RFC 8656 s.11.2), or None."""
        current = self.channels.get(number)
        if (
            current is not None
            and current.peer != peer
            and current.expires + CHANNEL_COOLDOWN > now
        ):
            return "Channel bound to another peer"
        for other, channel in self.channels.items():
            if other != number and channel.peer == peer and channel.expires > now:
                return "Peer bound to another channel"
        return None

    def bind(self, number: int, peer: Address, until: float) -> None:
        for other in [n for n, c in self.channels.items() if c.peer == peer and n != number]:
            del self.channels[other]  # expired (bind_conflict refused a live one)
        self.channels[number] = Channel(peer, until)

    def channel_peer(self, number: int, now: float) -> Address | None:
        channel = self.channels.get(number)
        return channel.peer if channel is not None and channel.expires > now else None

    def peer_channel(self, peer: Address, now: float) -> int | None:
        for number, channel in self.channels.items():
            if channel.peer == peer and channel.expires > now:
                return number
        return None

    # -- housekeeping ------------------------------------------------------------------------

    def expire(self, now: float) -> None:
        """Forget permissions and channel numbers whose time is over."""
        for host in [h for h, until in self.permissions.items() if until <= now]:
            del self.permissions[host]
        stale = [n for n, c in self.channels.items() if c.expires + CHANNEL_COOLDOWN <= now]
        for number in stale:
            del self.channels[number]

    def describe(self, now: float) -> dict[str, object]:
        transport, (host, port) = self.key
        relayed_host, relayed_port = self.relayed
        return {
            "user": self.user,
            "client": f"{transport}:{host}:{port}",
            "relayed": f"{relayed_host}:{relayed_port}",
            "expires_in": round(max(0.0, self.expires - now), 1),
            "permissions": len([u for u in self.permissions.values() if u > now]),
            "channels": len([c for c in self.channels.values() if c.expires > now]),
            "counters": dict(self.stats),
        }
