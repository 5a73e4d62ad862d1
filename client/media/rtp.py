"""RTP (RFC 3550) and its RTCP sender/receiver reports, as a call's media puts them on the wire.

| packet            | sent by   | when                              | reply                    |
| ----------------- | --------- | --------------------------------- | ------------------------ |
| RTP, PT 111, Opus | each side | every 20 ms, in silence too       | none                     |
| RTCP SR (PT 200)  | each side | about once a second               | none; the peer's next SR |
|                   |           |                                   | echoes it (LSR/DLSR)     |
| RTCP RR (PT 201)  | (parsed)  | what a receive-only side sends    | none                     |

RTP header (12 bytes, then 4 per CSRC, then the optional extension)::

     0                   1                   2                   3
    |V=2|P|X|  CC   |M|     PT      |       sequence number         |
    |                           timestamp                           |
    |                             SSRC                              |
    |                     CSRC list (CC entries)                    |
    |   extension profile (if X)    |   extension length (words)    |
    |                  extension data (4 * length bytes)            |
    |        payload ...            | padding (if P; last byte = count) |

Opus follows RFC 7587: a dynamic payload type (``OPUS_PAYLOAD_TYPE``), one Opus packet per RTP
packet, and a 48 kHz RTP clock whatever rate the codec runs at, so the timestamp advances by
``FRAME_TICKS`` (960) per 20 ms frame.  The marker bit is set on the first packet of a stream.

RTCP reports follow RFC 3550 section 6.4: an SR carries the sender's NTP-format time, RTP
timestamp and counts; each report block describes one stream received (fraction and cumulative
loss, highest extended sequence, interarrival jitter, and LSR/DLSR from which the other side
computes the round trip).  RTP and RTCP share one socket and are told apart as in RFC 5761: the
second byte of RTCP is its packet type 200-204, which no RTP payload type we use can produce.
Parsers raise ``RtpError``/``RtcpError`` (``ProtocolError``) and nothing else.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from overlay.errors import ProtocolError

RTP_VERSION = 2
#: RFC 7587: Opus always uses a 48 kHz RTP clock.
RTP_CLOCK_RATE = 48000
#: Our dynamic payload type for Opus (the one WebRTC offers).
OPUS_PAYLOAD_TYPE = 111
#: RTP timestamp ticks per 20 ms frame.
FRAME_TICKS = RTP_CLOCK_RATE * 20 // 1000
RTP_HEADER = struct.Struct("!BBHII")
RTP_HEADER_SIZE = RTP_HEADER.size
RTCP_HEADER = struct.Struct("!BBHI")
RTCP_HEADER_SIZE = RTCP_HEADER.size
SENDER_INFO = struct.Struct("!QIII")
REPORT_BLOCK = struct.Struct("!IIIIII")
RTCP_SR = 200
RTCP_RR = 201
#: RFC 5761 section 4: a second byte in this range marks RTCP on a shared port.
RTCP_TYPES = range(192, 224)
MAX_REPORT_BLOCKS = 31
#: Seconds from the NTP epoch (1900) to the Unix epoch (1970).
NTP_UNIX_OFFSET = 2_208_988_800
_U16 = 0xFFFF
_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF


class RtpError(ProtocolError):
    """A media packet (RTP) from the peer is malformed."""

    code = "bad-rtp"


class RtcpError(ProtocolError):
    """A media report (RTCP) from the peer is malformed."""

    code = "bad-rtcp"


def _check(name: str, value: int, limit: int) -> None:
    if not 0 <= value <= limit:
        raise ValueError(f"{name} {value} is outside 0..{limit}")


@dataclass(frozen=True)
class RtpExtension:
    """The RFC 3550 header extension: a 16-bit profile and data in whole 32-bit words."""

    profile: int
    data: bytes = b""

    def __post_init__(self) -> None:
        _check("RTP extension profile", self.profile, _U16)
        if len(self.data) % 4 or len(self.data) > 4 * _U16:
            raise ValueError("RTP extension data must be whole 32-bit words")


@dataclass(frozen=True)
class RtpHeader:
    payload_type: int
    sequence_number: int
    timestamp: int
    ssrc: int
    marker: bool = False
    padding: bool = False
    csrc: tuple[int, ...] = ()
    extension: RtpExtension | None = None

    def __post_init__(self) -> None:
        _check("RTP payload type", self.payload_type, 0x7F)
        _check("RTP sequence number", self.sequence_number, _U16)
        _check("RTP timestamp", self.timestamp, _U32)
        _check("RTP SSRC", self.ssrc, _U32)
        if len(self.csrc) > 15:
            raise ValueError("an RTP header holds at most 15 CSRC identifiers")
        for csrc in self.csrc:
            _check("RTP CSRC", csrc, _U32)

    def __bytes__(self) -> bytes:
        first = RTP_VERSION << 6 | self.padding << 5 | len(self.csrc)
        if self.extension is not None:
            first |= 0x10
        second = self.marker << 7 | self.payload_type
        parts = [
            RTP_HEADER.pack(first, second, self.sequence_number, self.timestamp, self.ssrc),
            struct.pack(f"!{len(self.csrc)}I", *self.csrc),
        ]
        if self.extension is not None:
            data = self.extension.data
            parts.append(struct.pack("!HH", self.extension.profile, len(data) // 4) + data)
        return b"".join(parts)

    @classmethod
    def parse_prefix(cls, data: bytes) -> tuple[RtpHeader, int]:
        """The header at the start of ``data`` and the offset where the payload begins."""
        if len(data) < RTP_HEADER_SIZE:
            raise RtpError(f"RTP packet shorter than its {RTP_HEADER_SIZE}-byte header.")
        first, second, sequence, timestamp, ssrc = RTP_HEADER.unpack_from(data)
        version = first >> 6
        if version != RTP_VERSION:
            raise RtpError(f"Unsupported RTP version {version}.")
        count = first & 0x0F
        offset = RTP_HEADER_SIZE + 4 * count
        if len(data) < offset:
            raise RtpError(f"RTP packet too short for its {count} CSRC identifiers.")
        csrc = struct.unpack_from(f"!{count}I", data, RTP_HEADER_SIZE)
        extension = None
        if first & 0x10:
            if len(data) < offset + 4:
                raise RtpError("RTP header extension runs past the end of the packet.")
            profile, words = struct.unpack_from("!HH", data, offset)
            offset += 4
            end = offset + 4 * words
            if len(data) < end:
                raise RtpError("RTP header extension runs past the end of the packet.")
            extension = RtpExtension(profile, bytes(data[offset:end]))
            offset = end
        header = cls(
            payload_type=second & 0x7F,
            sequence_number=sequence,
            timestamp=timestamp,
            ssrc=ssrc,
            marker=bool(second & 0x80),
            padding=bool(first & 0x20),
            csrc=csrc,
            extension=extension,
        )
        return header, offset


def padding_length(body: bytes) -> int:
    """Bytes of RTP padding at the end of ``body`` (the bytes after the header; P bit set)."""
    if not body:
        raise RtpError("RTP padding flag set on a packet with no payload.")
    count = body[-1]
    if count == 0:
        raise RtpError("RTP padding count of 0 is invalid.")
    if count > len(body):
        raise RtpError(f"RTP padding of {count} bytes is longer than the {len(body)}-byte body.")
    return count


@dataclass(frozen=True)
class RtpPacket:
    header: RtpHeader
    payload: bytes = b""
    #: Padding bytes after the payload (including the count byte); 0 unless ``header.padding``.
    padding: int = 0

    def __post_init__(self) -> None:
        if self.header.padding != (self.padding > 0) or not 0 <= self.padding <= 0xFF:
            raise ValueError("RTP padding length must be 1-255 exactly when the P bit is set")

    def __bytes__(self) -> bytes:
        tail = bytes(self.padding - 1) + bytes([self.padding]) if self.padding else b""
        return bytes(self.header) + self.payload + tail

    @classmethod
    def parse(cls, data: bytes) -> RtpPacket:
        header, offset = RtpHeader.parse_prefix(data)
        body = bytes(data[offset:])
        padding = padding_length(body) if header.padding else 0
        return cls(header, body[: len(body) - padding], padding)


def is_rtp_or_rtcp(datagram: bytes) -> bool:
    """True when ``datagram`` looks like RTP or RTCP (version 2): first byte 0x80-0xBF."""
    return len(datagram) > 0 and 0x80 <= datagram[0] <= 0xBF


def is_rtcp(datagram: bytes) -> bool:
    """True for RTCP on a shared RTP/RTCP port (RFC 5761: second byte 192-223)."""
    return is_rtp_or_rtcp(datagram) and len(datagram) > 1 and datagram[1] in RTCP_TYPES


# -- RTCP ------------------------------------------------------------------------------------


def ntp_timestamp(seconds: float) -> int:
    """64-bit NTP-format time (32.32 fixed point since 1900) for Unix ``seconds``."""
    return int((seconds + NTP_UNIX_OFFSET) * (1 << 32)) & _U64


def ntp_middle(ntp: int) -> int:
    """The middle 32 bits of an NTP timestamp (the LSR field; 16.16 fixed point)."""
    return (ntp >> 16) & _U32


@dataclass(frozen=True)
class SenderInfo:
    ntp_timestamp: int
    rtp_timestamp: int
    packet_count: int
    octet_count: int

    def __post_init__(self) -> None:
        _check("NTP timestamp", self.ntp_timestamp, _U64)
        for name in ("rtp_timestamp", "packet_count", "octet_count"):
            _check(name, getattr(self, name), _U32)


@dataclass(frozen=True)
class ReportBlock:
    """What the reporter knows about one stream it receives (RFC 3550 section 6.4.1)."""

    ssrc: int
    #: Packets lost since the previous report, as a fraction of 256.
    fraction_lost: int
    #: Packets lost since the start (may go negative with duplicates; 24-bit signed).
    cumulative_lost: int
    highest_sequence: int
    #: Interarrival jitter in RTP timestamp units.
    jitter: int
    #: Middle 32 bits of the NTP time of the last SR received from that stream (0 if none).
    last_sr: int
    #: Delay since that SR was received, in 1/65536 s (0 if none).
    delay_since_last_sr: int

    def __post_init__(self) -> None:
        _check("RTCP SSRC", self.ssrc, _U32)
        _check("fraction lost", self.fraction_lost, 0xFF)
        if not -(1 << 23) <= self.cumulative_lost < 1 << 23:
            raise ValueError(f"cumulative loss {self.cumulative_lost} does not fit 24 bits")
        for name in ("highest_sequence", "jitter", "last_sr", "delay_since_last_sr"):
            _check(name, getattr(self, name), _U32)

    def __bytes__(self) -> bytes:
        loss = self.fraction_lost << 24 | (self.cumulative_lost & 0xFFFFFF)
        return REPORT_BLOCK.pack(
            self.ssrc,
            loss,
            self.highest_sequence,
            self.jitter,
            self.last_sr,
            self.delay_since_last_sr,
        )

    @classmethod
    def parse(cls, data: bytes, offset: int = 0) -> ReportBlock:
        ssrc, loss, highest, jitter, lsr, dlsr = REPORT_BLOCK.unpack_from(data, offset)
        cumulative = loss & 0xFFFFFF
        if cumulative & 0x800000:
            cumulative -= 1 << 24
        return cls(ssrc, loss >> 24, cumulative, highest, jitter, lsr, dlsr)


@dataclass(frozen=True)
class RtcpReport:
    """A sender report (with ``sender_info``) or a receiver report (without)."""

    ssrc: int
    sender_info: SenderInfo | None = None
    blocks: tuple[ReportBlock, ...] = ()

    def __post_init__(self) -> None:
        _check("RTCP SSRC", self.ssrc, _U32)
        if len(self.blocks) > MAX_REPORT_BLOCKS:
            raise ValueError(f"an RTCP report holds at most {MAX_REPORT_BLOCKS} report blocks")

    @property
    def packet_type(self) -> int:
        return RTCP_RR if self.sender_info is None else RTCP_SR

    def __bytes__(self) -> bytes:
        body = b""
        if self.sender_info is not None:
            info = self.sender_info
            body = SENDER_INFO.pack(
                info.ntp_timestamp, info.rtp_timestamp, info.packet_count, info.octet_count
            )
        body += b"".join(bytes(block) for block in self.blocks)
        words = (RTCP_HEADER_SIZE + len(body)) // 4 - 1
        first = RTP_VERSION << 6 | len(self.blocks)
        return RTCP_HEADER.pack(first, self.packet_type, words, self.ssrc) + body

    @classmethod
    def parse(cls, data: bytes) -> RtcpReport:
        """Exactly one SR or RR packet (padding allowed, compound packets not)."""
        if len(data) < RTCP_HEADER_SIZE:
            raise RtcpError(f"RTCP packet shorter than its {RTCP_HEADER_SIZE}-byte header.")
        first, packet_type, words, ssrc = RTCP_HEADER.unpack_from(data)
        version = first >> 6
        if version != RTP_VERSION:
            raise RtcpError(f"Unsupported RTCP version {version}.")
        if packet_type not in (RTCP_SR, RTCP_RR):
            raise RtcpError(f"Unsupported RTCP packet type {packet_type}.")
        if (words + 1) * 4 != len(data):
            raise RtcpError("RTCP length field does not match the packet size.")
        end = len(data)
        if first & 0x20:
            count = data[-1]
            if count == 0 or count > end - RTCP_HEADER_SIZE:
                raise RtcpError(f"RTCP padding count of {count} is invalid.")
            end -= count
        offset = RTCP_HEADER_SIZE
        info = None
        if packet_type == RTCP_SR:
            if end < offset + SENDER_INFO.size:
                raise RtcpError("RTCP sender report too short for its sender information.")
            info = SenderInfo(*SENDER_INFO.unpack_from(data, offset))
            offset += SENDER_INFO.size
        blocks = first & 0x1F
        if end - offset != blocks * REPORT_BLOCK.size:
            raise RtcpError(f"RTCP report size does not match its {blocks} report blocks.")
        parsed = tuple(
            ReportBlock.parse(data, offset + i * REPORT_BLOCK.size) for i in range(blocks)
        )
        return cls(ssrc, info, parsed)
