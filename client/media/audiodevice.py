"""The sound card as a call's audio: ``DeviceSource`` (microphone) and ``DeviceSink`` (speaker).

Both open a PortAudio stream (``sounddevice`` raw streams) at 48 kHz, mono int16, in blocks of
20 ms, and hand out or take 20 ms frames at ``sample_rate`` (48 kHz by default; another rate is
converted with ``client.media.resample`` on the reactor's side).  ``list_devices()`` lists what
PortAudio sees, for ``voipctl devices``.

Threads.  PortAudio calls our callback on its own real-time thread every 20 ms.  The callback
and the reactor meet at one bounded ``collections.deque`` of raw blocks per stream, whose
``append`` and ``popleft`` are atomic: the callback only appends captured blocks (or pops blocks
to play) and updates its own counters; the reactor's ``read_frame`` / ``write_frame`` does the
rest (conversion, resampling, trimming).  We chose this over ``reactor.callFromThread`` because
(1) the call engine already ticks every 20 ms on its clock and simply pulls, so no event per
block has to cross threads and wake the reactor; (2) the deque is bounded, so a stalled reactor
costs the oldest audio, never memory or growing latency, whereas callFromThread's queue is
unbounded; (3) the callback never waits on the reactor or a lock, and the reactor never waits on
the device.  The callback never calls into Twisted at all.

Drift and latency.  The sound card's clock and the reactor's timer differ slightly; frames that
pile up beyond ``max_queued_frames`` are dropped (counted in ``overflows``) so latency stays
bounded, and a missing frame becomes silence (counted in ``underflows``).  The sink waits for
``prebuffer_frames`` before it starts (and restarts) playing, so the two clocks' phase jitter
does not turn into a click every few frames.

Errors.  No PortAudio library, no device, a device that cannot be opened, or a stream that
stopped by itself: ``AudioDeviceError`` with one line saying which.
"""

from __future__ import annotations

import collections
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Any

import numpy as np

from client.media.audio import SAMPLE_BYTES, frame_bytes, frame_samples
from client.media.resample import Resampler
from overlay.errors import VoipError

#: The rate the device runs at.
DEVICE_RATE = 48000
_BLOCK = frame_samples(DEVICE_RATE)


class AudioDeviceError(VoipError):
    """The audio device cannot be used."""

    code = "audio-device"


def _sounddevice() -> ModuleType:
    try:
        import sounddevice
    except OSError as e:  # the PortAudio shared library is missing
        raise AudioDeviceError(
            "PortAudio is not installed (Debian: libportaudio2), so no audio device can be used"
        ) from e
    except ImportError as e:
        raise AudioDeviceError(
            "The sounddevice package is not installed, so no audio device can be used"
        ) from e
    module: ModuleType = sounddevice
    return module


@dataclass(frozen=True)
class DeviceInfo:
    """One device PortAudio offers."""

    index: int
    name: str
    host_api: str
    input_channels: int
    output_channels: int
    default_sample_rate: float
    default_input: bool
    default_output: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def list_devices() -> list[DeviceInfo]:
    """Every audio device PortAudio sees (empty when there is none)."""
    sd = _sounddevice()
    try:
        devices = sd.query_devices()
        apis = sd.query_hostapis()
        default_in, default_out = (int(i) for i in sd.default.device)
    except sd.PortAudioError as e:
        raise AudioDeviceError(f"Audio devices could not be listed: {e}") from e
    return [
        DeviceInfo(
            index=int(d["index"]),
            name=str(d["name"]),
            host_api=str(apis[d["hostapi"]]["name"]),
            input_channels=int(d["max_input_channels"]),
            output_channels=int(d["max_output_channels"]),
            default_sample_rate=float(d["default_samplerate"]),
            default_input=int(d["index"]) == default_in,
            default_output=int(d["index"]) == default_out,
        )
        for d in devices
    ]


def _open(kind: str, device: int | str | None, callback: Any, finished: Any) -> tuple[Any, int]:
    """A started raw stream of ``kind`` ('input' or 'output') and its channel count."""
    sd = _sounddevice()
    what = "input" if kind == "input" else "output"
    try:
        info = sd.query_devices(device, kind=kind)
    except (ValueError, sd.PortAudioError) as e:
        if device is None:
            raise AudioDeviceError(
                f"No audio {what} device found (is a sound server running?)"
            ) from e
        if isinstance(device, int):
            raise AudioDeviceError(f"No audio {what} device number {device}") from e
        raise AudioDeviceError(f"No audio {what} device called {device!r}") from e
    name = info["name"]
    cls = sd.RawInputStream if kind == "input" else sd.RawOutputStream
    last: Exception | None = None
    # Mono first; some hardware only opens in stereo, which we mix down / duplicate.
    for channels in (1, 2):
        stream = None
        try:
            stream = cls(
                samplerate=DEVICE_RATE,
                blocksize=_BLOCK,
                device=info["index"],
                channels=channels,
                dtype="int16",
                latency="low",
                callback=callback,
                finished_callback=finished,
            )
            stream.start()
        except sd.PortAudioError as e:
            last = e
            if stream is not None:
                stream.close(ignore_errors=True)
            continue
        return stream, channels
    raise AudioDeviceError(f"Audio {what} device {name!r} could not be opened: {last}")


