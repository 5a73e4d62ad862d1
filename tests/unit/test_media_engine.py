"""Two media sessions over an in-memory link: order, FEC, concealment, reports, silence, stop.

The unit tests use a fake codec whose frames carry their frame number, so what comes out of
the far end can be checked frame by frame; the last tests run the real Opus codec and compare
the audio itself.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from client.media.codec import OpusPayloadError
from client.media.engine import MAX_CONCEALED, MediaSession
from client.media.jitterbuffer import JitterBuffer
from client.media.mediacrypto import MediaKeys, MediaSealer
from client.media.rtp import OPUS_PAYLOAD_TYPE, RtpPacket, is_rtcp

RATE = 16000
FRAME_BYTES = 640
KEYS = MediaKeys(send=bytes(range(32)), receive=bytes(range(1, 33)))
NORMAL, FEC, CONCEALED = 0, 1, 2


def frame(number: int, kind: int = NORMAL) -> bytes:
    return number.to_bytes(4, "big") + bytes([kind]) + bytes(FRAME_BYTES - 5)


class FakeEncoder:
    """A 'codec' whose packet carries this frame's number and, as its FEC, the previous one's."""

    sample_rate = RATE
    frame_samples = 320

    def __init__(self) -> None:
        self.previous = bytes(4)
        self.expected_loss: list[int] = []

    def encode(self, pcm: bytes) -> bytes:
        assert len(pcm) == FRAME_BYTES
        payload = b"F" + pcm[:4] + self.previous
        self.previous = pcm[:4]
        return payload

    def set_expected_loss(self, percent: int) -> None:
        self.expected_loss.append(percent)


class FakeDecoder:
    sample_rate = RATE
    frame_samples = 320

    def decode(self, payload: bytes) -> bytes:
        if payload[:1] != b"F":
            raise OpusPayloadError("not a fake frame")
        return frame(int.from_bytes(payload[1:5], "big"))

    def decode_fec(self, next_payload: bytes) -> bytes:
        return frame(int.from_bytes(next_payload[5:9], "big"), FEC)

    def conceal(self) -> bytes:
        return frame(0xFFFFFFFF, CONCEALED)


class CountingSource:
    """Frames numbered 1, 2, 3, ... (``frames`` of them, then finished)."""

    sample_rate = RATE

    def __init__(self, frames: int | None = None) -> None:
        self.frames = frames
        self.read = 0
        self.closed = False
        self.reads_after_end = 0

    def read_frame(self) -> bytes | None:
        if self.frames is not None and self.read >= self.frames:
            self.reads_after_end += 1
            return None
        self.read += 1
        return frame(self.read)

    def close(self) -> None:
        self.closed = True


class RecordingSink:
    sample_rate = RATE

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.closed = False

    def write_frame(self, pcm: bytes) -> None:
        assert len(pcm) == FRAME_BYTES
        self.frames.append(pcm)

    def close(self) -> None:
        self.closed = True

    def decoded(self) -> list[tuple[int, int]]:
        """(frame number, kind) of every frame written, silence left out."""
        return [
            (int.from_bytes(f[:4], "big"), f[4]) for f in self.frames if f != bytes(FRAME_BYTES)
        ]

    def numbers(self, kind: int | None = None) -> list[int]:
        return [n for n, k in self.decoded() if (kind is None or k == kind) and n != 0xFFFFFFFF]


@dataclass
class Link:
    """One direction of an in-memory UDP path with latency, jitter and chosen losses."""

    clock: Clock
    latency: float = 0.030
    jitter: float = 0.0
    loss: float = 0.0
    #: Drop RTP packet number n (0, 1, ...; it carries frame n + 1); reports are never dropped.
    drop: Callable[[int], bool] = lambda n: False
    seed: int = 1
    target: MediaSession | None = None
    sent: list[bytes] = field(default_factory=list)
    rtp_sent: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def send(self, data: bytes) -> None:
        self.sent.append(data)
        if not is_rtcp(data):
            self.rtp_sent += 1
            if self.drop(self.rtp_sent - 1):
                return
        if self.loss and self.rng.random() < self.loss:
            return
        assert self.target is not None
        delay = self.latency + self.rng.uniform(0.0, self.jitter)
        self.clock.callLater(delay, self.target.datagram_received, data)


@dataclass
class Call:
    clock: Clock
    a: MediaSession
    b: MediaSession
    a_to_b: Link
    b_to_a: Link
    a_source: CountingSource
    b_sink: RecordingSink
    a_encoder: FakeEncoder

    def run(self, seconds: float, step: float = 0.005) -> None:
        for _ in range(round(seconds / step)):
            self.clock.advance(step)


def make_call(
    *,
    frames: int | None = None,
    a_to_b: dict[str, object] | None = None,
    b_to_a: dict[str, object] | None = None,
) -> Call:
    clock = Clock()
    clock.advance(1000.0)
    forward = Link(clock, **(a_to_b or {}))  # type: ignore[arg-type]
    backward = Link(clock, **(b_to_a or {}))  # type: ignore[arg-type]
    source, sink, encoder = CountingSource(frames), RecordingSink(), FakeEncoder()
    a = MediaSession(
        clock,
        forward.send,
        KEYS,
        source,
        RecordingSink(),
        encoder=encoder,
        decoder=FakeDecoder(),
        codec_name="fake",
        rng=random.Random(1),
    )
    b = MediaSession(
        clock,
        backward.send,
        KEYS.reversed(),
        CountingSource(),
        sink,
        encoder=FakeEncoder(),
        decoder=FakeDecoder(),
        rng=random.Random(2),
    )
    forward.target, backward.target = b, a
    a.start()
    b.start()
    return Call(clock, a, b, forward, backward, source, sink, encoder)


def test_clean_link_delivers_every_frame_in_order_with_plausible_stats() -> None:
    call = make_call()
    call.run(5.0)
    numbers = call.b_sink.numbers()
    assert numbers[:3] == [1, 2, 3]
    assert numbers == sorted(numbers)
    # Nothing is lost; the buffer started at 60 ms and dropped one frame to settle at 40.
    skipped = set(range(1, max(numbers) + 1)) - set(numbers)
    assert len(skipped) == call.b.jitter_buffer.counters["compressed"] == 1
    assert len(numbers) >= 240  # 250 sent in 5 s, minus what is still in flight and buffered
    stats = call.b.stats()
    assert stats.packets_received >= 248
    assert stats.loss_percent == 0.0 and stats.packets_lost == 0
    assert stats.jitter_ms == pytest.approx(0.0, abs=0.01)
    assert stats.rtt_ms == pytest.approx(60.0, abs=1.0)  # 30 ms each way
    a_stats = call.a.stats()
    assert a_stats.packets_sent in (250, 251)  # the first at once, then one per 20 ms
    assert a_stats.codec == "fake"
    assert a_stats.remote_loss_percent == 0.0
    assert 40 <= a_stats.jitter_buffer_target_ms <= 60
    # 9-byte payload + 12-byte header + 16-byte tag per 20 ms, plus reports.
    assert 14.0 < a_stats.send_kbps < 17.0
    assert call.a.counters["reports-sent"] == 5
    assert stats.forged == stats.late == stats.duplicates == 0


def test_isolated_losses_are_rebuilt_from_fec_and_raise_the_expected_loss() -> None:
    call = make_call(a_to_b={"drop": lambda n: n % 10 == 5})
    call.run(6.0)
    lost_frames = {n + 1 for n in range(call.a_to_b.rtp_sent) if n % 10 == 5}
    decoded = call.b_sink.decoded()
    numbers = [n for n, _ in decoded]
    assert numbers == sorted(numbers)
    fec = set(call.b_sink.numbers(FEC))
    played = set(call.b_sink.numbers(NORMAL))
    assert fec and fec <= lost_frames
    assert played.isdisjoint(lost_frames)
    # Nothing else is missing from the audio, but for the one frame the buffer dropped to
    # shrink from its initial 60 ms to 40 ms (here it skips a lost frame to do that).
    gaps = set(range(1, max(played) + 1)) - (played | fec)
    counters = call.b.jitter_buffer.counters
    assert len(gaps) == counters["compressed"] + counters["skipped"] == 1
    stats = call.b.stats()
    assert stats.fec_recovered == len(fec)
    assert stats.concealed == 0
    assert 8.0 <= stats.loss_percent <= 12.0
    # b's reports tell a its stream loses 10 %: a's encoder plans its FEC for that.
    assert 9 <= call.a_encoder.expected_loss[-1] <= 13  # the worst of the last 5 reports
    assert call.a.stats().remote_loss_percent == pytest.approx(10.0, abs=1.5)


def test_bursts_of_loss_are_concealed() -> None:
    call = make_call(a_to_b={"drop": lambda n: 100 <= n < 104})
    call.run(4.0)
    stats = call.b.stats()
    assert stats.concealed >= 2
    assert stats.packets_lost == 4
    numbers = [n for n, kind in call.b_sink.decoded() if kind in (NORMAL, FEC)]
    # Frames 101-104 were lost: 104 comes back from 105's FEC, the others are concealed.
    missing = set(range(1, max(numbers) + 1)) - set(numbers)
    assert {101, 102, 103} <= missing <= {101, 102, 103, 104}
    assert numbers == sorted(numbers)


def test_jitter_and_reordering_still_play_in_order() -> None:
    call = make_call(a_to_b={"jitter": 0.080, "seed": 4})
    call.run(10.0)
    numbers = call.b_sink.numbers()
    assert numbers == sorted(numbers)
    assert len(set(numbers)) == len(numbers)
    stats = call.b.stats()
    assert stats.jitter_ms > 5.0
    assert stats.jitter_buffer_target_ms >= 100
    assert stats.late + stats.concealed < 25
    assert len(numbers) > 450


def test_random_loss_both_ways_gives_plausible_statistics() -> None:
    call = make_call(a_to_b={"loss": 0.05, "seed": 8}, b_to_a={"loss": 0.05, "seed": 9})
    call.run(20.0)
    for session in (call.a, call.b):
        stats = session.stats()
        assert 2.5 < stats.loss_percent < 8.0
        assert stats.rtt_ms == pytest.approx(60.0, abs=1.0)
        assert stats.remote_loss_percent is not None
    numbers = call.b_sink.numbers(NORMAL) + call.b_sink.numbers(FEC)
    assert len(numbers) > 0.97 * 1000  # FEC brings the isolated losses back


def test_packets_keep_flowing_after_a_file_source_ends() -> None:
    call = make_call(frames=50)
    call.run(3.0)
    assert call.a.stats().packets_sent in (150, 151)
    assert call.a_source.reads_after_end == 1
    assert call.b_sink.numbers() == list(range(1, 51))
    # The rest is silence: the call goes on until hang-up.
    assert call.b_sink.frames[-1] == bytes(FRAME_BYTES)
    assert call.b.stats().packets_received >= 145


def test_garbage_forgeries_and_replays_are_counted_never_raised() -> None:
    call = make_call()
    call.run(1.0)
    stranger = MediaSealer(bytes(32), 0x5555)
    captured = call.a_to_b.sent[10]
    for data in (
        b"",
        b"\x00\x01\x00\x00",  # STUN-like
        b"\x80" * 20,
        stranger.seal_rtp(OPUS_PAYLOAD_TYPE, 0, b"Fxxxxxxxx"),
        captured,
        captured,
        bytes(replace(RtpPacket.parse(captured).header, sequence_number=9999)) + bytes(30),
    ):
        call.b.datagram_received(data)
    call.run(1.0)
    stats = call.b.stats()
    assert stats.forged == 2
    assert stats.duplicates == 2
    assert stats.malformed == 3
    numbers = call.b_sink.numbers()
    assert numbers == list(range(1, len(numbers) + 1))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.binary(max_size=80), max_size=10), st.data())
def test_no_datagram_makes_the_receive_path_raise(junk: list[bytes], data: st.DataObject) -> None:
    clock = Clock()
    peer = MediaSealer(KEYS.send, 9)
    session = MediaSession(
        clock,
        lambda datagram: None,
        KEYS.reversed(),
        CountingSource(),
        RecordingSink(),
        encoder=FakeEncoder(),
        decoder=FakeDecoder(),
    )
    session.start()
    genuine = [peer.seal_rtp(OPUS_PAYLOAD_TYPE, n * 960, b"F" + bytes(8)) for n in range(5)]
    for datagram in junk + genuine:
        altered = bytearray(datagram)
        if altered and data.draw(st.booleans()):
            altered[data.draw(st.integers(0, len(altered) - 1))] ^= data.draw(st.integers(1, 255))
        session.datagram_received(bytes(altered))
        session.datagram_received(datagram)
        clock.advance(0.020)
    assert session.last_received is not None
    assert session.stats().packets_received == 5


def test_undecodable_payloads_are_concealed() -> None:
    clock = Clock()
    peer = MediaSealer(KEYS.send, 77)
    sink = RecordingSink()
    session = MediaSession(
        clock,
        lambda data: None,
        KEYS.reversed(),
        CountingSource(),
        sink,
        encoder=FakeEncoder(),
        decoder=FakeDecoder(),
        jitter_buffer=JitterBuffer(min_ms=40, initial_ms=40),
    )
    session.start()
    for n in range(20):
        payload = b"Z" if n == 5 else b"F" + (n + 1).to_bytes(4, "big") + bytes(4)
        session.datagram_received(peer.seal_rtp(OPUS_PAYLOAD_TYPE, n * 960, payload))
        clock.advance(0.020)
    assert session.counters["decode-errors"] == 1
    assert session.stats().concealed == 1
    assert 6 not in sink.numbers()
    assert sink.numbers(NORMAL)[:6] == [1, 2, 3, 4, 5, 7]


def test_long_silence_from_the_peer_conceals_then_plays_silence() -> None:
    call = make_call()
    call.run(1.0)
    call.a_to_b.drop = lambda n: True  # the peer vanishes
    before = len(call.b_sink.frames)
    call.run(1.0)
    after = call.b_sink.frames[before:]
    concealed = [f for f in after if f[4] == CONCEALED and f[:4] == b"\xff" * 4]
    assert 1 <= len(concealed) <= MAX_CONCEALED
    assert after[-1] == bytes(FRAME_BYTES)


def test_stop_returns_the_summary_closes_audio_and_stops_sending() -> None:
    call = make_call()
    call.run(2.0)
    summary = call.a.stop()
    assert call.a_source.closed and call.a.sink.closed  # type: ignore[attr-defined]
    assert summary.duration_s == pytest.approx(2.0)
    assert call.a.stop() is summary
    sent = len(call.a_to_b.sent)
    call.run(1.0)
    assert len(call.a_to_b.sent) == sent
    assert call.a.stats() is summary
    assert not call.a.running
    assert summary.summary()[0] == "Duration 0:02, codec fake."


def test_a_stalled_reactor_catches_up_without_drift() -> None:
    clock = Clock()
    sent: list[bytes] = []
    session = MediaSession(
        clock,
        sent.append,
        KEYS,
        CountingSource(),
        RecordingSink(),
        encoder=FakeEncoder(),
        decoder=FakeDecoder(),
    )
    session.start()
    clock.advance(0.1)  # five ticks fall due at once
    rtp = [RtpPacket.parse(d).header for d in sent if not is_rtcp(d)]
    assert len(rtp) == 6
    assert [h.timestamp - rtp[0].timestamp for h in rtp] == [960 * n for n in range(6)]
    for _ in range(500):
        clock.advance(0.0201)  # late by 0.1 ms every time: no drift accumulates
    assert session.packets_sent == 1 + int(clock.seconds() / 0.020 + 1e-6)


def test_only_the_first_peer_ssrc_is_followed() -> None:
    clock = Clock()
    sink = RecordingSink()
    session = MediaSession(
        clock,
        lambda data: None,
        KEYS.reversed(),
        CountingSource(),
        sink,
        encoder=FakeEncoder(),
        decoder=FakeDecoder(),
    )
    first, second = MediaSealer(KEYS.send, 1), MediaSealer(KEYS.send, 2)
    session.datagram_received(first.seal_rtp(OPUS_PAYLOAD_TYPE, 0, b"F" + bytes(8)))
    session.datagram_received(second.seal_rtp(OPUS_PAYLOAD_TYPE, 0, b"F" + bytes(8)))
    session.datagram_received(first.seal_rtp(96, 960, b"F" + bytes(8)))
    assert session.remote_ssrc == 1
    assert session.counters["foreign-ssrc"] == 1
    assert session.counters["wrong-payload-type"] == 1


def test_rates_must_match_the_codec() -> None:
    class Source48k(CountingSource):
        sample_rate = 48000

    with pytest.raises(ValueError, match="48000 Hz"):
        MediaSession(
            Clock(),
            lambda data: None,
            KEYS,
            Source48k(),
            RecordingSink(),
            encoder=FakeEncoder(),
            decoder=FakeDecoder(),
        )


# -- the real codec --------------------------------------------------------------------------


class ChirpSource:
    """A linear chirp from 300 Hz to 3 kHz and back, in 20 ms frames, for ``seconds``."""

    sample_rate = RATE

    def __init__(self, seconds: float) -> None:
        t = np.arange(int(seconds * RATE)) / RATE
        period = 2.0
        phase_t = t % period
        up = phase_t < period / 2
        f0, f1, half = 300.0, 3000.0, period / 2
        k = (f1 - f0) / half
        rising = 2 * np.pi * (f0 * phase_t + 0.5 * k * phase_t**2)
        down_t = phase_t - half
        falling = 2 * np.pi * (f1 * down_t - 0.5 * k * down_t**2)
        signal = np.where(up, rising, falling)
        self.samples = np.round(8000 * np.sin(signal)).astype("<i2")
        self.position = 0

    def read_frame(self) -> bytes | None:
        if self.position >= len(self.samples):
            return None
        chunk = self.samples[self.position : self.position + 320]
        self.position += 320
        return chunk.tobytes()

    def close(self) -> None:
        pass


def best_correlation(
    reference: np.ndarray, received: np.ndarray, max_delay: int
) -> tuple[float, int]:
    """The highest normalised correlation of ``reference`` with ``received[d : d + len]``,
    over delays 0 <= d < ``max_delay`` (cross-correlation by FFT)."""
    ref = reference.astype(np.float64)
    rx = received[: len(ref) + max_delay].astype(np.float64)
    size = 1 << (len(rx) + len(ref)).bit_length()
    products = np.fft.irfft(np.fft.rfft(rx, size) * np.conj(np.fft.rfft(ref, size)), size)
    energy = np.concatenate(([0.0], np.cumsum(rx * rx)))
    windows = energy[len(ref) : len(ref) + max_delay] - energy[:max_delay]
    norms = np.sqrt(np.maximum(windows, 1e-9)) * np.linalg.norm(ref)
    correlations = products[:max_delay] / norms
    delay = int(np.argmax(correlations))
    return float(correlations[delay]), delay


@pytest.mark.parametrize("loss", [0.0, 0.05])
def test_a_chirp_through_two_engines_with_opus_comes_out_alike(loss: float) -> None:
    from client.media.codec import OpusDecoder, OpusEncoder

    clock = Clock()
    forward = Link(clock, latency=0.025, jitter=0.010, loss=loss, seed=11)
    backward = Link(clock, latency=0.025)
    source, sink = ChirpSource(4.0), RecordingSink()
    a = MediaSession(
        clock,
        forward.send,
        KEYS,
        source,
        RecordingSink(),
        encoder=OpusEncoder(RATE),
        decoder=OpusDecoder(RATE),
    )
    b = MediaSession(
        clock,
        backward.send,
        KEYS.reversed(),
        CountingSource(),
        sink,
        encoder=OpusEncoder(RATE),
        decoder=OpusDecoder(RATE),
    )
    forward.target, backward.target = b, a
    a.start()
    b.start()
    for _ in range(1000):
        clock.advance(0.005)
    received = np.frombuffer(b"".join(sink.frames), dtype="<i2")
    # Seconds 1 to 3 of what was sent against what came out, up to half a second later.
    reference = source.samples[RATE : 3 * RATE]
    correlation, delay = best_correlation(reference, received[RATE:], RATE // 2)
    assert correlation > (0.95 if loss == 0 else 0.9), correlation
    # Mouth to ear: 25-35 ms on the link, the jitter buffer, the codec; well under 200 ms.
    assert 0.040 < delay / RATE < 0.200
    stats = b.stats()
    assert stats.codec == "opus 16 kHz"
    if loss:
        assert stats.fec_recovered > 0


def test_frame_clock_counts_due_ticks_and_stops_on_an_error() -> None:
    from client.media.frameclock import FrameClock

    clock = Clock()
    counts: list[int] = []

    def tick(count: int) -> None:
        counts.append(count)
        if sum(counts) >= 10:
            raise RuntimeError("boom")

    frame_clock = FrameClock(clock, 0.020, tick)
    frame_clock.start()
    clock.advance(0.020)
    clock.advance(0.065)  # three more fell due (at 40, 60 and 80 ms)
    assert counts == [1, 1, 3]
    with pytest.raises(RuntimeError):
        clock.advance(0.100)
    assert not frame_clock.running
    assert clock.getDelayedCalls() == []
