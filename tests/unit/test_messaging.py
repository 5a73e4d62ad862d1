"""Instant messages (client.messaging): encryption, refusal of tampered and forged messages,
exactly-once in order, receipts, key changes marked, and the body parsers fuzzed."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from client.envelope import seal
from client.keypins import KeyChanged, KeyPins
from client.messaging import (
    MessageBodyError,
    MessageRefused,
    Messenger,
    NoSuchUser,
    decrypt,
    encrypt,
    parse_plaintext,
    parse_receipt,
    plaintext,
)
from overlay.certificate import SignedCertificate
from overlay.identity import IdentityKey
from tests.unit.test_supernode import CA, NOW, user
from tests.unit.test_supernode import user_certificate as certificate


def cert(name: str) -> SignedCertificate:
    return SignedCertificate.parse(certificate(name))


class Peer:
    """One user's Messenger, with a recording post and a search that knows everyone."""

    def __init__(self, name: str, clock: Clock, state: Path) -> None:
        self.name = name
        self.posted: list[tuple[str, bytes]] = []
        self.queue = False

        async def search(peer: str) -> Any:
            if peer == "nobody":
                return SimpleNamespace(outcome="not-found", record=None)
            record = SimpleNamespace(certificate=certificate(peer))
            return SimpleNamespace(outcome="offline" if self.queue else "found", record=record)

        async def post(to: str, envelope: bytes) -> int:
            self.posted.append((to, envelope))
            return 3 if self.queue else 0

        (state / name).mkdir(exist_ok=True)
        self.messenger = Messenger(
            clock, CA.public_key, lambda: (user(name), cert(name)), state / name, search, post
        )

    async def send(self, to: str, text: str) -> dict[str, Any]:
        return await self.messenger.send(to, text, lambda _: None)

    def inbox(self) -> list[str]:
        return [m["text"] for m in self.messenger.listing()]


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(NOW)
    return clock


def test_encryption_round_trip_and_only_the_recipient_can_read() -> None:
    alice, bob, eve = user("alice"), user("bob"), IdentityKey.from_seed(b"e" * 32)
    body = encrypt(alice, bob.public_key, plaintext(b"i" * 16, 1, "hello"))
    assert b"hello" not in body
    assert parse_plaintext(decrypt(bob, alice.public_key, body)) == (b"i" * 16, 1, "hello")
    with pytest.raises(MessageBodyError, match="does not decrypt"):
        decrypt(eve, alice.public_key, body)
    with pytest.raises(MessageBodyError, match="does not decrypt"):  # claims another sender
        decrypt(bob, eve.public_key, body)
    tampered = bytearray(body)
    tampered[-1] ^= 1
    with pytest.raises(MessageBodyError, match="does not decrypt"):
        decrypt(bob, alice.public_key, bytes(tampered))


@pytest_twisted.ensureDeferred
async def test_exactly_once_in_order_with_receipts(clock: Clock, tmp_path: Path) -> None:
    alice, bob = Peer("alice", clock, tmp_path), Peer("bob", clock, tmp_path)
    alice.queue = True
    results = []
    for text in ("one", "two", "three"):
        results.append(await alice.send("bob", text))
        clock.advance(1)
    assert [r["outcome"] for r in results] == ["queued"] * 3
    envelopes = [e for _, e in alice.posted]
    # Pushed late (10 h), out of order, and twice (two replicas): shown once each, in order.
    clock.advance(10 * 3600)
    for data in [envelopes[2], envelopes[0], envelopes[1], envelopes[0], envelopes[2]]:
        bob.messenger.received(data)
    assert bob.inbox() == ["one", "two", "three"]
    assert bob.messenger.duplicates == 2
    # One receipt for the batch; alice's outbox says delivered.
    clock.advance(0.3)
    [(to, receipt)] = bob.posted
    assert to == "alice" and len(parse_receipt(_body(receipt))) == 3
    alice.messenger.received(receipt)
    assert [m["state"] for m in alice.messenger.listing(sent=True)] == ["delivered"] * 3
    # Persisted, 0600: a restarted daemon still dedupes (and keeps the order).
    path = tmp_path / "bob" / "messages-bob.json"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again = Peer("bob", clock, tmp_path)
    again.messenger.received(envelopes[1])
    assert again.inbox() == ["one", "two", "three"]


