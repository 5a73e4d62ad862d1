"""WAV files in and out of calls: every common format converted or refused with one clear line."""

from __future__ import annotations

import shutil
import struct
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest

from client.media.wavfile import AudioFileError, WavSink, WavSource
from overlay.errors import VoipError

NOT_PCM = "is not supported; convert it to 16-bit PCM with sox"


def riff(
    path: Path,
    data: bytes,
    *,
    tag: int = 1,
    channels: int = 1,
    rate: int = 16000,
    bits: int = 16,
    extensible: bool = False,
    before_data: bytes = b"",
    data_size: int | None = None,
) -> Path:
    """A WAV file written byte by byte, so every header variant can be made."""
    width = (bits + 7) // 8
    block = width * channels
    common = struct.pack("<HHIIHH", 0xFFFE if extensible else tag, channels, rate,
                         rate * block, block, bits)  # fmt: skip
    if extensible:
        guid_tail = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
        fmt = common + struct.pack("<HHI", 22, bits, 0) + struct.pack("<H", tag) + guid_tail
    else:
        fmt = common
    size = len(data) if data_size is None else data_size
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + before_data
    body += b"data" + struct.pack("<I", size) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


def read_all(source: WavSource) -> np.ndarray:
    frames = []
    while (frame := source.read_frame()) is not None:
        assert len(frame) == source.sample_rate // 50 * 2
        frames.append(frame)
    assert source.read_frame() is None  # and stays finished
    source.close()
    return np.frombuffer(b"".join(frames), dtype="<i2").astype(np.float64)


def tone(freq: float, rate: int, seconds: float = 1.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return np.asarray(amplitude * np.sin(2 * np.pi * freq * t))


def peak_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * rate / len(x))


def test_mono_16bit_at_16k_is_used_as_it_is(tmp_path: Path) -> None:
    x = (tone(440, 16000, 0.5) * 32767).astype("<i2")
    source = WavSource(riff(tmp_path / "a.wav", x.tobytes()))
    assert (source.sample_rate, source.file_rate, source.channels) == (16000, 16000, 1)
    assert source.duration == pytest.approx(0.5)
    got = read_all(source)
    assert len(got) == 8000
    assert np.array_equal(got, x)


def test_the_last_partial_frame_is_padded_with_silence(tmp_path: Path) -> None:
    x = np.full(500, 1000, dtype="<i2")  # one frame and 180 samples
    got = read_all(WavSource(riff(tmp_path / "a.wav", x.tobytes())))
    assert len(got) == 640
    assert np.all(got[:500] == 1000)
    assert np.all(got[500:] == 0)


def test_mono_16bit_at_48k_is_used_as_it_is(tmp_path: Path) -> None:
    x = (tone(1000, 48000, 0.2) * 32767).astype("<i2")
    source = WavSource(riff(tmp_path / "a.wav", x.tobytes(), rate=48000))
    assert source.sample_rate == 48000
    assert np.array_equal(read_all(source), x)


def test_stereo_is_mixed_to_mono(tmp_path: Path) -> None:
    left = np.full(320, 3000, dtype="<i2")
    right = np.full(320, -1000, dtype="<i2")
    data = np.column_stack([left, right]).astype("<i2").tobytes()
    source = WavSource(riff(tmp_path / "s.wav", data, channels=2))
    assert source.channels == 2
    assert np.all(read_all(source) == 1000)


@pytest.mark.parametrize(
    ("bits", "tag", "raw", "expected"),
    [
        (8, 1, np.array([0, 128, 255, 64], dtype=np.uint8).tobytes(), [-32768, 0, 32512, -16384]),
        (
            24,
            1,
            b"".join(v.to_bytes(3, "little", signed=True) for v in (-8388608, 0, 256 * 1234, -256)),
            [-32768, 0, 1234, -1],
        ),
        (32, 1, np.array([-(2**31), 0, 1234 << 16, 2**31 - 1], "<i4").tobytes(),
         [-32768, 0, 1234, 32767]),
        (32, 3, np.array([-1.0, 0.0, 0.5, 2.0], "<f4").tobytes(), [-32768, 0, 16384, 32767]),
        (64, 3, np.array([-0.25, 0.0, 0.25, -2.0], "<f8").tobytes(), [-8192, 0, 8192, -32768]),
    ],
)  # fmt: skip
@pytest.mark.parametrize("extensible", [False, True])
def test_other_sample_formats_are_converted(  # noqa: PLR0917 - parametrized
    tmp_path: Path, bits: int, tag: int, raw: bytes, expected: list[int], extensible: bool
) -> None:
    path = riff(tmp_path / "f.wav", raw, tag=tag, bits=bits, extensible=extensible)
    got = read_all(WavSource(path))
    assert list(got[:4]) == expected
    assert np.all(got[4:] == 0)


