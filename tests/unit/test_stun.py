"""The STUN codec: RFC 5769 vectors, round trips, and refusal of every malformed message."""

from __future__ import annotations

import contextlib
import ipaddress
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

import overlay.turn  # noqa: F401 - its TURN rows are in the shared attribute table too
from overlay.errors import ProtocolError
from overlay.stun import (
    ATTRIBUTES,
    CHANGE_REQUEST,
    ERROR_CODE,
    FINGERPRINT,
    MAPPED_ADDRESS,
    MESSAGE_INTEGRITY,
    NONCE,
    OTHER_ADDRESS,
    PADDING,
    REALM,
    RESPONSE_ORIGIN,
    SOFTWARE,
    UNKNOWN_ATTRIBUTES,
    USERNAME,
    XOR_MAPPED_ADDRESS,
    Attribute,
    AttributeCodec,
    ChangeRequest,
    ErrorCode,
    Method,
    StunClass,
    StunError,
    StunIntegrityError,
    StunMessage,
    is_stun,
    long_term_key,
    saslprep,
    short_term_key,
)

DATA = Path(__file__).parent.parent / "data"
SETTINGS = settings(max_examples=300, deadline=None)
TID = bytes.fromhex("b7e7a701bc34d686fa87dfae")
SHORT_TERM_PASSWORD = "VOkJxbRl1RmTxUk/WvJxBt"
LONG_TERM_USER = "\u30de\u30c8\u30ea\u30c3\u30af\u30b9"
LONG_TERM_PASSWORD = "The\u00adM\u00aatr\u2168"


def vector(name: str) -> bytes:
    text = (DATA / f"stun_rfc5769_{name}.hex").read_text()
    return bytes.fromhex("".join(ln for ln in text.splitlines() if not ln.startswith("#")))


def values(message: StunMessage) -> list[tuple[int, Any]]:
    return [(a.type, a.value) for a in message.attributes]


# -- RFC 5769 ---------------------------------------------------------------------------------


def test_rfc5769_sample_request() -> None:
    data = vector("request")
    assert len(data) == 108 and is_stun(data)
    message = StunMessage.parse(data)
    assert (message.method, message.message_class, message.transaction_id) == (
        Method.BINDING,
        StunClass.REQUEST,
        TID,
    )
    assert message.get(SOFTWARE) == "STUN test client"
    assert message.get(USERNAME) == "evtj:h6vY"
    # PRIORITY and ICE-CONTROLLED are ICE's: kept raw, one comprehension-required.
    assert (0x0024, bytes.fromhex("6e0001ff")) in values(message)
    assert (0x8029, bytes.fromhex("932ff9b151263b36")) in values(message)
    assert message.unknown_required() == (0x0024,)
    assert message.get(FINGERPRINT) == 0xE57A3BCF
    assert message.check_integrity(short_term_key(SHORT_TERM_PASSWORD))
    assert not message.check_integrity(short_term_key("VOkJxbRl1RmTxUk/WvJxBu"))


@pytest.mark.parametrize(
    ("name", "mapped"),
    [
        ("response_ipv4", ("192.0.2.1", 32853)),
        ("response_ipv6", ("2001:db8:1234:5678:11:2233:4455:6677", 32853)),
    ],
)
def test_rfc5769_sample_responses(name: str, mapped: tuple[str, int]) -> None:
    data = vector(name)
    message = StunMessage.parse(data)
    assert message.message_class is StunClass.SUCCESS and message.transaction_id == TID
    assert message.get(SOFTWARE) == "test vector"
    assert message.get(XOR_MAPPED_ADDRESS) == mapped
    assert message.check_integrity(short_term_key(SHORT_TERM_PASSWORD))
    assert not message.check_integrity(b"wrong")
    # Built from the RFC's parameters, our bytes are the vector's up to MESSAGE-INTEGRITY,
    # except the padding after "test vector", which the RFC fills with 0x20 and we with 0x00.
    built = StunMessage(
        Method.BINDING,
        StunClass.SUCCESS,
        TID,
        (SOFTWARE("test vector"), XOR_MAPPED_ADDRESS(mapped)),
    )
    expected = bytearray(data)
    expected[20 + 4 + 11] = 0
    body = bytes(built)[20:]
    assert bytes(built)[:2] == data[:2] and body == bytes(expected[20 : 20 + len(body)])
    protected = built.with_integrity(short_term_key(SHORT_TERM_PASSWORD)).with_fingerprint()
    assert StunMessage.parse(bytes(protected)).check_integrity(short_term_key(SHORT_TERM_PASSWORD))


