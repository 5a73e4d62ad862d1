"""Relay offers (overlay.relayoffers): a supernode offers its relay and a slot peer's.

Supernodes on the in-memory network of test_supernode, a Clock; the relays are stand-in
endpoints (secret and spare count: what an offer needs).  Real relays take the offers in
tests/integration/test_relay_call.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred

from overlay.certificate import Role, issue
from overlay.errors import ProtocolError
from overlay.identity import IdentityKey
from overlay.messages import Error
from overlay.overlay_protocol import RelayMint, RelayMinted
from overlay.relayoffers import MAX_SKEW, RelayEndpoint, _signed_part
from overlay.turn import credential_user, turn_password
from tests.unit.test_supernode import CA, NOW, Overlay, pump, results


def relay_for(sn: Any, spare: int = 5) -> RelayEndpoint:
    assert sn.info is not None
    return RelayEndpoint(sn.info.host, 3478, 3478, sn.node_id[:16], lambda: spare)


@pytest.fixture
def overlay() -> Overlay:
    overlay = Overlay(20)
    for sn in overlay.sns.values():
        sn.relay = relay_for(sn)
    return overlay


def offers_of(overlay: Overlay, sn: Any, user: str) -> Any:
    got = results(Deferred.fromCoroutine(sn.offers.for_node(user)))
    pump(overlay.clock, 1.5)
    assert got, "no offers yet"
    return got[0]


def test_a_node_gets_its_supernodes_relay_and_a_slot_peers(overlay: Overlay) -> None:
    sn = next(iter(overlay.sns.values()))
    offers = offers_of(overlay, sn, "alice")
    assert len(offers) == 2
    own, peer = offers
    assert own.host == sn.info.host
    assert peer.host != sn.info.host
    assert peer.host in {p.host for p in sn.view.peers}
    owner = next(s for s in overlay.sns.values() if s.info.host == peer.host)
    for offer, relay in ((own, sn.relay), (peer, owner.relay)):
        assert credential_user(offer.username) == "alice"
        assert offer.password == turn_password(relay.secret, offer.username)  # the relay's own
        assert offer.expires > NOW + 3600
    assert owner.counters["relay-credentials-minted"] == 1


def test_a_full_relay_offers_nothing_and_a_silent_peer_costs_a_second(overlay: Overlay) -> None:
    sn = next(iter(overlay.sns.values()))
    sn.relay = relay_for(sn, spare=0)
    for peer in sn.view.peers:
        overlay.net.detach((peer.host, peer.udp_port))
    offers = offers_of(overlay, sn, "alice")
    assert offers == ()
    assert sn.counters["relay-full"] == 1


def mint(
    overlay: Overlay, target: Any, signed_for: Any, *, key: IdentityKey, cert: bytes, sent_at: float
) -> Any:
    sent = int(sent_at)

    def build(rid: int) -> RelayMint:
        signature = key.sign(_signed_part(rid, "alice", signed_for.node_id, sent))
        return RelayMint(rid, "alice", cert, sent, signature)

    got = results(overlay.client.request((target.info.host, target.info.udp_port), build))
    pump(overlay.clock, 0.05)
    return got[0]


@pytest.mark.parametrize("forgery", ["user certificate", "wrong key", "stale", "other target"])
def test_only_a_certified_supernode_gets_a_peers_credential(overlay: Overlay, forgery: str) -> None:
    asker, target, third = list(overlay.sns.values())[:3]
    key = overlay.keys[asker.node_id]
    now = overlay.clock.seconds()
    assert asker.certificate is not None
    honest = mint(overlay, target, target, key=key, cert=asker.certificate, sent_at=now)
    assert isinstance(honest, RelayMinted) and len(honest.relays) == 1
    cert, signed_for, sent_at = asker.certificate, target, now
    if forgery == "user certificate":
        cert = bytes(issue(CA, "mallory", key.public_key, serial=2, now=NOW, role=Role.USER))
    elif forgery == "wrong key":
        key = IdentityKey.generate()
    elif forgery == "stale":
        sent_at -= MAX_SKEW + 1
    else:  # signed for the third supernode, sent to the target
        signed_for = third
    refused = target.counters["relay-mint-refused"] + target.counters["relay-mint-stale"]
    reply = mint(overlay, target, signed_for, key=key, cert=cert, sent_at=sent_at)
    assert isinstance(reply, Error), reply
    assert (
        target.counters["relay-mint-refused"] + target.counters["relay-mint-stale"] == refused + 1
    )


def test_the_handler_refuses_a_name_that_is_no_user(overlay: Overlay) -> None:
    asker, target = list(overlay.sns.values())[:2]
    now = int(overlay.clock.seconds())
    key = overlay.keys[asker.node_id]
    assert asker.certificate is not None
    signature = key.sign(_signed_part(1, "a:b", target.node_id, now))
    message = RelayMint(1, "a:b", asker.certificate, now, signature)
    with pytest.raises(ProtocolError):
        target.offers.handle_mint(message)
