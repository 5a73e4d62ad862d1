"""Login throughput of a real login server process, and where its time goes.

    .venv/bin/python -m tools.bench.login [--clients 50] [--seconds 10]
                                          [--hash-cost interactive|min] [--json]

Starts ``voip-login-server run`` as its own process on 127.0.0.1 (free port, temporary data
directory made with ``voip-login-server init``; the first benchmark user is added with
``adduser --password-stdin``, the others straight into the account store with the same argon2id
hash, since hashing each one would only slow the set-up).  Then ``--clients`` concurrent
clients (Twisted, ``client.loginclient.LoginClient``, one identity key each, one account each)
log in back to back until ``--seconds`` have passed or ``--max-logins`` were started.

Printed: logins/s sustained, latency p50/p99, failures; the server process's CPU time per login
(from /proc/PID/stat) next to the in-process cost of the steps of a login (argon2id verify,
channel handshake, certificate signing, the certificate's database write), and this process's
own CPU per login, since the clients share the machine with the server.

The server is stopped by its PID and the temporary directory deleted, also on failure.
Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, gatherResults
from twisted.python.failure import Failure

from login_server.accounts import AccountStore, check_password, hash_password
from login_server.cli import COSTS
from overlay import certificate
from overlay.channel import ClientHandshake, server_handshake
from overlay.errors import VoipError
from overlay.identity import IdentityKey, KdfCost, read_trust_anchor

T = TypeVar("T")
PASSWORD = "benchmark password"
STEP_SAMPLES = 20
READY_WAIT_S = 20.0
STOP_WAIT_S = 10.0
LOGIN_TIMEOUT_S = 60.0


class BenchError(Exception):
    """The benchmark could not run."""


# -- the server process ------------------------------------------------------------------


def server_command() -> list[str]:
    script = Path(sys.executable).with_name("voip-login-server")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "login_server.cli"]


def run_cli(args: list[str], stdin: str | None = None) -> None:
    result = subprocess.run(
        [*server_command(), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise BenchError(f"voip-login-server {args[0]} failed: {result.stderr.strip()}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def process_cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU time of a process so far (fields 14 and 15 of /proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rpartition(")")[2].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(STOP_WAIT_S)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(STOP_WAIT_S)


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# -- in-process costs of the steps of a login ---------------------------------------------


def median_ms(step: Callable[[], object], samples: int = STEP_SAMPLES) -> float:
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def step_costs(cost: KdfCost, scratch: Path) -> dict[str, float]:
    password_hash = hash_password(PASSWORD, cost)
    ca = IdentityKey.generate()
    user = IdentityKey.generate()

    def handshake() -> None:
        client = ClientHandshake(ca.public_key)
        reply, _session = server_handshake(ca, client.hello(), 0.0)
        client.finish(reply)

    store = AccountStore.create(scratch / "steps.db")
    try:
        return {
            "argon2id_verify_ms": median_ms(lambda: check_password(password_hash, PASSWORD)),
            "handshake_ms": median_ms(handshake),
            "certificate_sign_ms": median_ms(
                lambda: certificate.issue(ca, "bench", user.public_key, serial=1, now=0.0)
            ),
            "db_record_ms": median_ms(
                lambda: store.record_certificate("bench", user.public_key, "user", 0.0, 1.0)
            ),
        }
    finally:
        store.close()


# -- the clients -------------------------------------------------------------------------


@dataclass
class Load:
    latencies: list[float] = field(default_factory=list)
    finished_at: list[float] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)
    started: int = 0


def run_on_reactor(make: Callable[[Any], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine on the global reactor until it finishes; Ctrl-C stops it."""
    from twisted.internet import reactor

    outcome: list[Any] = []

    def start() -> None:
        work = Deferred.fromCoroutine(make(reactor))
        work.addBoth(outcome.append)
        work.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run()
    if not outcome:
        raise BenchError("interrupted")
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]  # type: ignore[no-any-return]