def test_rfc5769_long_term_request_is_reproduced_exactly() -> None:
    data = vector("request_long_term")
    message = StunMessage.parse(data)
    assert message.get(USERNAME) == LONG_TERM_USER
    assert message.get(NONCE) == "f//499k954d6OL34oL9FSTvy64sA"
    assert message.get(REALM) == "example.org"
    key = long_term_key(LONG_TERM_USER, "example.org", LONG_TERM_PASSWORD)
    assert message.check_integrity(key)
    assert not message.check_integrity(long_term_key(LONG_TERM_USER, "example.org", "TheMatrix"))
    built = StunMessage.request(
        USERNAME(LONG_TERM_USER),
        NONCE("f//499k954d6OL34oL9FSTvy64sA"),
        REALM("example.org"),
        transaction_id=bytes.fromhex("78ad3433c6ad72c029da412e"),
    ).with_integrity(key)
    assert bytes(built) == data
    assert bytes(message) == data


def test_a_flipped_bit_breaks_fingerprint_or_integrity() -> None:
    data = bytearray(vector("response_ipv4"))
    data[30] ^= 1  # inside XOR-MAPPED-ADDRESS
    with pytest.raises(StunIntegrityError, match="FINGERPRINT does not match"):
        StunMessage.parse(bytes(data))
    long_term = bytearray(vector("request_long_term"))
    long_term[-30] ^= 1  # inside REALM: no FINGERPRINT here, integrity fails
    message = StunMessage.parse(bytes(long_term))
    key = long_term_key(LONG_TERM_USER, "example.org", LONG_TERM_PASSWORD)
    assert not message.check_integrity(key)


def test_saslprep() -> None:
    assert saslprep(LONG_TERM_PASSWORD) == "TheMatrIX"
    assert saslprep("a\u00a0b") == "a b"  # non-ASCII space maps to space
    with pytest.raises(StunError, match="U\\+0007"):
        saslprep("bell\x07")
    with pytest.raises(StunError, match="right-to-left"):
        saslprep("\u05d0a")


# -- the header -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "klass", "type_"),
    [
        (Method.BINDING, StunClass.REQUEST, 0x0001),
        (Method.BINDING, StunClass.INDICATION, 0x0011),
        (Method.BINDING, StunClass.SUCCESS, 0x0101),
        (Method.BINDING, StunClass.ERROR, 0x0111),
        (Method.ALLOCATE, StunClass.ERROR, 0x0113),
        (Method.SEND, StunClass.INDICATION, 0x0016),
        (Method.DATA, StunClass.INDICATION, 0x0017),
        (0xFFF, StunClass.ERROR, 0x3FFF),
    ],
)
def test_message_type_packs_method_and_class(method: int, klass: StunClass, type_: int) -> None:
    message = StunMessage(method, klass, TID)
    assert struct.unpack("!H", bytes(message)[:2])[0] == type_
    assert StunMessage.parse(bytes(message)) == message


def test_builders_and_accessors() -> None:
    request = StunMessage.request()
    assert request.name == "Binding request" and len(request.transaction_id) == 12
    reply = request.success(XOR_MAPPED_ADDRESS(("203.0.113.5", 4000)))
    assert reply.name == "Binding success" and reply.transaction_id == request.transaction_id
    error = request.error(420, UNKNOWN_ATTRIBUTES((0x7777,)))
    assert error.get(ERROR_CODE) == ErrorCode(420, "Unknown Attribute")
    assert error.get(UNKNOWN_ATTRIBUTES) == (0x7777,)
    assert request.error(400, reason="").get(ERROR_CODE) == ErrorCode(400, "")
    assert StunMessage(0x123, StunClass.REQUEST, TID).name == "method 0x123 request"
    assert not request.has(FINGERPRINT) and request.with_fingerprint().has(FINGERPRINT)
    # Protecting twice replaces the old checks instead of stacking them.
    twice = request.with_integrity(b"k").with_fingerprint().with_integrity(b"k2")
    assert [a.type for a in twice.attributes] == [MESSAGE_INTEGRITY.code]
    assert twice.check_integrity(b"k2") and not twice.check_integrity(b"k")
    assert not request.check_integrity(b"k")  # none at all


def test_constructed_messages_keep_the_rules() -> None:
    with pytest.raises(StunError, match="12 bytes"):
        StunMessage(1, StunClass.REQUEST, b"short")
    with pytest.raises(StunError, match="12 bits"):
        StunMessage(0x1000, StunClass.REQUEST, TID)
    with pytest.raises(StunError, match="FINGERPRINT must be the last"):
        StunMessage(1, StunClass.REQUEST, TID, (FINGERPRINT(0), SOFTWARE("x")))
    with pytest.raises(StunError, match="Only FINGERPRINT may follow"):
        StunMessage(1, StunClass.REQUEST, TID, (MESSAGE_INTEGRITY(bytes(20)), SOFTWARE("x")))
    with pytest.raises(StunError, match="ERROR-CODE 200"):
        bytes(StunMessage(1, StunClass.ERROR, TID, (ERROR_CODE(ErrorCode(200)),)))
    with pytest.raises(ValueError, match="registered twice"):
        from overlay.stun import register

        register(AttributeCodec(0x0006, "X", lambda v, t: b"", lambda d, t: b""))


