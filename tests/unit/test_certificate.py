"""Certificates: issue, verify, and the one canonical encoding (golden vector, fuzzing)."""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path
from typing import Any

import cbor2
import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.certificate import (
    CLOCK_SKEW,
    MAX_CERT_SIZE,
    SIGNATURE_CONTEXT,
    BadSignature,
    Certificate,
    CertificateFormatError,
    Expired,
    NotYetValid,
    Role,
    SignedCertificate,
    UnknownVersion,
    WrongRole,
    WrongUser,
    issue,
)
from overlay.errors import CertificateError, ProtocolError
from overlay.identity import IdentityKey

SETTINGS = settings(max_examples=300, deadline=None)
DATA = Path(__file__).resolve().parent.parent / "data"

# The golden vector's inputs.
CA_SEED = bytes(range(32))
USER_SEED = bytes(range(32, 64))
NOW = 1_700_000_000
LIFETIME = 3600
SERIAL = 7

CA = IdentityKey.from_seed(CA_SEED)
USER = IdentityKey.from_seed(USER_SEED)


def golden_bytes() -> bytes:
    return bytes.fromhex((DATA / "certificate_v1.hex").read_text().strip())


def golden() -> SignedCertificate:
    return issue(CA, "alice", USER.public_key, serial=SERIAL, now=NOW, lifetime=LIFETIME)


def canonical(obj: Any) -> bytes:
    return bytes(cbor2.dumps(obj, canonical=True))


def raw_tbs(version: Any = 1, **changes: Any) -> list[Any]:
    fields = {
        "username": "alice",
        "public_key": USER.public_key,
        "role": "user",
        "serial": SERIAL,
        "not_before": NOW,
        "not_after": NOW + LIFETIME,
    }
    fields.update(changes)
    return [version, *fields.values()]


def format_error(data: Any) -> str:
    with pytest.raises(CertificateFormatError) as caught:
        SignedCertificate.parse(data)
    assert caught.value.code == "bad-certificate"
    return str(caught.value)


# -- golden vector ---------------------------------------------------------------------------


def test_issuing_the_golden_inputs_gives_the_golden_bytes() -> None:
    assert bytes(golden()) == golden_bytes()


def test_golden_bytes_parse_and_round_trip() -> None:
    data = golden_bytes()
    parsed = SignedCertificate.parse(data)
    assert parsed == golden()
    assert bytes(parsed) == data
    assert parsed.cert == Certificate(
        "alice", USER.public_key, Role.USER, SERIAL, NOW, NOW + LIFETIME, version=1
    )
    assert SignedCertificate.parse(bytearray(data)) == parsed  # type: ignore[arg-type]
    assert SignedCertificate.parse(memoryview(data)) == parsed  # type: ignore[arg-type]


def test_golden_bytes_follow_the_documented_layout() -> None:
    # Built by hand from the format in the module docstring, not by the code under test.
    tbs = (
        b"\x87"  # array of 7
        + b"\x01"  # version 1
        + b"\x65alice"
        + b"\x58\x20"
        + USER.public_key
        + b"\x64user"
        + bytes([SERIAL])
        + b"\x1a"
        + struct.pack("!I", NOW)
        + b"\x1a"
        + struct.pack("!I", NOW + LIFETIME)
    )
    data = golden_bytes()
    assert data[:1] == b"\x82"
    assert data[1 : 1 + len(tbs)] == tbs
    assert data[1 + len(tbs) : 3 + len(tbs)] == b"\x58\x40"
    signature = data[3 + len(tbs) :]
    assert len(signature) == 64
    nacl.signing.VerifyKey(CA.public_key).verify(SIGNATURE_CONTEXT + tbs, signature)


# -- issue and verify ------------------------------------------------------------------------


def test_issue_and_verify() -> None:
    signed = issue(CA, "alice", USER.public_key, serial=1, now=NOW + 0.9, lifetime=LIFETIME)
    assert signed.cert.not_before == NOW
    assert signed.not_after == NOW + LIFETIME
    assert signed.username == "alice"
    assert signed.public_key == USER.public_key
    assert signed.verify(CA.public_key, NOW, username="alice") == signed.cert
    supernode = issue(CA, "sn-1", USER.public_key, serial=2, now=NOW, role=Role.SUPERNODE)
    assert supernode.verify(CA.public_key, NOW, role=Role.SUPERNODE).role is Role.SUPERNODE


