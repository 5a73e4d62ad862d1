"""The sound-device source and sink around a fake PortAudio stream.

The callbacks are called here by hand, as PortAudio's thread would; the same classes are
tested against a real sound server in tests/integration/test_audio_device.py.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from client.media import audiodevice
from client.media.audiodevice import AudioDeviceError, DeviceSink, DeviceSource, list_devices


@dataclass
class Status:
    input_overflow: bool = False
    output_underflow: bool = False


class FakeStream:
    def __init__(self) -> None:
        self.aborted = self.closed = False

    def abort(self) -> None:
        self.aborted = True

    def close(self, ignore_errors: bool = True) -> None:
        self.closed = True


@pytest.fixture
def channels(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Streams open with this many channels (mono unless a test changes it)."""
    count = [1]

    def fake_open(kind: str, device: Any, callback: Any, finished: Any) -> tuple[FakeStream, int]:
        return FakeStream(), count[0]

    monkeypatch.setattr(audiodevice, "_open", fake_open)
    return count


def block(value: int, samples: int = 960, channels: int = 1) -> bytes:
    return np.full(samples * channels, value, dtype="<i2").tobytes()


def first(frame: bytes) -> int:
    return int(np.frombuffer(frame, "<i2")[0])


def test_source_hands_out_captured_blocks_in_order(channels: list[int]) -> None:
    source = DeviceSource()
    source._callback(block(1), 960, None, Status())
    source._callback(block(2), 960, None, Status())
    assert [first(source.read_frame()), first(source.read_frame())] == [1, 2]
    assert (source.overflows, source.underflows) == (0, 0)


def test_source_returns_silence_when_nothing_was_captured(channels: list[int]) -> None:
    source = DeviceSource()
    assert source.read_frame() == bytes(1920)
    assert source.underflows == 1


def test_source_drops_the_oldest_when_the_reader_falls_behind(channels: list[int]) -> None:
    source = DeviceSource(max_queued_frames=3)
    for value in range(1, 8):
        source._callback(block(value), 960, None, Status(input_overflow=value == 1))
    # The deque keeps 5 blocks, read_frame keeps the newest 3: latency stays bounded.
    assert [first(source.read_frame()) for _ in range(3)] == [5, 6, 7]
    assert source.overflows == 2 + 2 + 1  # deque, trimming, PortAudio's flag


def test_source_converts_to_the_asked_rate_and_mixes_stereo(channels: list[int]) -> None:
    channels[0] = 2
    source = DeviceSource(sample_rate=16000)
    stereo = np.column_stack([np.full(960, 3000), np.full(960, 1000)]).astype("<i2").tobytes()
    frames = []
    for _ in range(5):
        source._callback(stereo, 960, None, Status())
        frames.append(source.read_frame())
    assert {len(f) for f in frames} == {640}
    assert np.frombuffer(frames[-1], "<i2")[-1] == 2000


def test_source_reports_a_stopped_device(channels: list[int]) -> None:
    source = DeviceSource()
    source._finished()
    with pytest.raises(AudioDeviceError, match="audio input device stopped"):
        source.read_frame()
    source.close()
    source.close()
    with pytest.raises(ValueError, match="closed"):
        source.read_frame()


def play(sink: DeviceSink, status: Status | None = None) -> bytes:
    out = bytearray(1920 * sink._channels)
    sink._callback(out, 960, None, status or Status())
    return bytes(out)


def test_sink_waits_for_a_small_prebuffer_then_plays_in_order(channels: list[int]) -> None:
    sink = DeviceSink(prebuffer_frames=2)
    sink.write_frame(block(1))
    assert play(sink) == bytes(1920)  # one frame is not enough yet
    sink.write_frame(block(2))
    assert [first(play(sink)), first(play(sink))] == [1, 2]
    assert sink.underflows == 0