# -- malformed input --------------------------------------------------------------------------


def header(length: int, type_: int = 0x0001, cookie: int = 0x2112A442) -> bytes:
    return struct.pack("!HHI", type_, length, cookie) + TID


def attr(type_: int, value: bytes) -> bytes:
    return struct.pack("!HH", type_, len(value)) + value + bytes(-len(value) % 4)


def message_with(*attributes: bytes) -> bytes:
    body = b"".join(attributes)
    return header(len(body)) + body


@pytest.mark.parametrize(
    ("data", "text"),
    [
        (b"\x00\x01\x00\x00", "shorter than its 20-byte header"),
        (header(0, type_=0x4001), "two top bits"),
        (header(0, cookie=0x12345678), "lacks the magic cookie"),
        (header(2) + b"\x00\x00", "not a multiple of 4"),
        (header(8), "does not match the 0 bytes"),
        (header(4) + struct.pack("!HH", 0x8022, 8), "SOFTWARE runs past the end"),
        (message_with(attr(0x0020, b"\x00\x03\x00\x01abcd")), "unknown address family 3"),
        (message_with(attr(0x0020, b"\x00\x01\x00\x01abcdef")), "an IPv4 address needs 8"),
        (message_with(attr(0x0001, b"\x00\x02\x00\x01abcd")), "an IPv6 address needs 20"),
        (message_with(attr(0x802C, b"\x00")), "OTHER-ADDRESS is 1 bytes, too short"),
        (message_with(attr(0x0006, b"\xff\xfe")), "USERNAME is not valid UTF-8"),
        (message_with(attr(0x0006, b"u" * 514)), "USERNAME is longer than 513 bytes"),
        (message_with(attr(0x0008, bytes(19))), "MESSAGE-INTEGRITY is 19 bytes, not 20"),
        (message_with(attr(0x8028, bytes(3))), "FINGERPRINT is 3 bytes, not 4"),
        (message_with(attr(0x0009, b"\x00\x00")), "ERROR-CODE is 2 bytes"),
        (message_with(attr(0x0009, b"\x00\x00\x02\x00")), "class 2 and number 0"),
        (message_with(attr(0x0009, b"\x00\x00\x04\x64")), "class 4 and number 100"),
        (message_with(attr(0x0009, b"\x00\x00\x04\x00\xc3")), "reason is not valid UTF-8"),
        (message_with(attr(0x000A, b"\x00\x01\x00")), "UNKNOWN-ATTRIBUTES is 3 bytes"),
        (message_with(attr(0x0003, bytes(2))), "CHANGE-REQUEST is 2 bytes, not 4"),
        (message_with(attr(0x8028, bytes(4))), "FINGERPRINT does not match"),
    ],
)
def test_malformed_messages_are_refused_with_a_reason(data: bytes, text: str) -> None:
    with pytest.raises(StunError) as caught:
        StunMessage.parse(data)
    assert text in str(caught.value)


def test_nothing_may_follow_fingerprint() -> None:
    body = attr(0x0006, b"user")
    extra = attr(0x8022, b"late")
    # The FINGERPRINT covers the header whose length counts the late attribute too.
    length = len(body) + 8 + len(extra)
    crc = zlib.crc32(header(length) + body) ^ 0x5354554E
    data = header(length) + body + attr(0x8028, struct.pack("!I", crc)) + extra
    with pytest.raises(StunError, match="SOFTWARE follows FINGERPRINT"):
        StunMessage.parse(data)


def test_attributes_after_message_integrity_are_ignored() -> None:
    protected = bytes(StunMessage.request(USERNAME("u"), transaction_id=TID).with_integrity(b"k"))
    extra = attr(0x8022, b"late")
    data = header(len(protected) - 20 + len(extra)) + protected[20:] + extra
    message = StunMessage.parse(data)
    assert [a.type for a in message.attributes] == [USERNAME.code, MESSAGE_INTEGRITY.code]
    assert message.check_integrity(b"k")  # the HMAC covers what preceded it only


def test_is_stun() -> None:
    assert is_stun(bytes(StunMessage.request()))
    assert not is_stun(b"")
    assert not is_stun(header(0, type_=0x8001))  # RTP's first byte
    assert not is_stun(header(4))  # length does not match
    assert not is_stun(header(0, cookie=0))
    from overlay.messages import Ping

    assert not is_stun(bytes(Ping(1)))


