"""CPU cost of a call's media: encode + seal + open + jitter buffer + decode, and a whole call.

    .venv/bin/python -m tools.bench.media_engine [--seconds 10] [--rate 16000]
                                                 [--bitrate 24000] [--loss 0.05] [--json]

Audio: the caller's speech sample (``tools.audio.speech``, espeak-ng + sox) when those tools are
installed, else a synthetic speech-like signal (a 4 Hz-modulated sweep with noise); the output
says which.  Two measurements, both CPU time of this process (``time.process_time``):

1. Each step alone over ``--seconds`` of 20 ms frames: Opus encode, seal, open, jitter buffer
   push + pop, Opus decode; reported in microseconds per frame.
2. A whole call: two ``MediaSession``s on an injected ``Clock`` joined by an in-memory link
   (20 ms each way, ``--loss`` each way), both sending for ``--seconds``.  Reported as CPU
   seconds per call-second for both ends together and for one end, as a percentage of one core
   per end, and the number of calls' ends one core could carry.

Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from twisted.internet.task import Clock

from client.media.audio import frame_bytes
from client.media.codec import OpusDecoder, OpusEncoder
from client.media.engine import MediaSession
from client.media.jitterbuffer import JitterBuffer
from client.media.mediacrypto import MediaKeys, MediaOpener, MediaSealer, OpenedRtp
from client.media.rtp import FRAME_TICKS, OPUS_PAYLOAD_TYPE

KEYS = MediaKeys(send=bytes(range(32)), receive=bytes(range(32, 64)))
LINK_DELAY = 0.020


def synthetic(seconds: float, rate: int) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    sweep = np.sin(2 * np.pi * (200 * t + 150 * np.sin(2 * np.pi * 0.3 * t)))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)
    noise = np.random.default_rng(1).normal(0, 0.05, len(t))
    return bytes(np.round(9000 * (envelope * sweep + noise)).astype("<i2").tobytes())


def speech(seconds: float, rate: int) -> tuple[bytes, str]:
    """``seconds`` of audio (the speech sample repeated), and what it is."""
    try:
        from client.media.wavfile import WavSource
        from tools.audio.speech import caller_speech

        source = WavSource(caller_speech(rate), rate)
    except Exception as error:  # the tools are optional for a benchmark
        return synthetic(seconds, rate), f"synthetic (no speech sample: {error})"
    frames = []
    try:
        while (frame := source.read_frame()) is not None:
            frames.append(frame)
    finally:
        source.close()
    sample = b"".join(frames)
    need = int(seconds * rate) * 2
    return (sample * (need // len(sample) + 1))[:need], "espeak-ng speech"


def split(pcm: bytes, rate: int) -> list[bytes]:
    size = frame_bytes(rate)
    return [pcm[i : i + size] for i in range(0, len(pcm) - size + 1, size)]


class ListSource:
    def __init__(self, frames: list[bytes], rate: int) -> None:
        self.sample_rate = rate
        self._frames = iter(frames)

    def read_frame(self) -> bytes | None:
        return next(self._frames, None)

    def close(self) -> None:
        pass


class NullSink:
    def __init__(self, rate: int) -> None:
        self.sample_rate = rate
        self.frames = 0

    def write_frame(self, pcm: bytes) -> None:
        self.frames += 1

    def close(self) -> None:
        pass


def timed(step: Callable[[], Any]) -> tuple[float, Any]:
    start = time.process_time()
    result = step()
    return time.process_time() - start, result


def steps(frames: list[bytes], rate: int, bitrate: int) -> dict[str, float]:
    """Microseconds of CPU per 20 ms frame for each step alone."""
    encoder, decoder = OpusEncoder(rate, bitrate), OpusDecoder(rate)
    sealer, opener = MediaSealer(KEYS.send, 1), MediaOpener(KEYS.send)
    buffer = JitterBuffer()
    n = len(frames)
    cost: dict[str, float] = {}
    seconds, payloads = timed(lambda: [encoder.encode(f) for f in frames])
    cost["encode"] = seconds
    seconds, datagrams = timed(
        lambda: [
            sealer.seal_rtp(OPUS_PAYLOAD_TYPE, i * FRAME_TICKS, p) for i, p in enumerate(payloads)
        ]
    )
    cost["seal"] = seconds
    seconds, opened = timed(lambda: [opener.open(d) for d in datagrams])
    cost["open"] = seconds
    packets = [o for o in opened if isinstance(o, OpenedRtp)]

    def jitter() -> list[Any]:
        out = []
        for i, o in enumerate(packets):
            buffer.push(o.index, o.packet.header.timestamp, o.packet.payload, i * 0.02)
            out.append(buffer.pop())
        return out

    cost["jitterbuffer"], _ = timed(jitter)
    cost["decode"], _ = timed(lambda: [decoder.decode(p) for p in payloads])
    result = {name: 1e6 * value / n for name, value in cost.items()}
    result["total"] = sum(result.values())
    result["payload_bytes"] = sum(len(p) for p in payloads) / n
    return result


def whole_call(frames: list[bytes], rate: int, bitrate: int, loss: float) -> dict[str, Any]:
    clock = Clock()
    rng = random.Random(7)
    sessions: list[MediaSession] = []

    def link(to: int) -> Callable[[bytes], None]:
        def send(data: bytes) -> None:
            if rng.random() >= loss:
                clock.callLater(LINK_DELAY, sessions[to].datagram_received, data)

        return send

    for me, keys in ((0, KEYS), (1, KEYS.reversed())):
        sessions.append(
            MediaSession(
                clock,
                link(1 - me),
                keys,
                ListSource(frames, rate),
                NullSink(rate),
                encoder=OpusEncoder(rate, bitrate),
                decoder=OpusDecoder(rate),
            )
        )
    seconds = len(frames) * 0.020

    def run() -> None:
        for session in sessions:
            session.start()
        for _ in range(int(seconds / 0.010)):
            clock.advance(0.010)

    cpu, _ = timed(run)
    summaries = [session.stop() for session in sessions]
    per_end = cpu / 2 / seconds
    return {
        "audio_seconds": round(seconds, 2),
        "cpu_seconds_both_ends": round(cpu, 4),
        "cpu_per_call_second_both_ends": round(cpu / seconds, 5),
        "percent_of_a_core_per_end": round(100 * per_end, 3),
        "call_ends_per_core": int(1 / per_end) if per_end > 0 else None,
        "loss_percent_measured": round(summaries[1].loss_percent, 2),
        "fec_recovered": summaries[1].fec_recovered,
        "concealed": summaries[1].concealed,
        "send_kbps": round(summaries[0].average_send_kbps, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=int, default=16000)
    parser.add_argument("--bitrate", type=int, default=24000)
    parser.add_argument("--loss", type=float, default=0.0)
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args(argv)
    pcm, kind = speech(options.seconds, options.rate)
    frames = split(pcm, options.rate)
    per_frame = steps(frames, options.rate, options.bitrate)
    call = whole_call(frames, options.rate, options.bitrate, options.loss)
    report = {
        "audio": kind,
        "rate": options.rate,
        "bitrate": options.bitrate,
        "frames": len(frames),
        "per_frame_us": {k: round(v, 2) for k, v in per_frame.items()},
        "call": call,
    }
    if options.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{len(frames)} frames of {kind}, Opus {options.rate} Hz at {options.bitrate} bit/s")
    print("CPU per 20 ms frame (us):")
    for name, value in per_frame.items():
        print(f"  {name:14} {value:9.2f}")
    print("Whole call (two engines, in-memory link):")
    for name, value in call.items():
        print(f"  {name:32} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
