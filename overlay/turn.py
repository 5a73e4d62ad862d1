"""TURN (RFC 8656) on top of the STUN codec: attributes, ChannelData, stream framing, credentials.

Shared by the relay (``relay.server``) and the client (``client.turnclient``).  The STUN message
codec is ``overlay.stun``; this module adds TURN's rows to its attribute table, the ChannelData
message, the framing of both on a TCP stream, and the time-limited credentials in the style of
coturn's ``use-auth-secret`` (the REST API draft, draft-uberti-behave-turn-rest):

    username = "<expiry unix time>:<user>"
    password = base64(HMAC-SHA1(secret, username))

so a relay that shares ``secret`` with whoever mints credentials (the supernode it runs in) can
check them with no database, and a password stops working at its expiry time.

Messages of TURN (methods, their attributes, their errors) are in ``docs/protocol.md``,
section "Relay (TURN)".
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct
from dataclasses import dataclass
from typing import cast

from overlay.stun_attributes import (
    REASONS,
    AttributeCodec,
    StunError,
    _address,
    _raw,
    _row,
)

#: IANA protocol number of UDP, the only REQUESTED-TRANSPORT a TURN server must support.
TRANSPORT_UDP = 17
FAMILY_IPV4 = 0x01
FAMILY_IPV6 = 0x02

#: Channel numbers (RFC 8656 §12): 0x4000 through 0x4FFF.
CHANNEL_MIN = 0x4000
CHANNEL_MAX = 0x4FFF
CHANNEL_HEADER = struct.Struct("!HH")

#: Defaults of RFC 8656: allocation lifetime 10 min (at most 1 h), permission 5 min, channel 10 min.
DEFAULT_LIFETIME = 600
MAX_LIFETIME = 3600
PERMISSION_LIFETIME = 300
CHANNEL_LIFETIME = 600

#: The longest message a TURN peer of ours sends or accepts (a STUN message or ChannelData).
MAX_MESSAGE = 1500 + 64

REASONS.update(
    {
        437: "Allocation Mismatch",
        440: "Address Family not Supported",
        441: "Wrong Credentials",
        442: "Unsupported Transport Protocol",
        443: "Peer Address Family Mismatch",
        486: "Allocation Quota Reached",
        508: "Insufficient Capacity",
    }
)


class TurnError(StunError):
    """A TURN message (or ChannelData) is malformed."""

    code = "bad-turn"


# -- attributes --------------------------------------------------------------------------------


def _u32(name: str) -> AttributeCodec[int]:
    def pack(value: int, tid: bytes) -> bytes:
        return struct.pack("!I", value)

    def unpack(data: bytes, tid: bytes) -> int:
        if len(data) != 4:
            raise TurnError(f"TURN {name} is {len(data)} bytes, not 4.")
        return cast(int, struct.unpack("!I", data)[0])

    return AttributeCodec(0, name, pack, unpack)


def _first_byte(name: str) -> AttributeCodec[int]:
    """One byte followed by three reserved bytes (REQUESTED-TRANSPORT, -ADDRESS-FAMILY)."""

    def pack(value: int, tid: bytes) -> bytes:
        return struct.pack("!B3x", value)

    def unpack(data: bytes, tid: bytes) -> int:
        if len(data) != 4:
            raise TurnError(f"TURN {name} is {len(data)} bytes, not 4.")
        return data[0]

    return AttributeCodec(0, name, pack, unpack)


def _pack_channel(value: int, tid: bytes) -> bytes:
    return struct.pack("!H2x", value)


def _unpack_channel(data: bytes, tid: bytes) -> int:
    if len(data) != 4:
        raise TurnError(f"TURN CHANNEL-NUMBER is {len(data)} bytes, not 4.")
    return cast(int, struct.unpack_from("!H", data)[0])


def _pack_flag(value: bool, tid: bytes) -> bytes:
    return b""


def _unpack_flag(data: bytes, tid: bytes) -> bool:
    if data:
        raise TurnError(f"TURN DONT-FRAGMENT is {len(data)} bytes, not empty.")
    return True


def _pack_even(value: bool, tid: bytes) -> bytes:
    return bytes([0x80 if value else 0])


def _unpack_even(data: bytes, tid: bytes) -> bool:
    if len(data) != 1:
        raise TurnError(f"TURN EVEN-PORT is {len(data)} bytes, not 1.")
    return bool(data[0] & 0x80)


CHANNEL_NUMBER = _row(0x000C, AttributeCodec(0, "CHANNEL-NUMBER", _pack_channel, _unpack_channel))
LIFETIME = _row(0x000D, _u32("LIFETIME"))
XOR_PEER_ADDRESS = _row(0x0012, _address("XOR-PEER-ADDRESS", xor=True))
DATA = _row(0x0013, _raw("DATA"))
XOR_RELAYED_ADDRESS = _row(0x0016, _address("XOR-RELAYED-ADDRESS", xor=True))
REQUESTED_ADDRESS_FAMILY = _row(0x0017, _first_byte("REQUESTED-ADDRESS-FAMILY"))
EVEN_PORT = _row(0x0018, AttributeCodec(0, "EVEN-PORT", _pack_even, _unpack_even))
REQUESTED_TRANSPORT = _row(0x0019, _first_byte("REQUESTED-TRANSPORT"))
DONT_FRAGMENT = _row(0x001A, AttributeCodec(0, "DONT-FRAGMENT", _pack_flag, _unpack_flag))
RESERVATION_TOKEN = _row(0x0022, _raw("RESERVATION-TOKEN"))
ADDITIONAL_ADDRESS_FAMILY = _row(0x8000, _first_byte("ADDITIONAL-ADDRESS-FAMILY"))


# -- ChannelData -------------------------------------------------------------------------------


def is_channel_data(data: bytes) -> bool:
    """Does ``data`` start like a ChannelData message (first two bits 01, RFC 8656 §12.4)?"""
    return len(data) >= CHANNEL_HEADER.size and 0x40 <= data[0] <= 0x4F


@dataclass(frozen=True)
class ChannelData:
    channel: int
    data: bytes

    def __post_init__(self) -> None:
        if not CHANNEL_MIN <= self.channel <= CHANNEL_MAX:
            raise TurnError(f"TURN channel {self.channel:#06x} is outside 0x4000-0x4FFF.")
        if len(self.data) > 0xFFFF:
            raise TurnError("TURN ChannelData is longer than 65535 bytes.")

    def to_bytes(self, *, padded: bool = False) -> bytes:
        """The wire form; ``padded`` for a stream transport (a multiple of 4 bytes, §12.5)."""
        out = CHANNEL_HEADER.pack(self.channel, len(self.data)) + self.data
        return out + bytes(-len(out) % 4) if padded else out

    def __bytes__(self) -> bytes:
        return self.to_bytes()

    @classmethod
    def parse(cls, data: bytes) -> ChannelData:
        """One ChannelData message (padding after the data is allowed, as over TCP)."""
        if len(data) < CHANNEL_HEADER.size:
            raise TurnError(f"TURN ChannelData of {len(data)} bytes is shorter than its header.")
        channel, length = CHANNEL_HEADER.unpack_from(data)
        if not CHANNEL_MIN <= channel <= CHANNEL_MAX:
            raise TurnError(f"TURN channel {channel:#06x} is outside 0x4000-0x4FFF.")
        end = CHANNEL_HEADER.size + length
        if end > len(data):
            raise TurnError(f"TURN ChannelData says {length} bytes but carries {len(data) - 4}.")
        if len(data) - end > 3:
            raise TurnError("TURN ChannelData has more than 3 bytes after its data.")
        return cls(channel, bytes(data[CHANNEL_HEADER.size : end]))


# -- stream framing (TURN over TCP, RFC 8656 §12.5 and RFC 8489 §6.2.2) -----------------------


class StreamFramer:
    """Splits a TCP byte stream into whole STUN messages and ChannelData messages.

    ``feed(bytes)`` returns the complete messages received so far, each as bytes (ChannelData
    without its padding).  A frame that starts with neither (first two bits 00 or 01), or says
    it is longer than ``limit``, raises ``TurnError``: the stream cannot be resynchronised and
    the connection must be closed.
    """

    def __init__(self, limit: int = MAX_MESSAGE) -> None:
        self.limit = limit
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        frames: list[bytes] = []
        while len(self._buffer) >= 4:
            first = self._buffer[0]
            (length,) = struct.unpack_from("!H", self._buffer, 2)
            if first < 0x40:  # STUN: 20-byte header, the length counts the attributes
                total = 20 + length
                take = total
                if length % 4:
                    raise TurnError(f"STUN length {length} on the stream is not a multiple of 4.")
            elif first <= 0x4F:  # ChannelData, padded to 4 bytes on a stream
                total = 4 + length
                take = total + (-total % 4)
            else:
                raise TurnError(f"A TURN stream frame starts with byte {first:#04x}.")
            if total > self.limit:
                raise TurnError(f"A TURN stream frame of {total} bytes is over {self.limit}.")
            if len(self._buffer) < take:
                break
            frames.append(bytes(self._buffer[:total]))
            del self._buffer[:take]
        if len(self._buffer) > self.limit + 4:  # cannot happen: a frame is bounded above
            raise TurnError("The TURN stream buffer overflowed.")
        return frames

    @property
    def pending(self) -> int:
        return len(self._buffer)


# -- time-limited credentials (coturn's use-auth-secret) ---------------------------------------


@dataclass(frozen=True)
class TurnCredential:
    username: str
    password: str
    expires: int

    def to_wire(self) -> dict[str, object]:
        return {"username": self.username, "password": self.password, "expires": self.expires}


def turn_password(secret: bytes, username: str) -> str:
    return base64.b64encode(hmac.digest(secret, username.encode(), hashlib.sha1)).decode()


def mint_credential(secret: bytes, user: str, now: float, ttl: int = 86400) -> TurnCredential:
    """A credential for ``user`` valid ``ttl`` seconds from ``now`` (a unix time)."""
    if ":" in user:
        raise ValueError("a TURN user name may not contain ':'")
    expires = int(now) + ttl
    username = f"{expires}:{user}"
    return TurnCredential(username, turn_password(secret, username), expires)


def credential_expiry(username: str) -> int | None:
    """The expiry time in a time-limited username, None when it has none."""
    head, sep, _ = username.partition(":")
    if not sep or not head.isdigit() or len(head) > 12:
        return None
    return int(head)


def credential_user(username: str) -> str:
    """The user part of a time-limited username (the whole name when it has no expiry)."""
    head, sep, rest = username.partition(":")
    return rest if sep and head.isdigit() else username