def test_sink_plays_silence_when_starved_and_primes_again(channels: list[int]) -> None:
    sink = DeviceSink(prebuffer_frames=2)
    sink.write_frame(block(1))
    sink.write_frame(block(2))
    play(sink)
    play(sink)
    assert play(sink) == bytes(1920)
    assert sink.underflows == 1
    sink.write_frame(block(3))
    assert play(sink) == bytes(1920)  # priming again
    sink.write_frame(block(4))
    assert first(play(sink)) == 3
    play(sink, Status(output_underflow=True))
    assert sink.underflows == 2


def test_sink_drops_the_oldest_when_written_too_fast(channels: list[int]) -> None:
    sink = DeviceSink(max_queued_frames=3, prebuffer_frames=1)
    for value in range(1, 7):
        sink.write_frame(block(value))
    assert sink.overflows == 3
    assert [first(play(sink)) for _ in range(3)] == [4, 5, 6]


def test_sink_converts_from_the_call_rate_and_fills_stereo(channels: list[int]) -> None:
    channels[0] = 2
    sink = DeviceSink(sample_rate=16000, prebuffer_frames=1)
    for _ in range(3):
        sink.write_frame(block(1000, 320))
    out = np.frombuffer(play(sink), "<i2").reshape(-1, 2)
    assert np.array_equal(out[:, 0], out[:, 1])
    with pytest.raises(ValueError, match="is 640 bytes"):
        sink.write_frame(bytes(1920))


def fake_sounddevice(**overrides: Any) -> SimpleNamespace:
    class PortAudioError(Exception):
        pass

    def query_devices(device: Any = None, kind: str | None = None) -> Any:
        raise PortAudioError("Error querying device -1")

    module = SimpleNamespace(
        PortAudioError=PortAudioError,
        query_devices=query_devices,
        query_hostapis=lambda: [{"name": "ALSA"}],
        default=SimpleNamespace(device=[-1, -1]),
    )
    for key, value in overrides.items():
        setattr(module, key, value)
    return module


def test_no_device_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audiodevice, "_sounddevice", fake_sounddevice)
    with pytest.raises(AudioDeviceError) as caught:
        DeviceSource()
    assert str(caught.value) == "No audio input device found (is a sound server running?)"
    with pytest.raises(AudioDeviceError, match="No audio output device found"):
        DeviceSink()
    with pytest.raises(AudioDeviceError, match="No audio output device called 'usb'"):
        DeviceSink("usb")


def test_a_device_that_will_not_open_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def query_devices(device: Any = None, kind: str | None = None) -> Any:
        return {"name": "Card", "index": 3}

    module = fake_sounddevice(query_devices=query_devices)

    def refuse(**kwargs: Any) -> Any:
        raise module.PortAudioError("Device unavailable")

    module.RawInputStream = refuse
    monkeypatch.setattr(audiodevice, "_sounddevice", lambda: module)
    with pytest.raises(AudioDeviceError, match="Audio input device 'Card' could not be opened"):
        DeviceSource()


def test_list_devices_describes_each_device(monkeypatch: pytest.MonkeyPatch) -> None:
    devices = [
        {"index": 0, "name": "pulse", "hostapi": 0, "max_input_channels": 32,
         "max_output_channels": 32, "default_samplerate": 44100.0},
        {"index": 1, "name": "mic", "hostapi": 0, "max_input_channels": 1,
         "max_output_channels": 0, "default_samplerate": 48000.0},
    ]  # fmt: skip
    default = SimpleNamespace(device=[1, 0])
    module = fake_sounddevice(query_devices=lambda: devices, default=default)
    monkeypatch.setattr(audiodevice, "_sounddevice", lambda: module)
    listed = list_devices()
    assert [(d.name, d.default_input, d.default_output) for d in listed] == [
        ("pulse", False, True),
        ("mic", True, False),
    ]
    assert listed[1].to_dict()["input_channels"] == 1


def test_a_missing_sounddevice_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sounddevice", None)
    with pytest.raises(AudioDeviceError, match="sounddevice package is not installed"):
        list_devices()
