"""Relay offers: the TURN relays a supernode offers its attached nodes for their calls.

A node asks its supernode (``relay-offer`` over its TCP link).  The supernode offers its own
relay, with a credential it mints for the node's user (``overlay.turn.mint_credential``, the
secret is its relay's), and one relay of a slot peer, so that a call has a second relay to move
to even when both callers sit on the same supernode.  The peer's credential comes from the peer
itself (``relay-mint`` over UDP): only a supernode may ask, so the request carries the asking
supernode's certificate (role supernode, signed by the CA) and its node key's signature over
the request, the asked supernode's id and the time; the answer is the peer's own offer.

    SN -> SN   relay-mint {rid, user, certificate, sent_at, signature} -> relay-minted {rid, relays}

A relay offers nothing when it has no spare allocation.  Requests older than ``MAX_SKEW`` or
not signed by a certified supernode are refused and counted; an accepted one costs only a
credential (the allocation itself still needs the user to come), so a replay inside the window
gains nothing.  Replies are smaller than requests (the certificate alone outweighs an offer).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cbor2
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger

from overlay.certificate import Role, SignedCertificate
from overlay.errors import ProtocolError, VoipError
from overlay.identity import verify_signature
from overlay.overlay_protocol import RelayMint, RelayMinted, RelayOffer
from overlay.turn import mint_credential
from overlay.usernames import is_valid_username

if TYPE_CHECKING:
    from overlay.supernode import Supernode

log = Logger()

MINT_CONTEXT = b"voip-relay-mint-v1"
#: How long a relay credential minted for a user stays valid: longer than any call, since the
#: client refreshes its allocation with the same credential.
RELAY_CREDENTIAL_TTL = 12 * 3600
#: A relay-mint request this much older (or newer) than our clock is refused.
MAX_SKEW = 60.0
#: How long the supernode waits for a peer's credential before offering its own relay alone.
PEER_TIMEOUT = 1.0
PEERS_ASKED = 2


@dataclass
class RelayEndpoint:
    """The TURN relay running beside a supernode (``relay.service``), as offered to nodes."""

    host: str
    udp_port: int
    tcp_port: int
    secret: bytes
    #: How many more allocations the relay can take now.
    spare: Callable[[], int]


def _signed_part(rid: int, user: str, target: bytes, sent_at: int) -> bytes:
    return MINT_CONTEXT + bytes(cbor2.dumps([rid, user, target, sent_at], canonical=True))


class RelayOffers:
    def __init__(self, supernode: Supernode) -> None:
        self.supernode = supernode

    def own(self, username: str) -> tuple[RelayOffer, ...]:
        """Our relay with a credential for ``username``, when it has room; else nothing."""
        sn = self.supernode
        relay = sn.relay
        if relay is None:
            return ()
        spare = relay.spare()
        if spare <= 0:
            sn.counters["relay-full"] += 1
            return ()
        credential = mint_credential(
            relay.secret, username, sn.clock.seconds(), RELAY_CREDENTIAL_TTL
        )
        sn.counters["relay-offers"] += 1
        return (
            RelayOffer(
                relay.host,
                relay.udp_port,
                relay.tcp_port,
                credential.username,
                credential.password,
                credential.expires,
                spare,
            ),
        )

    async def for_node(self, username: str) -> tuple[RelayOffer, ...]:
        """Our relay and one of a slot peer (the first to answer), for an attached user."""
        sn = self.supernode
        own = self.own(username)
        view, certificate = sn.view, sn.certificate
        if view is None or certificate is None:
            return own
        peers = [p for p in view.peers if p.node_id != sn.node_id]
        sn.rng.shuffle(peers)
        asks = [
            self._ask(peer.host, peer.udp_port, peer.node_id, username)
            for peer in peers[:PEERS_ASKED]
        ]
        if not asks:
            return own
        results = await DeferredList(asks, consumeErrors=True)
        others = [offer for ok, offers in results if ok for offer in offers]
        return (*own, *others[:1])

    def _ask(
        self, host: str, port: int, node_id: bytes, username: str
    ) -> Deferred[tuple[RelayOffer, ...]]:
        sn = self.supernode
        assert sn.certificate is not None
        sent_at = int(sn.clock.seconds())

        def build(rid: int) -> RelayMint:
            signature = sn.node_key.sign(_signed_part(rid, username, node_id, sent_at))
            return RelayMint(rid, username, sn.certificate or b"", sent_at, signature)

        def offers(reply: object) -> tuple[RelayOffer, ...]:
            if isinstance(reply, RelayMinted):
                return reply.relays[:1]
            return ()

        asked = sn.udp.request((host, port), build, timeout=PEER_TIMEOUT)
        return asked.addCallback(offers)

    def handle_mint(self, message: RelayMint) -> RelayMinted:
        """A peer supernode asks us for a credential for its user: check it is a supernode."""
        sn = self.supernode
        now = sn.clock.seconds()
        if abs(now - message.sent_at) > MAX_SKEW:
            sn.counters["relay-mint-stale"] += 1
            raise ProtocolError("The relay-mint request is stale.")
        try:
            cert = SignedCertificate.parse(message.certificate).verify(
                sn.ca_public_key, now, Role.SUPERNODE
            )
        except VoipError:
            sn.counters["relay-mint-refused"] += 1
            raise ProtocolError(
                "The relay-mint request has no valid supernode certificate."
            ) from None
        signed = _signed_part(message.rid, message.user, sn.node_id, message.sent_at)
        if not verify_signature(cert.public_key, signed, message.signature):
            sn.counters["relay-mint-refused"] += 1
            raise ProtocolError("The relay-mint request is not signed by its supernode.")
        if not is_valid_username(message.user):
            raise ProtocolError("The relay-mint request names no valid user.")
        sn.counters["relay-credentials-minted"] += 1
        return RelayMinted(message.rid, self.own(message.user))
