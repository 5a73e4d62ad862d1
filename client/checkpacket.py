"""Connectivity-check packets: the datagrams that prove a candidate pair works.

Our own compact form of ICE's Binding request and response (RFC 8445 7.2), sent on the call
socket and authenticated with the call's check key (``client.callkeys``) instead of STUN's
short-term credentials.

    packet    sender -> receiver      carries                                 answered by
    request   either side, on a pair  call token, transaction id, role and    a response, from
                                      tie-breaker, priority, nominate flag    the address the
                                                                              request went to
    response  receiver -> requester   the same transaction id, the            -
                                      responder's role, the address the
                                      request came from ("observed"), the
                                      nominate flag echoed

Every packet is 72 bytes, requests and responses alike, so an answer never amplifies:

    offset size  field
     0      1    magic 0x56 'V' (outside STUN 0x00-0x03 and RTP/RTCP 0x80-0xBF on the call socket)
     1      1    version, 1
     2      1    type: 1 request, 2 response
     3      1    flags: 0x01 nominate, 0x02 the sender is controlling; other bits zero
     4      8    call token (the first 8 bytes of the call id)
    12     12    transaction id (random, new for every transmission)
    24      8    tie-breaker (random per call side; settles a role conflict, RFC 8445 7.3.1.1)
    32      4    the priority the sender's address gets if the receiver learns it as peer-reflexive
    36      1    observed address family: 0 in a request, 4 or 6 in a response
    37      1    zero
    38      2    observed port (0 in a request)
    40     16    observed address (IPv4 in the first 4 bytes and the rest zero; zero in a request)
    56     16    MAC: HMAC-SHA256(check key, bytes 0-55), the first 16 bytes

``CheckPacket.parse`` checks the size, magic and version, then the MAC (constant-time), then the
fields, and raises only ``CheckError`` (``CheckAuthError`` for a failed MAC).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import struct
from dataclasses import dataclass

from overlay.errors import ProtocolError

MAGIC = 0x56
VERSION = 1
SIZE = 72
MAC_SIZE = 16
TOKEN_SIZE = 8
TXID_SIZE = 12
KEY_SIZE = 32
NOMINATE = 0x01
CONTROLLING = 0x02
_BODY = struct.Struct("!BBBB8s12sQIBBH16s")
Address = tuple[str, int]


class CheckError(ProtocolError):
    """A connectivity check packet from the peer was not valid."""

    code = "bad-check"


class CheckAuthError(CheckError):
    """A connectivity check packet failed authentication."""

    code = "bad-check-mac"


class CheckType(enum.IntEnum):
    REQUEST = 1
    RESPONSE = 2


def is_check(data: bytes) -> bool:
    """Is this datagram ours to parse (by its first byte)?"""
    return len(data) > 0 and data[0] == MAGIC


def _mac(key: bytes, body: bytes) -> bytes:
    return hmac.new(key, body, hashlib.sha256).digest()[:MAC_SIZE]


@dataclass(frozen=True)
class CheckPacket:
    type: CheckType
    call_token: bytes
    transaction_id: bytes
    tie_breaker: int
    priority: int
    controlling: bool
    nominate: bool = False
    #: Responses only: the address the request came from, as the responder saw it.
    observed: Address | None = None

    def to_bytes(self, key: bytes) -> bytes:
        """The packet, authenticated with ``key``."""
        if len(key) != KEY_SIZE:
            raise ValueError("the check key is 32 bytes")
        if len(self.call_token) != TOKEN_SIZE or len(self.transaction_id) != TXID_SIZE:
            raise ValueError("call token is 8 bytes, transaction id 12")
        if (self.type is CheckType.RESPONSE) != (self.observed is not None):
            raise ValueError("a response, and only a response, carries the observed address")
        family, port, packed = 0, 0, bytes(16)
        if self.observed is not None:
            address = ipaddress.ip_address(self.observed[0])
            family, port = address.version, self.observed[1]
            packed = address.packed.ljust(16, b"\x00")
        flags = (NOMINATE if self.nominate else 0) | (CONTROLLING if self.controlling else 0)
        body = _BODY.pack(
            MAGIC, VERSION, self.type, flags, self.call_token, self.transaction_id,
            self.tie_breaker, self.priority, family, 0, port, packed,
        )  # fmt: skip
        return body + _mac(key, body)

    @classmethod
    def parse(cls, data: bytes, key: bytes) -> CheckPacket:
        """Check and decode one datagram; raises only ``CheckError``."""
        if len(data) != SIZE:
            raise CheckError(f"A check packet is {SIZE} bytes, not {len(data)}.")
        body, mac = data[:-MAC_SIZE], data[-MAC_SIZE:]
        (
            magic,
            version,
            kind,
            flags,
            token,
            txid,
            tie_breaker,
            prio,
            family,
            zero,
            port,
            packed,
        ) = _BODY.unpack(body)
        if magic != MAGIC:
            raise CheckError("Not a check packet (wrong first byte).")
        if version != VERSION:
            raise CheckError(f"Check packet version {version} is not supported.")
        if not hmac.compare_digest(mac, _mac(key, body)):
            raise CheckAuthError("A check packet failed authentication (wrong check key).")
        if kind not in (CheckType.REQUEST, CheckType.RESPONSE):
            raise CheckError(f"Unknown check packet type {kind}.")
        if flags & ~(NOMINATE | CONTROLLING):
            raise CheckError("A check packet has unknown flags.")
        if zero != 0:
            raise CheckError("A check packet's reserved byte is not zero.")
        observed: Address | None = None
        if kind == CheckType.REQUEST:
            if family != 0 or port != 0 or any(packed):
                raise CheckError("A check request carries an observed address.")
        else:
            observed = _observed(family, port, packed)
        return cls(
            CheckType(kind),
            bytes(token),
            bytes(txid),
            tie_breaker,
            prio,
            controlling=bool(flags & CONTROLLING),
            nominate=bool(flags & NOMINATE),
            observed=observed,
        )


def _observed(family: int, port: int, packed: bytes) -> Address:
    if family == 4:
        if any(packed[4:]):
            raise CheckError("A check response's IPv4 address has stray bytes.")
        host = str(ipaddress.IPv4Address(packed[:4]))
    elif family == 6:
        host = str(ipaddress.IPv6Address(packed))
    else:
        raise CheckError(f"A check response has address family {family}.")
    if port == 0:
        raise CheckError("A check response carries port 0.")
    return (host, port)
