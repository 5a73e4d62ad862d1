"""Control messages: every registered type round-trips, and decoding refuses malformed input."""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from typing import Any, Union

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

# Imported for their side effect: they register their messages.
import overlay.channel
import overlay.login_protocol
import overlay.overlay_protocol
from overlay.errors import ProtocolError
from overlay.framing import MAX_PAYLOAD, Frame
from overlay.login_protocol import CertificateReply, Contact
from overlay.messages import (
    Error,
    MessageError,
    Ping,
    Pong,
    Record,
    UnknownMessageType,
    decode,
    message_types,
    name_of,
    parse_datagram,
)
from overlay.overlay_protocol import FIND_OUTCOMES, FindResult, RelayOffer
from overlay.slotmap import SupernodeInfo

SETTINGS = settings(max_examples=100, deadline=None)

SCALARS: dict[Any, SearchStrategy[Any]] = {
    int: st.integers(),
    str: st.text(max_size=40),
    bytes: st.binary(max_size=80),
    bool: st.booleans(),
    float: st.floats(allow_nan=False),
}


#: Records that check their own fields get values they accept.
VALID_RECORDS: dict[Any, SearchStrategy[Any]] = {
    SupernodeInfo: st.builds(
        SupernodeInfo,
        st.binary(min_size=32, max_size=32),
        st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789.-:", min_size=1, max_size=40),
        st.integers(1, 65535),
        st.integers(1, 65535),
    ),
    RelayOffer: st.builds(
        RelayOffer,
        st.text(alphabet="0123456789.:abcdef", min_size=1, max_size=40),
        st.integers(0, 65535),
        st.integers(0, 65535),
        st.text(min_size=1, max_size=60),
        st.text(min_size=1, max_size=60),
        st.integers(),
        st.integers(),
    ),
    FindResult: st.builds(
        FindResult,
        st.integers(),
        st.sampled_from(FIND_OUTCOMES),
        st.integers(0, 1000),
        st.none() | st.binary(max_size=80),
    ),
}


def strategy_for(annotation: Any) -> SearchStrategy[Any]:
    """Values of a field type: the same types ``overlay.messages`` accepts."""
    if annotation in VALID_RECORDS:
        return VALID_RECORDS[annotation]
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        return st.none() | strategy_for(inner)
    if origin is tuple:
        item, _ = typing.get_args(annotation)
        return st.lists(strategy_for(item), max_size=4).map(tuple)
    if isinstance(annotation, type) and issubclass(annotation, Record):
        return records(annotation)
    return SCALARS[annotation]


def records(cls: type[Record]) -> SearchStrategy[Any]:
    if cls in VALID_RECORDS:
        return VALID_RECORDS[cls]
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    return st.builds(cls, **{f.name: strategy_for(hints[f.name]) for f in fields})


def test_the_message_table() -> None:
    # Type codes are on the wire: renumbering one breaks every deployed peer.
    table = {code: cls.NAME for code, cls in message_types().items()}
    assert table == {
        0x0001: "error",
        0x0002: "ping",
        0x0003: "pong",
        0x0010: "hello",
        0x0011: "hello-reply",
        0x0012: "sealed",
        0x0020: "register",
        0x0021: "registered",
        0x0022: "login",
        0x0023: "certificate",
        0x0024: "renew",
        0x0040: "sn-ping",
        0x0041: "search",
        0x0042: "search-found",
        0x0043: "search-referral",
        0x0044: "search-none",
        0x0045: "store",
        0x0046: "stored",
        0x0047: "pull",
        0x0048: "records",
        0x0049: "reach-check",
        0x004A: "reach-ok",
        0x004B: "forward",
        0x004C: "forwarded",
        0x004D: "locate",
        0x004E: "digest",
        0x004F: "digest-reply",
        0x0050: "attach",
        0x0051: "attached",
        0x0052: "publish",
        0x0053: "published",
        0x0054: "send",
        0x0055: "sent",
        0x0056: "incoming",
        0x0057: "migrate",
        0x0058: "ack",
        0x0059: "relay-offer",
        0x005A: "relays",
        0x005B: "find",
        0x005C: "find-result",
        0x005D: "relay-mint",
        0x005E: "relay-minted",
        0x0070: "post",
        0x0071: "posted",
        0x0072: "deposit",
        0x0073: "deposited",
        0x0074: "collect",
        0x0075: "collected",
        0x0076: "drop",
        0x0077: "dropped",
        0x0060: "sn-apply",
        0x0061: "sn-admitted",
        0x0062: "sn-heartbeat",
        0x0063: "sn-state",
        0x0064: "sn-leave",
    }
    assert overlay.channel.Sealed.TYPE == 0x0012
    assert overlay.login_protocol.Login.TYPE == 0x0022


