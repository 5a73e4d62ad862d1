"""The simple audio sources: silence and a test tone, 20 ms frames at a time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from client.media.audio import (
    FRAME_MS,
    AudioSink,
    AudioSource,
    SilenceSource,
    ToneSource,
    frame_bytes,
    frame_samples,
)
from client.media.wavfile import WavSink, WavSource


def test_frame_sizes() -> None:
    assert FRAME_MS == 20
    assert frame_samples(16000) == 320
    assert frame_bytes(48000) == 1920


def test_silence_forever_or_for_a_number_of_frames() -> None:
    forever = SilenceSource(48000)
    assert all(forever.read_frame() == bytes(1920) for _ in range(100))
    short = SilenceSource(16000, frames=2)
    assert [short.read_frame(), short.read_frame(), short.read_frame()] == [
        bytes(640),
        bytes(640),
        None,
    ]


def test_a_tone_is_one_continuous_sine_across_frames() -> None:
    source = ToneSource(1000.0, 16000, amplitude=0.5, frames=50)
    frames = []
    while (frame := source.read_frame()) is not None:
        frames.append(frame)
    assert len(frames) == 50
    x = np.frombuffer(b"".join(frames), "<i2").astype(np.float64)
    want = 0.5 * 32767 * np.sin(2 * np.pi * 1000 * np.arange(16000) / 16000)
    assert np.max(np.abs(x - want)) <= 0.5 + 1e-9  # only rounding to int16


def test_a_tone_refuses_what_it_cannot_play() -> None:
    with pytest.raises(ValueError, match="cannot be sampled at 16000 Hz"):
        ToneSource(9000.0, 16000)
    with pytest.raises(ValueError, match="amplitude must be between 0 and 1"):
        ToneSource(440.0, 16000, amplitude=1.5)


def test_the_classes_fit_the_protocols(tmp_path: Path) -> None:
    sink = WavSink(tmp_path / "a.wav", 16000)
    sink.write_frame(bytes(640))
    source = WavSource(tmp_path / "a.wav")
    for thing in (SilenceSource(), ToneSource(), source):
        assert isinstance(thing, AudioSource)
        assert not isinstance(thing, AudioSink)
    assert isinstance(sink, AudioSink)
    assert not isinstance(sink, AudioSource)
    sink.close()
    source.close()
