"""Media encryption: every RTP payload and RTCP report sealed with ChaCha20-Poly1305 (IETF).

Like SRTP with an AEAD (RFC 7714), but with libsodium's ChaCha20-Poly1305::

    sealed RTP  = RTP header (clear) | AEAD(payload [+ RTP padding]) | 16-byte tag
                  associated data: the whole RTP header
    sealed RTCP = first 8 bytes (clear: V/P/RC, PT, length, sender SSRC) | AEAD(rest) | tag
                  | E=1 + 31-bit report index (clear)
                  associated data: the first 8 bytes and the 4-byte index

The header stays readable so a capture can be dissected by standard tools, and any change to
it breaks the tag.  The 12-byte nonce is never sent; both sides build it from the packet::

    nonce = kind (0 = RTP, 1 = RTCP) | 0 | SSRC (4 bytes) | packet index (6 bytes)

The RTP packet index is the 48-bit extended sequence number, ROC * 65536 + SEQ, where ROC
counts the wraps of the 16-bit sequence number; the receiver estimates it from the highest
index it has authenticated (RFC 3711 appendix A).  The RTCP index is a 31-bit counter carried
in the trailer.  A call has one key per direction (``MediaKeys``; the call engine derives them),
each sender starts its first sequence number below 32768 and counts up, and a ``MediaSealer``
refuses to go past the index space, so no nonce ever repeats under one key.

Receiving (``MediaOpener.open``): a replay window of the last ``REPLAY_WINDOW`` indices per SSRC
and packet kind (a sliding bitmap, RFC 3711 section 3.3.2) rejects duplicates and packets too
old to tell; the window only moves once the tag checks out.  A malformed, forged, altered,
replayed or too-old packet makes ``open`` return None and bump a counter; it never raises.
"""

from __future__ import annotations

import struct
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from nacl.bindings import (
    crypto_aead_chacha20poly1305_ietf_ABYTES,
    crypto_aead_chacha20poly1305_ietf_decrypt,
    crypto_aead_chacha20poly1305_ietf_encrypt,
    crypto_aead_chacha20poly1305_ietf_KEYBYTES,
)
from nacl.exceptions import CryptoError

from client.media.rtp import (
    RTCP_HEADER_SIZE,
    RtcpReport,
    RtpHeader,
    RtpPacket,
    is_rtcp,
    is_rtp_or_rtcp,
    padding_length,
)
from overlay.errors import ProtocolError, VoipError

KEY_BYTES: int = crypto_aead_chacha20poly1305_ietf_KEYBYTES
TAG_BYTES: int = crypto_aead_chacha20poly1305_ietf_ABYTES
REPLAY_WINDOW = 128
KIND_RTP = 0
KIND_RTCP = 1
MAX_RTP_INDEX = (1 << 48) - 1
MAX_RTCP_INDEX = (1 << 31) - 1
E_FLAG = 1 << 31
#: Extra bytes a sealed RTP packet carries over the plain one.
RTP_OVERHEAD = TAG_BYTES
#: Extra bytes a sealed report carries: the tag and the index trailer.
RTCP_OVERHEAD = TAG_BYTES + 4
_INDEX = struct.Struct("!I")


class MediaCryptoError(VoipError):
    """The call's media encryption cannot go on (its packet counter is used up)."""

    code = "media-crypto"


def nonce(kind: int, ssrc: int, index: int) -> bytes:
    """The 12-byte AEAD nonce of packet ``index`` of stream ``ssrc`` (``kind`` RTP or RTCP)."""
    return bytes([kind, 0]) + ssrc.to_bytes(4, "big") + index.to_bytes(6, "big")


@dataclass(frozen=True, repr=False)
class MediaKeys:
    """One 32-byte key per direction: ``send`` seals what we send, ``receive`` opens the rest."""

    send: bytes
    receive: bytes

    def __post_init__(self) -> None:
        if len(self.send) != KEY_BYTES or len(self.receive) != KEY_BYTES:
            raise ValueError(f"media keys are {KEY_BYTES} bytes each")
        if self.send == self.receive:
            raise ValueError("the two directions of a call need different media keys")

    def __repr__(self) -> str:
        return "MediaKeys(<hidden>)"

    def reversed(self) -> MediaKeys:
        """The peer's view of the same keys."""
        return MediaKeys(send=self.receive, receive=self.send)


