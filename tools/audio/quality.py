"""Speech quality of a call: PESQ wideband scores and the delay between two recordings.

    .venv/bin/python -m tools.audio.quality reference.wav degraded.wav

``pesq_wb(reference_wav, degraded_wav)`` scores what a listener would hear at the far end
(ITU-T P.862.2 wideband MOS-LQO, via the ``pesq`` package: 1.0 bad to about 4.64 for a perfect
copy).  A call's recording starts late by the call's set-up and latency, which PESQ's own
alignment only partly absorbs, so the degraded signal is first lined up with the reference by
cross-correlation (``align``) and both are cut to the part they share.  Files of any rate or
format ``client.media.wavfile`` reads are converted to 16 kHz mono first.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import numpy.typing as npt
from pesq import NoUtterancesError, PesqError, pesq  # type: ignore[import-untyped]

from client.media.wavfile import WavSource

SAMPLE_RATE = 16000
FloatArray = npt.NDArray[np.float64]


def load_wav(path: str | os.PathLike[str], sample_rate: int = SAMPLE_RATE) -> FloatArray:
    """The whole file as mono float64 samples (int16 scale) at ``sample_rate``."""
    source = WavSource(path, sample_rate)
    try:
        frames = []
        while (frame := source.read_frame()) is not None:
            frames.append(frame)
    finally:
        source.close()
    return np.frombuffer(b"".join(frames), dtype="<i2").astype(np.float64)


def align(
    reference: npt.ArrayLike,
    degraded: npt.ArrayLike,
    sample_rate: int = SAMPLE_RATE,
    max_delay_ms: float = 5000.0,
) -> float:
    """How many milliseconds ``degraded`` lags ``reference`` (negative: it leads).

    The peak of the cross-correlation within ``max_delay_ms``, found with FFTs.
    """
    ref = np.asarray(reference, dtype=np.float64)
    deg = np.asarray(degraded, dtype=np.float64)
    if len(ref) == 0 or len(deg) == 0:
        raise ValueError("cannot align an empty signal")
    n = 1 << int(np.ceil(np.log2(len(ref) + len(deg))))
    corr = np.fft.irfft(np.fft.rfft(deg, n) * np.conj(np.fft.rfft(ref, n)), n)
    limit = int(max_delay_ms * sample_rate / 1000)
    lags = np.arange(0, min(limit, len(deg) - 1) + 1)
    leads = np.arange(1, min(limit, len(ref) - 1) + 1)
    candidates = np.concatenate([lags, -leads])
    best = int(candidates[np.argmax(corr[candidates % n])])
    return best * 1000.0 / sample_rate


def trim_to_alignment(
    reference: FloatArray, degraded: FloatArray, delay_ms: float, sample_rate: int = SAMPLE_RATE
) -> tuple[FloatArray, FloatArray]:
    """Both signals cut so that sample i of one lines up with sample i of the other."""
    shift = round(delay_ms * sample_rate / 1000)
    if shift >= 0:
        degraded = degraded[shift:]
    else:
        reference = reference[-shift:]
    length = min(len(reference), len(degraded))
    return reference[:length], degraded[:length]


def pesq_wb_signals(
    reference: npt.ArrayLike, degraded: npt.ArrayLike, sample_rate: int = SAMPLE_RATE
) -> float:
    """PESQ-WB (MOS-LQO) of two signals at ``sample_rate`` (16 kHz), after aligning them."""
    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"PESQ wideband scores 16 kHz signals, not {sample_rate} Hz")
    ref = np.asarray(reference, dtype=np.float64)
    deg = np.asarray(degraded, dtype=np.float64)
    ref, deg = trim_to_alignment(ref, deg, align(ref, deg, sample_rate), sample_rate)
    if len(ref) < sample_rate // 2:
        raise ValueError("the signals share less than half a second of audio")
    for name, signal in (("reference", ref), ("degraded", deg)):
        if np.max(np.abs(signal)) < 1.0:  # below one int16 step: PESQ would divide by zero
            raise ValueError(f"PESQ found no speech in the {name} signal (it is silent)")
    try:
        return float(pesq(sample_rate, ref.astype(np.float32), deg.astype(np.float32), "wb"))
    except NoUtterancesError as e:
        raise ValueError("PESQ found no speech in the signals") from e
    except PesqError as e:
        raise ValueError(f"PESQ failed: {type(e).__name__}") from e


def pesq_wb(reference_wav: str | os.PathLike[str], degraded_wav: str | os.PathLike[str]) -> float:
    """PESQ-WB (MOS-LQO) of ``degraded_wav`` against ``reference_wav``, aligned first."""
    return pesq_wb_signals(load_wav(reference_wav), load_wav(degraded_wav))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m tools.audio.quality REFERENCE.wav DEGRADED.wav", file=sys.stderr)
        return 2
    ref, deg = load_wav(args[0]), load_wav(args[1])
    delay = align(ref, deg)
    print(f"delay {delay:.1f} ms, PESQ-WB {pesq_wb_signals(ref, deg):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
