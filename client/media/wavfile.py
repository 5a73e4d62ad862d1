"""WAV files as a call's audio: ``WavSource`` plays a file into a call, ``WavSink`` records one.

Headless calls (``voipctl call bob --play speech.wav --record reply.wav``) and the tests use
these instead of a sound device.

Reading takes what people actually have: PCM of 8, 16, 24 or 32 bits, 32- or 64-bit float,
plain or WAVE_FORMAT_EXTENSIBLE headers (sox and most editors write the latter for 24-bit and
multi-channel audio), any number of channels (mixed down to mono) and any sample rate.  Mono
16-bit at 16 or 48 kHz is used as it is; other rates are converted (``client.media.resample``,
windowed-sinc) to ``sample_rate`` if one is given, else to 48 kHz from 32 kHz up and to 16 kHz
below.  The RIFF chunks are parsed here rather than by the stdlib ``wave`` module, which (before
Python 3.12) refuses extensible and float files.  A file that cannot be used is refused with one
line naming it and saying why (``AudioFileError``).  A data chunk whose size was never filled in
(a recording cut short) is read up to the end of the file.

Writing (mono 16-bit, stdlib ``wave``): each ``write_frame`` appends the frame and rewrites the
header's two size fields, unbuffered, so the file on disk is a valid WAV holding every frame
written so far, whenever the process dies.  ``close()`` only closes it.
"""

from __future__ import annotations

import os
import struct
import wave
from typing import IO, BinaryIO

import numpy as np
import numpy.typing as npt

from client.media.audio import SAMPLE_BYTES, frame_samples
from client.media.resample import Resampler
from overlay.errors import VoipError

#: Sample rates a file is used at without conversion.
NATIVE_RATES = (16000, 48000)

_PCM = 0x0001
_FLOAT = 0x0003
_EXTENSIBLE = 0xFFFE
#: Names of common formats we refuse, for the message.
_FORMAT_NAMES = {
    0x0002: "Microsoft ADPCM",
    0x0006: "A-law",
    0x0007: "mu-law",
    0x0011: "IMA ADPCM",
    0x0031: "GSM 6.10",
    0x0050: "MPEG",
    0x0055: "MP3",
    0x00FF: "AAC",
}
_READ_FRAMES = 4096
_Path = str | os.PathLike[str]


class AudioFileError(VoipError):
    """The audio file cannot be used."""

    code = "audio-file"


class _Format:
    def __init__(self, tag: int, channels: int, rate: int, block_align: int, bits: int) -> None:
        self.tag = tag
        self.channels = channels
        self.rate = rate
        self.block_align = block_align
        self.bits = bits

    @property
    def width(self) -> int:
        """Bytes per sample of one channel (the container, not the valid bits)."""
        return self.block_align // self.channels


def _parse_fmt(name: str, body: bytes) -> _Format:
    if len(body) < 16:
        raise AudioFileError(f"{name} is not a valid WAV file (format chunk too short)")
    tag, channels, rate, _byte_rate, block_align, bits = struct.unpack_from("<HHIIHH", body)
    if tag == _EXTENSIBLE:
        if len(body) < 40:
            raise AudioFileError(f"{name} is not a valid WAV file (extensible format too short)")
        tag = struct.unpack_from("<H", body, 24)[0]
    if tag not in (_PCM, _FLOAT):
        kind = _FORMAT_NAMES.get(tag, f"format 0x{tag:04x}")
        raise AudioFileError(
            f"{name}: {kind} WAV is not supported; convert it to 16-bit PCM with sox"
        )
    if channels == 0 or rate == 0 or block_align == 0 or block_align % channels:
        raise AudioFileError(f"{name} is not a valid WAV file (bad channel count or rate)")
    fmt = _Format(tag, channels, rate, block_align, bits)
    if tag == _FLOAT and fmt.width not in (4, 8):
        raise AudioFileError(f"{name}: {bits}-bit float WAV is not supported; convert it with sox")
    if tag == _PCM and fmt.width not in (1, 2, 3, 4):
        raise AudioFileError(f"{name}: {bits}-bit PCM WAV is not supported; convert it with sox")
    return fmt


def _to_float(raw: bytes, fmt: _Format) -> npt.NDArray[np.float64]:
    """Interleaved samples as mono float64 in the int16 scale (full scale = 32768)."""
    width = fmt.width
    if fmt.tag == _FLOAT:
        x = np.frombuffer(raw, dtype="<f4" if width == 4 else "<f8").astype(np.float64) * 32768.0
    elif width == 1:
        x = (np.frombuffer(raw, dtype=np.uint8).astype(np.float64) - 128.0) * 256.0
    elif width == 2:
        x = np.frombuffer(raw, dtype="<i2").astype(np.float64)
    elif width == 3:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 1 << 23, v - (1 << 24), v) / 256.0).astype(np.float64)
    else:
        x = np.frombuffer(raw, dtype="<i4").astype(np.float64) / 65536.0
    if fmt.channels > 1:
        x = x.reshape(-1, fmt.channels).mean(axis=1)
    return x


def _to_pcm16(x: npt.NDArray[np.float64]) -> bytes:
    return bytes(np.clip(np.round(x), -32768, 32767).astype("<i2").tobytes())


