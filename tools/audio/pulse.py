"""A private PulseAudio sound server with a null sink, so tests can use a real sound device.

    .venv/bin/python -m tools.audio.pulse      # start one, print its variables, stop on Enter

What works (checked as root in a container without a sound card):

    pulseaudio --daemonize=no -n --exit-idle-time=-1 --disallow-exit
        --load=module-native-protocol-unix
        --load="module-null-sink sink_name=voiptest rate=48000 channels=1"

started as a child process with ``PULSE_RUNTIME_PATH``, ``PULSE_STATE_PATH`` and ``HOME`` in a
temporary directory of its own, and stopped by its PID.  As root pulseaudio only warns ("not
intended to be run as root") and runs; ``-D`` would fork a daemon whose PID we would have to
read back, so it runs in the foreground as our child instead.  ``-n`` skips the default
configuration (no hardware detection, no D-Bus, no X11).  The null sink throws away what is
played into it, and its monitor source ("voiptest.monitor", the default source) records what was
played: a loop from an output device back to an input device.

Clients find it through ``PULSE_SERVER`` (``env()``).  PortAudio sees it through ALSA's pulse
plugin (Debian ``libasound2-plugins``): the device named "pulse" always, and "default" too when
the server was already running when PortAudio initialised.  ``sounddevice`` initialises
PortAudio when imported, so ``reinitialise_portaudio()`` restarts it after the server started.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

SINK = "voiptest"


class PulseUnavailable(RuntimeError):
    """PulseAudio could not be started here."""


class PulseServer:
    """One private pulseaudio process with a null sink (a context manager)."""

    def __init__(self, sink: str = SINK, rate: int = 48000, channels: int = 1) -> None:
        self.sink = sink
        self.rate = rate
        self.channels = channels
        self.pid: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None

    @property
    def monitor(self) -> str:
        """The source that records what the null sink plays."""
        return f"{self.sink}.monitor"

    @property
    def socket(self) -> Path:
        assert self._dir is not None, "the server was not started"
        return self._dir / "runtime" / "native"

    def env(self) -> dict[str, str]:
        """The environment variables a client needs to reach this server."""
        return {"PULSE_SERVER": f"unix:{self.socket}"}

    def start(self, timeout: float = 10.0) -> None:
        binary = shutil.which("pulseaudio")
        if binary is None:
            raise PulseUnavailable("pulseaudio is not installed (apt-get install pulseaudio)")
        self._dir = Path(tempfile.mkdtemp(prefix="voip-pulse-"))
        runtime, state = self._dir / "runtime", self._dir / "state"
        runtime.mkdir(mode=0o700)
        state.mkdir(mode=0o700)
        env = dict(os.environ)
        env.update(
            PULSE_RUNTIME_PATH=str(runtime), PULSE_STATE_PATH=str(state), HOME=str(self._dir)
        )
        env.pop("PULSE_SERVER", None)
        log = self._dir / "pulseaudio.log"
        sink = f"module-null-sink sink_name={self.sink} rate={self.rate} channels={self.channels}"
        command = [
            binary,
            "--daemonize=no",
            "-n",
            "--exit-idle-time=-1",
            "--disallow-exit",
            f"--log-target=file:{log}",
            "--load=module-native-protocol-unix",
            f"--load={sink}",
        ]
        self._process = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.pid = self._process.pid
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self._process.poll() is not None or time.monotonic() > deadline:
                reason = self._log_tail(log)
                self.stop()
                raise PulseUnavailable(f"pulseaudio did not start: {reason}")
            time.sleep(0.05)

    def _ready(self) -> bool:
        if not self.socket.exists():
            return False
        pactl = shutil.which("pactl")
        if pactl is None:
            return True
        env = dict(os.environ, **self.env())
        done = subprocess.run(
            [pactl, "list", "short", "sinks"], check=False, env=env, capture_output=True, timeout=5
        )
        return done.returncode == 0 and self.sink.encode() in done.stdout

    @staticmethod
    def _log_tail(log: Path) -> str:
        try:
            lines = [line for line in log.read_text().splitlines() if line.startswith("E:")]
        except OSError:
            return "no log"
        return lines[-1] if lines else "no error logged"

    def stop(self) -> None:
        """Stop the server by its PID and delete its directory."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> PulseServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def reinitialise_portaudio() -> None:
    """Make an already imported ``sounddevice`` look for devices again."""
    import sounddevice

    sounddevice._terminate()
    sounddevice._initialize()


def main() -> int:
    with PulseServer() as server:
        for key, value in server.env().items():
            print(f"export {key}={value}")
        print(f"# pid {server.pid}; null sink {server.sink}, monitor {server.monitor}")
        print("# press Enter to stop", file=sys.stderr)
        sys.stdin.readline()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