def test_a_certificate_signed_by_another_ca_is_refused() -> None:
    other_ca = IdentityKey.generate()
    forged = issue(other_ca, "alice", USER.public_key, serial=SERIAL, now=NOW)
    with pytest.raises(BadSignature) as caught:
        forged.verify(CA.public_key, NOW)
    assert str(caught.value) == "The certificate was not signed by our login server."
    assert caught.value.code == "bad-signature"


@pytest.mark.parametrize(
    "change",
    [
        {"username": "mallory"},
        {"public_key": bytes(32)},
        {"role": Role.SUPERNODE},
        {"serial": SERIAL + 1},
        {"not_after": NOW + 10 * LIFETIME},
    ],
)
def test_any_change_to_the_body_breaks_the_signature(change: dict[str, Any]) -> None:
    signed = golden()
    altered = SignedCertificate(dataclasses.replace(signed.cert, **change), signed.signature)
    with pytest.raises(BadSignature):
        altered.verify(CA.public_key, NOW)


def test_clock_skew_boundaries() -> None:
    signed = golden()
    not_before, not_after = NOW, NOW + LIFETIME
    assert CLOCK_SKEW == 60
    signed.verify(CA.public_key, not_before - CLOCK_SKEW)
    signed.verify(CA.public_key, not_after + CLOCK_SKEW)
    for early in (not_before - CLOCK_SKEW - 0.001, not_before - CLOCK_SKEW - 1):
        with pytest.raises(NotYetValid) as not_yet:
            signed.verify(CA.public_key, early)
        assert str(not_yet.value) == "The certificate is not valid yet."
    for late in (not_after + CLOCK_SKEW + 0.001, not_after + CLOCK_SKEW + 1):
        with pytest.raises(Expired) as expired:
            signed.verify(CA.public_key, late)
        assert str(expired.value) == "The certificate has expired."


def test_wrong_role() -> None:
    with pytest.raises(WrongRole) as caught:
        golden().verify(CA.public_key, NOW, role=Role.SUPERNODE)
    assert str(caught.value) == "The certificate is for a user, not a supernode."
    supernode = issue(CA, "sn-1", USER.public_key, serial=2, now=NOW, role=Role.SUPERNODE)
    with pytest.raises(WrongRole) as caught:
        supernode.verify(CA.public_key, NOW)
    assert str(caught.value) == "The certificate is for a supernode, not a user."
    # role=None accepts either.
    assert supernode.verify(CA.public_key, NOW, role=None).username == "sn-1"


def test_wrong_user() -> None:
    with pytest.raises(WrongUser) as caught:
        golden().verify(CA.public_key, NOW, username="bob")
    assert str(caught.value) == "The certificate belongs to alice, not bob."


# -- versions and canonical encoding ---------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "shown"),
    [(2, "2"), (0, "0"), (2**70, str(2**70)), (True, "True"), ("1", "str"), (None, "NoneType")],
)
def test_unknown_version(version: Any, shown: str) -> None:
    data = canonical([raw_tbs(version), CA.sign(b"x")])
    with pytest.raises(UnknownVersion) as caught:
        SignedCertificate.parse(data)
    assert str(caught.value) == f"The certificate has unknown version {shown}."
    assert caught.value.code == "unknown-version"


def test_unknown_version_of_a_shared_structure_is_named_not_printed() -> None:
    # CBOR value sharing lets a few hundred bytes describe a structure with a million leaves;
    # printing it in the error message would take forever.
    version: list[Any] = [0]
    for _ in range(20):
        version = [version, version]
    data = cbor2.dumps([[version], bytes(64)], value_sharing=True)
    assert len(data) <= MAX_CERT_SIZE
    with pytest.raises(UnknownVersion) as caught:
        SignedCertificate.parse(data)
    assert str(caught.value) == "The certificate has unknown version list."


def assemble(tbs_items: list[bytes], *, tbs_head: bytes = b"\x87", tail: bytes = b"") -> bytes:
    """A certificate from hand-encoded tbs items, signed correctly over the canonical tbs."""
    signature = golden().signature
    return b"\x82" + tbs_head + b"".join(tbs_items) + tail + b"\x58\x40" + signature


def golden_items() -> list[bytes]:
    return [
        b"\x01",
        b"\x65alice",
        b"\x58\x20" + USER.public_key,
        b"\x64user",
        bytes([SERIAL]),
        b"\x1a" + struct.pack("!I", NOW),
        b"\x1a" + struct.pack("!I", NOW + LIFETIME),
    ]


