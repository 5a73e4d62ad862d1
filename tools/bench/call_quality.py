"""Call quality through the NAT lab under link impairments, beside Opus alone as the ceiling.

    sudo .venv/bin/python -m tools.bench.call_quality [--seconds 8] [--profile NAME ...] [--json]

Real programs on a real (namespaced) network: a login server and a supernode on public hosts,
users ``alice`` (203.0.113.12) and ``bob`` (198.51.100.12) on two more public hosts, so the call
takes the simplest real path (direct, host to host, across the lab's "internet" bridge).  For
each profile alice's link is impaired in both directions (UDP only: the media, not the
supernode's TCP link) and alice calls bob for ``--seconds``; both send speech (espeak-ng) and
record what they hear.  Profiles (each way):

    clean        nothing
    jitter-20ms  delay 20 ms +- 20 ms (uniform 0-40 ms; jitter reorders packets, as netem's does)
    loss-3       3 % independent loss
    loss-10      10 % independent loss
    burst-10     10 % loss in bursts of 3 packets on average (Gilbert model, tools.netlab.burstloss)

This kernel has no ``tc netem`` (docs/netlab.md), so impairments are the lab's NFQUEUE
impairer (``tools.netlab.impair``), one process per direction so that each direction has its
own bursts.  Reported per profile:

- PESQ-WB each way (``tools.audio.quality``), and "Opus alone": the same speech through
  ``OpusEncoder`` -> ``OpusDecoder`` with no network, the ceiling a call can reach; on a lossy
  row also Opus alone with that profile's losses (same model), FEC planned for the loss and
  used wherever the next packet arrived: what the codec could do, to compare the call with;
- the loss each side measured, and packets its FEC recovered;
- mouth-to-ear latency: the cross-correlation delay of what was heard against what was sent.
  Each side's recording starts when its own media starts, so one direction's figure is off by
  the difference of the two start times and the other's by the same amount the other way; their
  mean is the one-way latency (frame clock + network + jitter buffer; a WAV file has no sound
  card buffers);
- CPU per call: CPU seconds each ``voipd`` used (``/proc/PID/stat``) from placing the call to
  its end, divided by the call's duration, as a percentage of one core (set-up included).

A benchmark: figures are printed, never asserted.  Needs root (namespaces, netfilter); says so
and exits 2 otherwise.  Every process is stopped by PID and every namespace removed, also on
failure or Ctrl-C/SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tools.netlab.burstloss import GilbertLoss
from tools.netlab.calls import CallLab, CallLabError, CallRecord
from tools.netlab.command import CommandFailed, LabError, in_ns, run
from tools.netlab.lab import Lab, preflight, signals_interrupt
from tools.netlab.nat import IPTABLES
from tools.netlab.scenario import WAN, Host, Link, Scenario
from tools.processes import Processes, ProcessFailure

ALICE, BOB = "alice", "bob"
SCENARIO = Scenario(
    "call-bench",
    "login server, one supernode and two users, all public",
    hosts=(
        Host("login", Link(WAN, "203.0.113.10")),
        Host("sn", Link(WAN, "203.0.113.11")),
        Host(ALICE, Link(WAN, "203.0.113.12")),
        Host(BOB, Link(WAN, "198.51.100.12")),
    ),
)
#: NFQUEUE numbers of the impaired link's two directions (queues are per namespace).
QUEUES = {"POSTROUTING": ("-o", 7), "PREROUTING": ("-i", 8)}
READY_S = 10.0


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_pct: float = 0.0
    #: Mean loss burst in packets; None: independent losses.
    burst: float | None = None

    @property
    def active(self) -> bool:
        return bool(self.delay_ms or self.jitter_ms or self.loss_pct)

    def impairer(self, queue: int, seed: int) -> list[str]:
        common = ["--queue", str(queue), "--delay-ms", f"{self.delay_ms:g}"]
        common += ["--jitter-ms", f"{self.jitter_ms:g}", "--seed", str(seed)]
        if self.burst is None:
            return Lab.python("tools.netlab.impair", *common, "--loss-pct", f"{self.loss_pct:g}")
        return Lab.python(
            "tools.netlab.burstloss",
            *common,
            "--loss-pct",
            f"{self.loss_pct:g}",
            "--burst",
            f"{self.burst:g}",
        )


PROFILES = (
    Profile("clean", "none"),
    Profile("jitter-20ms", "delay 20+-20 ms", delay_ms=20.0, jitter_ms=20.0),
    Profile("loss-3", "3% loss", loss_pct=3.0),
    Profile("loss-10", "10% loss", loss_pct=10.0),
    Profile("burst-10", "10% loss, bursts of 3", loss_pct=10.0, burst=3.0),
)


@contextlib.contextmanager
def impaired(lab: Lab, node: str, profile: Profile, seed: int) -> Iterator[None]:
    """``node``'s uplink impaired as ``profile`` says, both directions, until the block ends."""
    if not profile.active:
        yield
        return
    ns = lab.namespace(node)
    procs: list[subprocess.Popen[str]] = []
    rules: list[tuple[str, ...]] = []
    try:
        for number, (chain, (flag, queue)) in enumerate(QUEUES.items()):
            proc = lab.spawn(node, profile.impairer(queue, seed + number))
            procs.append(proc)
            assert proc.stdout is not None
            readable, _, _ = select.select([proc.stdout], [], [], READY_S)
            if not readable or proc.stdout.readline().strip() != "ready":
                error = proc.stderr.read() if proc.poll() is not None and proc.stderr else ""
                raise LabError(f"impairer for {chain} in {ns} did not start: {error.strip()}")
            rule = (chain, flag, "eth0", "-p", "udp", "-j", "NFQUEUE", "--queue-num", str(queue))
            run(in_ns(ns, IPTABLES, "-w", "-t", "mangle", "-A", *rule))
            rules.append(rule)
        yield
    finally:
        for added in rules:
            run(in_ns(ns, IPTABLES, "-w", "-t", "mangle", "-D", *added), check=False)
        for proc in procs:
            lab.stop(proc)


