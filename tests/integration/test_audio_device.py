"""The real sound-device path: PortAudio -> ALSA -> a private PulseAudio server's null sink.

``DeviceSink`` plays a tone into the null sink, ``DeviceSource`` records the sink's monitor, both
driven by the Twisted reactor every 20 ms as a call drives them.  The server is started by
``tools.audio.pulse`` (its own runtime directory, stopped by PID); the test is skipped, with the
reason, only when pulseaudio cannot start on this machine.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest
import pytest_twisted

from client.media.audio import ToneSource
from client.media.audiodevice import AudioDeviceError, DeviceSink, DeviceSource, list_devices
from tools.audio.pulse import PulseServer, PulseUnavailable, reinitialise_portaudio

pytestmark = pytest.mark.integration

#: How long to wait for the null sink to start moving audio (it can take about 2 s).
MAX_TICKS = 500


@pytest.fixture
def pulse(monkeypatch: pytest.MonkeyPatch) -> Iterator[PulseServer]:
    server = PulseServer()
    try:
        server.start()
    except PulseUnavailable as e:
        pytest.skip(f"PulseAudio cannot start here: {e}")
    try:
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        reinitialise_portaudio()
        yield server
    finally:
        server.stop()
        monkeypatch.undo()
        reinitialise_portaudio()


def loudness(frame: bytes) -> float:
    x = np.frombuffer(frame, "<i2").astype(np.float64)
    return float(np.sqrt(np.mean(x**2)))


def peak_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * rate / len(x))


def test_the_sound_server_is_listed(pulse: PulseServer) -> None:
    devices = list_devices()
    names = [d.name for d in devices]
    assert "pulse" in names
    assert any(d.default_input for d in devices)
    assert any(d.default_output for d in devices)


@pytest_twisted.ensureDeferred
async def test_a_tone_played_on_the_device_is_recorded_from_its_monitor(
    pulse: PulseServer,
) -> None:
    from twisted.internet import reactor, task

    sink = DeviceSink(sample_rate=16000)
    source = DeviceSource(sample_rate=16000)
    tone = ToneSource(1000.0, 16000, amplitude=0.3)
    recorded: list[bytes] = []
    loud: list[bytes] = []

    def tick() -> None:
        sink.write_frame(tone.read_frame() or b"")
        frame = source.read_frame()
        recorded.append(frame)
        if loudness(frame) > 1000:
            loud.append(frame)
        if len(loud) >= 50 or len(recorded) >= MAX_TICKS:
            loop.stop()

    loop = task.LoopingCall(tick)
    loop.clock = reactor
    try:
        await loop.start(0.02)
    finally:
        sink.close()
        source.close()
    assert len(loud) >= 50, f"only {len(loud)} of {len(recorded)} recorded frames held the tone"
    heard = np.frombuffer(b"".join(loud[-50:]), "<i2").astype(np.float64)
    assert abs(peak_hz(heard, 16000) - 1000.0) <= 10
    # The null sink passes the level through: about 0.3 of full scale, give or take a glitch.
    assert np.percentile(np.abs(heard), 99) == pytest.approx(0.3 * 32767, rel=0.1)


@pytest.fixture
def no_sound_server(monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str]) -> Iterator[None]:
    monkeypatch.setenv("PULSE_SERVER", f"unix:{tmp_path}/no-such-server")
    reinitialise_portaudio()
    try:
        yield
    finally:
        monkeypatch.undo()
        reinitialise_portaudio()


def test_without_a_sound_server_the_error_says_so(no_sound_server: None) -> None:
    if list_devices():
        pytest.skip("this machine has audio devices of its own")
    with pytest.raises(AudioDeviceError) as caught:
        DeviceSource()
    assert str(caught.value) == "No audio input device found (is a sound server running?)"
    with pytest.raises(AudioDeviceError, match="No audio output device found"):
        DeviceSink()