class DeviceSource:
    """Captures 20 ms frames from the sound card; ``read_frame`` never blocks, never ends."""

    def __init__(
        self,
        device: int | str | None = None,
        sample_rate: int = DEVICE_RATE,
        max_queued_frames: int = 3,
    ) -> None:
        self.sample_rate = sample_rate
        #: Frames read before the device had captured them (silence was returned).
        self.underflows = 0
        self._dropped = 0
        self._device_overflows = 0  # written by the PortAudio thread only
        self._max_queued = max_queued_frames
        self._queue: collections.deque[bytes] = collections.deque(maxlen=max_queued_frames + 2)
        self._pending = bytearray()
        self._silence = bytes(frame_bytes(sample_rate))
        self._resampler = (
            Resampler(DEVICE_RATE, sample_rate) if sample_rate != DEVICE_RATE else None
        )
        self._closing = False
        self._stopped = False
        self._stream, self._channels = _open("input", device, self._callback, self._finished)

    def _callback(self, indata: Any, frames: int, time: Any, status: Any) -> None:
        # PortAudio's thread: copy the block, count trouble, nothing else.
        if status.input_overflow:
            self._device_overflows += 1
        if len(self._queue) == self._queue.maxlen:  # the append below pushes the oldest out
            self._device_overflows += 1
        self._queue.append(bytes(indata))

    def _finished(self) -> None:
        self._stopped = True

    def read_frame(self) -> bytes:
        if self._closing:
            raise ValueError("the audio input device was closed")
        if self._stopped:
            raise AudioDeviceError("The audio input device stopped (was it unplugged?)")
        need = _BLOCK * SAMPLE_BYTES * self._channels
        while self._queue:
            self._pending += self._queue.popleft()
        excess = len(self._pending) // need - self._max_queued
        if excess > 0:  # the reader fell behind the device: drop the oldest, keep latency low
            del self._pending[: excess * need]
            self._dropped += excess
        if len(self._pending) < need:
            self.underflows += 1
            return self._silence
        block = np.frombuffer(bytes(self._pending[:need]), dtype="<i2")
        del self._pending[:need]
        if self._channels == 2:
            block = block.reshape(-1, 2).mean(axis=1).astype("<i2")
        if self._resampler is None:
            return block.tobytes()
        out = self._resampler.process(block)
        return bytes(np.clip(np.round(out), -32768, 32767).astype("<i2").tobytes())

    @property
    def overflows(self) -> int:
        """Captured audio thrown away: PortAudio overflows plus frames read too late."""
        return self._dropped + self._device_overflows

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._stream.abort()
        self._stream.close()


class DeviceSink:
    """Plays 20 ms frames on the sound card; ``write_frame`` never blocks."""

    def __init__(
        self,
        device: int | str | None = None,
        sample_rate: int = DEVICE_RATE,
        max_queued_frames: int = 5,
        prebuffer_frames: int = 2,
    ) -> None:
        self.sample_rate = sample_rate
        #: Frames thrown away because more were written than the device played.
        self.overflows = 0
        self._underflows = 0  # written by the PortAudio thread only
        self._queue: collections.deque[bytes] = collections.deque()
        self._max_queued = max_queued_frames
        self._prebuffer = prebuffer_frames
        self._priming = True  # callback thread only
        self._left = b""  # callback thread only
        self._resampler = (
            Resampler(sample_rate, DEVICE_RATE) if sample_rate != DEVICE_RATE else None
        )
        self._frame_bytes = frame_bytes(sample_rate)
        self._closing = False
        self._stopped = False
        self._stream, self._channels = _open("output", device, self._callback, self._finished)

    def write_frame(self, pcm: bytes) -> None:
        if self._closing:
            raise ValueError("the audio output device was closed")
        if self._stopped:
            raise AudioDeviceError("The audio output device stopped (was it unplugged?)")
        if len(pcm) != self._frame_bytes:
            raise ValueError(f"a 20 ms frame at {self.sample_rate} Hz is {self._frame_bytes} bytes")
        block = np.frombuffer(pcm, dtype="<i2")
        if self._resampler is not None:
            out = self._resampler.process(block)
            block = np.clip(np.round(out), -32768, 32767).astype("<i2")
        if self._channels == 2:
            block = np.repeat(block, 2)
        while len(self._queue) >= self._max_queued:
            try:
                self._queue.popleft()
            except IndexError:  # the callback took it meanwhile
                break
            self.overflows += 1
        self._queue.append(block.tobytes())

    def _callback(self, outdata: Any, frames: int, time: Any, status: Any) -> None:
        # PortAudio's thread: fill the device's buffer from the queue, or with silence.
        if status.output_underflow:
            self._underflows += 1
        size = len(outdata)
        if self._priming:
            if len(self._queue) < self._prebuffer:
                outdata[:] = bytes(size)
                return
            self._priming = False
        data = self._left
        while len(data) < size and self._queue:
            data += self._queue.popleft()
        if len(data) < size:
            self._underflows += 1
            self._priming = True
            data += bytes(size - len(data))
        outdata[:] = data[:size]
        self._left = data[size:]

    @property
    def underflows(self) -> int:
        """Device blocks that found nothing (or too little) to play: silence was played."""
        return self._underflows

    def _finished(self) -> None:
        self._stopped = True

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._stream.abort()
        self._stream.close()