def _body(envelope: bytes) -> bytes:
    from client.envelope import Envelope

    return Envelope.parse(envelope).body


@pytest_twisted.ensureDeferred
async def test_forged_misaddressed_and_too_old_messages_are_refused(
    clock: Clock, tmp_path: Path
) -> None:
    bob = Peer("bob", clock, tmp_path)
    body = encrypt(user("alice"), user("bob").public_key, plaintext(b"i" * 16, 1, "hi"))
    # Signed by mallory with alice's certificate.
    forged = seal(user("mallory"), cert("alice"), "bob", "msg", body, clock.seconds())
    to_carol = seal(user("alice"), cert("alice"), "carol", "msg", body, clock.seconds())
    stale = seal(user("alice"), cert("alice"), "bob", "msg", body, clock.seconds() - 80 * 3600)
    for data in (forged, to_carol, stale, b"garbage"):
        bob.messenger.received(data)
    assert bob.inbox() == []
    assert bob.messenger.rejected == 3  # garbage is left to the call manager's count
    # A body encrypted by someone else under alice's signature does not decrypt.
    other = encrypt(user("mallory"), user("bob").public_key, plaintext(b"j" * 16, 1, "x"))
    bob.messenger.received(seal(user("alice"), cert("alice"), "bob", "msg", other, NOW))
    assert bob.inbox() == [] and bob.messenger.rejected == 4


@pytest_twisted.ensureDeferred
async def test_a_changed_key_marks_the_message_and_refuses_sending(
    clock: Clock, tmp_path: Path
) -> None:
    alice, bob = Peer("alice", clock, tmp_path), Peer("bob", clock, tmp_path)
    pins = KeyPins(tmp_path / "pins.json")
    pins.accept("alice", bytes(32))  # bob once saw another key for alice
    bob.messenger.key_check = pins.check
    await alice.send("bob", "it is me")
    bob.messenger.received(alice.posted[0][1])
    [message] = bob.messenger.listing()
    assert message["key_changed"] and message["text"] == "it is me"
    with pytest.raises(KeyChanged):
        await bob.send("alice", "who are you?")
    assert bob.posted == []  # nothing went to the changed key (the receipt is not due yet)


@pytest_twisted.ensureDeferred
async def test_one_line_errors(clock: Clock, tmp_path: Path) -> None:
    alice = Peer("alice", clock, tmp_path)
    with pytest.raises(MessageRefused, match="too long: 501 bytes; at most 500"):
        await alice.send("bob", "x" * 501)
    with pytest.raises(MessageRefused, match="too long: 502 bytes"):
        await alice.send("bob", "é" * 251)
    with pytest.raises(MessageRefused, match="cannot message yourself"):
        await alice.send("alice", "hi")
    with pytest.raises(NoSuchUser, match="No such user, or nobody has not been online"):
        await alice.send("nobody", "hi")
    assert (await alice.send("bob", "é" * 250))["outcome"] == "delivered"


@given(st.binary(max_size=600))
def test_plaintext_parser_raises_only_its_error(data: bytes) -> None:
    with contextlib.suppress(MessageBodyError):
        parse_plaintext(data)


@given(st.binary(max_size=600))
def test_receipt_and_body_parsers_raise_only_their_error(data: bytes) -> None:
    for parse in (parse_receipt, lambda d: decrypt(user("bob"), user("alice").public_key, d)):
        with contextlib.suppress(MessageBodyError):
            parse(data)


@given(
    st.binary(min_size=16, max_size=16),
    st.integers(1, 2**63 - 1),
    st.text(min_size=1, max_size=120),
)
def test_plaintext_round_trip(message_id: bytes, seq: int, text: str) -> None:
    if len(text.encode()) <= 500:
        assert parse_plaintext(plaintext(message_id, seq, text)) == (message_id, seq, text)