def load(path: Path, seconds: float | None = None) -> Any:
    from tools.audio.quality import SAMPLE_RATE, load_wav

    samples = load_wav(path)
    return samples if seconds is None else samples[: int(seconds * SAMPLE_RATE)]


def _loss_model(profile: Profile | None, seed: int) -> Callable[[], bool]:
    """``lost()`` per packet, drawn as the profile's impairer draws (independent or bursts)."""
    rng = random.Random(seed)
    if profile is None or not profile.loss_pct:
        return lambda: False
    if profile.burst is not None:
        return GilbertLoss(profile.loss_pct / 100, profile.burst, rng).lost
    probability = profile.loss_pct / 100
    return lambda: rng.random() < probability


def opus_alone(
    speech: Path, seconds: float, profile: Profile | None = None, seed: int = 1
) -> dict[str, float]:
    """PESQ-WB of ``seconds`` of ``speech`` through Opus and back with no network, and the CPU
    encoding and decoding took (percent of one core, in real time).

    With a lossy ``profile``: packets are lost as its impairer would lose them, the encoder
    plans FEC for that loss (where a call's engine converges) and every loss whose next packet
    arrived is rebuilt from FEC, else concealed: what the codec alone can do on that link.
    """
    import numpy as np

    from client.media.audio import frame_bytes
    from client.media.codec import OpusDecoder, OpusEncoder
    from tools.audio.quality import SAMPLE_RATE, pesq_wb_signals

    reference = load(speech, seconds)
    pcm = reference.astype("<i2").tobytes()
    size = frame_bytes(SAMPLE_RATE)
    frames = [pcm[i : i + size] for i in range(0, len(pcm) - size + 1, size)]
    encoder, decoder = OpusEncoder(SAMPLE_RATE), OpusDecoder(SAMPLE_RATE)
    if profile is not None and profile.loss_pct:
        encoder.set_expected_loss(round(profile.loss_pct))
    lost = _loss_model(profile, seed)
    started = time.process_time()
    packets = [encoder.encode(frame) for frame in frames]
    encoded = time.process_time()
    arrived = [None if lost() else packet for packet in packets]
    out = []
    for index, packet in enumerate(arrived):
        following = arrived[index + 1] if index + 1 < len(arrived) else None
        if packet is not None:
            out.append(decoder.decode(packet))
        elif following is not None:
            out.append(decoder.decode_fec(following))
        else:
            out.append(decoder.conceal())
    done = time.process_time()
    heard = np.frombuffer(b"".join(out), dtype="<i2").astype(np.float64)
    real_time = len(frames) * 0.020
    return {
        "pesq": pesq_wb_signals(reference, heard),
        "encode_cpu_percent": 100.0 * (encoded - started) / real_time,
        "decode_cpu_percent": 100.0 * (done - encoded) / real_time,
    }