async def wait_until_ready(reactor: Any, address: str, ca_key: bytes, server: Any) -> None:
    from client.loginclient import LoginClient

    deadline = time.monotonic() + READY_WAIT_S
    probe = LoginClient(reactor, address, ca_key, timeout=2.0)
    while True:
        if server.poll() is not None:
            raise BenchError(f"the login server exited with status {server.returncode}")
        try:
            await probe.ping()
            return
        except VoipError as exc:
            if time.monotonic() > deadline:
                raise BenchError(f"the login server did not come up: {exc}") from None
        pause: Deferred[None] = Deferred()
        reactor.callLater(0.1, pause.callback, None)
        await pause


async def drive(
    reactor: Any,
    address: str,
    ca_key: bytes,
    users: list[str],
    *,
    seconds: float,
    max_logins: int,
) -> tuple[Load, float, float]:
    """Log in back to back from every client; returns the load and its start and end times."""
    from client.loginclient import LoginClient

    load = Load()
    start = time.perf_counter()
    deadline = start + seconds

    async def one_client(username: str) -> None:
        client = LoginClient(reactor, address, ca_key, timeout=LOGIN_TIMEOUT_S)
        identity = IdentityKey.generate()
        while time.perf_counter() < deadline and load.started < max_logins:
            load.started += 1
            begun = time.perf_counter()
            try:
                await client.login(username, PASSWORD, identity)
            except VoipError as exc:
                load.failures[f"{type(exc).__name__}: {exc}"] += 1
                continue
            now = time.perf_counter()
            load.latencies.append(now - begun)
            load.finished_at.append(now)

    await gatherResults([Deferred.fromCoroutine(one_client(name)) for name in users])
    return load, start, time.perf_counter()


