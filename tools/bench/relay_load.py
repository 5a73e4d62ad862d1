"""Relay load: N concurrent relayed voice calls through our relay and through coturn, side by side.

    .venv/bin/python -m tools.bench.relay_load [--quick] [--relay ours|coturn|both]
                                               [--calls N ...] [--seconds S] [--workers W]
                                               [--json FILE]

Each relay under test runs as its own process on 127.0.0.1, started afresh for every run: ours
(``python -m relay.cli serve``, defaults but ``--max-allocations`` and ``--allow-peers
127.0.0.0/8``) and coturn's ``turnserver`` (``tools.coturn.CoturnServer``, its defaults: no
quotas).  The same load generator drives both, and a third path, "direct", with no relay at all.

One call is two TURN allocations A and B (each its own UDP socket on 127.0.0.1 and its own user,
``client.turnclient.TurnClient``, a channel bound to the other's relayed address).  Then each side
sends 50 packets/s (one per 20 ms tick) of 100 bytes (an Opus 24 kbit/s frame + RTP header + AEAD
tag, rounded up) as ChannelData to the other's relayed address, so every packet crosses the relay
twice (client -> relay -> relayed socket -> relay -> client).  A packet carries its stream, its
sequence number and its send time (CLOCK_MONOTONIC, the same clock at the receiver).  The direct
path sends the same 104-byte datagrams socket to socket: the generator's own delay and loss under
the same load, the baseline that "added latency" is taken against.

The generator is plain sockets and ``select.epoll`` in ``--workers`` processes (default 1: this
machine has 2 cores, and the relay needs one), calls split evenly among them.  Set-up drives
``TurnClient`` on a ``task.Clock`` advanced by real time (no reactor), at most SETUP_PARALLEL calls
at once.  Sending: the 2N streams are spread evenly over each 20 ms tick; a packet is sent when
due (epoll waits at millisecond granularity, so sends bunch per millisecond) and stamped when it
is really sent, so a late generator lowers the load instead of inflating the delay.  Measured:

- relay CPU: utime + stime of the relay process (all its threads, /proc/PID/stat) over the send
  window; per call = CPU seconds / window / N, in % of one core;
- loss: packets sent vs received, counted after a DRAIN_S drain;
- delay: receive time - send time of every packet, p50 and p99 (ms); added = relay - direct;
- honesty columns: the generator's own CPU (% of one core, all workers), how late its sends
  were (p99, ms), how busy the whole machine was (cores), and the machine's UDP buffer drops
  (/proc/net/snmp, every process on the machine counts).

A relay "sustains" N when its loss is under 1 %; the steps stop for a relay at its first N with
more loss.  The largest N sustained is a grid value (the next step failed, or the cap was
reached: then shown as ">= N").  A row whose direct path itself lost 1 % or more, or whose sends
were more than a tick late (p99), is marked ``*``: the generator, not the relay, was the limit.

Every process started is stopped by its PID, also on failure, Ctrl-C or SIGTERM.  Only
127.0.0.1.  A benchmark: figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import json
import multiprocessing
import os
import re
import select
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
TICK = 0.020
PAYLOAD = 100
CHANNEL_HEADER = struct.Struct("!HH")
#: After the 4-byte header: stream number, sequence number, send time (ns, CLOCK_MONOTONIC).
STAMP = struct.Struct("!IIq")
PAD = bytes(PAYLOAD - STAMP.size)
DATAGRAM = CHANNEL_HEADER.size + PAYLOAD
QUICK_CALLS = (5, 20, 50)
QUICK_SECONDS = 10.0
FULL_CALLS = (10, 25, 50, 100, 200, 400)
FULL_SECONDS = 15.0
SUSTAINED_LOSS = 1.0
DRAIN_S = 0.5
SETUP_PARALLEL = 32
SETUP_TIMEOUT = 60.0
READY_TIMEOUT = 90.0
START_DELAY = 0.3
PATHS = ("ours", "coturn", "direct")
SECRET = "relay-load-bench-secret"
RELAYING = re.compile(r"relaying on udp (?P<host>[^\s:]+):(?P<port>\d+) ")

Address = tuple[str, int]


# -- the generator (one worker process) ------------------------------------------------------


@dataclass
class Stream:
    """One direction of one call: sent on ``sock`` to ``dest`` behind ``header``."""

    sock: socket.socket
    dest: Address
    header: bytes


def _open_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((HOST, 0))
    sock.setblocking(False)
    return sock


def _drain(sock: socket.socket) -> Iterator[tuple[bytes, Address]]:
    while True:
        try:
            data, addr = sock.recvfrom(2048)
        except (BlockingIOError, InterruptedError):
            return
        yield data, addr


def _sender(sock: socket.socket) -> Callable[[bytes, Any], None]:
    def send(data: bytes, address: Any) -> None:
        sock.sendto(data, address)

    return send


def _starter(work: Callable[[Any, Any], Any], a: Any, b: Any) -> Callable[[], Any]:
    from twisted.internet.defer import Deferred

    def start() -> Any:
        return Deferred.fromCoroutine(work(a, b))

    return start


def setup_relayed(
    server: Address, secret: str, calls: int, first: int, sockets: list[socket.socket]
) -> list[Stream]:
    """Allocate two relayed addresses per call and bind channels between them (no reactor)."""
    from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults
    from twisted.internet.task import Clock

    from client.turnclient import TurnClient
    from overlay.turn import mint_credential

    clock = Clock()
    poller = select.epoll()
    clients: dict[int, tuple[socket.socket, TurnClient]] = {}
    pairs: list[tuple[TurnClient, TurnClient]] = []
    socket_of: dict[int, socket.socket] = {}
    for call in range(first, first + calls):
        pair = []
        for side in "ab":
            sock = _open_socket()
            sockets.append(sock)
            credential = mint_credential(secret.encode(), f"load{call}{side}", time.time())
            client = TurnClient(clock, server, credential, send=_sender(sock))
            clients[sock.fileno()] = (sock, client)
            socket_of[id(client)] = sock
            poller.register(sock.fileno(), select.EPOLLIN)
            pair.append(client)
        pairs.append((pair[0], pair[1]))

    async def one_call(a: TurnClient, b: TurnClient) -> None:
        relayed = await gatherResults(
            [Deferred.fromCoroutine(a.allocate()), Deferred.fromCoroutine(b.allocate())]
        )
        await gatherResults(
            [Deferred.fromCoroutine(a.bind(relayed[1])), Deferred.fromCoroutine(b.bind(relayed[0]))]
        )

    limit = DeferredSemaphore(SETUP_PARALLEL)
    done = gatherResults(
        [limit.run(_starter(one_call, a, b)) for a, b in pairs],
        consumeErrors=True,
    )
    outcome: list[Any] = []
    done.addBoth(outcome.append)
    deadline = last = time.monotonic()
    deadline += SETUP_TIMEOUT
    try:
        while not outcome:
            for fd, _ in poller.poll(0.005):
                sock, client = clients[fd]
                for data, addr in _drain(sock):
                    client.datagram_received(data, addr)
            now = time.monotonic()
            clock.advance(now - last)
            last = now
            if now > deadline:
                raise RuntimeError(f"TURN set-up of {calls} calls took over {SETUP_TIMEOUT:g} s")
    finally:
        poller.close()
    if not isinstance(outcome[0], list):
        raise RuntimeError(f"TURN set-up failed: {outcome[0].getErrorMessage()}")
    streams = []
    for a, b in pairs:
        for me, other in ((a, b), (b, a)):
            assert other.relayed is not None
            sock = socket_of[id(me)]
            channel = me.channels[other.relayed]
            streams.append(Stream(sock, server, CHANNEL_HEADER.pack(channel, PAYLOAD)))
    return streams


def setup_direct(calls: int, sockets: list[socket.socket]) -> list[Stream]:
    """Two plain sockets per call that send to each other (a fake channel header, same size)."""
    streams = []
    header = CHANNEL_HEADER.pack(0x4000, PAYLOAD)
    for _ in range(calls):
        a, b = _open_socket(), _open_socket()
        sockets += [a, b]
        streams += [Stream(a, b.getsockname(), header), Stream(b, a.getsockname(), header)]
    return streams


@dataclass
class WorkerResult:
    sent: int = 0
    received: int = 0
    send_errors: int = 0
    bad: int = 0
    cpu_seconds: float = 0.0
    delays_ns: bytes = b""
    lateness_ns: bytes = b""


def load(streams: list[Stream], start: float, seconds: float) -> WorkerResult:
    """Send every stream's packets on schedule from ``start`` for ``seconds``; receive them all."""
    result = WorkerResult()
    n = len(streams)
    interval = TICK / n
    total = n * round(seconds / TICK)
    delays = array.array("q")
    lateness = array.array("q")
    received = [0] * n
    poller = select.epoll()
    by_fd = {}
    for stream in streams:
        by_fd[stream.sock.fileno()] = stream.sock
        poller.register(stream.sock.fileno(), select.EPOLLIN)
    monotonic, monotonic_ns, pack = time.monotonic, time.monotonic_ns, STAMP.pack
    unpack = STAMP.unpack_from
    while monotonic() < start:
        time.sleep(max(0.0, min(0.05, start - monotonic())))
    cpu_start = time.process_time()
    start_ns = int(start * 1e9)
    interval_ns = int(interval * 1e9)
    end = start + seconds + DRAIN_S
    k = 0
    try:
        while True:
            now_ns = monotonic_ns()
            while k < total and start_ns + k * interval_ns <= now_ns:
                stream = streams[k % n]
                sent_ns = monotonic_ns()
                try:
                    stream.sock.sendto(
                        stream.header + pack(k % n, k // n, sent_ns) + PAD, stream.dest
                    )
                    result.sent += 1
                    lateness.append(sent_ns - start_ns - k * interval_ns)
                except OSError:
                    result.send_errors += 1
                k += 1
            if k >= total and monotonic() >= end:
                break
            if k == total and result.cpu_seconds == 0.0:
                result.cpu_seconds = time.process_time() - cpu_start
            wait = (start_ns + k * interval_ns - monotonic_ns()) / 1e9 if k < total else 0.01
            for fd, _ in poller.poll(max(0.0, wait)):
                sock = by_fd[fd]
                while True:
                    try:
                        data = sock.recv(2048)
                    except (BlockingIOError, InterruptedError):
                        break
                    arrived = monotonic_ns()
                    if len(data) != DATAGRAM:
                        result.bad += 1
                        continue
                    index, _, sent_at = unpack(data, CHANNEL_HEADER.size)
                    if index >= n:
                        result.bad += 1
                        continue
                    received[index] += 1
                    delays.append(arrived - sent_at)
    finally:
        poller.close()
    if result.cpu_seconds == 0.0:
        result.cpu_seconds = time.process_time() - cpu_start
    result.received = sum(received)
    result.delays_ns = delays.tobytes()
    result.lateness_ns = lateness.tobytes()
    return result


def worker(conn: Connection, server: Address | None, calls: int, first: int) -> None:
    """A generator process: set up, say ready, wait for ("go", start, seconds), send the result."""
    sockets: list[socket.socket] = []
    try:
        if server is None:
            streams = setup_direct(calls, sockets)
        else:
            streams = setup_relayed(server, SECRET, calls, first, sockets)
        conn.send(("ready", len(streams)))
        if not conn.poll(READY_TIMEOUT):
            return
        _, start, seconds = conn.recv()
        conn.send(("done", asdict(load(streams, start, seconds))))
    except KeyboardInterrupt:
        pass
    except Exception as error:  # reported to the parent, which says which worker failed
        with contextlib.suppress(OSError):
            conn.send(("error", f"{type(error).__name__}: {error}"))
    finally:
        for sock in sockets:
            sock.close()
        conn.close()


# -- the relays under test -------------------------------------------------------------------


@contextlib.contextmanager
def relay_under_test(path: str, calls: int, logs: Path) -> Iterator[tuple[Address | None, int]]:
    """The relay for one run, as (its UDP address, its PID); (None, 0) for the direct path."""
    if path == "direct":
        yield None, 0
        return
    if path == "coturn":
        from tools.coturn import CoturnServer

        with CoturnServer(secret=SECRET) as coturn:
            assert coturn.process is not None
            yield coturn.udp_address, coturn.process.pid
        return
    from tools.processes import RELAY, Processes

    secret = logs / "secret"
    secret.write_text(SECRET + "\n")
    processes = Processes(logs)
    try:
        process = processes.start(
            "relay",
            RELAY,
            "serve",
            "--listen",
            f"{HOST}:0",
            "--secret-file",
            secret,
            "--allow-peers",
            "127.0.0.0/8",
            "--max-allocations",
            str(2 * calls + 16),
            ready=RELAYING,
        )
        assert process.match is not None
        yield (process.match["host"], int(process.match["port"])), process.pid
    finally:
        processes.stop_all()


# -- measuring ---------------------------------------------------------------------------------


def process_cpu(pid: int) -> float:
    """utime + stime of a process, all threads, in seconds (0.0 for no process)."""
    if not pid:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def udp_drops() -> int:
    """RcvbufErrors + SndbufErrors of the whole machine (/proc/net/snmp)."""
    lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines()]
    names, values = [line for line in lines if line[0] == "Udp:"][:2]
    table = dict(zip(names[1:], values[1:], strict=True))
    return int(table.get("RcvbufErrors", 0)) + int(table.get("SndbufErrors", 0))