def variant(index: int, encoding: bytes) -> bytes:
    items = golden_items()
    items[index] = encoding
    return assemble(items)


def test_hand_assembled_golden_certificate_parses() -> None:
    # The helper itself is right: unchanged items give the golden bytes.
    assert assemble(golden_items()) == golden_bytes()


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(variant(0, b"\x18\x01"), id="version-in-two-bytes"),
        pytest.param(variant(4, b"\x18\x07"), id="serial-in-two-bytes"),
        pytest.param(variant(4, b"\x1b" + struct.pack("!Q", SERIAL)), id="serial-in-nine-bytes"),
        pytest.param(variant(5, b"\x1b" + struct.pack("!Q", NOW)), id="time-in-nine-bytes"),
        pytest.param(variant(1, b"\x78\x05alice"), id="username-length-in-two-bytes"),
        pytest.param(variant(1, b"\x7f\x62al\x63ice\xff"), id="indefinite-username"),
        pytest.param(variant(2, b"\x59\x00\x20" + USER.public_key), id="key-length-in-3-bytes"),
        pytest.param(
            variant(
                2, b"\x5f\x50" + USER.public_key[:16] + b"\x50" + USER.public_key[16:] + b"\xff"
            ),
            id="indefinite-public-key",
        ),
        pytest.param(assemble(golden_items(), tbs_head=b"\x98\x07"), id="tbs-length-in-2-bytes"),
        pytest.param(assemble(golden_items(), tbs_head=b"\x9f", tail=b"\xff"), id="indefinite-tbs"),
        pytest.param(b"\x9f" + golden_bytes()[1:] + b"\xff", id="indefinite-outer-array"),
        pytest.param(golden_bytes() + b"\x00", id="trailing-byte"),
    ],
)
def test_non_canonical_encodings_are_refused(data: bytes) -> None:
    assert format_error(data) == "The certificate is not canonically encoded."


BAD_FORMATS: list[tuple[Any, str]] = [
    ("not bytes", "The certificate is not a byte string."),
    (bytes(MAX_CERT_SIZE + 1), "The certificate is too large."),
    (b"", "The certificate is not valid CBOR."),
    (b"\xff", "The certificate is not valid CBOR."),
    (golden_bytes()[:-1], "The certificate is not valid CBOR."),
    (canonical(1), "The certificate is not a [tbs, signature] pair."),
    (canonical([raw_tbs()]), "The certificate is not a [tbs, signature] pair."),
    (canonical({"tbs": 1}), "The certificate is not a [tbs, signature] pair."),
    (b"\xd9\xd9\xf7" + golden_bytes(), "The certificate is not a [tbs, signature] pair."),
    (canonical([raw_tbs(), bytes(63)]), "The certificate signature is not 64 bytes."),
    (canonical([raw_tbs(), "s" * 64]), "The certificate signature is not 64 bytes."),
    (canonical([[], bytes(64)]), "The certificate body is not an array."),
    (canonical([b"tbs", bytes(64)]), "The certificate body is not an array."),
    (canonical([raw_tbs()[:6], bytes(64)]), "The certificate body has the wrong number of fields."),
    (
        canonical([[*raw_tbs(), 0], bytes(64)]),
        "The certificate body has the wrong number of fields.",
    ),
    (canonical([raw_tbs(username=5), bytes(64)]), "The certificate username is not a string."),
    (
        canonical([raw_tbs(username="a" * 33), bytes(64)]),
        "The certificate username is not a string.",
    ),
    (canonical([raw_tbs(username="Alice"), bytes(64)]), "The certificate username is not valid."),
    (canonical([raw_tbs(username="al"), bytes(64)]), "The certificate username is not valid."),
    (
        canonical([raw_tbs(public_key=bytes(31)), bytes(64)]),
        "The certificate public key is not 32 bytes.",
    ),
    (canonical([raw_tbs(role="admin"), bytes(64)]), "The certificate role is unknown."),
    (canonical([raw_tbs(role=["user"]), bytes(64)]), "The certificate role is unknown."),
    (canonical([raw_tbs(serial=-1), bytes(64)]), "The certificate has a bad serial or time."),
    (canonical([raw_tbs(serial=True), bytes(64)]), "The certificate has a bad serial or time."),
    (canonical([raw_tbs(not_before=1.5), bytes(64)]), "The certificate has a bad serial or time."),
    (canonical([raw_tbs(not_after="x"), bytes(64)]), "The certificate has a bad serial or time."),
]


