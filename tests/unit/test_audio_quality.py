"""The yardsticks for call quality: PESQ-WB scores, delay alignment, and the speech samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from client.media.codec import OpusDecoder, OpusEncoder
from client.media.resample import resample
from client.media.wavfile import WavSink
from tools.audio.quality import align, load_wav, pesq_wb, pesq_wb_signals
from tools.audio.speech import callee_speech, caller_speech


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return load_wav(caller_speech())


def write(path: Path, x: np.ndarray, rate: int = 16000) -> Path:
    sink = WavSink(path, rate)
    sink.write_frame(np.clip(np.round(x), -32768, 32767).astype("<i2").tobytes())
    sink.close()
    return path


def test_the_two_directions_speak_different_sentences() -> None:
    caller, callee = load_wav(caller_speech()), load_wav(callee_speech())
    assert 8 < len(caller) / 16000 < 30
    assert 8 < len(callee) / 16000 < 30
    n = min(len(caller), len(callee))
    a, b = caller[:n], callee[:n]
    assert abs(np.dot(a, b) / np.sqrt(np.dot(a, a) * np.dot(b, b))) < 0.1
    assert caller_speech() == caller_speech()  # cached, same file


def test_a_file_scores_about_4_5_against_itself(speech: np.ndarray) -> None:
    path = caller_speech()
    assert pesq_wb(path, path) > 4.4


def test_noise_and_a_narrower_band_score_lower(speech: np.ndarray) -> None:
    rng = np.random.default_rng(1)
    rms = np.sqrt(np.mean(speech**2))
    noisy = speech + rng.normal(0.0, rms / 10 ** (25 / 20), len(speech))  # 25 dB SNR
    narrow = resample(resample(speech, 16000, 8000), 8000, 16000)[: len(speech)]
    perfect = pesq_wb_signals(speech, speech)
    assert pesq_wb_signals(speech, noisy) < 3.0 < perfect
    assert pesq_wb_signals(speech, narrow) < 4.2 < perfect


@pytest.mark.parametrize("delay_ms", [0.0, 37.5, 123.0, 480.0, 1500.0])
def test_align_finds_an_inserted_delay(speech: np.ndarray, delay_ms: float) -> None:
    pad = np.zeros(round(delay_ms * 16))
    delayed = np.concatenate([pad, speech])
    assert align(speech, delayed) == pytest.approx(delay_ms)
    assert align(delayed, speech) == pytest.approx(-delay_ms)


def test_align_copes_with_noise_and_a_different_end(speech: np.ndarray) -> None:
    rng = np.random.default_rng(2)
    degraded = np.concatenate([rng.normal(0, 30, 3200), speech[:-8000] * 0.5])
    degraded[3200:] += rng.normal(0, 200, len(degraded) - 3200)
    assert align(speech, degraded) == pytest.approx(200.0)


def test_a_late_start_does_not_ruin_the_score(tmp_path: Path, speech: np.ndarray) -> None:
    # A call's recording starts late by its latency and ends early with the hang-up.
    late = np.concatenate([np.zeros(16000 * 7 // 10), speech[:-16000]])
    reference = write(tmp_path / "ref.wav", speech)
    degraded = write(tmp_path / "deg.wav", late)
    assert pesq_wb(reference, degraded) > 4.4


def test_scoring_works_across_sample_rates(tmp_path: Path, speech: np.ndarray) -> None:
    reference = write(tmp_path / "ref.wav", speech)
    at_48k = write(tmp_path / "deg48.wav", resample(speech, 16000, 48000), 48000)
    assert pesq_wb(reference, at_48k) > 4.3


def test_silence_cannot_be_scored(speech: np.ndarray) -> None:
    with pytest.raises(ValueError, match="PESQ found no speech"):
        pesq_wb_signals(speech, np.zeros_like(speech))
    with pytest.raises(ValueError, match="share less than half a second"):
        pesq_wb_signals(speech[:4000], speech[:4000])


def test_opus_alone_keeps_speech_near_transparent() -> None:
    # The ceiling a call can reach: Opus at 16 kHz, 24 kbit/s, no loss (measured 4.12 / 4.22).
    for path in (caller_speech(), callee_speech()):
        x = load_wav(path).astype("<i2")
        encoder, decoder = OpusEncoder(16000, 24000), OpusDecoder(16000)
        decoded = b"".join(
            decoder.decode(encoder.encode(x[i : i + 320].tobytes()))
            for i in range(0, len(x) - 319, 320)
        )
        score = pesq_wb_signals(x.astype(np.float64), np.frombuffer(decoded, "<i2"))
        assert score > 3.9
