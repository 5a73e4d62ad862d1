"""Connectivity-check packets (client.checkpacket): layout, authentication, fuzzing."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from client.checkpacket import (
    MAC_SIZE,
    SIZE,
    CheckAuthError,
    CheckError,
    CheckPacket,
    CheckType,
    is_check,
)

KEY = bytes(range(32))
TOKEN = b"call-id!"
TXID = b"transaction!"


def request(**changes: object) -> CheckPacket:
    fields: dict[str, object] = {
        "type": CheckType.REQUEST,
        "call_token": TOKEN,
        "transaction_id": TXID,
        "tie_breaker": 2**63 + 5,
        "priority": 1862270975,
        "controlling": True,
        "nominate": False,
        "observed": None,
    }
    fields.update(changes)
    return CheckPacket(**fields)  # type: ignore[arg-type]


def resealed(body: bytes, key: bytes = KEY) -> bytes:
    """``body`` (56 bytes) with a valid MAC: gets a packet past authentication."""
    return body + hmac.new(key, body, hashlib.sha256).digest()[:MAC_SIZE]


def test_layout_of_a_request() -> None:
    data = request(nominate=True).to_bytes(KEY)
    assert len(data) == SIZE == 72
    assert data[:4] == bytes([0x56, 1, 1, 0x03])
    assert data[4:12] == TOKEN and data[12:24] == TXID
    assert data[36:56] == bytes(20)
    assert (
        is_check(data) and not is_check(b"\x00\x01") and not is_check(b"\x80") and not is_check(b"")
    )


def test_responses_carry_the_observed_address_and_are_no_larger() -> None:
    for observed in (("203.0.113.7", 40001), ("2001:db8::7", 1)):
        response = request(type=CheckType.RESPONSE, observed=observed, controlling=False)
        data = response.to_bytes(KEY)
        assert len(data) == len(request().to_bytes(KEY))
        assert CheckPacket.parse(data, KEY) == response
    assert CheckPacket.parse(request().to_bytes(KEY), KEY) == request()


def test_a_wrong_key_or_any_flipped_bit_fails_authentication() -> None:
    data = request().to_bytes(KEY)
    with pytest.raises(CheckAuthError, match="failed authentication"):
        CheckPacket.parse(data, bytes(32))
    for i in range(4, SIZE):
        flipped = bytearray(data)
        flipped[i] ^= 0x10
        with pytest.raises(CheckAuthError):
            CheckPacket.parse(bytes(flipped), KEY)


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [
        (0, 0x57, "wrong first byte"),
        (1, 2, "version 2 is not supported"),
    ],
)
def test_header_errors_come_before_authentication(offset: int, value: int, message: str) -> None:
    data = bytearray(request().to_bytes(KEY))
    data[offset] = value
    with pytest.raises(CheckError, match=message) as raised:
        CheckPacket.parse(bytes(data), KEY)
    assert not isinstance(raised.value, CheckAuthError)


def _body(data: bytes, **at: int) -> bytes:
    body = bytearray(data[:-MAC_SIZE])
    for offset, value in at.items():
        body[int(offset[1:])] = value
    return bytes(body)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"b2": 3}, "Unknown check packet type 3"),
        ({"b3": 0x04}, "unknown flags"),
        ({"b37": 1}, "reserved byte"),
        ({"b36": 4}, "request carries an observed address"),
        ({"b41": 9}, "request carries an observed address"),
    ],
)
def test_authenticated_but_malformed_requests(changes: dict[str, int], message: str) -> None:
    data = resealed(_body(request().to_bytes(KEY), **changes))
    with pytest.raises(CheckError, match=message):
        CheckPacket.parse(data, KEY)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"b36": 5}, "address family 5"),
        ({"b44": 1}, "IPv4 address has stray bytes"),
        ({"b38": 0, "b39": 0}, "port 0"),
    ],
)
def test_authenticated_but_malformed_responses(changes: dict[str, int], message: str) -> None:
    response = request(type=CheckType.RESPONSE, observed=("203.0.113.7", 40001))
    data = resealed(_body(response.to_bytes(KEY), **changes))
    with pytest.raises(CheckError, match=message):
        CheckPacket.parse(data, KEY)


def test_wrong_sizes() -> None:
    with pytest.raises(CheckError, match="72 bytes, not 71"):
        CheckPacket.parse(request().to_bytes(KEY)[:-1], KEY)


@given(st.binary(max_size=100))
def test_parse_of_random_bytes_raises_only_check_error(data: bytes) -> None:
    with pytest.raises(CheckError):
        CheckPacket.parse(b"V" + data, KEY)  # a random MAC never matches


@st.composite
def _bodies(draw: st.DrawFn) -> bytes:
    """56-byte bodies that get past the header checks often, so the field checks are fuzzed."""
    header = bytes([0x56, draw(st.sampled_from([1, 1, 1, 2])), draw(st.integers(0, 4))])
    flags = bytes([draw(st.sampled_from([0, 1, 2, 3, 4, 0x80]))])
    middle = draw(st.binary(min_size=32, max_size=32))
    family = bytes([draw(st.sampled_from([0, 4, 6, 5])), draw(st.sampled_from([0, 0, 1]))])
    port = draw(st.sampled_from([b"\x00\x00", b"\x12\x34"]))
    address = draw(
        st.one_of(
            st.just(bytes(16)),
            st.binary(min_size=4, max_size=4).map(lambda b: b + bytes(12)),
            st.binary(min_size=16, max_size=16),
        )
    )
    return header + flags + middle + family + port + address


@given(_bodies())
def test_parse_of_authenticated_random_bodies_raises_only_check_error(body: bytes) -> None:
    data = resealed(body)
    try:
        packet = CheckPacket.parse(data, KEY)
    except CheckAuthError:  # pragma: no cover - the MAC is right
        raise AssertionError("a correct MAC was refused") from None
    except CheckError:
        return
    assert packet.to_bytes(KEY) == data


@st.composite
def _packets(draw: st.DrawFn) -> CheckPacket:
    kind = draw(st.sampled_from(CheckType))
    ip = draw(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)))
    observed = (str(ip), draw(st.integers(1, 65535))) if kind is CheckType.RESPONSE else None
    return CheckPacket(
        kind,
        draw(st.binary(min_size=8, max_size=8)),
        draw(st.binary(min_size=12, max_size=12)),
        draw(st.integers(0, 2**64 - 1)),
        draw(st.integers(0, 2**32 - 1)),
        draw(st.booleans()),
        draw(st.booleans()),
        observed,
    )


@given(_packets())
def test_round_trip(packet: CheckPacket) -> None:
    assert CheckPacket.parse(packet.to_bytes(KEY), KEY) == packet
