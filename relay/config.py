"""The relay's options (``RelayConfig``), with their documented defaults (docs/relay.md)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from overlay.turn import CHANNEL_LIFETIME, DEFAULT_LIFETIME, MAX_LIFETIME, PERMISSION_LIFETIME

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class RelayConfig:
    """Every option of the relay; the defaults are the documented ones (docs/relay.md)."""

    #: The shared secret of the time-limited credentials (coturn's static-auth-secret).
    secret: bytes
    realm: str = "voip"
    #: Where clients reach the relay (UDP and TCP); port 0: ephemeral, the same for both if can.
    listen_host: str = "127.0.0.1"
    udp_port: int = 3478
    tcp_port: int = 3478
    #: The address relayed sockets are opened on (peers see this one).
    relay_ip: str = "127.0.0.1"
    #: Peers a client may reach; nothing else (default: none at all).
    allow_peers: tuple[IPNetwork, ...] = ()
    #: Also every globally routable unicast address (the CLI's ``--allow-peers public``).
    allow_public_peers: bool = False
    max_allocations: int = 1000
    user_quota: int = 8
    #: Bytes per second per allocation and direction; 0: unlimited.
    bandwidth: int = 64 * 1024
    #: Seconds an allocation may relay nothing before it is deleted; 0: never.
    idle_timeout: float = 120.0
    default_lifetime: int = DEFAULT_LIFETIME
    max_lifetime: int = MAX_LIFETIME
    permission_lifetime: int = PERMISSION_LIFETIME
    channel_lifetime: int = CHANNEL_LIFETIME
    nonce_lifetime: float = 600.0
    #: Bytes a 401/438 to an unauthenticated UDP request may exceed it by (default 0: never).
    #: coturn's ``turnutils_uclient -y`` sends 44-byte Allocates, which need 8.
    challenge_slack: int = 0
    #: How often expired allocations, permissions and channels are removed.
    sweep_interval: float = 5.0

    def __post_init__(self) -> None:
        if not self.secret:
            raise ValueError("the relay needs a non-empty secret")
        if len(self.realm.encode()) > 763:
            raise ValueError("a STUN realm has at most 763 bytes")

    def peer_allowed(self, host: str) -> bool:
        """May a client reach ``host`` through the relay (CreatePermission, ChannelBind)?"""
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        if any(ip in network for network in self.allow_peers):
            return True
        return self.allow_public_peers and ip.is_global and not ip.is_multicast
