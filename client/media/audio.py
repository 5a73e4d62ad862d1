"""Where a call's audio comes from and goes to: the source and sink protocols, and simple sources.

Every piece of audio in a call moves as 20 ms frames of mono signed 16-bit little-endian PCM
(``FRAME_MS``).  A source hands out one frame per ``read_frame()`` call; the call engine calls
it once per 20 ms tick of its clock.  A sink takes one frame per ``write_frame()``.

Implementations: ``SilenceSource`` and ``ToneSource`` here, ``WavSource``/``WavSink`` in
``client.media.wavfile`` (headless calls and tests), ``DeviceSource``/``DeviceSink`` in
``client.media.audiodevice`` (the sound card).
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import numpy as np

#: Duration of one audio frame everywhere in a call.
FRAME_MS = 20
#: Bytes per sample (mono signed 16-bit).
SAMPLE_BYTES = 2


def frame_samples(sample_rate: int) -> int:
    """Samples in one 20 ms frame at ``sample_rate``."""
    return sample_rate * FRAME_MS // 1000


def frame_bytes(sample_rate: int) -> int:
    """Bytes in one 20 ms frame of mono int16 PCM at ``sample_rate``."""
    return frame_samples(sample_rate) * SAMPLE_BYTES


@runtime_checkable
class AudioSource(Protocol):
    """Hands out audio one 20 ms frame at a time."""

    sample_rate: int

    def read_frame(self) -> bytes | None:
        """One 20 ms frame of int16 mono PCM, or None when the source is finished.

        A file ends; a sound device never does (it returns silence when it has nothing).
        """
        ...

    def close(self) -> None:
        """Release the file or device; reading after this is an error."""
        ...


@runtime_checkable
class AudioSink(Protocol):
    """Takes audio one 20 ms frame at a time."""

    sample_rate: int

    def write_frame(self, pcm: bytes) -> None:
        """Play or store one frame of int16 mono PCM."""
        ...

    def close(self) -> None:
        """Flush and release the file or device."""
        ...


class SilenceSource:
    """Digital silence: forever, or for ``frames`` frames and then finished."""

    def __init__(self, sample_rate: int = 16000, frames: int | None = None) -> None:
        self.sample_rate = sample_rate
        self._remaining = frames
        self._frame = bytes(frame_bytes(sample_rate))

    def read_frame(self) -> bytes | None:
        if self._remaining is not None:
            if self._remaining <= 0:
                return None
            self._remaining -= 1
        return self._frame

    def close(self) -> None:
        self._remaining = 0


class ToneSource:
    """A sine tone with continuous phase across frames (for tests and the audio check).

    ``amplitude`` is a fraction of full scale; ``frames=None`` plays forever.
    """

    def __init__(
        self,
        frequency: float = 440.0,
        sample_rate: int = 16000,
        amplitude: float = 0.3,
        frames: int | None = None,
    ) -> None:
        if not 0 < frequency < sample_rate / 2:
            raise ValueError(f"a {frequency} Hz tone cannot be sampled at {sample_rate} Hz")
        if not 0.0 <= amplitude <= 1.0:
            raise ValueError(f"amplitude must be between 0 and 1, not {amplitude}")
        self.sample_rate = sample_rate
        self.frequency = frequency
        self._amplitude = amplitude * 32767.0
        self._remaining = frames
        self._n = 0
        self._step = 2.0 * math.pi * frequency / sample_rate

    def read_frame(self) -> bytes | None:
        if self._remaining is not None:
            if self._remaining <= 0:
                return None
            self._remaining -= 1
        count = frame_samples(self.sample_rate)
        n = np.arange(self._n, self._n + count, dtype=np.float64)
        self._n += count
        pcm = np.round(self._amplitude * np.sin(self._step * n)).astype("<i2")
        return pcm.tobytes()

    def close(self) -> None:
        self._remaining = 0