def percentile(values: Sequence[int], fraction: float) -> float:
    if not values:
        return float("nan")
    return float(values[min(len(values) - 1, int(fraction * len(values)))])


@dataclass
class Run:
    path: str
    calls: int
    seconds: float
    workers: int
    sent: int = 0
    received: int = 0
    send_errors: int = 0
    loss_pct: float = 0.0
    delay_p50_ms: float = 0.0
    delay_p99_ms: float = 0.0
    relay_cpu_s: float = 0.0
    relay_cpu_pct_per_call: float = 0.0
    generator_cpu_pct: float = 0.0
    send_late_p99_ms: float = 0.0
    machine_busy_cores: float = 0.0
    udp_drops: int = 0
    generator_limited: bool = False
    notes: list[str] = field(default_factory=list)


class BenchError(Exception):
    """The benchmark could not run."""


def _expect(conn: Connection, kind: str, timeout: float, path: str) -> Any:
    """The next message of a generator, which must be ``kind``; BenchError otherwise."""
    try:
        if not conn.poll(timeout):
            raise BenchError(f"a load generator for {path} said nothing in {timeout:g} s")
        said, detail = conn.recv()
    except EOFError:
        raise BenchError(f"a load generator for {path} died") from None
    if said != kind:
        raise BenchError(f"a load generator for {path} failed: {detail}")
    return detail


