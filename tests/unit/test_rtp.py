"""RTP header and RTCP report codecs: golden bytes, round trips, fuzzing, demultiplexing."""

from __future__ import annotations

import contextlib
import struct
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from client.media.rtp import (
    FRAME_TICKS,
    OPUS_PAYLOAD_TYPE,
    ReportBlock,
    RtcpError,
    RtcpReport,
    RtpError,
    RtpExtension,
    RtpHeader,
    RtpPacket,
    SenderInfo,
    is_rtcp,
    is_rtp_or_rtcp,
    ntp_middle,
    ntp_timestamp,
)
from overlay.errors import ProtocolError

SETTINGS = settings(max_examples=300, deadline=None)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)

# Opus, marker set, seq 0x1234, timestamp 0xDEADBEEF, SSRC 0x01020304, payload "opus".
GOLDEN_SIMPLE = bytes.fromhex("80ef1234deadbeef01020304") + b"opus"
# P, X and 2 CSRCs; PT 96, seq 1, timestamp 960; extension 0xBEDE with one word; payload "hi";
# two bytes of padding.
GOLDEN_FULL = (
    bytes.fromhex("b2600001000003c0cafebabe")
    + bytes.fromhex("0000000a0000000b")
    + bytes.fromhex("bede0001")
    + bytes.fromhex("10ff0000")
    + b"hi"
    + bytes.fromhex("0002")
)
# Receiver report from SSRC 0x11111111 with one block about 0x22222222: 5/256 lost, 7 in all,
# highest 0x00010005, jitter 48, LSR 0x12345678, DLSR 0x00008000.
GOLDEN_RR = bytes.fromhex(
    "81c90007" + "11111111" + "22222222" + "05000007" + "00010005" + "0000003012345678" + "00008000"
)


def test_golden_simple_opus_packet() -> None:
    header = RtpHeader(OPUS_PAYLOAD_TYPE, 0x1234, 0xDEADBEEF, 0x01020304, marker=True)
    packet = RtpPacket(header, b"opus")
    assert bytes(packet) == GOLDEN_SIMPLE
    assert RtpPacket.parse(GOLDEN_SIMPLE) == packet


def test_golden_packet_with_csrcs_extension_and_padding() -> None:
    header = RtpHeader(
        96,
        1,
        FRAME_TICKS,
        0xCAFEBABE,
        padding=True,
        csrc=(10, 11),
        extension=RtpExtension(0xBEDE, bytes.fromhex("10ff0000")),
    )
    packet = RtpPacket(header, b"hi", padding=2)
    assert bytes(packet) == GOLDEN_FULL
    assert RtpPacket.parse(GOLDEN_FULL) == packet
    assert RtpHeader.parse_prefix(GOLDEN_FULL) == (header, 28)


def test_golden_receiver_report() -> None:
    block = ReportBlock(0x22222222, 5, 7, 0x00010005, 48, 0x12345678, 0x8000)
    report = RtcpReport(0x11111111, None, (block,))
    assert bytes(report) == GOLDEN_RR
    assert RtcpReport.parse(GOLDEN_RR) == report
    assert report.packet_type == 201


def test_sender_report_layout() -> None:
    info = SenderInfo(ntp_timestamp(0.0), 960, 50, 3000)
    data = bytes(RtcpReport(7, info))
    assert data[:4] == bytes.fromhex("80c80006")  # SR, no blocks, 7 words follow
    assert struct.unpack("!Q", data[8:16])[0] == 2_208_988_800 << 32
    assert RtcpReport.parse(data) == RtcpReport(7, info)


def test_negative_cumulative_loss_is_24_bit_twos_complement() -> None:
    block = ReportBlock(1, 0, -2, 0, 0, 0, 0)
    assert bytes(block)[4:8] == bytes.fromhex("00fffffe")
    assert ReportBlock.parse(bytes(block)) == block


def test_ntp_middle_is_16_16_fixed_point() -> None:
    assert ntp_middle(ntp_timestamp(1.5)) & 0xFFFF == 0x8000


def test_demultiplexing_rtp_and_rtcp() -> None:
    assert is_rtp_or_rtcp(GOLDEN_SIMPLE) and not is_rtcp(GOLDEN_SIMPLE)
    assert is_rtp_or_rtcp(GOLDEN_RR) and is_rtcp(GOLDEN_RR)
    stun = bytes.fromhex("0001000021124442")
    for other in (b"", stun, b"\x40\xc8", b"\xc0\xc8"):
        assert not is_rtp_or_rtcp(other)
        assert not is_rtcp(other)
    # Our payload types can never look like RTCP, marker bit or not.
    for marker in (False, True):
        data = bytes(RtpHeader(OPUS_PAYLOAD_TYPE, 0, 0, 0, marker=marker))
        assert not is_rtcp(data)


def test_invalid_values_are_refused_when_building() -> None:
    with pytest.raises(ValueError):
        RtpHeader(128, 0, 0, 0)
    with pytest.raises(ValueError):
        RtpHeader(0, 0x10000, 0, 0)
    with pytest.raises(ValueError):
        RtpPacket(RtpHeader(0, 0, 0, 0, padding=True), b"x", 0)
    with pytest.raises(ValueError):
        RtpExtension(1, b"abc")
    with pytest.raises(ValueError):
        ReportBlock(1, 256, 0, 0, 0, 0, 0)


H = bytes.fromhex("80ef1234deadbeef01020304")  # a plain 12-byte header


def with_first_byte(first: int, rest: bytes = b"") -> bytes:
    return bytes([first]) + H[1:] + rest