# -- the run -----------------------------------------------------------------------------


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def benchmark(clients: int, seconds: float, cost_name: str, max_logins: int) -> dict[str, Any]:
    cost = COSTS[cost_name]
    scratch = Path(tempfile.mkdtemp(prefix="bench-login-"))
    server: subprocess.Popen[bytes] | None = None
    log_path = scratch / "server.log"
    try:
        data = scratch / "data"
        run_cli(["init", "--data", str(data)])
        users = [f"bench{i:03d}" for i in range(clients)]
        run_cli(
            [
                "adduser",
                "--data",
                str(data),
                "--password-stdin",
                "--hash-cost",
                cost_name,
                users[0],
            ],
            stdin=PASSWORD + "\n",
        )
        store = AccountStore.open_existing(data / "accounts.db")
        try:
            password_hash = hash_password(PASSWORD, cost)
            for name in users[1:]:
                store.add(name, password_hash, time.time())
        finally:
            store.close()
        ca_key = read_trust_anchor(data / "ca.pub")

        port = free_port()
        address = f"127.0.0.1:{port}"
        with log_path.open("wb") as log:
            server = subprocess.Popen(
                [
                    *server_command(),
                    "run",
                    "--data",
                    str(data),
                    "--listen",
                    f"tcp:{port}:interface=127.0.0.1",
                    "--hash-cost",
                    cost_name,
                    "--cert-lifetime",
                    "1h",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        running = server
        # The CPU counters are read right around the load itself, not the start-up.
        cpu: dict[str, float] = {}

        async def run(reactor: Any) -> tuple[Load, float, float]:
            await wait_until_ready(reactor, address, ca_key, running)
            cpu["user"], cpu["system"] = process_cpu_seconds(running.pid)
            cpu["own"] = own_cpu_seconds()
            result = await drive(
                reactor, address, ca_key, users, seconds=seconds, max_logins=max_logins
            )
            user, system = process_cpu_seconds(running.pid)
            cpu["user"], cpu["system"] = user - cpu["user"], system - cpu["system"]
            cpu["own"] = own_cpu_seconds() - cpu["own"]
            return result

        try:
            load, start, end = run_on_reactor(run)
        except BenchError as exc:
            raise BenchError(f"{exc}\n--- server log ---\n{log_tail(log_path)}") from None
        steps = step_costs(cost, scratch)
    finally:
        if server is not None:
            stop_process(server)
        shutil.rmtree(scratch, ignore_errors=True)

    logins = len(load.latencies)
    in_window = sum(1 for t in load.finished_at if t <= start + seconds)
    per_login = 1000 / logins if logins else math.nan
    server_ms = (cpu["user"] + cpu["system"]) * per_login
    return {
        "clients": clients,
        "seconds": seconds,
        "hash_cost": {"name": cost_name, "ops": cost.ops, "mem": cost.mem},
        "logins": logins,
        "logins_per_s": in_window / seconds,
        "elapsed_s": end - start,
        "latency_p50_ms": percentile(load.latencies, 0.50) * 1000 if logins else math.nan,
        "latency_p99_ms": percentile(load.latencies, 0.99) * 1000 if logins else math.nan,
        "failures": sum(load.failures.values()),
        "failure_reasons": dict(load.failures.most_common(5)),
        "server_cpu_ms_per_login": server_ms,
        "server_system_cpu_ms_per_login": cpu["system"] * per_login,
        "server_rest_ms_per_login": server_ms - steps["argon2id_verify_ms"],
        "client_cpu_ms_per_login": cpu["own"] * per_login,
        "steps": steps,
        "cpus": os.cpu_count(),
    }


def print_table(r: dict[str, Any]) -> None:
    steps = r["steps"]
    cost = r["hash_cost"]
    server_ms = r["server_cpu_ms_per_login"]
    verify = steps["argon2id_verify_ms"]
    share = 100 * verify / server_ms if server_ms > 0 else math.nan
    system = r["server_system_cpu_ms_per_login"]
    rest = r["server_rest_ms_per_login"]
    rows = [
        ("logins completed", f"{r['logins']}"),
        ("logins/s sustained", f"{r['logins_per_s']:.1f}"),
        ("latency p50", f"{r['latency_p50_ms']:.1f} ms"),
        ("latency p99", f"{r['latency_p99_ms']:.1f} ms"),
        ("failures", f"{r['failures']}"),
        ("", ""),
        (
            "server CPU per login",
            f"{server_ms:.2f} ms   (/proc/PID/stat, {system:.2f} ms of it system)",
        ),
        ("  argon2id verify", f"{verify:.2f} ms   ({share:.0f} %; in-process median, run alone)"),
        ("  the rest", f"{rest:.2f} ms   (server CPU - verify: the steps below, Twisted,"),
        ("", " " * 11 + "logging, thread hand-off, argon2id's page faults under load)"),
        ("    handshake", f"{steps['handshake_ms']:.3f} ms   (in-process median)"),
        ("    certificate signing", f"{steps['certificate_sign_ms']:.3f} ms   (in-process median)"),
        ("    certificate DB write", f"{steps['db_record_ms']:.3f} ms   (in-process median)"),
        ("client CPU per login", f"{r['client_cpu_ms_per_login']:.2f} ms   (this process)"),
    ]
    print(
        f"login benchmark: {r['clients']} clients, {r['seconds']:g} s, hash cost {cost['name']} "
        f"(ops {cost['ops']}, mem {cost['mem'] // 1024} KiB), {r['cpus']} CPUs"
    )
    for label, value in rows:
        print(f"  {label:<26}{value}" if label or value else "")
    for reason, count in r["failure_reasons"].items():
        print(f"  failure x{count}: {reason}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.login", description=__doc__)
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients (50)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the run (10)")
    parser.add_argument("--hash-cost", choices=sorted(COSTS), default="interactive")
    parser.add_argument(
        "--max-logins", type=int, default=100_000, help="stop after starting this many"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.seconds <= 0 or args.max_logins < 1:
        parser.error("--clients, --seconds and --max-logins must be positive")
    try:
        result = benchmark(args.clients, args.seconds, args.hash_cost, args.max_logins)
    except BenchError as exc:
        print(f"bench login: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"schema_version": 1, **result}, sort_keys=True))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
