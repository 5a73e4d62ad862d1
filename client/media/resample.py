"""Sample-rate conversion for audio: windowed-sinc polyphase filtering in numpy.

Used where a rate must change: a WAV file at 44.1 kHz fed to a 16 kHz encoder, a 48 kHz sound
device under a 16 kHz call.  ``resample()`` converts a whole signal with no delay;
``Resampler`` converts a stream chunk by chunk (the sound device's 20 ms blocks) and carries the
filter's history across chunks, at the price of a fixed delay of ``delay_samples`` input
samples (about 1 ms).

How: the ratio is reduced to ``up/down``; the signal is (conceptually) zero-stuffed by ``up``,
low-pass filtered below the lower Nyquist frequency with a Kaiser-windowed sinc, and kept every
``down``-th sample.  Only the taps that meet non-zero input are computed: each output sample is
a dot product of ``2 * half_width + 1`` input samples with one row of a precomputed phase table.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

#: Zero crossings of the sinc kept on each side: sets the filter's steepness.
ZERO_CROSSINGS = 16
#: Pass-band edge as a fraction of the lower Nyquist frequency.
ROLLOFF = 0.92
#: Kaiser window shape (about 80 dB of stop-band attenuation).
KAISER_BETA = 8.0
#: Output samples computed per numpy step (bounds the memory of the gather).
_CHUNK = 8192


class _Kernel:
    """The phase table of one conversion ratio."""

    def __init__(self, from_rate: int, to_rate: int) -> None:
        if from_rate <= 0 or to_rate <= 0:
            raise ValueError(f"sample rates must be positive, not {from_rate} -> {to_rate}")
        g = math.gcd(from_rate, to_rate)
        self.up = to_rate // g
        self.down = from_rate // g
        widest = max(self.up, self.down)
        # Half width of the filter, counted in input samples.
        self.half_width = math.ceil(ZERO_CROSSINGS * widest / (ROLLOFF * self.up))
        cutoff = ROLLOFF * 0.5 / widest  # cycles per sample of the zero-stuffed signal
        span = self.half_width * self.up
        phases = np.arange(self.up)[:, None]
        offsets = np.arange(-self.half_width, self.half_width + 1)[None, :]
        # Distance, in zero-stuffed samples, between an output's position and each input tap.
        n = (phases - offsets * self.up).astype(np.float64)
        window = np.zeros_like(n)
        inside = np.abs(n) <= span
        window[inside] = np.i0(KAISER_BETA * np.sqrt(1.0 - (n[inside] / span) ** 2))
        window /= np.i0(KAISER_BETA)
        self.table: FloatArray = 2.0 * cutoff * np.sinc(2.0 * cutoff * n) * window * self.up

    def out_length(self, n_in: int) -> int:
        """Output samples produced for ``n_in`` input samples (ceil(n_in * up / down))."""
        return -(-n_in * self.up // self.down)

    def compute(self, padded: FloatArray, first: int, start_m: int, stop_m: int) -> FloatArray:
        """Outputs ``start_m`` to ``stop_m``; ``padded[0]`` is the input sample ``first``.

        Output ``m`` is centred on input position ``m * down / up`` and reads input samples
        ``floor(m * down / up) - half_width`` .. ``+ half_width``; they must all be in ``padded``.
        """
        out = np.empty(max(0, stop_m - start_m), dtype=np.float64)
        taps = np.arange(-self.half_width, self.half_width + 1)
        for lo in range(start_m, stop_m, _CHUNK):
            m = np.arange(lo, min(stop_m, lo + _CHUNK), dtype=np.int64)
            pos = m * self.down
            centre = pos // self.up
            phase = pos - centre * self.up
            idx = (centre - first)[:, None] + taps[None, :]
            out[lo - start_m : lo - start_m + len(m)] = np.einsum(
                "ij,ij->i", padded[idx], self.table[phase]
            )
        return out


def resample(samples: npt.ArrayLike, from_rate: int, to_rate: int) -> FloatArray:
    """The whole signal ``samples`` converted from ``from_rate`` to ``to_rate`` (no delay).

    The result has ``ceil(len * to_rate / from_rate)`` samples, as float64 in the input's scale.
    """
    converter = Resampler(from_rate, to_rate, zero_delay=True)
    return np.concatenate([converter.process(samples), converter.flush()])


class Resampler:
    """A stream converted chunk by chunk; ``process`` returns what each chunk makes ready.

    Default (``zero_delay=False``), for live audio: after ``n`` input samples in total exactly
    ``ceil(n * to_rate / from_rate)`` output samples have been returned, so a 20 ms chunk in
    gives a 20 ms chunk out whenever both rates are multiples of 50 Hz; the output lags the
    input by ``delay_samples`` input samples.

    ``zero_delay=True``, for files: the output lines up with the input exactly, but each chunk's
    last ``half_width`` input samples wait for the next chunk; ``flush()`` at the end returns
    the rest, making ``ceil(n * to_rate / from_rate)`` samples in all.
    """

    def __init__(self, from_rate: int, to_rate: int, zero_delay: bool = False) -> None:
        self.from_rate = from_rate
        self.to_rate = to_rate
        self._kernel = _Kernel(from_rate, to_rate)
        h = self._kernel.half_width
        self._lag = 0 if zero_delay or from_rate == to_rate else h
        self.delay_samples = self._lag
        # The (possibly delayed) input y[j] = x[j - lag], zero before x starts: the samples of
        # it kept, and the index in y of the first of them.  Output m reads y around m*down/up.
        self._buffer: FloatArray = np.zeros(h + self._lag, dtype=np.float64)
        self._first = -h
        self._received = 0
        self._emitted = 0
        self._flushed = False

    def process(self, samples: npt.ArrayLike) -> FloatArray:
        """Feed the next chunk of input; returns the output samples it completes."""
        x = np.asarray(samples, dtype=np.float64)
        if self._flushed:
            raise ValueError("the resampler was flushed; make a new one for a new stream")
        if self.from_rate == self.to_rate:
            return x.copy()
        self._received += len(x)
        return self._run(x, self._received)

    def flush(self) -> FloatArray:
        """The output still held back at the end of the stream (then the stream is over)."""
        if self._flushed or self.from_rate == self.to_rate:
            self._flushed = True
            return np.zeros(0, dtype=np.float64)
        self._flushed = True
        h = self._kernel.half_width
        return self._run(np.zeros(h + 1), self._received + h + 1, final=True)

    def _run(self, x: FloatArray, available: int, final: bool = False) -> FloatArray:
        k = self._kernel
        h = k.half_width
        self._buffer = np.concatenate([self._buffer, x])
        # Output m's last tap is y[floor(m*down/up) + h] = x[floor(m*down/up) + h - lag].
        last_centre = available - 1 - h + self._lag
        stop = max(self._emitted, -(-(last_centre + 1) * k.up // k.down))
        if final:
            stop = min(stop, k.out_length(self._received + self._lag))
        out = k.compute(self._buffer, self._first, self._emitted, stop)
        self._emitted = stop
        # Keep only what the next output still needs.
        keep_from = (stop * k.down) // k.up - h
        drop = max(0, keep_from - self._first)
        if drop:
            self._buffer = self._buffer[drop:]
            self._first += drop
        return out
