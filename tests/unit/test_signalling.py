"""Signed envelopes, call signals and per-call keys: forgery, replay, bad input."""

from __future__ import annotations

import contextlib

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from client.callkeys import BadCallKey, EphemeralKey
from client.envelope import (
    MAX_AGE,
    Envelope,
    EnvelopeError,
    ReplayedEnvelope,
    ReplayGuard,
    open_envelope,
    seal,
)
from client.signalling import CallSignal, CandidateInfo, SignalError, signal
from overlay.certificate import Role, issue
from overlay.identity import IdentityKey

NOW = 1_800_000_000.0
CA = IdentityKey.from_seed(b"c" * 32)
ALICE = IdentityKey.from_seed(b"a" * 32)
MALLORY = IdentityKey.from_seed(b"m" * 32)
ALICE_CERT = issue(CA, "alice", ALICE.public_key, serial=1, now=NOW - 10)
MALLORY_CERT = issue(CA, "mallory", MALLORY.public_key, serial=2, now=NOW - 10)
CALL_ID = bytes(range(16))
HOST = CandidateInfo("host", "127.0.0.1", 40000, 100)


def sealed(body: bytes = b"hello", recipient: str = "bob", now: float = NOW) -> bytes:
    return seal(ALICE, ALICE_CERT, recipient, "call", body, now)


def test_envelope_round_trip_names_the_sender() -> None:
    opened = open_envelope(sealed(), CA.public_key, "bob", NOW + 1, ReplayGuard())
    assert (opened.sender, opened.kind, opened.body) == ("alice", "call", b"hello")
    assert opened.sender_key == ALICE.public_key


def test_replayed_envelope_is_refused() -> None:
    guard = ReplayGuard()
    data = sealed()
    open_envelope(data, CA.public_key, "bob", NOW, guard)
    with pytest.raises(ReplayedEnvelope):
        open_envelope(data, CA.public_key, "bob", NOW + 5, guard)


def test_old_envelope_is_refused_even_when_forgotten() -> None:
    with pytest.raises(EnvelopeError, match="too old"):
        open_envelope(sealed(), CA.public_key, "bob", NOW + MAX_AGE + 1, ReplayGuard())


def test_envelope_for_someone_else_is_refused() -> None:
    with pytest.raises(EnvelopeError, match="addressed to carol"):
        open_envelope(sealed(recipient="carol"), CA.public_key, "bob", NOW, ReplayGuard())


def test_impersonation_with_a_valid_certificate_of_ones_own_is_refused() -> None:
    # Mallory signs with her own key but carries alice's certificate.
    good = Envelope.parse(sealed())
    forged = Envelope(
        good.kind,
        bytes(ALICE_CERT),
        good.recipient,
        good.sent_at_ms,
        b"forged",
        MALLORY.sign(b"voip-envelope-v1" + cbor2.dumps(good.tbs(), canonical=True)),
    )
    with pytest.raises(EnvelopeError, match="not signed by alice"):
        open_envelope(bytes(forged), CA.public_key, "bob", NOW, ReplayGuard())


def test_altered_body_is_refused() -> None:
    good = Envelope.parse(sealed())
    altered = Envelope(
        good.kind, good.sender_certificate, "bob", good.sent_at_ms, b"other", good.signature
    )
    with pytest.raises(EnvelopeError, match="not signed"):
        open_envelope(bytes(altered), CA.public_key, "bob", NOW, ReplayGuard())


def test_certificate_from_another_ca_is_refused() -> None:
    other_ca = IdentityKey.from_seed(b"o" * 32)
    cert = issue(other_ca, "alice", ALICE.public_key, serial=1, now=NOW)
    data = seal(ALICE, cert, "bob", "call", b"x", NOW)
    with pytest.raises(EnvelopeError, match="bad certificate"):
        open_envelope(data, CA.public_key, "bob", NOW, ReplayGuard())


def test_supernode_certificate_cannot_send_user_messages() -> None:
    cert = issue(CA, "alice", ALICE.public_key, serial=1, now=NOW, role=Role.SUPERNODE)
    data = seal(ALICE, cert, "bob", "call", b"x", NOW)
    with pytest.raises(EnvelopeError, match="bad certificate"):
        open_envelope(data, CA.public_key, "bob", NOW, ReplayGuard())


def test_oversized_message_is_refused_when_sealing() -> None:
    with pytest.raises(EnvelopeError, match="too large"):
        sealed(b"x" * 2000)


def test_replay_guard_is_bounded() -> None:
    guard = ReplayGuard(limit=10)
    for i in range(50):
        guard.check(i.to_bytes(4, "big"), NOW + i)
    assert len(guard._seen) <= 10