@pytest.mark.parametrize(
    ("data", "text"),
    [
        (H[:2], "RTP packet shorter than its 12-byte header."),
        (with_first_byte(0x40), "Unsupported RTP version 1."),
        (with_first_byte(0x83, bytes(8)), "RTP packet too short for its 3 CSRC identifiers."),
        (with_first_byte(0x90, b"\xbe"), "RTP header extension runs past the end of the packet."),
        (
            with_first_byte(0x90, bytes.fromhex("bede0002") + bytes(4)),
            "RTP header extension runs past the end of the packet.",
        ),
        (with_first_byte(0xA0), "RTP padding flag set on a packet with no payload."),
        (with_first_byte(0xA0, b"ab\x00"), "RTP padding count of 0 is invalid."),
        (
            with_first_byte(0xA0, b"ab\x04"),
            "RTP padding of 4 bytes is longer than the 3-byte body.",
        ),
    ],
)
def test_malformed_rtp_is_refused(data: bytes, text: str) -> None:
    with pytest.raises(RtpError) as caught:
        RtpPacket.parse(data)
    assert str(caught.value) == text
    assert caught.value.code == "bad-rtp"


SSRC = "11111111"


@pytest.mark.parametrize(
    ("data", "text"),
    [
        (b"\x81\xc9\x00", "RTCP packet shorter than its 8-byte header."),
        (bytes.fromhex("41c90001" + SSRC), "Unsupported RTCP version 1."),
        (bytes.fromhex("81cb0001" + SSRC), "Unsupported RTCP packet type 203."),
        (bytes.fromhex("81c90002" + SSRC), "RTCP length field does not match the packet size."),
        (
            bytes.fromhex("80c80001" + SSRC),
            "RTCP sender report too short for its sender information.",
        ),
        (
            bytes.fromhex("81c90001" + SSRC),
            "RTCP report size does not match its 1 report blocks.",
        ),
        (
            bytes.fromhex("82c90007" + SSRC) + bytes(24),
            "RTCP report size does not match its 2 report blocks.",
        ),
        (bytes.fromhex("a0c90002" + SSRC) + bytes(4), "RTCP padding count of 0 is invalid."),
    ],
)
def test_malformed_rtcp_is_refused(data: bytes, text: str) -> None:
    with pytest.raises(RtcpError) as caught:
        RtcpReport.parse(data)
    assert str(caught.value) == text
    assert caught.value.code == "bad-rtcp"


def test_padded_rtcp_is_accepted() -> None:
    data = bytearray(bytes(RtcpReport(5)) + bytes.fromhex("00000004"))
    data[0] |= 0x20
    data[2:4] = (2).to_bytes(2, "big")
    assert RtcpReport.parse(bytes(data)) == RtcpReport(5)


extensions = st.builds(
    RtpExtension,
    profile=u16,
    data=st.integers(0, 8).flatmap(lambda words: st.binary(min_size=4 * words, max_size=4 * words)),
)
headers = st.builds(
    RtpHeader,
    payload_type=st.integers(0, 127),
    sequence_number=u16,
    timestamp=u32,
    ssrc=u32,
    marker=st.booleans(),
    padding=st.just(False),
    csrc=st.lists(u32, max_size=15).map(tuple),
    extension=st.none() | extensions,
)


@st.composite
def packets(draw: st.DrawFn) -> RtpPacket:
    header = draw(headers)
    padding = draw(st.integers(0, 255))
    if padding:
        header = replace(header, padding=True)
    return RtpPacket(header, draw(st.binary(max_size=200)), padding)


blocks = st.builds(
    ReportBlock,
    ssrc=u32,
    fraction_lost=st.integers(0, 255),
    cumulative_lost=st.integers(-(1 << 23), (1 << 23) - 1),
    highest_sequence=u32,
    jitter=u32,
    last_sr=u32,
    delay_since_last_sr=u32,
)
reports = st.builds(
    RtcpReport,
    ssrc=u32,
    sender_info=st.none()
    | st.builds(
        SenderInfo,
        ntp_timestamp=st.integers(0, (1 << 64) - 1),
        rtp_timestamp=u32,
        packet_count=u32,
        octet_count=u32,
    ),
    blocks=st.lists(blocks, max_size=31).map(tuple),
)


@SETTINGS
@given(packets())
def test_rtp_round_trips(packet: RtpPacket) -> None:
    data = bytes(packet)
    assert is_rtp_or_rtcp(data)
    assert RtpPacket.parse(data) == packet


@SETTINGS
@given(reports)
def test_rtcp_round_trips(report: RtcpReport) -> None:
    data = bytes(report)
    assert is_rtcp(data)
    assert len(data) % 4 == 0
    assert RtcpReport.parse(data) == report


@SETTINGS
@given(st.binary(max_size=120))
def test_parsers_raise_only_their_protocol_error(data: bytes) -> None:
    for parse in (RtpPacket.parse, RtcpReport.parse):
        try:
            parse(data)
        except ProtocolError as error:
            assert isinstance(error, RtpError | RtcpError)


@SETTINGS
@given(st.one_of(packets().map(bytes), reports.map(bytes)), st.data())
def test_mutated_packets_raise_only_protocol_errors(data: bytes, draw: st.DataObject) -> None:
    mutated = bytearray(data)
    for _ in range(draw.draw(st.integers(1, 4))):
        position = draw.draw(st.integers(0, len(mutated) - 1))
        mutated[position] = draw.draw(st.integers(0, 255))
    cut = draw.draw(st.integers(0, len(mutated)))
    for candidate in (bytes(mutated), bytes(mutated[:cut])):
        for parse in (RtpPacket.parse, RtcpReport.parse):
            with contextlib.suppress(ProtocolError):
                parse(candidate)