class ReplayWindow:
    """Which of the last ``size`` packet indices were seen (bit i = highest - i)."""

    def __init__(self, size: int = REPLAY_WINDOW) -> None:
        self.size = size
        self.highest: int | None = None
        self._bits = 0

    def check(self, index: int) -> str | None:
        """None when ``index`` may be accepted, else why not: "duplicate" or "too-old"."""
        if self.highest is None or index > self.highest:
            return None
        age = self.highest - index
        if age >= self.size:
            return "too-old"
        if self._bits >> age & 1:
            return "duplicate"
        return None

    def accept(self, index: int) -> None:
        """Mark ``index`` as seen (call only after the packet authenticated)."""
        if self.highest is None:
            self.highest, self._bits = index, 1
        elif index > self.highest:
            shift = index - self.highest
            self._bits = (
                (self._bits << shift | 1) & ((1 << self.size) - 1) if shift < self.size else 1
            )
            self.highest = index
        else:
            self._bits |= 1 << (self.highest - index)


def estimate_index(highest: int | None, sequence: int) -> int:
    """The extended index of 16-bit ``sequence`` given the highest index seen (RFC 3711 A).

    Negative when the packet would come from before index 0 (the receiver rejects it).
    """
    if highest is None:
        return sequence
    roc, last = highest >> 16, highest & 0xFFFF
    if last < 0x8000:
        guess = roc - 1 if sequence - last > 0x8000 else roc
    else:
        guess = roc + 1 if last - 0x8000 > sequence else roc
    return guess * 0x10000 + sequence


class MediaSealer:
    """Seals what one side sends: it owns the SSRC's sequence numbers and report counter."""

    def __init__(self, key: bytes, ssrc: int, *, first_sequence: int = 0) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a media key is {KEY_BYTES} bytes")
        if not 0 <= first_sequence < 0x8000:
            raise ValueError("the first RTP sequence number must be below 32768")
        self._key = key
        self.ssrc = ssrc
        #: The index (extended sequence number) the next RTP packet gets.
        self.next_index = first_sequence
        self.next_report_index = 0

    def seal_rtp(
        self, payload_type: int, timestamp: int, payload: bytes, *, marker: bool = False
    ) -> bytes:
        """The datagram for ``payload``, numbered with the next sequence number."""
        index = self.next_index
        if index > MAX_RTP_INDEX:
            raise MediaCryptoError("The call's media packet counter is used up; call again.")
        self.next_index += 1
        header = bytes(RtpHeader(payload_type, index & 0xFFFF, timestamp, self.ssrc, marker))
        sealed = crypto_aead_chacha20poly1305_ietf_encrypt(
            payload, header, nonce(KIND_RTP, self.ssrc, index), self._key
        )
        return header + sealed

    def seal_report(self, report: RtcpReport) -> bytes:
        """The datagram for ``report`` (its SSRC must be ours)."""
        if report.ssrc != self.ssrc:
            raise ValueError("a report is sealed by the sealer of its own SSRC")
        index = self.next_report_index
        if index > MAX_RTCP_INDEX:
            raise MediaCryptoError("The call's media report counter is used up; call again.")
        self.next_report_index += 1
        plain = bytes(report)
        clear = plain[:RTCP_HEADER_SIZE]
        trailer = _INDEX.pack(E_FLAG | index)
        sealed = crypto_aead_chacha20poly1305_ietf_encrypt(
            plain[RTCP_HEADER_SIZE:], clear + trailer, nonce(KIND_RTCP, self.ssrc, index), self._key
        )
        return clear + sealed + trailer


@dataclass(frozen=True)
class OpenedRtp:
    packet: RtpPacket
    #: The 48-bit extended sequence number.
    index: int


@dataclass(frozen=True)
class OpenedReport:
    report: RtcpReport
    index: int


