"""Mailboxes (overlay.mailbox): bounds and expiry on a Clock, deposit at every member of the
recipient's slot, collection in order at login over the in-memory network, drop after the ack,
a dead replica, and forged or unsigned requests refused."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from client.envelope import seal
from overlay.certificate import SignedCertificate
from overlay.errors import ProtocolError
from overlay.mailbox import (
    HOLD_FOR,
    Collect,
    Collected,
    Deposit,
    Deposited,
    Drop,
    Held,
    MailboxFull,
    MailboxStore,
    Post,
    Posted,
)
from overlay.messages import Error
from overlay.overlay_protocol import Attached, Incoming
from tests.unit.test_supernode import NOW, Link, Overlay, error_of, pump, results, user
from tests.unit.test_supernode import user_certificate as certificate


def held(n: int, sender: str = "alice", to: str = "bob", at: float = NOW) -> Held:
    return Held(n.to_bytes(16, "big"), sender, to, n, at, b"e%d" % n)


def envelope(sender: str, to: str, text: bytes, at: float = NOW, kind: str = "msg") -> bytes:
    cert = SignedCertificate.parse(certificate(sender))
    return seal(user(sender), cert, to, kind, text, at)


def test_bounds_per_pair_per_recipient_and_in_all() -> None:
    store = MailboxStore(Clock(), per_recipient=5, per_pair=3, total=6)
    for n in range(3):
        assert store.put(held(n))
    assert not store.put(held(0))  # held already: not twice
    with pytest.raises(MailboxFull, match="bob's mailbox is full: 3 messages from alice"):
        store.put(held(3))
    store.put(held(4, sender="carol"))
    store.put(held(5, sender="carol"))
    with pytest.raises(MailboxFull, match=r"^bob's mailbox is full\.$"):
        store.put(held(6, sender="dave"))
    store.put(held(7, to="erin"))
    with pytest.raises(MailboxFull, match="this supernode is"):
        store.put(held(8, to="frank"))
    assert store.counters["refused-full"] == 3


def test_envelopes_expire_72_hours_after_they_were_deposited() -> None:
    clock = Clock()
    store = MailboxStore(clock)
    store.put(held(2, at=0))
    clock.advance(HOLD_FOR - 10)
    store.put(held(1, at=clock.seconds()))
    assert [h.digest for h in store.list("bob")] == [held(1).digest, held(2).digest]  # sealed order
    clock.advance(10)
    assert [h.digest for h in store.list("bob")] == [held(1).digest]
    assert store.counters["expired"] == 1
    clock.advance(HOLD_FOR)
    assert store.list("bob") == [] and "bob" not in store.boxes


def slot_overlay() -> tuple[Overlay, list[Any], Any]:
    overlay = Overlay(20, seed=10)
    slot = overlay.slot_of_name("bob")
    return overlay, overlay.members(slot), overlay.members(1 - slot)[0]


def test_a_post_to_an_offline_user_is_held_by_every_member_of_their_slot() -> None:
    overlay, members, outsider = slot_overlay()
    outsider.locate_user = lambda name: Deferred.fromCoroutine(_none())
    alice = Link(overlay, outsider)
    assert isinstance(alice.attach("alice"), Attached)
    blob = envelope("alice", "bob", b"ciphertext", overlay.clock.seconds())
    reply = alice.request(lambda rid: Post(rid, "bob", blob), 0.5)
    assert isinstance(reply, Posted) and reply.queued and reply.replicas == len(members)
    assert all(len(sn.mailbox.store) == 1 for sn in members)
    assert len(outsider.mailbox.store) == 0
    # Someone else's envelope may not be posted by alice.
    forged = envelope("carol", "bob", b"x", overlay.clock.seconds())
    error = error_of(alice.request(lambda rid: Post(rid, "bob", forged), 0.5))
    assert error.message == "A posted message must be from its poster to the named user."


async def _none() -> None:
    return None


def test_at_login_held_messages_are_pushed_in_order_once_acked_then_dropped() -> None:
    overlay, members, outsider = slot_overlay()
    now = overlay.clock.seconds()
    blobs = [envelope("alice", "bob", b"m%d" % i, now + i) for i in range(3)]
    for blob in reversed(blobs):  # deposited out of order: delivered in sealed order
        assert isinstance(
            overlay.ask(members[0], lambda rid, b=blob: Deposit(rid, b), 0), Deposited
        )
    for sn in members[1:]:
        for blob in blobs:
            sn.mailbox.store.put(sn.mailbox.check(blob))
    # One replica is gone; the others still deliver.
    overlay.net.detach((members[1].info.host, members[1].info.udp_port))
    bob = Link(overlay, outsider)
    assert isinstance(bob.attach("bob"), Attached)
    bob.settle(3.0)
    assert bob.node.pushed == [Incoming(i + 1, blob) for i, blob in enumerate(blobs)]
    assert all(len(sn.mailbox.store) == 0 for sn in members if sn is not members[1])
    assert len(members[1].mailbox.store) == 3  # pushed again at a later login: deduped by id
    assert outsider.counters["mailbox-delivered"] == 3


def test_a_node_that_does_not_ack_leaves_its_messages_held() -> None:
    overlay, members, outsider = slot_overlay()
    blob = envelope("alice", "bob", b"m", overlay.clock.seconds())
    for sn in members:
        sn.mailbox.store.put(sn.mailbox.check(blob))
    bob = Link(overlay, outsider, answer=False)
    assert isinstance(bob.attach("bob"), Attached)
    bob.settle(6.0)
    assert len(bob.node.pushed) == 1
    assert all(len(sn.mailbox.store) == 1 for sn in members)


def test_collect_and_drop_need_a_supernode_signature_and_deposit_a_valid_envelope() -> None:
    overlay, members, _ = slot_overlay()
    sn = members[0]
    now = int(overlay.clock.seconds())
    unsigned = overlay.ask(sn, lambda rid: Collect(rid, "bob", 0, b"", now, bytes(64)), 1100)
    assert error_of(unsigned).message == "The collect request has no valid supernode certificate."
    user_cert = certificate("mallory")
    forged = overlay.ask(sn, lambda rid: Drop(rid, "bob", (), user_cert, now, bytes(64)), 0)
    assert error_of(forged).message == "The drop request has no valid supernode certificate."
    stale = envelope("alice", "bob", b"old", now - 600)
    assert "too old" in error_of(overlay.ask(sn, lambda rid: Deposit(rid, stale), 0)).message
    call = envelope("alice", "bob", b"sig", now, kind="call")
    reply = overlay.ask(sn, lambda rid: Deposit(rid, call), 0)
    assert error_of(reply).message == "A call envelope is not held for offline users."
    elsewhere = overlay.name_in_slot(1 - overlay.slot_of_name("bob"))
    reply = overlay.ask(sn, lambda rid: Deposit(rid, envelope("alice", elsewhere, b"m", now)), 0)
    assert error_of(reply).message == f"This supernode does not hold {elsewhere}'s mailbox."
    # A genuine peer's collect is answered, one envelope per padded reply.
    blob = envelope("alice", "bob", b"m", now)
    sn.mailbox.store.put(sn.mailbox.check(blob))
    peer = members[1]
    got = results(peer.mailbox._ask(sn.info, "collect", "bob", 0, 1100))
    pump(overlay.clock, 0.05)
    assert got == [Collected(got[0].rid, (blob,), None)]
    assert not isinstance(got[0], Error)


@given(st.binary(max_size=1200))
def test_deposit_of_garbage_raises_only_protocol_errors(data: bytes) -> None:
    overlay = _SHARED
    sn = overlay.members(0)[0]
    with contextlib.suppress(ProtocolError):
        sn.mailbox.handle(Deposit(1, data))


_SHARED = Overlay(10, seed=3)