def test_a_ping_on_the_wire() -> None:
    assert bytes(Ping(1)) == b"\x01\x00\x02\x00\x00\x00\x06\xa1\x63rid\x01"
    assert parse_datagram(b"\x01\x00\x02\x00\x00\x00\x06\xa1\x63rid\x01") == Ping(1)


ALL_TYPES = sorted(message_types().values(), key=lambda c: c.TYPE)


# One example holds an instance of every registered type, so none is left out.  (A
# parametrised Hypothesis test trips pytest-twisted, which wraps the shared inner test once
# per parameter.)
@SETTINGS
@given(data=st.data())
def test_every_message_type_round_trips(data: st.DataObject) -> None:
    for cls in ALL_TYPES:
        sent = data.draw(records(cls), label=cls.NAME)
        wire = bytes(sent)
        frame = Frame.parse(wire, MAX_PAYLOAD)
        assert frame.type == cls.TYPE
        received = decode(frame)
        assert type(received) is cls
        assert received == sent
        # Canonical CBOR: the same message always makes the same bytes.
        assert bytes(received) == wire


def test_name_of() -> None:
    assert name_of(0x0002) == "ping"
    assert name_of(0x7777) == "type 0x7777"


def payload_error(type_code: int, document: Any) -> str:
    with pytest.raises(MessageError) as caught:
        decode(Frame(type_code, bytes(cbor2.dumps(document))))
    assert caught.value.code == "bad-message"
    return str(caught.value)


def test_unknown_type_code() -> None:
    with pytest.raises(UnknownMessageType) as caught:
        decode(Frame(0x7777, bytes(cbor2.dumps({"rid": 1}))))
    assert str(caught.value) == "Unknown message type 0x7777."
    assert caught.value.code == "unknown-type"
    with pytest.raises(UnknownMessageType) as caught:
        decode(Frame(0x0000, b""))
    assert str(caught.value) == "Unknown message type 0x0000."


def test_missing_field() -> None:
    assert payload_error(Ping.TYPE, {}) == "ping lacks the field 'rid'."
    assert payload_error(Pong.TYPE, {"rid": 1}) == "pong lacks the field 'time'."


@pytest.mark.parametrize(
    ("type_code", "document", "text"),
    [
        (Ping.TYPE, {"rid": "1"}, "ping.rid must be int, not str."),
        (Ping.TYPE, {"rid": True}, "ping.rid must be int, not bool."),
        (Ping.TYPE, {"rid": 1.0}, "ping.rid must be int, not float."),
        (Ping.TYPE, {"rid": None}, "ping.rid must be int, not NoneType."),
        (Pong.TYPE, {"rid": 1, "time": "now"}, "pong.time must be float, not str."),
        (Pong.TYPE, {"rid": 1, "time": False}, "pong.time must be float, not bool."),
        (
            overlay.channel.Hello.TYPE,
            {"client_eph": "key"},
            "hello.client_eph must be bytes, not str.",
        ),
        (
            overlay.login_protocol.Register.TYPE,
            {"rid": 1, "username": b"alice", "password": "pw"},
            "register.username must be str, not bytes.",
        ),
        (
            Error.TYPE,
            {"rid": 1, "request": "login", "code": "x", "message": "m", "retry_after": "soon"},
            "error.retry_after must be float, not str.",
        ),
        (
            CertificateReply.TYPE,
            {"rid": 1, "certificate": b"", "bootstrap": {"host": "h", "port": 1}},
            "certificate.bootstrap must be a list, not dict.",
        ),
        (
            CertificateReply.TYPE,
            {"rid": 1, "certificate": b"", "bootstrap": [{"host": "h", "port": "1"}]},
            "Contact.port must be int, not str.",
        ),
        (
            CertificateReply.TYPE,
            {"rid": 1, "certificate": b"", "bootstrap": [["h", 1]]},
            "Contact payload is not a map.",
        ),
        (
            CertificateReply.TYPE,
            {"rid": 1, "certificate": b"", "bootstrap": [{"port": 1}]},
            "Contact lacks the field 'host'.",
        ),
    ],
)
def test_wrong_types_are_named(type_code: int, document: Any, text: str) -> None:
    assert payload_error(type_code, document) == text