@given(st.binary(max_size=1200))
def test_envelope_parser_raises_only_its_error(data: bytes) -> None:
    with contextlib.suppress(EnvelopeError):
        Envelope.parse(data)


@given(st.binary(max_size=1200))
def test_open_envelope_raises_only_its_error(data: bytes) -> None:
    with contextlib.suppress(EnvelopeError):
        open_envelope(data, CA.public_key, "bob", NOW, ReplayGuard())


def test_signals_round_trip() -> None:
    invite = signal("invite", CALL_ID, ephemeral=b"k" * 32, candidates=(HOST,), codec="opus")
    assert CallSignal.parse(bytes(invite)) == invite
    bye = signal("bye", CALL_ID, reason="no media path")
    assert CallSignal.parse(bytes(bye)) == bye


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kind": "dance"}, "Unknown call signal"),
        ({"call_id": b"short"}, "not 16 bytes"),
        ({"kind": "invite", "candidates": [HOST.to_map()], "codec": "opus"}, "lacks a 32-byte"),
        ({"kind": "invite", "ephemeral": b"k" * 32, "codec": "opus"}, "lists no address"),
        ({"kind": "bye", "ephemeral": b"k" * 32}, "carries no call key"),
        (
            {"kind": "invite", "ephemeral": b"k" * 32, "candidates": [HOST.to_map()]},
            "no codec",
        ),
        (
            {
                "kind": "accept",
                "ephemeral": b"k" * 32,
                "candidates": [{"kind": "host", "host": "example.com", "port": 1, "priority": 1}],
            },
            "not an IP address",
        ),
        (
            {
                "kind": "accept",
                "ephemeral": b"k" * 32,
                "candidates": [{"kind": "host", "host": "::1", "port": 0, "priority": 1}],
            },
            "port is out of range",
        ),
        ({"kind": "bye", "reason": "a\x07b"}, "not printable"),
        ({"kind": 7}, "malformed"),
    ],
)
def test_bad_signals_are_refused_with_a_reason(fields: dict[str, object], message: str) -> None:
    document: dict[str, object] = {"call_id": CALL_ID, "kind": "bye", **fields}
    with pytest.raises(SignalError, match=message):
        CallSignal.parse(cbor2.dumps(document))


@given(st.binary(max_size=900))
def test_signal_parser_raises_only_its_error(data: bytes) -> None:
    with contextlib.suppress(SignalError):
        CallSignal.parse(data)


@given(
    st.dictionaries(
        st.sampled_from(["call_id", "kind", "ephemeral", "candidates", "codec", "reason"]),
        st.one_of(st.binary(max_size=40), st.text(max_size=10), st.integers(), st.none()),
    )
)
def test_signal_parser_on_near_valid_maps(document: dict[str, object]) -> None:
    with contextlib.suppress(SignalError):
        CallSignal.parse(cbor2.dumps(document))


def test_both_sides_derive_the_same_keys_and_they_differ_per_direction() -> None:
    caller, callee = EphemeralKey(), EphemeralKey()
    a_pub, b_pub = caller.public, callee.public
    args = (CALL_ID, "alice", "bob", a_pub, b_pub)
    mine = caller.derive(b_pub, *args, i_am_caller=True)
    theirs = callee.derive(a_pub, *args, i_am_caller=False)
    assert mine.send == theirs.receive and mine.receive == theirs.send
    assert mine.check == theirs.check
    assert len({mine.send, mine.receive, mine.check}) == 3
    assert "secret" in repr(mine) and mine.send.hex() not in repr(mine)


def test_a_call_key_is_used_once_and_weak_keys_are_refused() -> None:
    key = EphemeralKey()
    other = EphemeralKey().public
    key.derive(other, CALL_ID, "a", "b", key.public, other, i_am_caller=True)
    with pytest.raises(BadCallKey, match="already used"):
        key.derive(other, CALL_ID, "a", "b", other, other, i_am_caller=True)
    weak = EphemeralKey()
    with pytest.raises(BadCallKey, match="weak"):
        weak.derive(bytes(32), CALL_ID, "a", "b", bytes(32), bytes(32), i_am_caller=True)


def test_different_calls_get_different_keys() -> None:
    a, b = EphemeralKey(), EphemeralKey()
    a2, b2 = EphemeralKey(), EphemeralKey()
    k1 = a.derive(b.public, CALL_ID, "alice", "bob", a.public, b.public, i_am_caller=True)
    k2 = a2.derive(b2.public, CALL_ID, "alice", "bob", a2.public, b2.public, i_am_caller=True)
    assert k1.send != k2.send