def run_once(path: str, calls: int, seconds: float, workers: int, logs: Path) -> Run:
    """One run: a fresh relay, ``calls`` calls over ``workers`` generator processes."""
    workers = max(1, min(workers, calls))
    run = Run(path, calls, seconds, workers)
    context = multiprocessing.get_context("spawn")
    with relay_under_test(path, calls, logs) as (server, pid):
        started: list[tuple[Any, Connection]] = []
        try:
            first = 0
            for index in range(workers):
                share = calls // workers + (index < calls % workers)
                mine, theirs = context.Pipe()
                process = context.Process(
                    target=worker, args=(theirs, server, share, first), daemon=True
                )
                process.start()
                theirs.close()
                started.append((process, mine))
                first += share
            for _, conn in started:
                _expect(conn, "ready", READY_TIMEOUT, path)
            start = time.monotonic() + START_DELAY
            for _, conn in started:
                conn.send(("go", start, seconds))
            time.sleep(max(0.0, start - time.monotonic()))
            cpu0, machine0, drops0 = process_cpu(pid), machine_cpu(), udp_drops()
            time.sleep(max(0.0, start + seconds - time.monotonic()))
            cpu1, machine1 = process_cpu(pid), machine_cpu()
            results = []
            for _, conn in started:
                results.append(WorkerResult(**_expect(conn, "done", seconds + READY_TIMEOUT, path)))
            run.udp_drops = udp_drops() - drops0
        finally:
            for process, conn in started:
                conn.close()
                process.join(2.0)
                if process.is_alive():
                    process.terminate()  # SIGTERM to its PID
                    process.join(2.0)
                if process.is_alive():
                    process.kill()
                    process.join(2.0)
    delays: array.array[int] = array.array("q")
    late: array.array[int] = array.array("q")
    for result in results:
        run.sent += result.sent
        run.received += result.received
        run.send_errors += result.send_errors
        run.generator_cpu_pct += 100 * result.cpu_seconds / seconds
        delays.frombytes(result.delays_ns)
        late.frombytes(result.lateness_ns)
        if result.bad:
            run.notes.append(f"{result.bad} malformed datagrams")
    ordered, late_ordered = sorted(delays), sorted(late)
    run.loss_pct = 100 * (run.sent - run.received) / run.sent if run.sent else 100.0
    run.delay_p50_ms = percentile(ordered, 0.50) / 1e6
    run.delay_p99_ms = percentile(ordered, 0.99) / 1e6
    run.send_late_p99_ms = percentile(late_ordered, 0.99) / 1e6
    run.relay_cpu_s = cpu1 - cpu0
    run.relay_cpu_pct_per_call = 100 * run.relay_cpu_s / seconds / calls
    busy, total = machine1[0] - machine0[0], machine1[1] - machine0[1]
    run.machine_busy_cores = (os.cpu_count() or 1) * busy / total if total else 0.0
    if run.send_errors:
        run.notes.append(f"{run.send_errors} sends failed")
    return run