def test_a_float_field_too_large_for_a_float() -> None:
    assert payload_error(Pong.TYPE, {"rid": 1, "time": 2**1100}) == (
        "pong.time is too large for a float."
    )


def test_payload_that_is_not_a_map_or_not_cbor() -> None:
    assert payload_error(Ping.TYPE, [1]) == "ping payload is not a map."
    assert payload_error(Ping.TYPE, "rid") == "ping payload is not a map."
    for payload in (b"", b"\xff", b"\xa1\x63rid", b"\x81" * 1000 + b"\x00"):
        with pytest.raises(MessageError) as caught:
            decode(Frame(Ping.TYPE, payload))
        assert str(caught.value) == "ping payload is not valid CBOR."


def test_unknown_extra_keys_are_ignored() -> None:
    document = {"rid": 7, "future": [1, {"x": b"y"}], "time": 1}
    assert decode(Frame(Ping.TYPE, bytes(cbor2.dumps(document)))) == Ping(7)


def test_an_int_is_accepted_for_a_float_and_becomes_a_float() -> None:
    pong = decode(Frame(Pong.TYPE, bytes(cbor2.dumps({"rid": 1, "time": 5}))))
    assert pong == Pong(1, 5.0)
    assert isinstance(pong, Pong)
    assert isinstance(pong.time, float)


def test_optional_and_default_fields() -> None:
    document = {"rid": 1, "request": "login", "code": "rate-limited", "message": "Slow down."}
    assert decode(Frame(Error.TYPE, bytes(cbor2.dumps(document)))) == Error(
        1, "login", "rate-limited", "Slow down.", None
    )
    document["retry_after"] = None
    assert decode(Frame(Error.TYPE, bytes(cbor2.dumps(document)))).retry_after is None  # type: ignore[attr-defined]
    reply = decode(
        Frame(CertificateReply.TYPE, bytes(cbor2.dumps({"rid": 2, "certificate": b"c"})))
    )
    assert reply == CertificateReply(2, b"c", (), 0.0)
    nested = {"rid": 2, "certificate": b"c", "bootstrap": [{"host": "sn", "port": 7000}]}
    reply = decode(Frame(CertificateReply.TYPE, bytes(cbor2.dumps(nested))))
    assert reply == CertificateReply(2, b"c", (Contact("sn", 7000, None),), 0.0)


# -- fuzzing ---------------------------------------------------------------------------------

FIELD_NAMES = sorted(
    {f.name for cls in message_types().values() for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    | {"host", "port", "udp_port"}
)

cbor_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=3), inner, max_size=6)
    ),
    max_leaves=15,
)

type_codes = st.sampled_from(sorted(message_types())) | st.integers(0, 0xFFFF)


def only_protocol_errors(frame: Frame) -> None:
    try:
        received = decode(frame)
    except ProtocolError:
        return
    assert frame.type == type(received).TYPE


@SETTINGS
@given(type_codes, st.binary(max_size=200))
def test_decode_raises_only_protocol_errors_on_random_payloads(code: int, payload: bytes) -> None:
    only_protocol_errors(Frame(code, payload))


@SETTINGS
@given(
    st.sampled_from(sorted(message_types())),
    st.dictionaries(st.sampled_from(FIELD_NAMES), cbor_values, max_size=8),
)
def test_decode_raises_only_protocol_errors_on_random_maps(code: int, document: Any) -> None:
    only_protocol_errors(Frame(code, bytes(cbor2.dumps(document))))


@SETTINGS
@given(st.sampled_from(sorted(message_types())), st.binary(max_size=100))
def test_decode_raises_only_protocol_errors_behind_cbor_tags(code: int, body: bytes) -> None:
    # Tags cbor2 turns into exotic objects: sets, shared values, rationals, dates, bignums...
    for tag in (b"\xd9\x01\x02", b"\xd8\x1c", b"\xd8\x1e", b"\xc1", b"\xc2", b"\xd8\x25"):
        only_protocol_errors(Frame(code, tag + body))
        for name in FIELD_NAMES:
            key = bytes(cbor2.dumps(name))
            only_protocol_errors(Frame(code, b"\xa1" + key + tag + body))


@SETTINGS
@given(st.binary(max_size=100))
def test_parse_datagram_raises_only_protocol_errors(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        parse_datagram(b"\x01" + data)


def test_bytes_after_the_cbor_map_are_refused() -> None:
    payload = bytes(Ping(7).to_frame().payload) + b"\x00"
    with pytest.raises(ProtocolError, match=r"^ping payload has bytes after its CBOR map\.$"):
        decode(Frame(Ping.TYPE, payload))
