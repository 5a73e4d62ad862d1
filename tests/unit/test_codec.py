"""The Opus codec: round trips, FEC against concealment, and corrupt payloads from peers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from client.media.audio import ToneSource
from client.media.codec import (
    FRAME_MS,
    CodecError,
    OpusDecoder,
    OpusEncoder,
    OpusPayloadError,
)
from overlay.errors import ProtocolError
from tools.audio.quality import load_wav
from tools.audio.speech import caller_speech

SETTINGS = settings(max_examples=400, deadline=None)


def pcm(samples: np.ndarray) -> bytes:
    return bytes(samples.astype("<i2").tobytes())


def samples(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i2").astype(np.float64)


def speech_frames(n: int = 320) -> list[bytes]:
    x = load_wav(caller_speech()).astype("<i2")
    return [x[i : i + n].tobytes() for i in range(0, len(x) - n + 1, n)]


def best_correlation(reference: np.ndarray, decoded: np.ndarray, max_lag: int = 400) -> float:
    """Normalised correlation of ``decoded`` with ``reference`` after the codec's delay."""
    n = len(reference) - max_lag
    lag = int(np.argmax(np.correlate(decoded[: n + max_lag], reference[:n], "valid")))
    a, b = reference[: len(reference) - lag], decoded[lag:]
    return float(np.dot(a, b) / np.sqrt(np.dot(a, a) * np.dot(b, b)))


def test_frame_sizes_follow_the_sample_rate() -> None:
    assert FRAME_MS == 20
    for rate in (8000, 12000, 16000, 24000, 48000):
        assert OpusEncoder(rate).frame_samples == rate // 50
        assert OpusDecoder(rate).frame_samples == rate // 50


