"""Framing: version, type, length, payload, on TCP streams and in UDP datagrams."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.errors import ProtocolError
from overlay.framing import (
    HEADER_SIZE,
    MAX_DATAGRAM_PAYLOAD,
    MAX_PAYLOAD,
    WIRE_VERSION,
    Frame,
    FrameDecoder,
    FramingError,
)

SETTINGS = settings(max_examples=300, deadline=None)

frames = st.builds(
    Frame,
    type=st.integers(0, 0xFFFF),
    payload=st.binary(max_size=300),
)


def header(length: int, type_: int = 0x0002, version: int = WIRE_VERSION) -> bytes:
    return struct.pack("!BHI", version, type_, length)


def test_frame_layout_is_version_type_length_payload() -> None:
    assert bytes(Frame(0x0102, b"abc")) == b"\x01\x01\x02\x00\x00\x00\x03abc"
    assert HEADER_SIZE == 7


@SETTINGS
@given(frames)
def test_frame_round_trips_as_a_datagram(frame: Frame) -> None:
    data = bytes(frame)
    assert len(data) == HEADER_SIZE + len(frame.payload)
    assert Frame.parse(data) == frame


def test_datagram_accepts_exactly_the_limit() -> None:
    frame = Frame(1, bytes(MAX_DATAGRAM_PAYLOAD))
    assert Frame.parse(bytes(frame)) == frame
    with pytest.raises(FramingError) as caught:
        Frame.parse(bytes(Frame(1, bytes(MAX_DATAGRAM_PAYLOAD + 1))))
    assert str(caught.value) == (
        f"Frame of {MAX_DATAGRAM_PAYLOAD + 1} bytes exceeds the limit of {MAX_DATAGRAM_PAYLOAD}."
    )


def test_datagram_accepts_a_bytearray() -> None:
    assert Frame.parse(bytearray(bytes(Frame(9, b"xy")))) == Frame(9, b"xy")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("data", "text"),
    [
        (b"", "Frame shorter than its 7-byte header."),
        (header(0)[:6], "Frame shorter than its 7-byte header."),
        (header(3) + b"ab", "Frame length does not match the datagram size."),
        (header(1) + b"ab", "Frame length does not match the datagram size."),
        (header(0, version=2), "Unsupported wire version 2."),
        (header(0, version=0), "Unsupported wire version 0."),
        (header(0xFFFFFFFF), "Frame of 4294967295 bytes exceeds the limit of 1200."),
    ],
)
def test_malformed_datagrams_are_refused(data: bytes, text: str) -> None:
    with pytest.raises(FramingError) as caught:
        Frame.parse(data)
    assert str(caught.value) == text
    assert caught.value.code == "bad-frame"


def stream_of(frames_: list[Frame]) -> bytes:
    return b"".join(bytes(f) for f in frames_)


def test_decoder_cuts_a_stream_fed_byte_by_byte() -> None:
    sent = [Frame(1, b""), Frame(2, b"hello"), Frame(0xFFFF, bytes(range(256)))]
    decoder = FrameDecoder()
    received: list[Frame] = []
    data = stream_of(sent)
    for i in range(len(data)):
        received.extend(decoder.feed(data[i : i + 1]))
    assert received == sent
    assert decoder.buffered == 0


def test_decoder_returns_several_frames_from_one_chunk_and_keeps_the_rest() -> None:
    decoder = FrameDecoder()
    data = stream_of([Frame(1, b"a"), Frame(2, b"bb")]) + bytes(Frame(3, b"ccc"))[:9]
    assert list(decoder.feed(data)) == [Frame(1, b"a"), Frame(2, b"bb")]
    assert decoder.buffered == 9
    assert list(decoder.feed(b"c")) == [Frame(3, b"ccc")]
    assert decoder.buffered == 0


@SETTINGS
@given(st.lists(frames, max_size=8), st.data())
def test_decoder_yields_the_same_frames_however_the_stream_is_cut(
    sent: list[Frame], data: st.DataObject
) -> None:
    stream = stream_of(sent)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    decoder = FrameDecoder()
    received: list[Frame] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        received.extend(decoder.feed(stream[start:end]))
    assert received == sent
    assert decoder.buffered == 0


def test_oversized_frame_is_refused_from_its_header_alone() -> None:
    decoder = FrameDecoder(max_payload=100)
    with pytest.raises(FramingError) as caught:
        list(decoder.feed(header(101)))
    assert str(caught.value) == "Frame of 101 bytes exceeds the limit of 100."
    assert decoder.buffered == 0


def test_tcp_limit_is_max_payload_exactly() -> None:
    decoder = FrameDecoder()
    big = Frame(1, bytes(MAX_PAYLOAD))
    assert list(decoder.feed(bytes(big))) == [big]
    with pytest.raises(FramingError) as caught:
        list(decoder.feed(header(MAX_PAYLOAD + 1)))
    assert str(caught.value) == f"Frame of {MAX_PAYLOAD + 1} bytes exceeds the limit of 65536."


def test_frames_before_a_bad_header_are_still_delivered() -> None:
    decoder = FrameDecoder()
    got: list[Frame] = []
    with pytest.raises(FramingError) as caught:
        for frame in decoder.feed(bytes(Frame(5, b"ok")) + header(0, version=7)):
            got.append(frame)
    assert got == [Frame(5, b"ok")]
    assert str(caught.value) == "Unsupported wire version 7."


def test_decoder_stays_broken_after_an_error() -> None:
    decoder = FrameDecoder()
    with pytest.raises(FramingError):
        list(decoder.feed(header(0, version=9)))
    with pytest.raises(FramingError) as caught:
        list(decoder.feed(bytes(Frame(1, b"fine"))))
    assert str(caught.value) == "Stream already failed framing."
    assert decoder.buffered == 0


@SETTINGS
@given(st.binary(max_size=64), st.integers(0, 2000))
def test_parse_raises_only_protocol_errors_on_random_bytes(data: bytes, limit: int) -> None:
    try:
        frame = Frame.parse(data, limit)
    except ProtocolError:
        return
    assert bytes(frame) == data


@SETTINGS
@given(st.lists(st.binary(max_size=40), max_size=6), st.integers(0, 64))
def test_decoder_raises_only_protocol_errors_on_random_bytes(
    chunks: list[bytes], limit: int
) -> None:
    decoder = FrameDecoder(max_payload=limit)
    received: list[Frame] = []
    try:
        for chunk in chunks:
            received.extend(decoder.feed(chunk))
    except ProtocolError:
        return
    # Whatever was accepted re-encodes to a prefix of the stream.
    stream = b"".join(chunks)
    assert stream.startswith(stream_of(received))
    assert all(len(f.payload) <= limit for f in received)