@pytest.mark.parametrize(
    ("rate", "freq", "target"),
    [
        (8000, 1000, 16000),
        (11025, 2000, 16000),
        (22050, 3000, 16000),
        (24000, 5000, 16000),
        (32000, 7000, 48000),
        (44100, 3000, 48000),
        (96000, 12000, 48000),
    ],
)
def test_other_rates_are_converted_and_keep_their_frequency(
    tmp_path: Path, rate: int, freq: float, target: int
) -> None:
    x = (tone(freq, rate) * 32767).astype("<i2")
    source = WavSource(riff(tmp_path / "r.wav", x.tobytes(), rate=rate))
    assert (source.sample_rate, source.file_rate) == (target, rate)
    got = read_all(source)
    assert target - 2 * (target // 50) < len(got) <= target + target // 50
    assert abs(peak_hz(got[:target], target) - freq) <= 2
    # The converted tone keeps its level (no loss in the pass band, no clipping).
    assert np.max(np.abs(got[100 : target - 100])) == pytest.approx(0.5 * 32767, rel=0.02)


def test_a_rate_can_be_asked_for(tmp_path: Path) -> None:
    x = (tone(1000, 48000) * 32767).astype("<i2")
    source = WavSource(riff(tmp_path / "r.wav", x.tobytes(), rate=48000), sample_rate=16000)
    assert source.sample_rate == 16000
    got = read_all(source)
    assert len(got) == 16000
    assert abs(peak_hz(got, 16000) - 1000) <= 1


def test_conversion_removes_what_the_new_rate_cannot_hold(tmp_path: Path) -> None:
    # 7.5 kHz and 10 kHz tones at 44.1 kHz, converted to 16 kHz: 10 kHz would alias to 6 kHz.
    x = tone(10000, 44100, amplitude=0.4) * 32767
    source = WavSource(riff(tmp_path / "r.wav", x.astype("<i2").tobytes(), rate=44100), 16000)
    got = read_all(source)
    assert np.max(np.abs(got[200:-200])) < 0.001 * 32767


def test_unknown_chunks_and_odd_sizes_are_skipped(tmp_path: Path) -> None:
    x = np.arange(320, dtype="<i2")
    junk = b"LIST" + struct.pack("<I", 5) + b"abcde" + b"\x00"  # odd size: one pad byte
    got = read_all(WavSource(riff(tmp_path / "j.wav", x.tobytes(), before_data=junk)))
    assert np.array_equal(got, x)


def test_an_unfinished_recording_is_read_to_its_end(tmp_path: Path) -> None:
    # A recorder that died before filling in the sizes leaves 0 there.
    x = np.arange(640, dtype="<i2")
    got = read_all(WavSource(riff(tmp_path / "u.wav", x.tobytes(), data_size=0)))
    assert np.array_equal(got, x)
    got = read_all(WavSource(riff(tmp_path / "v.wav", x.tobytes(), data_size=10**6)))
    assert np.array_equal(got, x)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("speech.mp3", b"ID3\x03\x00\x00\x00" + bytes(100), "speech.mp3 is not a WAV file"),
        ("e.wav", b"", "e.wav is empty"),
        ("t.wav", b"RIFF", "t.wav is not a WAV file"),
        ("n.wav", b"RIFF\x04\x00\x00\x00WAVE", "n.wav is not a valid WAV file (no data chunk)"),
        ("r.wav", b"RF64\xff\xff\xff\xffWAVE", "r.wav: RF64 (over 4 GB) WAV is not supported"),
    ],
)
def test_files_that_are_not_wav_are_refused(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(AudioFileError) as caught:
        WavSource(path)
    assert str(caught.value) == str(tmp_path / message)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tag": 6, "bits": 8}, f"f.wav: A-law WAV {NOT_PCM}"),
        ({"tag": 0x55, "bits": 0}, f"f.wav: MP3 WAV {NOT_PCM}"),
        ({"tag": 0x1234}, f"f.wav: format 0x1234 WAV {NOT_PCM}"),
        ({"tag": 3, "bits": 24}, "f.wav: 24-bit float WAV is not supported; convert it with sox"),
        ({"tag": 3, "bits": 16, "extensible": True},
         "f.wav: 16-bit float WAV is not supported; convert it with sox"),
        ({"bits": 40}, "f.wav: 40-bit PCM WAV is not supported; convert it with sox"),
        ({"channels": 0}, "f.wav is not a valid WAV file (bad channel count or rate)"),
        ({"rate": 0}, "f.wav is not a valid WAV file (bad channel count or rate)"),
    ],
)  # fmt: skip
def test_formats_we_cannot_read_are_refused_with_the_reason(
    tmp_path: Path, kwargs: dict[str, int], message: str
) -> None:
    path = riff(tmp_path / "f.wav", bytes(64), **kwargs)  # type: ignore[arg-type]
    with pytest.raises(AudioFileError) as caught:
        WavSource(path)
    assert str(caught.value) == str(tmp_path / message)
    assert isinstance(caught.value, VoipError)