# -- properties -------------------------------------------------------------------------------

hosts: SearchStrategy[str] = st.one_of(
    st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n))),
    st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n))),
)
addresses = st.tuples(hosts, st.integers(0, 65535))
short_text = st.text(max_size=40)

VALUES: dict[int, SearchStrategy[Any]] = {
    0x0001: addresses,
    0x0003: st.builds(ChangeRequest, st.booleans(), st.booleans()),
    0x0004: addresses,
    0x0005: addresses,
    0x0006: short_text,
    0x0009: st.builds(ErrorCode, st.integers(300, 699), short_text),
    0x000A: st.lists(st.integers(0, 0xFFFF), max_size=5).map(tuple),
    0x0014: short_text,
    0x0015: short_text,
    0x0020: addresses,
    0x0026: st.binary(max_size=64),
    0x8022: short_text,
    0x8023: addresses,
    0x802B: addresses,
    0x802C: addresses,
    # TURN (overlay.turn)
    0x000C: st.integers(0x4000, 0x4FFF),
    0x000D: st.integers(0, 2**32 - 1),
    0x0012: addresses,
    0x0013: st.binary(max_size=64),
    0x0016: addresses,
    0x0017: st.integers(0, 255),
    0x0018: st.booleans(),
    0x0019: st.integers(0, 255),
    0x001A: st.just(True),
    0x0022: st.binary(min_size=8, max_size=8),
    0x8000: st.integers(0, 255),
}
known = st.sampled_from(sorted(VALUES)).flatmap(
    lambda code: VALUES[code].map(lambda value: Attribute(code, value))
)
unknown = st.builds(
    Attribute,
    st.integers(0, 0xFFFF).filter(lambda t: t not in ATTRIBUTES),
    st.binary(max_size=40),
)


@st.composite
def messages(draw: st.DrawFn) -> StunMessage:
    message = StunMessage(
        draw(st.integers(0, 0xFFF)),
        draw(st.sampled_from(StunClass)),
        draw(st.binary(min_size=12, max_size=12)),
        tuple(draw(st.lists(known | unknown, max_size=6))),
    )
    if draw(st.booleans()):
        message = message.with_integrity(draw(st.binary(min_size=1, max_size=32)))
    if draw(st.booleans()):
        message = message.with_fingerprint()
    return message


def test_every_known_attribute_has_a_strategy() -> None:
    assert set(VALUES) | {MESSAGE_INTEGRITY.code, FINGERPRINT.code} == set(ATTRIBUTES)


@SETTINGS
@given(messages())
def test_parse_inverts_bytes(message: StunMessage) -> None:
    data = bytes(message)
    assert is_stun(data)
    assert StunMessage.parse(data) == message


@SETTINGS
@given(st.binary(max_size=200))
def test_parse_raises_nothing_but_stun_error_on_random_bytes(data: bytes) -> None:
    with contextlib.suppress(StunError):
        StunMessage.parse(data)
    is_stun(data)


@SETTINGS
@given(messages(), st.data())
def test_parse_raises_nothing_but_stun_error_on_damaged_messages(
    message: StunMessage, data: st.DataObject
) -> None:
    raw = bytearray(bytes(message))
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    for candidate in (bytes(raw), bytes(raw[:cut])):
        try:
            parsed = StunMessage.parse(candidate)
        except StunError as exc:
            assert isinstance(exc, ProtocolError) and str(exc).startswith(("STUN", "A STUN"))
        else:
            parsed.check_integrity(b"key")


@SETTINGS
@given(messages())
def test_integrity_verifies_what_was_protected(message: StunMessage) -> None:
    protected = message.with_integrity(b"secret").with_fingerprint()
    parsed = StunMessage.parse(bytes(protected))
    assert parsed.check_integrity(b"secret") and not parsed.check_integrity(b"secreT")


def test_change_request_and_rfc5780_addresses_round_trip() -> None:
    message = StunMessage.request(
        CHANGE_REQUEST(ChangeRequest(change_ip=True)),
        PADDING(b"xyz"),
        transaction_id=TID,
    ).success(
        RESPONSE_ORIGIN(("198.51.100.1", 3478)),
        OTHER_ADDRESS(("198.51.100.2", 3479)),
        MAPPED_ADDRESS((str(ipaddress.ip_address("::ffff:1.2.3.4")), 9)),
    )
    assert StunMessage.parse(bytes(message)) == message
    request = StunMessage.request(CHANGE_REQUEST(ChangeRequest(True, True)), transaction_id=TID)
    assert bytes(request)[-4:] == b"\x00\x00\x00\x06"