def measure(record: CallRecord, alice_says: Path, bob_says: Path) -> dict[str, Any]:
    """The figures of one call (see the module docstring)."""
    from tools.audio.quality import align, pesq_wb_signals

    sent = {ALICE: load(alice_says), BOB: load(bob_says)}
    heard = {BOB: load(record.callee_heard), ALICE: load(record.caller_heard)}
    summaries = {ALICE: record.caller_summary, BOB: record.callee_summary}
    result: dict[str, Any] = {"path": (record.caller_summary.get("path") or {}).get("kind")}
    pesq: dict[str, float | None] = {}
    delays = []
    for speaker, listener in ((ALICE, BOB), (BOB, ALICE)):
        direction = f"{speaker}_to_{listener}"
        try:
            pesq[direction] = pesq_wb_signals(sent[speaker], heard[listener])
        except ValueError as exc:  # e.g. nothing heard at all
            pesq[direction] = None
            result.setdefault("errors", []).append(f"{direction}: {exc}")
        delays.append(align(sent[speaker], heard[listener]))
    result["pesq"] = pesq
    result["mouth_to_ear_ms"] = sum(delays) / 2
    media = {side: summaries[side].get("media") or {} for side in (ALICE, BOB)}
    result["loss_percent"] = {  # what the listener measured
        f"{ALICE}_to_{BOB}": media[BOB].get("loss_percent"),
        f"{BOB}_to_{ALICE}": media[ALICE].get("loss_percent"),
    }
    result["fec_recovered"] = {side: media[side].get("fec_recovered") for side in (ALICE, BOB)}
    result["concealed"] = {side: media[side].get("concealed") for side in (ALICE, BOB)}
    duration = float(record.caller_summary.get("duration") or record.wall_seconds)
    result["duration_s"] = duration
    result["cpu_percent"] = {side: 100.0 * record.cpu[side] / duration for side in (ALICE, BOB)}
    return result