@dataclass
class _Source:
    rtp: ReplayWindow = field(default_factory=ReplayWindow)
    rtcp: ReplayWindow = field(default_factory=ReplayWindow)


class MediaOpener:
    """Opens what the peer sent; keeps a replay window per SSRC (at most ``max_sources``)."""

    def __init__(self, key: bytes, *, window: int = REPLAY_WINDOW, max_sources: int = 4) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a media key is {KEY_BYTES} bytes")
        self._key = key
        self._window = window
        self._max_sources = max_sources
        self._sources: OrderedDict[int, _Source] = OrderedDict()
        #: opened-rtp, opened-rtcp, malformed, forged, duplicate, too-old
        self.counters: Counter[str] = Counter()

    def open(self, datagram: bytes) -> OpenedRtp | OpenedReport | None:
        """The authenticated packet in ``datagram``, or None (counted) if it is not one."""
        data = bytes(datagram)
        if not is_rtp_or_rtcp(data):
            self.counters["malformed"] += 1
            return None
        try:
            return self._open_rtcp(data) if is_rtcp(data) else self._open_rtp(data)
        except ProtocolError:
            self.counters["malformed"] += 1
            return None

    def _source(self, ssrc: int) -> _Source:
        source = self._sources.get(ssrc)
        if source is None:
            source = _Source(ReplayWindow(self._window), ReplayWindow(self._window))
        return source

    def _remember(self, ssrc: int, source: _Source) -> None:
        self._sources[ssrc] = source
        self._sources.move_to_end(ssrc)
        while len(self._sources) > self._max_sources:
            self._sources.popitem(last=False)

    def _admit(self, window: ReplayWindow, index: int) -> bool:
        if index < 0:
            self.counters["too-old"] += 1
            return False
        refused = window.check(index)
        if refused is not None:
            self.counters[refused] += 1
            return False
        return True

    def _decrypt(self, body: bytes, aad: bytes, kind: int, ssrc: int, index: int) -> bytes | None:
        if len(body) < TAG_BYTES:
            self.counters["malformed"] += 1
            return None
        try:
            plain: bytes = crypto_aead_chacha20poly1305_ietf_decrypt(
                body, aad, nonce(kind, ssrc, index), self._key
            )
        except CryptoError:
            self.counters["forged"] += 1
            return None
        return plain

    def _open_rtp(self, data: bytes) -> OpenedRtp | None:
        header, offset = RtpHeader.parse_prefix(data)
        source = self._source(header.ssrc)
        index = estimate_index(source.rtp.highest, header.sequence_number)
        if not self._admit(source.rtp, index):
            return None
        plain = self._decrypt(data[offset:], data[:offset], KIND_RTP, header.ssrc, index)
        if plain is None:
            return None
        padding = padding_length(plain) if header.padding else 0
        source.rtp.accept(index)
        self._remember(header.ssrc, source)
        self.counters["opened-rtp"] += 1
        return OpenedRtp(RtpPacket(header, plain[: len(plain) - padding], padding), index)

    def _open_rtcp(self, data: bytes) -> OpenedReport | None:
        if len(data) < RTCP_HEADER_SIZE + TAG_BYTES + 4:
            self.counters["malformed"] += 1
            return None
        clear, trailer = data[:RTCP_HEADER_SIZE], data[-4:]
        (flagged,) = _INDEX.unpack(trailer)
        if not flagged & E_FLAG:
            self.counters["malformed"] += 1
            return None
        index = flagged & MAX_RTCP_INDEX
        ssrc = int.from_bytes(clear[4:8], "big")
        source = self._source(ssrc)
        if not self._admit(source.rtcp, index):
            return None
        body = data[RTCP_HEADER_SIZE:-4]
        plain = self._decrypt(body, clear + trailer, KIND_RTCP, ssrc, index)
        if plain is None:
            return None
        report = RtcpReport.parse(clear + plain)
        source.rtcp.accept(index)
        self._remember(ssrc, source)
        self.counters["opened-rtcp"] += 1
        return OpenedReport(report, index)