class WavSource:
    """A WAV file read as 20 ms frames of mono int16 PCM; ``read_frame`` is None at its end."""

    def __init__(self, path: _Path, sample_rate: int | None = None) -> None:
        self.path = os.fspath(path)
        name = self.path
        try:
            self._file: BinaryIO = open(self.path, "rb")  # noqa: SIM115 - closed by close()
        except OSError as e:
            raise AudioFileError(f"{name}: {e.strerror or e}") from e
        try:
            self._fmt, self._remaining = self._read_header(name)
        except BaseException:
            self._file.close()
            raise
        fmt = self._fmt
        self.file_rate = fmt.rate
        self.channels = fmt.channels
        if sample_rate is None:
            if fmt.rate in NATIVE_RATES:
                sample_rate = fmt.rate
            else:
                sample_rate = 48000 if fmt.rate >= 32000 else 16000
        self.sample_rate = sample_rate
        #: Seconds of audio in the file.
        self.duration = self._remaining / fmt.block_align / fmt.rate
        self._resampler = Resampler(fmt.rate, sample_rate, zero_delay=True)
        self._pending = np.zeros(0, dtype=np.float64)
        self._frame = frame_samples(sample_rate)
        self._ended = False
        self._closed = False

    def _read_header(self, name: str) -> tuple[_Format, int]:
        f = self._file
        head = f.read(12)
        if len(head) == 0:
            raise AudioFileError(f"{name} is empty")
        if len(head) < 12 or head[:4] not in (b"RIFF", b"RF64") or head[8:12] != b"WAVE":
            raise AudioFileError(f"{name} is not a WAV file")
        if head[:4] == b"RF64":
            raise AudioFileError(f"{name}: RF64 (over 4 GB) WAV is not supported")
        size = os.fstat(f.fileno()).st_size
        fmt: _Format | None = None
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                raise AudioFileError(f"{name} is not a valid WAV file (no data chunk)")
            cid, csize = struct.unpack("<4sI", chunk)
            if cid == b"fmt ":
                fmt = _parse_fmt(name, f.read(csize))
                if csize % 2:
                    f.seek(1, os.SEEK_CUR)
            elif cid == b"data":
                if fmt is None:
                    raise AudioFileError(f"{name} is not a valid WAV file (audio before format)")
                start = f.tell()
                if csize == 0 or start + csize > size:
                    csize = size - start  # never filled in, or cut short: read to the end
                csize -= csize % fmt.block_align
                if csize <= 0:
                    raise AudioFileError(f"{name} holds no audio")
                return fmt, csize
            else:
                f.seek(csize + csize % 2, os.SEEK_CUR)

    def read_frame(self) -> bytes | None:
        if self._closed:
            raise ValueError(f"{self.path} was closed")
        while len(self._pending) < self._frame and not self._ended:
            self._fill()
        if len(self._pending) == 0:
            return None
        out, self._pending = self._pending[: self._frame], self._pending[self._frame :]
        if len(out) < self._frame:
            out = np.concatenate([out, np.zeros(self._frame - len(out))])
        return _to_pcm16(out)

    def _fill(self) -> None:
        want = min(self._remaining, _READ_FRAMES * self._fmt.block_align)
        raw = self._file.read(want) if want else b""
        raw = raw[: len(raw) - len(raw) % self._fmt.block_align]
        self._remaining -= len(raw)
        if raw:
            more = self._resampler.process(_to_float(raw, self._fmt))
        else:
            more = self._resampler.flush()
            self._ended = True
        self._pending = np.concatenate([self._pending, more])

    def close(self) -> None:
        self._closed = True
        self._file.close()


class WavSink:
    """Records 20 ms frames of mono int16 PCM into a WAV file at ``sample_rate``."""

    def __init__(self, path: _Path, sample_rate: int) -> None:
        self.path = os.fspath(path)
        self.sample_rate = sample_rate
        self.frames_written = 0
        try:
            # Unbuffered: each frame and each header update reaches the OS at once.
            raw: IO[bytes] = open(self.path, "wb", buffering=0)  # noqa: SIM115 - see close()
        except OSError as e:
            raise AudioFileError(f"{self.path}: {e.strerror or e}") from e
        self._raw = raw
        self._wav = wave.open(raw, "wb")  # noqa: SIM115
        self._wav.setnchannels(1)
        self._wav.setsampwidth(SAMPLE_BYTES)
        self._wav.setframerate(sample_rate)
        self._closed = False

    def __del__(self) -> None:
        # Close the wave writer before its file, whatever order garbage collection picks.
        if not getattr(self, "_closed", True):
            self.close()

    def write_frame(self, pcm: bytes) -> None:
        if self._closed:
            raise ValueError(f"{self.path} was closed")
        if len(pcm) % SAMPLE_BYTES:
            raise ValueError(f"PCM frame of {len(pcm)} bytes is not whole 16-bit samples")
        try:
            self._wav.writeframes(pcm)
        except OSError as e:
            raise AudioFileError(f"{self.path}: {e.strerror or e}") from e
        self.frames_written += 1

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._wav.close()
        finally:
            self._raw.close()