def test_a_wav_without_audio_is_refused(tmp_path: Path) -> None:
    path = riff(tmp_path / "silent.wav", b"")
    with pytest.raises(AudioFileError, match=r"silent\.wav holds no audio"):
        WavSource(path)


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(AudioFileError, match=r"nothere\.wav: No such file or directory"):
        WavSource(tmp_path / "nothere.wav")


needs_sox = pytest.mark.skipif(shutil.which("sox") is None, reason="sox is not installed")


@needs_sox
def test_files_made_by_sox_are_read(tmp_path: Path) -> None:
    # sox writes WAVE_FORMAT_EXTENSIBLE for 24-bit stereo, which the stdlib wave module refuses.
    path = tmp_path / "sox.wav"
    subprocess.run(
        ["sox", "-n", "-r", "44100", "-b", "24", "-c", "2", str(path), "synth", "1", "sine", "700"],
        check=True,
    )
    source = WavSource(path)
    assert (source.file_rate, source.channels, source.sample_rate) == (44100, 2, 48000)
    got = read_all(source)
    assert abs(peak_hz(got[:48000], 48000) - 700) <= 2


@needs_sox
def test_a_law_made_by_sox_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "alaw.wav"
    subprocess.run(
        ["sox", "-n", "-r", "8000", "-e", "a-law", str(path), "synth", "0.1", "sine", "440"],
        check=True,
    )
    with pytest.raises(AudioFileError, match="A-law WAV is not supported"):
        WavSource(path)


def test_the_sink_writes_a_wav_that_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "out.wav"
    sink = WavSink(path, 16000)
    frames = [np.full(320, i * 100, dtype="<i2").tobytes() for i in range(10)]
    for frame in frames:
        sink.write_frame(frame)
    sink.close()
    sink.close()  # closing twice is harmless
    with wave.open(str(path)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 16000)
        assert w.readframes(w.getnframes()) == b"".join(frames)
    assert np.array_equal(read_all(WavSource(path)), np.frombuffer(b"".join(frames), "<i2"))


def test_the_sink_file_is_valid_after_every_frame(tmp_path: Path) -> None:
    # What a crash leaves behind: the header already counts every frame written.
    path = tmp_path / "live.wav"
    sink = WavSink(path, 48000)
    for count in (1, 2, 7):
        while sink.frames_written < count:
            sink.write_frame(bytes(1920))
        with wave.open(str(path)) as w:
            assert w.getnframes() == count * 960
    sink.close()


def test_the_sink_refuses_misuse(tmp_path: Path) -> None:
    with pytest.raises(AudioFileError, match="No such file or directory"):
        WavSink(tmp_path / "no" / "dir.wav", 16000)
    sink = WavSink(tmp_path / "x.wav", 16000)
    with pytest.raises(ValueError, match="not whole 16-bit samples"):
        sink.write_frame(b"\x00")
    sink.close()
    with pytest.raises(ValueError, match="was closed"):
        sink.write_frame(bytes(640))
