"""Presence records: signing, verification (each rejection), the canonical encoding, fuzzing."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.certificate import CLOCK_SKEW, Role, issue
from overlay.errors import ProtocolError
from overlay.identity import IdentityKey
from overlay.presence import (
    MAX_LIFETIME,
    MAX_PRESENCE_SIZE,
    Address,
    Attachment,
    PresenceError,
    PresenceRecord,
    SignedPresence,
    Status,
    is_current,
    last_seen,
    sign,
)

SETTINGS = settings(max_examples=300, deadline=None)
NOW = 1_700_000_000
HOUR = 3600

CA = IdentityKey.from_seed(bytes(range(32)))
OTHER_CA = IdentityKey.from_seed(bytes(range(1, 33)))
ALICE = IdentityKey.from_seed(bytes(range(32, 64)))
BOB = IdentityKey.from_seed(bytes(range(64, 96)))
SN = Attachment(bytes(range(100, 132)), "203.0.113.7", 7000, 7001)


def certificate(
    username: str = "alice",
    key: IdentityKey = ALICE,
    *,
    ca: IdentityKey = CA,
    now: int = NOW - HOUR,
    lifetime: int = 24 * HOUR,
    role: Role = Role.USER,
) -> bytes:
    return bytes(
        issue(ca, username, key.public_key, serial=5, now=now, lifetime=lifetime, role=role)
    )


def presence(**changes: Any) -> PresenceRecord:
    fields: dict[str, Any] = {
        "username": "alice",
        "certificate": certificate(),
        "supernode": SN,
        "reflexive": Address("198.51.100.20", 40000),
        "nat_type": "port-restricted",
        "status": Status.ONLINE,
        "sequence": 17,
        "issued_at": NOW,
        "expires_at": NOW + HOUR,
    }
    fields.update(changes)
    return PresenceRecord(**fields)


def signed(key: IdentityKey = ALICE, **changes: Any) -> SignedPresence:
    return sign(presence(**changes), key)


GOOD = bytes(signed())


def rejection(item: SignedPresence, now: float = NOW, username: str | None = None) -> str:
    """Send ``item`` over the wire and verify it; the message of the refusal."""
    received = SignedPresence.parse(bytes(item))
    with pytest.raises(PresenceError) as caught:
        received.verify(CA.public_key, now, username)
    assert caught.value.code == "bad-presence"
    return str(caught.value)


def parse_error(data: Any) -> str:
    with pytest.raises(PresenceError) as caught:
        SignedPresence.parse(data)
    return str(caught.value)


def canonical(obj: Any) -> bytes:
    return bytes(cbor2.dumps(obj, canonical=True))


# -- sign and verify ------------------------------------------------------------------------


def test_round_trip_over_the_wire_verifies_to_the_same_record() -> None:
    record = presence()
    data = bytes(sign(record, ALICE))
    assert len(data) < MAX_PRESENCE_SIZE
    received = SignedPresence.parse(data)
    assert received.verify(CA.public_key, NOW + 5, "alice") == record
    assert received.record.supernode == SN
    assert received.record.status is Status.ONLINE


def test_record_without_supernode_or_reflexive_address_round_trips() -> None:
    record = presence(supernode=None, reflexive=None, status=Status.OFFLINE)
    received = SignedPresence.parse(bytes(sign(record, ALICE)))
    assert received.verify(CA.public_key, NOW) == record


def test_looked_up_name_is_compared_case_insensitively() -> None:
    assert signed().verify(CA.public_key, NOW, "Alice").username == "alice"


def test_record_for_another_name_than_the_one_looked_up_is_refused() -> None:
    assert rejection(signed(), username="bob") == "The presence record is for alice, not bob."


def test_certificate_from_another_ca_is_refused() -> None:
    item = signed(certificate=certificate(ca=OTHER_CA))
    assert rejection(item) == (
        "The certificate in the presence record of alice was not signed by our login server."
    )


def test_tampered_field_breaks_the_user_signature() -> None:
    original = signed()
    for change in (
        {"status": Status.OFFLINE},
        {"sequence": 18},
        {"reflexive": Address("198.51.100.99", 40000)},
        {"supernode": None},
        {"expires_at": NOW + 2 * HOUR},
    ):
        tampered = SignedPresence(
            dataclasses.replace(original.record, **change), original.signature
        )
        assert rejection(tampered) == "The presence record of alice is not signed by alice's key."


def test_record_signed_by_someone_else_is_refused() -> None:
    # Bob (or a supernode) holds Alice's certificate but not her key.
    assert rejection(signed(BOB)) == "The presence record of alice is not signed by alice's key."


def test_certificate_of_another_user_is_refused() -> None:
    item = signed(BOB, certificate=certificate("bob", BOB))
    assert rejection(item) == "The presence record of alice carries the certificate of bob."


def test_supernode_certificate_is_refused() -> None:
    item = signed(certificate=certificate(role=Role.SUPERNODE))
    assert rejection(item) == (
        "The certificate in the presence record of alice is not a user certificate."
    )


def test_certificate_expired_before_the_record_was_issued_is_refused() -> None:
    stale = certificate(now=NOW - 3 * HOUR, lifetime=HOUR)  # ended 2 h before issued_at
    assert rejection(signed(certificate=stale)) == (
        "The certificate in the presence record of alice had expired when the record was issued."
    )


def test_certificate_not_yet_valid_when_the_record_was_issued_is_refused() -> None:
    early = certificate(now=NOW + HOUR)
    assert rejection(signed(certificate=early), now=NOW + 2 * HOUR) == (
        "The certificate in the presence record of alice was not yet valid when the record "
        "was issued."
    )


def test_certificate_valid_at_issue_time_but_expired_now_still_proves_last_seen() -> None:
    item = signed(certificate=certificate(now=NOW - HOUR, lifetime=2 * HOUR))
    much_later = NOW + 48 * HOUR  # the certificate and the record have both expired
    record = item.verify(CA.public_key, much_later, "alice")
    assert not is_current(record, much_later)
    assert last_seen(record) == NOW


def test_malformed_certificate_is_refused_with_the_reason() -> None:
    assert rejection(signed(certificate=b"\xff")) == (
        "The presence record of alice carries a bad certificate: The certificate is not valid CBOR."
    )


def test_record_issued_in_the_future_is_refused_beyond_the_clock_skew() -> None:
    item = signed(issued_at=NOW + CLOCK_SKEW + 1, expires_at=NOW + HOUR)
    assert rejection(item) == "The presence record of alice was issued in the future."
    # Within the skew it is accepted.
    edge = signed(issued_at=NOW + CLOCK_SKEW, expires_at=NOW + HOUR)
    assert edge.verify(CA.public_key, NOW).issued_at == NOW + CLOCK_SKEW


def test_record_expiring_before_it_was_issued_is_refused() -> None:
    assert rejection(signed(expires_at=NOW)) == (
        "The presence record of alice expires before it was issued."
    )


def test_record_claiming_more_than_72_hours_is_refused() -> None:
    limit = NOW + MAX_LIFETIME + CLOCK_SKEW
    assert rejection(signed(expires_at=limit + 1)) == (
        "The presence record of alice claims to be valid for more than 72 h."
    )
    assert signed(expires_at=limit).verify(CA.public_key, NOW).expires_at == limit


def test_sign_refuses_a_record_peers_would_not_parse() -> None:
    with pytest.raises(PresenceError) as caught:
        signed(supernode=Attachment(SN.node_id, SN.host, 70000, 7001))
    assert str(caught.value) == "The presence record supernode is malformed."
    with pytest.raises(PresenceError) as caught:
        signed(username="Alice")
    assert str(caught.value) == "The presence record username is not valid."


def test_current_and_last_seen() -> None:
    record = presence(issued_at=NOW, expires_at=NOW + HOUR)
    assert is_current(record, NOW + HOUR - 1)
    assert not is_current(record, NOW + HOUR)
    assert last_seen(record) == NOW


# -- parsing --------------------------------------------------------------------------------


def good_parts() -> tuple[list[Any], bytes]:
    item = signed()
    return item.record.body(), item.signature


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("text", "The presence record is not a byte string."),
        (b"\x00" * (MAX_PRESENCE_SIZE + 1), "The presence record is too large."),
        (b"\xff\xff", "The presence record is not valid CBOR."),
        (GOOD + b"\x00", "The presence record has bytes after its CBOR array."),
        (canonical([1, 2, 3]), "The presence record is not a [body, signature] pair."),
        (canonical([[1], b"short"]), "The presence record signature is not 64 bytes."),
        (canonical([{}, bytes(64)]), "The presence record body is not an array."),
        (canonical([[2], bytes(64)]), "The presence record has unknown version 2."),
        (canonical([[True], bytes(64)]), "The presence record has unknown version True."),
        (canonical([["1"], bytes(64)]), "The presence record has unknown version str."),
        (canonical([[1, "alice"], bytes(64)]), "The presence record body has the wrong number"),
    ],
)
def test_parse_refuses_malformed_input(data: Any, message: str) -> None:
    assert parse_error(data).startswith(message)


@pytest.mark.parametrize(
    ("index", "value", "message"),
    [
        (1, "Alice", "The presence record username is not valid."),
        (1, "a" * 33, "The presence record username is not valid."),
        (2, "not bytes", "The presence record certificate is not a byte string."),
        (2, bytes(513), "The presence record certificate is not a byte string."),
        (3, {"node_id": bytes(32), "host": "h"}, "The presence record supernode is malformed."),
        (3, [1, 2], "The presence record supernode is malformed."),
        (
            3,
            {"node_id": bytes(31), "host": "h", "tcp_port": 1, "udp_port": 2},
            "The presence record supernode is malformed.",
        ),
        (4, {"host": "h", "port": 0}, "The presence record address is malformed."),
        (4, {"host": "a b", "port": 5}, "The presence record address is malformed."),
        (4, {"host": "h", "port": "5"}, "The presence record address is malformed."),
        (5, "", "The presence record NAT type is not valid."),
        (5, 7, "The presence record NAT type is not valid."),
        (6, "asleep", "The presence record status is unknown."),
        (6, ["online"], "The presence record status is unknown."),
        (7, -1, "The presence record has a bad sequence or time."),
        (8, 2**63, "The presence record has a bad sequence or time."),
        (9, False, "The presence record has a bad sequence or time."),
        (9, 1.5, "The presence record has a bad sequence or time."),
    ],
)
def test_parse_refuses_a_bad_field(index: int, value: Any, message: str) -> None:
    body, signature = good_parts()
    body[index] = value
    assert parse_error(canonical([body, signature])) == message


def test_parse_refuses_non_canonical_encodings() -> None:
    body, signature = good_parts()
    good = canonical([body, signature])
    assert SignedPresence.parse(good).record == presence()
    # An unknown key in the supernode map would be silently dropped: refused instead.
    body[3] = {**body[3], "extra": 1}
    variants = [
        canonical([body, signature]),
        bytes(cbor2.dumps([good_parts()[0], signature])),  # maps in insertion order
        b"\x9f" + good[1:] + b"\xff",  # indefinite-length outer array
    ]
    for data in variants:
        assert data != good
        assert parse_error(data) == "The presence record is not canonically encoded."


# -- properties -----------------------------------------------------------------------------

usernames = st.from_regex(r"[a-z0-9._-]{3,32}", fullmatch=True)
hosts = st.from_regex(r"[a-z0-9.:-]{1,60}", fullmatch=True)
ports = st.integers(1, 65535)
times = st.integers(0, 2**63 - 1)
attachments = st.builds(Attachment, st.binary(min_size=32, max_size=32), hosts, ports, ports)
addresses = st.builds(Address, hosts, ports)
records = st.builds(
    PresenceRecord,
    username=usernames,
    certificate=st.binary(max_size=300),
    supernode=st.none() | attachments,
    reflexive=st.none() | addresses,
    nat_type=st.sampled_from(["unknown", "open", "full-cone", "symmetric", "udp-blocked"]),
    status=st.sampled_from(Status),
    sequence=times,
    issued_at=times,
    expires_at=times,
)


@SETTINGS
@given(records, st.binary(min_size=64, max_size=64))
def test_parse_inverts_bytes(record: PresenceRecord, signature: bytes) -> None:
    item = SignedPresence(record, signature)
    assert SignedPresence.parse(bytes(item)) == item


@SETTINGS
@given(st.binary(max_size=600))
def test_parse_of_random_bytes_raises_only_protocol_errors(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        SignedPresence.parse(data)


cbor_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=40)
    | st.binary(max_size=80),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=12,
)


@SETTINGS
@given(st.data())
def test_parse_of_a_random_body_raises_only_presence_errors(data: st.DataObject) -> None:
    # Start from a good body and replace some fields, so parsing gets past the first checks.
    body, signature = good_parts()
    for index in data.draw(st.lists(st.integers(1, 9), max_size=4)):
        body[index] = data.draw(cbor_values)
    with contextlib.suppress(PresenceError):
        SignedPresence.parse(canonical([body, signature])).verify(CA.public_key, NOW)


@SETTINGS
@given(st.data())
def test_a_mutated_record_never_verifies(data: st.DataObject) -> None:
    blob = bytearray(GOOD)
    for _ in range(data.draw(st.integers(1, 4))):
        if not blob:
            break
        kind = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        at = data.draw(st.integers(0, len(blob) - 1))
        if kind == "flip":
            blob[at] ^= data.draw(st.integers(1, 255))
        elif kind == "cut":
            del blob[at : at + data.draw(st.integers(1, 8))]
        else:
            blob[at:at] = data.draw(st.binary(min_size=1, max_size=8))
    mutated = bytes(blob)
    if mutated == GOOD:
        return
    with pytest.raises(ProtocolError):
        SignedPresence.parse(mutated).verify(CA.public_key, NOW)