# -- the report --------------------------------------------------------------------------------


def sustained(runs: list[Run], path: str) -> tuple[int, bool]:
    """The largest N with loss under 1 %, and whether a larger N was tried and failed."""
    mine = sorted((r for r in runs if r.path == path), key=lambda r: r.calls)
    best, failed = 0, False
    for run in mine:
        if run.loss_pct < SUSTAINED_LOSS:
            best = run.calls
        else:
            failed = True
            break
    return best, failed


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def cell(run: Run | None, cpu: bool) -> str:
    if run is None:
        return " " * (31 if cpu else 22)
    mark = "*" if run.generator_limited else " "
    text = f"{run.loss_pct:6.2f} {run.delay_p50_ms:6.2f} {run.delay_p99_ms:7.2f}{mark}"
    return f"{run.relay_cpu_pct_per_call:7.3f} {text}" if cpu else text


def report(runs: list[Run], paths: Sequence[str]) -> str:
    relays = [p for p in paths if p != "direct"]
    by = {(r.path, r.calls): r for r in runs}
    lines = ["Relayed calls, 50 packets/s each way of 100 bytes; CPU in % of one core per call."]
    head1 = "      "
    head2 = " calls"
    for path in paths:
        if path == "direct":
            head1 += f" | {'direct (no relay)':^22}"
            head2 += " |  loss%    p50     p99 "
        else:
            head1 += f" | {path:^31}"
            head2 += " | cpu%/c  loss%    p50     p99 "
    if len(relays) == 2:
        head1 += " | ours/coturn"
        head2 += " |   cpu/call"
    lines += [head1, head2, "-" * len(head2)]
    for calls in sorted({r.calls for r in runs}):
        row = f"{calls:6d}"
        for path in paths:
            row += " | " + cell(by.get((path, calls)), path != "direct")
        if len(relays) == 2:
            ours, coturn = by.get(("ours", calls)), by.get(("coturn", calls))
            both = ours is not None and coturn is not None
            row += " | " + (
                f"{ratio(ours.relay_cpu_pct_per_call, coturn.relay_cpu_pct_per_call):>10}"
                if ours is not None and coturn is not None and both
                else ""
            )
        lines.append(row)
    lines += ["", "Added latency (relay - direct, ms) and the generator, per run:"]
    lines.append(
        f"{'calls':>6} {'path':7} {'+p50':>6} {'+p99':>7} {'sent':>8} {'received':>8} "
        f"{'gen cpu%':>8} {'late p99':>8} {'busy cores':>10} {'udp drops':>9}"
    )
    for run in sorted(runs, key=lambda r: (r.calls, PATHS.index(r.path))):
        direct = by.get(("direct", run.calls))
        added = (
            f"{run.delay_p50_ms - direct.delay_p50_ms:6.2f} "
            f"{run.delay_p99_ms - direct.delay_p99_ms:7.2f}"
            if direct is not None and run.path != "direct"
            else f"{'':6} {'':7}"
        )
        lines.append(
            f"{run.calls:6d} {run.path:7} {added} {run.sent:8d} {run.received:8d} "
            f"{run.generator_cpu_pct:8.1f} {run.send_late_p99_ms:8.2f} "
            f"{run.machine_busy_cores:10.2f} {run.udp_drops:9d}"
            + (f"  ({'; '.join(run.notes)})" if run.notes else "")
        )
    lines += ["", f"Largest N with under {SUSTAINED_LOSS:g} % loss (of the N tried):"]
    best: dict[str, tuple[int, bool]] = {}
    for path in relays:
        best[path] = sustained(runs, path)
        n, failed = best[path]
        lines.append(f"  {path:7} {'' if failed else '>='}{n}")
    if len(relays) == 2:
        (ours_n, ours_failed), (coturn_n, coturn_failed) = best["ours"], best["coturn"]
        bound = "" if ours_failed and coturn_failed else " (a bound: a side reached the cap)"
        lines.append(f"  ours/coturn max N: {ratio(ours_n, coturn_n)}{bound}")
        pairs = [
            (by[("ours", c)], by[("coturn", c)])
            for c in sorted({r.calls for r in runs})
            if ("ours", c) in by and ("coturn", c) in by
        ]
        if pairs:
            ours_run, coturn_run = pairs[-1]
            lines.append(
                f"  ours/coturn CPU per call at N={ours_run.calls}: "
                f"{ratio(ours_run.relay_cpu_pct_per_call, coturn_run.relay_cpu_pct_per_call)}"
            )
    if any(r.generator_limited for r in runs):
        lines.append(
            "  * the generator was the limit on this row (direct loss >= 1 % or sends over a "
            "tick late): the relay's figures there are a bound, not its own."
        )
    lines.append(
        f"The generator shares this machine's {os.cpu_count()} cores with the relay; "
        "'gen cpu%' is its own CPU (all workers, % of one core)."
    )
    return "\n".join(lines)