@pytest.mark.parametrize("rate", [16000, 48000])
def test_a_tone_survives_a_round_trip(rate: int) -> None:
    encoder, decoder = OpusEncoder(rate), OpusDecoder(rate)
    tone = ToneSource(440.0, rate, 0.5, frames=50)
    sent, received = [], []
    while (frame := tone.read_frame()) is not None:
        packet = encoder.encode(frame)
        assert 0 < len(packet) < 200
        sent.append(frame)
        received.append(decoder.decode(packet))
    assert all(len(r) == rate // 50 * 2 for r in received)
    assert best_correlation(samples(b"".join(sent)), samples(b"".join(received))) > 0.95


def test_speech_survives_a_round_trip() -> None:
    encoder, decoder = OpusEncoder(), OpusDecoder()
    frames = speech_frames()
    decoded = b"".join(decoder.decode(encoder.encode(f)) for f in frames)
    assert best_correlation(samples(b"".join(frames)), samples(decoded)) > 0.9


def test_the_bitrate_setting_changes_the_packet_sizes() -> None:
    frames = speech_frames()

    def kbps(bitrate: int) -> float:
        encoder = OpusEncoder(bitrate=bitrate)
        assert encoder.bitrate == bitrate
        return sum(len(encoder.encode(f)) for f in frames) * 8 / (len(frames) * 0.02) / 1000

    low, high = kbps(12000), kbps(32000)
    assert 8 < low < 14
    assert 20 < high < 34
    encoder = OpusEncoder()
    encoder.set_bitrate(16000)
    assert encoder.bitrate == 16000


def test_packets_keep_flowing_in_silence() -> None:
    # DTX off: a silent frame is still a real packet (DTX would send 1-2 byte packets).
    encoder = OpusEncoder()
    sizes = [len(encoder.encode(bytes(640))) for _ in range(100)]
    assert min(sizes) > 2


def dropped_frame_errors(fec: bool) -> tuple[float, float]:
    """Squared error of the lost frames when rebuilt by FEC and by concealment."""
    frames = speech_frames()
    encoder = OpusEncoder(fec=fec)
    encoder.set_expected_loss(10)
    packets = [encoder.encode(f) for f in frames]
    reference = OpusDecoder()
    clean = [reference.decode(p) for p in packets]
    with_fec, with_plc = OpusDecoder(), OpusDecoder()
    fec_error = plc_error = 0.0
    lost = set(range(20, len(packets) - 1, 9))
    for i, packet in enumerate(packets):
        if i in lost:
            a = samples(with_fec.decode_fec(packets[i + 1]))
            b = samples(with_plc.conceal())
            want = samples(clean[i])
            fec_error += float(np.sum((a - want) ** 2))
            plc_error += float(np.sum((b - want) ** 2))
        else:
            with_fec.decode(packet)
            with_plc.decode(packet)
    return fec_error, plc_error


def test_fec_recovers_a_lost_frame_better_than_concealment() -> None:
    fec_error, plc_error = dropped_frame_errors(fec=True)
    assert fec_error < 0.5 * plc_error


def test_without_fec_the_next_packet_cannot_help() -> None:
    # Without FEC data libopus falls back to concealment (almost sample for sample).
    fec_error, plc_error = dropped_frame_errors(fec=False)
    assert fec_error == pytest.approx(plc_error, rel=0.05)


def test_expected_loss_is_clamped_and_inert_without_fec() -> None:
    encoder = OpusEncoder()
    assert encoder.expected_loss == 0  # FEC bits only once the engine measures loss
    encoder.set_expected_loss(150)
    assert encoder.expected_loss == 100
    encoder.set_expected_loss(-3)
    assert encoder.expected_loss == 0
    no_fec = OpusEncoder(fec=False)
    no_fec.set_expected_loss(20)
    assert no_fec.expected_loss == 0


def test_concealment_returns_a_whole_frame() -> None:
    decoder = OpusDecoder(48000)
    assert len(decoder.conceal()) == 960 * 2


def test_bad_settings_are_refused() -> None:
    with pytest.raises(CodecError, match="Opus cannot run at 44100 Hz"):
        OpusEncoder(44100)
    with pytest.raises(CodecError, match="Opus cannot run at 22050 Hz"):
        OpusDecoder(22050)
    with pytest.raises(ValueError, match="bit rate must be 6000-510000"):
        OpusEncoder(bitrate=1000)
    with pytest.raises(ValueError, match="is 640 bytes"):
        OpusEncoder().encode(bytes(600))


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "Opus payload is empty"),
        (b"\x50" + bytes(20), "Opus payload holds 40 ms of audio, expected one 20 ms frame"),
        (b"\x0b\x05", "Opus payload holds 100 ms of audio"),
        (b"\x03\x00", "Opus payload holds no audio frame"),
        (b"\xff\xff\xff", "Opus payload is invalid: corrupted stream"),
        (bytes(5000), "Opus payload of 5000 bytes is too long"),
    ],
)
def test_a_corrupt_payload_is_a_protocol_error(payload: bytes, message: str) -> None:
    decoder = OpusDecoder()
    with pytest.raises(OpusPayloadError, match=message):
        decoder.decode(payload)
    with pytest.raises(OpusPayloadError):
        decoder.decode_fec(payload)
    assert issubclass(OpusPayloadError, ProtocolError)


def test_the_decoder_goes_on_after_garbage() -> None:
    encoder, decoder = OpusEncoder(), OpusDecoder()
    tone = ToneSource(440.0, 16000, 0.5)
    for _ in range(5):
        decoder.decode(encoder.encode(tone.read_frame() or b""))
    with pytest.raises(OpusPayloadError):
        decoder.decode(b"\xff\xff\xff")
    sent, got = [], []
    for _ in range(25):
        frame = tone.read_frame() or b""
        sent.append(frame)
        got.append(decoder.decode(encoder.encode(frame)))
    assert best_correlation(samples(b"".join(sent)), samples(b"".join(got))) > 0.95


@SETTINGS
@given(st.binary(max_size=1500))
def test_random_payloads_decode_or_raise_only_protocol_errors(payload: bytes) -> None:
    decoder = OpusDecoder()
    for method in (decoder.decode, decoder.decode_fec):
        try:
            out = method(payload)
        except ProtocolError:
            continue
        assert len(out) == decoder.frame_samples * 2


@SETTINGS
@given(st.binary(min_size=1, max_size=1500))
def test_random_payloads_with_a_20ms_header_decode_or_raise_only_protocol_errors(
    body: bytes,
) -> None:
    # A TOC byte for one 20 ms frame gets random data past the first parsing checks.
    decoder = OpusDecoder(48000)
    for toc in (0x08, 0x48, 0x78, 0xF8):  # SILK NB, SILK WB, hybrid FB, CELT FB
        try:
            out = decoder.decode(bytes([toc]) + body)
        except ProtocolError:
            continue
        assert len(out) == 960 * 2