@pytest.mark.parametrize(("data", "text"), BAD_FORMATS)
def test_malformed_certificates(data: Any, text: str) -> None:
    assert format_error(data) == text


# -- properties ------------------------------------------------------------------------------

certificates = st.builds(
    SignedCertificate,
    cert=st.builds(
        Certificate,
        username=st.from_regex(r"[a-z0-9._-]{3,32}", fullmatch=True),
        public_key=st.binary(min_size=32, max_size=32),
        role=st.sampled_from(Role),
        serial=st.integers(0, 2**128),
        not_before=st.integers(0, 2**64),
        not_after=st.integers(0, 2**64),
    ),
    signature=st.binary(min_size=64, max_size=64),
)


@SETTINGS
@given(certificates)
def test_parse_round_trips(signed: SignedCertificate) -> None:
    data = bytes(signed)
    assert SignedCertificate.parse(data) == signed
    assert bytes(SignedCertificate.parse(data)) == data


@settings(max_examples=50, deadline=None)
@given(
    st.from_regex(r"[a-z0-9._-]{3,32}", fullmatch=True),
    st.sampled_from(Role),
    st.integers(0, 2**40),
    st.integers(1, 30 * 24 * 3600),
)
def test_issued_certificates_verify_after_a_round_trip(
    username: str, role: Role, now: int, lifetime: int
) -> None:
    signed = issue(CA, username, USER.public_key, serial=now, now=now, lifetime=lifetime, role=role)
    parsed = SignedCertificate.parse(bytes(signed))
    assert parsed.verify(CA.public_key, now + lifetime, role=role, username=username) == signed.cert


def only_protocol_errors(data: bytes) -> None:
    try:
        parsed = SignedCertificate.parse(data)
    except ProtocolError as exc:
        assert isinstance(exc, CertificateError)
        return
    assert bytes(parsed) == bytes(data)


@SETTINGS
@given(st.binary(max_size=MAX_CERT_SIZE + 8))
def test_parse_raises_only_protocol_errors_on_random_bytes(data: bytes) -> None:
    only_protocol_errors(data)


@SETTINGS
@given(
    st.lists(
        st.tuples(
            st.integers(0, 124),
            st.sampled_from(["set", "insert", "delete"]),
            st.binary(min_size=1, max_size=3),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_parse_raises_only_protocol_errors_on_mutated_certificates(
    edits: list[tuple[int, str, bytes]],
) -> None:
    data = bytearray(golden_bytes())
    for position, kind, chunk in edits:
        at = position % (len(data) + 1)
        if kind == "set":
            data[at : at + len(chunk)] = chunk
        elif kind == "insert":
            data[at:at] = chunk
        else:
            del data[at : at + len(chunk)]
    only_protocol_errors(bytes(data))


cbor_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=40)
    | st.binary(max_size=70)
    | st.sampled_from(["user", "supernode", "alice", 1]),
    lambda inner: (
        st.lists(inner, max_size=8) | st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(st.lists(cbor_values, min_size=0, max_size=8), cbor_values)
def test_parse_raises_only_protocol_errors_on_random_cbor(tbs: list[Any], signature: Any) -> None:
    only_protocol_errors(bytes(cbor2.dumps([tbs, signature])))


@SETTINGS
@given(
    st.tuples(*[st.just(value) | cbor_values for value in raw_tbs()]),
    st.just(bytes(64)) | cbor_values,
)
def test_parse_raises_only_protocol_errors_when_some_fields_are_random(
    tbs: tuple[Any, ...], signature: Any
) -> None:
    only_protocol_errors(bytes(cbor2.dumps([list(tbs), signature])))


@SETTINGS
@given(st.binary(max_size=300))
def test_parse_raises_only_protocol_errors_behind_cbor_tags(body: bytes) -> None:
    # Tags cbor2 turns into exotic objects: sets, shared values, rationals, dates, bignums...
    for tag in (
        b"\xd9\x01\x02",
        b"\xd8\x1c",
        b"\xd8\x1e",
        b"\xc1",
        b"\xc2",
        b"\xd8\x25",
        b"\xd9\x01\x00",
    ):
        only_protocol_errors(b"\x82" + tag + body)
        only_protocol_errors(b"\x82\x87" + tag + body)
