"""Sample-rate conversion: lengths, pass band, stop band, and streaming equal to one piece."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from client.media.resample import Resampler, resample

RATES = [8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000]


def sine(freq: float, rate: int, seconds: float = 0.5) -> np.ndarray:
    return np.asarray(np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate))


@pytest.mark.parametrize("src", RATES)
@pytest.mark.parametrize("dst", [16000, 48000])
def test_a_tone_in_the_pass_band_comes_out_unchanged(src: int, dst: int) -> None:
    freq = 0.3 * min(src, dst)
    x = sine(freq, src)
    y = resample(x, src, dst)
    assert len(y) == -(-len(x) * dst // src)
    t = np.arange(len(y)) / dst
    edge = dst // 50  # the first and last 20 ms see the signal switch on and off
    assert np.max(np.abs(y - np.sin(2 * np.pi * freq * t))[edge:-edge]) < 1e-3


@pytest.mark.parametrize(("src", "dst"), [(48000, 16000), (44100, 16000), (44100, 8000)])
def test_what_the_new_rate_cannot_hold_is_removed(src: int, dst: int) -> None:
    # Above the new Nyquist frequency: would alias back into the speech band.
    for freq in (0.55 * dst, 0.8 * dst, 0.45 * src):
        y = resample(sine(freq, src), src, dst)
        assert np.max(np.abs(y[100:-100])) < 1e-3  # at least 60 dB down


def test_same_rate_is_a_copy() -> None:
    x = np.arange(10.0)
    assert np.array_equal(resample(x, 16000, 16000), x)
    assert np.array_equal(Resampler(16000, 16000).process(x), x)


def test_bad_rates_are_refused() -> None:
    with pytest.raises(ValueError, match="sample rates must be positive"):
        resample(np.zeros(4), 0, 16000)


@pytest.mark.parametrize(("src", "dst"), [(48000, 16000), (16000, 48000), (44100, 16000)])
def test_live_stream_gives_a_whole_frame_per_frame(src: int, dst: int) -> None:
    stream = Resampler(src, dst)
    x = sine(1000, src, 1.0)
    step = src // 50
    outs = [stream.process(x[i : i + step]) for i in range(0, len(x), step)]
    assert {len(o) for o in outs} == {dst // 50}
    y = np.concatenate(outs)
    t = np.arange(len(y)) / dst - stream.delay_samples / src
    assert stream.delay_samples < src // 500  # under 2 ms
    assert np.max(np.abs(y - np.sin(2 * np.pi * 1000 * t))[dst // 50 :]) < 1e-3


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from([(44100, 16000), (8000, 48000), (22050, 16000), (48000, 16000)]),
    st.lists(st.integers(0, 3000), min_size=1, max_size=8),
)
def test_streaming_in_any_chunks_equals_one_piece(rates: tuple[int, int], sizes: list[int]) -> None:
    src, dst = rates
    rng = np.random.default_rng(sum(sizes))
    x = rng.normal(0.0, 1000.0, sum(sizes))
    stream = Resampler(src, dst, zero_delay=True)
    pieces, start = [], 0
    for size in sizes:
        pieces.append(stream.process(x[start : start + size]))
        start += size
    pieces.append(stream.flush())
    assert np.allclose(np.concatenate(pieces), resample(x, src, dst), atol=1e-6)
    with pytest.raises(ValueError, match="was flushed"):
        stream.process(x[:1])
