"""STUN messages (RFC 8489, which obsoletes RFC 5389): the codec, the key helpers, demultiplexing.

Message table (the STUN usage of this system; the server is ``overlay.stun_server``, the client
``overlay.stun_client``; details in ``docs/protocol.md``, section "STUN"):

    message               sender -> receiver               answer
    Binding request       node -> supernode UDP port       Binding success: XOR-MAPPED-ADDRESS
                          (NAT discovery, client.natcheck)   (+ FINGERPRINT if the request had one)
                                                           400 Bad Request: malformed, or a method
                                                             other than Binding
                                                           420 Unknown Attribute: lists the unknown
                                                             comprehension-required attributes
    Binding indication    node -> anyone (keep-alive)      none
    success / error       supernode -> node                none (matched by transaction id)

A message is a frozen ``StunMessage``: method, class, transaction id and attributes in wire order.
Attribute codecs are a table (``overlay.stun_attributes``, re-exported here), one row per type;
a row is also the typed key to read an attribute (``message.get(XOR_MAPPED_ADDRESS)``) and the
constructor of one.  Attributes the table does not know are kept raw (bytes), so a server can
answer 420 listing the comprehension-required ones (< 0x8000).

MESSAGE-INTEGRITY and FINGERPRINT are computed by ``with_integrity(key)`` and
``with_fingerprint()``; ``parse`` verifies FINGERPRINT itself and keeps the received bytes so
``check_integrity(key)`` works on exactly what arrived.  Every malformed input raises a
``StunError`` naming what is wrong.  The RFC 3489 (no magic cookie) format is not spoken.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import stringprep
import struct
import unicodedata
import zlib
from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import Any, TypeVar, cast

from overlay.stun_attributes import (
    ALTERNATE_SERVER,
    ATTRIBUTES,
    CHANGE_REQUEST,
    CHANGED_ADDRESS,
    ERROR_CODE,
    FINGERPRINT,
    MAGIC_COOKIE,
    MAPPED_ADDRESS,
    MESSAGE_INTEGRITY,
    NONCE,
    OTHER_ADDRESS,
    PADDING,
    REALM,
    REASONS,
    RESPONSE_ORIGIN,
    SOFTWARE,
    SOURCE_ADDRESS,
    UNKNOWN_ATTRIBUTES,
    USERNAME,
    XOR_MAPPED_ADDRESS,
    Address,
    Attribute,
    AttributeCodec,
    ChangeRequest,
    ErrorCode,
    StunError,
    StunIntegrityError,
    attribute_name,
    register,
)

__all__ = [
    "ALTERNATE_SERVER",
    "ATTRIBUTES",
    "CHANGED_ADDRESS",
    "CHANGE_REQUEST",
    "ERROR_CODE",
    "FINGERPRINT",
    "HEADER_SIZE",
    "MAGIC_COOKIE",
    "MAPPED_ADDRESS",
    "MESSAGE_INTEGRITY",
    "NONCE",
    "OTHER_ADDRESS",
    "PADDING",
    "REALM",
    "REASONS",
    "RESPONSE_ORIGIN",
    "SOFTWARE",
    "SOURCE_ADDRESS",
    "UNKNOWN_ATTRIBUTES",
    "USERNAME",
    "XOR_MAPPED_ADDRESS",
    "Address",
    "Attribute",
    "AttributeCodec",
    "ChangeRequest",
    "ErrorCode",
    "Method",
    "StunClass",
    "StunError",
    "StunIntegrityError",
    "StunMessage",
    "attribute_name",
    "is_stun",
    "long_term_key",
    "new_transaction_id",
    "register",
    "saslprep",
    "short_term_key",
]

HEADER = struct.Struct("!HHI12s")
HEADER_SIZE = HEADER.size
FINGERPRINT_XOR = 0x5354554E
T = TypeVar("T")


class StunClass(IntEnum):
    REQUEST = 0
    INDICATION = 1
    SUCCESS = 2
    ERROR = 3


class Method(IntEnum):
    BINDING = 0x001
    ALLOCATE = 0x003  # TURN (RFC 8656), for the relay
    REFRESH = 0x004
    SEND = 0x006
    DATA = 0x007
    CREATE_PERMISSION = 0x008
    CHANNEL_BIND = 0x009


# -- messages ----------------------------------------------------------------------------------


def new_transaction_id() -> bytes:
    return secrets.token_bytes(12)


def _message_type(method: int, klass: int) -> int:
    return (
        (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((klass & 1) << 4)
        | ((klass & 2) << 7)
    )


def _pack_attributes(attributes: tuple[Attribute, ...], tid: bytes) -> bytes:
    out = bytearray()
    for attribute in attributes:
        row = ATTRIBUTES.get(attribute.type)
        value = row.pack(attribute.value, tid) if row is not None else bytes(attribute.value)
        if len(value) > 0xFFFF:
            raise StunError(f"STUN {attribute_name(attribute.type)} is longer than 65535 bytes.")
        out += struct.pack("!HH", attribute.type, len(value)) + value + bytes(-len(value) % 4)
    return bytes(out)


@dataclass(frozen=True)
class StunMessage:
    method: int
    message_class: StunClass
    transaction_id: bytes
    attributes: tuple[Attribute, ...] = ()
    #: The bytes this message was parsed from (for ``check_integrity``); not part of equality.
    raw: bytes | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.method <= 0xFFF:
            raise StunError(f"STUN method {self.method:#x} does not fit 12 bits.")
        if len(self.transaction_id) != 12:
            raise StunError("A STUN transaction id is 12 bytes.")
        types = [a.type for a in self.attributes]
        if FINGERPRINT.code in types[:-1]:
            raise StunError("STUN FINGERPRINT must be the last attribute.")
        if MESSAGE_INTEGRITY.code in types:
            after = types[types.index(MESSAGE_INTEGRITY.code) + 1 :]
            if after not in ([], [FINGERPRINT.code]):
                raise StunError("Only FINGERPRINT may follow STUN MESSAGE-INTEGRITY.")

    # -- building --------------------------------------------------------------------------

    @classmethod
    def request(
        cls,
        *attributes: Attribute,
        method: int = Method.BINDING,
        transaction_id: bytes | None = None,
    ) -> StunMessage:
        """A request (a Binding request unless told), with a fresh transaction id unless given."""
        return cls(method, StunClass.REQUEST, transaction_id or new_transaction_id(), attributes)

    def success(self, *attributes: Attribute) -> StunMessage:
        """The success response to this request."""
        return StunMessage(self.method, StunClass.SUCCESS, self.transaction_id, attributes)

    def error(self, code: int, *attributes: Attribute, reason: str | None = None) -> StunMessage:
        """The error response to this request (``reason`` defaults to the RFC's phrase)."""
        text = REASONS.get(code, "") if reason is None else reason
        error = ERROR_CODE(ErrorCode(code, text))
        return StunMessage(self.method, StunClass.ERROR, self.transaction_id, (error, *attributes))

    def _without_checks(self) -> tuple[Attribute, ...]:
        stop = {MESSAGE_INTEGRITY.code, FINGERPRINT.code}
        kept: list[Attribute] = []
        for attribute in self.attributes:
            if attribute.type in stop:
                break
            kept.append(attribute)
        return tuple(kept)

    def with_integrity(self, key: bytes) -> StunMessage:
        """This message with MESSAGE-INTEGRITY (HMAC-SHA1 under ``key``) and no FINGERPRINT."""
        kept = self._without_checks()
        body = _pack_attributes(kept, self.transaction_id)
        digest = hmac.digest(key, self._header(len(body) + 24) + body, "sha1")
        return replace(self, attributes=(*kept, MESSAGE_INTEGRITY(digest)), raw=None)

    def with_fingerprint(self) -> StunMessage:
        kept = tuple(a for a in self.attributes if a.type != FINGERPRINT.code)
        body = _pack_attributes(kept, self.transaction_id)
        crc = zlib.crc32(self._header(len(body) + 8) + body) ^ FINGERPRINT_XOR
        return replace(self, attributes=(*kept, FINGERPRINT(crc)), raw=None)

    # -- reading ---------------------------------------------------------------------------

    def get(self, codec: AttributeCodec[T]) -> T | None:
        """The value of the first attribute of this type, None when absent."""
        for attribute in self.attributes:
            if attribute.type == codec.code:
                return cast(T, attribute.value)
        return None

    def has(self, codec: AttributeCodec[Any]) -> bool:
        return any(a.type == codec.code for a in self.attributes)

    def unknown_required(self) -> tuple[int, ...]:
        """Comprehension-required attribute types (below 0x8000) this table does not know."""
        seen = dict.fromkeys(
            a.type for a in self.attributes if a.type < 0x8000 and a.type not in ATTRIBUTES
        )
        return tuple(seen)

    @property
    def name(self) -> str:
        try:
            method = Method(self.method).name.replace("_", "-").title()
        except ValueError:
            method = f"method {self.method:#05x}"
        return f"{method} {self.message_class.name.lower()}"

    def check_integrity(self, key: bytes) -> bool:
        """Whether MESSAGE-INTEGRITY is present and right under ``key``, on the received bytes."""
        data = self.raw if self.raw is not None else bytes(self)
        offset = HEADER_SIZE
        while offset + 4 <= len(data):
            type_, length = struct.unpack_from("!HH", data, offset)
            if type_ == MESSAGE_INTEGRITY.code and length == 20:
                header = data[:2] + struct.pack("!H", offset + 4) + data[4:HEADER_SIZE]
                expected = hmac.digest(key, header + data[HEADER_SIZE:offset], "sha1")
                return hmac.compare_digest(expected, data[offset + 4 : offset + 24])
            offset += 4 + length + (-length % 4)
        return False

    # -- the wire --------------------------------------------------------------------------

    def _header(self, length: int) -> bytes:
        type_ = _message_type(self.method, self.message_class)
        return HEADER.pack(type_, length, MAGIC_COOKIE, self.transaction_id)

    def __bytes__(self) -> bytes:
        body = _pack_attributes(self.attributes, self.transaction_id)
        return self._header(len(body)) + body

    @classmethod
    def parse(cls, data: bytes) -> StunMessage:
        data = bytes(data)
        if len(data) < HEADER_SIZE:
            raise StunError("STUN message shorter than its 20-byte header.")
        type_, length, cookie, tid = HEADER.unpack_from(data)
        if type_ & 0xC000:
            raise StunError("STUN message type has one of its two top bits set.")
        if cookie != MAGIC_COOKIE:
            raise StunError("STUN message lacks the magic cookie (RFC 3489 is not spoken).")
        if length % 4:
            raise StunError(f"STUN message length {length} is not a multiple of 4.")
        if length != len(data) - HEADER_SIZE:
            raise StunError(
                f"STUN message length {length} does not match the "
                f"{len(data) - HEADER_SIZE} bytes after the header."
            )
        method = (type_ & 0x000F) | ((type_ & 0x00E0) >> 1) | ((type_ & 0x3E00) >> 2)
        klass = StunClass(((type_ & 0x0010) >> 4) | ((type_ & 0x0100) >> 7))
        attributes: list[Attribute] = []
        offset, integrity, fingerprint = HEADER_SIZE, False, False
        while offset < len(data):
            atype, alength = struct.unpack_from("!HH", data, offset)
            name = attribute_name(atype)
            start, end = offset + 4, offset + 4 + alength
            if end + (-alength % 4) > len(data):
                raise StunError(f"STUN {name} runs past the end of the message.")
            if fingerprint:
                raise StunError(f"STUN {name} follows FINGERPRINT.")
            row = ATTRIBUTES.get(atype)
            value = row.unpack(data[start:end], tid) if row is not None else data[start:end]
            if atype == FINGERPRINT.code:
                fingerprint = True
                if zlib.crc32(data[:offset]) ^ FINGERPRINT_XOR != value:
                    raise StunIntegrityError("STUN FINGERPRINT does not match the message.")
            if not integrity or atype == FINGERPRINT.code:  # RFC 8489 s.9: ignore the rest
                attributes.append(Attribute(atype, value))
            integrity = integrity or atype == MESSAGE_INTEGRITY.code
            offset = end + (-alength % 4)
        return cls(method, klass, tid, tuple(attributes), raw=data)


def is_stun(datagram: bytes) -> bool:
    """Whether a datagram is a STUN message, to demultiplex a socket shared with other protocols.

    Checks the two top bits (zero), the magic cookie and the length (a multiple of 4 matching
    the datagram).  No overlay frame passes: its length would exceed 2 MB (``overlay.framing``).
    """
    if len(datagram) < HEADER_SIZE or datagram[0] & 0xC0:
        return False
    length = int.from_bytes(datagram[2:4], "big")
    cookie = int.from_bytes(datagram[4:8], "big")
    return cookie == MAGIC_COOKIE and length % 4 == 0 and length + HEADER_SIZE == len(datagram)


# -- credentials -------------------------------------------------------------------------------


def saslprep(text: str) -> str:
    """RFC 4013 SASLprep (stored strings), as RFC 5389 prepares STUN passwords."""
    mapped = "".join(
        " " if stringprep.in_table_c12(c) else c for c in text if not stringprep.in_table_b1(c)
    )
    prepared = unicodedata.normalize("NFKC", mapped)
    prohibited = (
        stringprep.in_table_c12,
        stringprep.in_table_c21_c22,
        stringprep.in_table_c3,
        stringprep.in_table_c4,
        stringprep.in_table_c5,
        stringprep.in_table_c6,
        stringprep.in_table_c7,
        stringprep.in_table_c8,
        stringprep.in_table_c9,
        stringprep.in_table_a1,
    )
    for c in prepared:
        if any(check(c) for check in prohibited):
            raise StunError(f"A STUN credential contains U+{ord(c):04X}, which SASLprep forbids.")
    if any(stringprep.in_table_d1(c) for c in prepared) and (
        any(stringprep.in_table_d2(c) for c in prepared)
        or not stringprep.in_table_d1(prepared[0])
        or not stringprep.in_table_d1(prepared[-1])
    ):
        raise StunError("A STUN credential mixes right-to-left and left-to-right text.")
    return prepared


def short_term_key(password: str) -> bytes:
    """The MESSAGE-INTEGRITY key of the short-term credential mechanism (ICE checks)."""
    return saslprep(password).encode()


def long_term_key(username: str, realm: str, password: str) -> bytes:
    """MD5(username ":" realm ":" SASLprep(password)): the long-term mechanism's key (TURN)."""
    text = f"{username}:{realm}:{saslprep(password)}".encode()
    return hashlib.md5(text, usedforsecurity=False).digest()  # the RFC's choice, not ours
