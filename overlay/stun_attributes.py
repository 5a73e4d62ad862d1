"""STUN attributes (RFC 8489 s.14, RFC 5780 s.7, RFC 3489 s.11.2): the table of their codecs.

One ``AttributeCodec`` row per attribute type: its code, its name, and how its value is packed and
unpacked (address attributes need the transaction id for the XOR mask).  A row is also the typed
key to read an attribute from a message (``message.get(XOR_MAPPED_ADDRESS) -> Address | None``)
and builds one (``XOR_MAPPED_ADDRESS(("192.0.2.1", 32853))``).  Other modules add rows with
``register`` (the relay's TURN attributes).  Value types:

    *-ADDRESS, RESPONSE-ORIGIN, ALTERNATE-SERVER     (host, port), host as ipaddress prints it
    USERNAME, REALM, NONCE, SOFTWARE                 str (UTF-8, at most the RFC's byte limits)
    MESSAGE-INTEGRITY (20 bytes), PADDING            bytes
    FINGERPRINT                                      int (CRC-32 xor 0x5354554e)
    ERROR-CODE                                       ErrorCode(code, reason)
    UNKNOWN-ATTRIBUTES                               tuple[int, ...]
    CHANGE-REQUEST                                   ChangeRequest(change_ip, change_port)

The messages themselves are in ``overlay.stun``, which re-exports everything here.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar, cast

from overlay.errors import ProtocolError

MAGIC_COOKIE = 0x2112A442
Address = tuple[str, int]
T = TypeVar("T")


class StunError(ProtocolError):
    """A STUN message is malformed."""

    code = "bad-stun"


class StunIntegrityError(StunError):
    """A STUN message failed its FINGERPRINT check."""

    code = "bad-stun-fingerprint"


REASONS = {
    300: "Try Alternate",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    420: "Unknown Attribute",
    438: "Stale Nonce",
    500: "Server Error",
}


@dataclass(frozen=True)
class Attribute:
    type: int
    #: The decoded value (see the codec's row); raw bytes for a type the table does not know.
    value: Any


@dataclass(frozen=True)
class AttributeCodec(Generic[T]):
    """One row of the attribute table: the type code, its name, and how its value is coded."""

    code: int
    name: str
    pack: Callable[[T, bytes], bytes]  # (value, transaction id) -> value bytes
    unpack: Callable[[bytes, bytes], T]  # (value bytes, transaction id) -> value

    def __call__(self, value: T) -> Attribute:
        return Attribute(self.code, value)


ATTRIBUTES: dict[int, AttributeCodec[Any]] = {}


def register(codec: AttributeCodec[T]) -> AttributeCodec[T]:
    if codec.code in ATTRIBUTES:
        raise ValueError(f"STUN attribute {codec.code:#06x} registered twice")
    ATTRIBUTES[codec.code] = codec
    return codec


def attribute_name(code: int) -> str:
    row = ATTRIBUTES.get(code)
    return row.name if row is not None else f"attribute {code:#06x}"


# -- value codecs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorCode:
    code: int
    reason: str = ""


@dataclass(frozen=True)
class ChangeRequest:
    change_ip: bool = False
    change_port: bool = False


def _address(name: str, xor: bool) -> AttributeCodec[Address]:
    mask_port = MAGIC_COOKIE >> 16 if xor else 0

    def mask(raw: bytes, tid: bytes) -> bytes:
        if not xor:
            return raw
        pad = struct.pack("!I", MAGIC_COOKIE) + tid
        return bytes(a ^ b for a, b in zip(raw, pad, strict=False))

    def pack(value: Address, tid: bytes) -> bytes:
        ip = ipaddress.ip_address(value[0])
        return struct.pack("!BBH", 0, 1 if ip.version == 4 else 2, value[1] ^ mask_port) + mask(
            ip.packed, tid
        )

    def unpack(data: bytes, tid: bytes) -> Address:
        if len(data) < 4:
            raise StunError(f"STUN {name} is {len(data)} bytes, too short for an address.")
        _, family, port = struct.unpack_from("!BBH", data)
        size = {1: 4, 2: 16}.get(family)
        if size is None:
            raise StunError(f"STUN {name} has unknown address family {family}.")
        if len(data) != 4 + size:
            version = 4 if size == 4 else 6
            raise StunError(
                f"STUN {name} is {len(data)} bytes; an IPv{version} address needs {4 + size}."
            )
        raw = mask(data[4:], tid)
        host = ipaddress.IPv4Address(raw) if size == 4 else ipaddress.IPv6Address(raw)
        return (str(host), port ^ mask_port)

    return AttributeCodec(0, name, pack, unpack)


def _text(name: str, limit: int) -> AttributeCodec[str]:
    def pack(value: str, tid: bytes) -> bytes:
        data = value.encode()
        if len(data) > limit:
            raise StunError(f"STUN {name} is longer than {limit} bytes.")
        return data

    def unpack(data: bytes, tid: bytes) -> str:
        if len(data) > limit:
            raise StunError(f"STUN {name} is longer than {limit} bytes.")
        try:
            return data.decode()
        except UnicodeDecodeError:
            raise StunError(f"STUN {name} is not valid UTF-8.") from None

    return AttributeCodec(0, name, pack, unpack)


def _fixed(name: str, size: int) -> AttributeCodec[bytes]:
    def pack(value: bytes, tid: bytes) -> bytes:
        return bytes(value)

    def unpack(data: bytes, tid: bytes) -> bytes:
        if len(data) != size:
            raise StunError(f"STUN {name} is {len(data)} bytes, not {size}.")
        return data

    return AttributeCodec(0, name, pack, unpack)


def _raw(name: str) -> AttributeCodec[bytes]:
    return AttributeCodec(0, name, lambda value, tid: bytes(value), lambda data, tid: data)


def _pack_error(value: ErrorCode, tid: bytes) -> bytes:
    if not 300 <= value.code <= 699:
        raise StunError(f"STUN ERROR-CODE {value.code} is outside 300-699.")
    reason = _text("ERROR-CODE reason", 763).pack(value.reason, tid)
    return struct.pack("!HBB", 0, value.code // 100, value.code % 100) + reason


def _unpack_error(data: bytes, tid: bytes) -> ErrorCode:
    if len(data) < 4:
        raise StunError(f"STUN ERROR-CODE is {len(data)} bytes, shorter than 4.")
    _, klass, number = struct.unpack_from("!HBB", data)
    klass &= 0x07
    if not 3 <= klass <= 6 or number > 99:
        raise StunError(f"STUN ERROR-CODE has class {klass} and number {number}.")
    reason = _text("ERROR-CODE reason", 763).unpack(data[4:], tid)
    return ErrorCode(klass * 100 + number, reason)


def _pack_codes(value: tuple[int, ...], tid: bytes) -> bytes:
    return struct.pack(f"!{len(value)}H", *value)


def _unpack_codes(data: bytes, tid: bytes) -> tuple[int, ...]:
    if len(data) % 2:
        raise StunError(f"STUN UNKNOWN-ATTRIBUTES is {len(data)} bytes, not a multiple of 2.")
    return struct.unpack(f"!{len(data) // 2}H", data)


def _pack_change(value: ChangeRequest, tid: bytes) -> bytes:
    return struct.pack("!I", (4 if value.change_ip else 0) | (2 if value.change_port else 0))


def _unpack_change(data: bytes, tid: bytes) -> ChangeRequest:
    if len(data) != 4:
        raise StunError(f"STUN CHANGE-REQUEST is {len(data)} bytes, not 4.")
    (flags,) = struct.unpack("!I", data)
    return ChangeRequest(bool(flags & 4), bool(flags & 2))


def _pack_fingerprint(value: int, tid: bytes) -> bytes:
    return struct.pack("!I", value)


def _unpack_fingerprint(data: bytes, tid: bytes) -> int:
    if len(data) != 4:
        raise StunError(f"STUN FINGERPRINT is {len(data)} bytes, not 4.")
    return cast(int, struct.unpack("!I", data)[0])


def _row(code: int, template: AttributeCodec[T]) -> AttributeCodec[T]:
    return register(replace(template, code=code))


# -- the attribute table -----------------------------------------------------------------------

MAPPED_ADDRESS = _row(0x0001, _address("MAPPED-ADDRESS", xor=False))
CHANGE_REQUEST = _row(0x0003, AttributeCodec(0, "CHANGE-REQUEST", _pack_change, _unpack_change))
SOURCE_ADDRESS = _row(0x0004, _address("SOURCE-ADDRESS", xor=False))  # RFC 3489
CHANGED_ADDRESS = _row(0x0005, _address("CHANGED-ADDRESS", xor=False))  # RFC 3489
USERNAME = _row(0x0006, _text("USERNAME", 513))
MESSAGE_INTEGRITY = _row(0x0008, _fixed("MESSAGE-INTEGRITY", 20))
ERROR_CODE = _row(0x0009, AttributeCodec(0, "ERROR-CODE", _pack_error, _unpack_error))
UNKNOWN_ATTRIBUTES = _row(
    0x000A, AttributeCodec(0, "UNKNOWN-ATTRIBUTES", _pack_codes, _unpack_codes)
)
REALM = _row(0x0014, _text("REALM", 763))
NONCE = _row(0x0015, _text("NONCE", 763))
XOR_MAPPED_ADDRESS = _row(0x0020, _address("XOR-MAPPED-ADDRESS", xor=True))
PADDING = _row(0x0026, _raw("PADDING"))  # RFC 5780
SOFTWARE = _row(0x8022, _text("SOFTWARE", 763))
ALTERNATE_SERVER = _row(0x8023, _address("ALTERNATE-SERVER", xor=False))
FINGERPRINT = _row(0x8028, AttributeCodec(0, "FINGERPRINT", _pack_fingerprint, _unpack_fingerprint))
RESPONSE_ORIGIN = _row(0x802B, _address("RESPONSE-ORIGIN", xor=False))  # RFC 5780
OTHER_ADDRESS = _row(0x802C, _address("OTHER-ADDRESS", xor=False))  # RFC 5780