def mark_generator_limits(runs: list[Run]) -> None:
    direct = {r.calls: r for r in runs if r.path == "direct"}
    for run in runs:
        baseline = direct.get(run.calls)
        run.generator_limited = run.send_late_p99_ms > TICK * 1000 or (
            baseline is not None and baseline.loss_pct >= SUSTAINED_LOSS
        )


def benchmark(
    paths: Sequence[str], steps: Sequence[int], seconds: float, workers: int, logs: Path
) -> list[Run]:
    """Every path at every step, a path leaving the steps after its first N with >= 1 % loss."""
    runs: list[Run] = []
    active = list(paths)
    for calls in steps:
        relays_left = [p for p in active if p != "direct"]
        if not relays_left and "direct" in paths and len(paths) > 1:
            break
        for path in list(active):
            print(f"{path}: {calls} calls for {seconds:g} s...", file=sys.stderr, flush=True)
            run = run_once(path, calls, seconds, workers, logs)
            runs.append(run)
            if path != "direct" and run.loss_pct >= SUSTAINED_LOSS:
                active.remove(path)
    mark_generator_limits(runs)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 5, 20, 50 for 10 s each")
    parser.add_argument("--relay", choices=("ours", "coturn", "both"), default="both")
    parser.add_argument("--calls", type=int, nargs="+", help="the N to try, in order")
    parser.add_argument("--seconds", type=float, help="length of each run (quick 10, full 15)")
    parser.add_argument("--workers", type=int, default=1, help="generator processes (1)")
    parser.add_argument("--no-direct", action="store_true", help="skip the direct baseline")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures here")
    args = parser.parse_args(argv)
    steps = args.calls or (QUICK_CALLS if args.quick else FULL_CALLS)
    if any(n < 1 for n in steps) or args.workers < 1:
        parser.error("--calls and --workers must be at least 1")
    seconds = args.seconds or (QUICK_SECONDS if args.quick else FULL_SECONDS)
    paths = [p for p in ("ours", "coturn") if args.relay in (p, "both")]
    if not args.no_direct:
        paths.append("direct")
    if "coturn" in paths:
        from tools.coturn import turnserver_installed

        if not turnserver_installed():
            print("turnserver (coturn) is not installed; measuring ours only.", file=sys.stderr)
            paths.remove("coturn")
    from tools.netlab.lab import signals_interrupt

    try:
        with signals_interrupt(), tempfile.TemporaryDirectory(prefix="relay-load-") as logs:
            runs = benchmark(paths, steps, seconds, args.workers, Path(logs))
    except KeyboardInterrupt:
        print("Interrupted; every process was stopped.", file=sys.stderr)
        return 130
    except BenchError as error:
        print(f"relay_load: {error}", file=sys.stderr)
        return 1
    print(report(runs, paths))
    if args.json is not None:
        document = {
            "schema_version": 1,
            "packets_per_second": round(1 / TICK),
            "payload_bytes": PAYLOAD,
            "cores": os.cpu_count(),
            "runs": [asdict(r) for r in runs],
            "sustained": {p: sustained(runs, p)[0] for p in paths if p != "direct"},
        }
        args.json.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