def run_bench(
    profiles: list[Profile], seconds: float, seed: int, keep: bool = False
) -> dict[str, Any]:
    from tools.audio.speech import callee_speech, caller_speech

    alice_says, bob_says = caller_speech(16000), callee_speech(16000)
    report: dict[str, Any] = {
        "schema_version": 1,
        "seconds": seconds,
        "network": f"{ALICE} {SCENARIO.node(ALICE).link.address} <-> {BOB} "
        f"{SCENARIO.node(BOB).link.address}, both public; {ALICE}'s link impaired (UDP)",
        "opus_alone": {
            f"{ALICE}_to_{BOB}": opus_alone(alice_says, seconds),
            f"{BOB}_to_{ALICE}": opus_alone(bob_says, seconds),
        },
        "profiles": [],
    }
    workdir = Path(tempfile.mkdtemp(dir="/tmp", prefix="vq-"))
    try:
        with signals_interrupt(), Lab(SCENARIO) as lab:
            processes = Processes(workdir / "logs")
            try:
                calls = CallLab(lab, processes, workdir)
                calls.start_login_server("login", "--min-supernodes", "1")
                calls.start_supernodes(["sn"])
                calls.start_users([ALICE, BOB])
                for profile in profiles:
                    with impaired(lab, ALICE, profile, seed):
                        calls.wait_findable([(ALICE, BOB), (BOB, ALICE)])
                        record = calls.call(
                            ALICE, BOB, seconds=seconds, caller_wav=alice_says,
                            callee_wav=bob_says, label=profile.name,
                        )  # fmt: skip
                    figures = measure(record, alice_says, bob_says)
                    figures.update(name=profile.name, impairment=profile.description)
                    figures["opus_alone_same_loss"] = {
                        f"{ALICE}_to_{BOB}": opus_alone(alice_says, seconds, profile, seed)["pesq"],
                        f"{BOB}_to_{ALICE}": opus_alone(bob_says, seconds, profile, seed)["pesq"],
                    }
                    report["profiles"].append(figures)
                    print(f"call_quality: {profile.name} done", file=sys.stderr)
            finally:
                processes.stop_all()
    finally:
        if keep:
            print(f"call_quality: recordings and logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return report


def _f(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def table(report: dict[str, Any]) -> str:
    a2b, b2a = f"{ALICE}_to_{BOB}", f"{BOB}_to_{ALICE}"
    head = (
        f"{'profile':<12} {'impairment (each way)':<22} {'PESQ a>b':>8} {'PESQ b>a':>8} "
        f"{'Opus alone':>10} {'loss a>b':>8} {'loss b>a':>8} {'FEC a/b':>7} {'m2e ms':>6} "
        f"{'CPU alice':>9} {'CPU bob':>8}  path"
    )
    opus = report["opus_alone"]
    # A side encodes what it says and decodes what it hears.
    opus_cpu = {
        ALICE: opus[a2b]["encode_cpu_percent"] + opus[b2a]["decode_cpu_percent"],
        BOB: opus[b2a]["encode_cpu_percent"] + opus[a2b]["decode_cpu_percent"],
    }
    ceiling = f"{opus[a2b]['pesq']:.2f}/{opus[b2a]['pesq']:.2f}"
    lines = [
        f"Call quality: {report['network']}; {report['seconds']:g} s calls, Opus 16 kHz.",
        head,
        f"{'Opus alone':<12} {'no network':<22} {opus[a2b]['pesq']:>8.2f} "
        f"{opus[b2a]['pesq']:>8.2f} {ceiling:>10} {'-':>8} {'-':>8} {'-':>7} {'-':>6} "
        f"{opus_cpu[ALICE]:>8.1f}% {opus_cpu[BOB]:>7.1f}%  (encode + decode only)",
    ]
    for p in report["profiles"]:
        fec = f"{p['fec_recovered'][ALICE]}/{p['fec_recovered'][BOB]}"
        same = p["opus_alone_same_loss"]
        lines.append(
            f"{p['name']:<12} {p['impairment']:<22} {_f(p['pesq'][a2b], '>8.2f')} "
            f"{_f(p['pesq'][b2a], '>8.2f')} {f'{same[a2b]:.2f}/{same[b2a]:.2f}':>10} "
            f"{_f(p['loss_percent'][a2b], '>7.1f', '%')} "
            f"{_f(p['loss_percent'][b2a], '>7.1f', '%')} {fec:>7} "
            f"{p['mouth_to_ear_ms']:>6.0f} {p['cpu_percent'][ALICE]:>8.1f}% "
            f"{p['cpu_percent'][BOB]:>7.1f}%  {p['path']}"
        )
    lines += [
        "Opus alone: encode -> decode without a network (a>b/b>a); on an impaired row, with the "
        "profile's loss drawn the same way, FEC planned for it and used for every loss it can.",
        "loss: measured by the listener; FEC: frames rebuilt from in-band FEC at alice/bob; "
        "m2e: mouth-to-ear, one way (no sound card); CPU: each voipd per call, % of one core.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench.call_quality",
        description="Call quality through the NAT lab under link impairments (needs root).",
    )
    names = [p.name for p in PROFILES]
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each call (8)")
    parser.add_argument(
        "--profile", action="append", choices=names, help="run only these (default: all)"
    )
    parser.add_argument("--seed", type=int, default=1, help="impairers' random seed (1)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument(
        "--keep", action="store_true", help="keep the recordings and daemon logs (prints where)"
    )
    args = parser.parse_args(argv)
    problems = preflight()
    if problems:
        print(f"call_quality: cannot run: {'; '.join(problems)}", file=sys.stderr)
        return 2
    profiles = [p for p in PROFILES if not args.profile or p.name in args.profile]
    try:
        report = run_bench(profiles, args.seconds, args.seed, args.keep)
    except (LabError, CommandFailed, CallLabError, ProcessFailure) as exc:
        print(f"call_quality: {str(exc).splitlines()[0]}", file=sys.stderr)
        if not isinstance(exc, LabError):
            print(str(exc), file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2) if args.json else table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
