"""Relayed calls between real voipd processes on 127.0.0.1, with real relays.

Loopback has no NAT, so these calls are made relayed by ``--relay-only`` (a real option: the
peer then never learns your address).  The NAT lab (tests/nat/test_relay_matrix.py) relays
where NATs leave no other way.

- through the relay that runs inside the supernode;
- through coturn's ``turnserver``, configured by the caller with ``--relay`` (use-auth-secret
  credentials minted by our client from the shared secret): any standard TURN server works;
- through two standalone ``voip-relay`` processes, the primary killed mid-call: the media moves
  to the backup within 3 s.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_call import speech_files
from tests.integration.test_overlay_cli import ctl, log_in, node, status, wait_for
from tools.processes import RELAY, VOIPCTL, DaemonProcess, Process, Processes, start_login_server

pytestmark = pytest.mark.integration

CALL_SECONDS = 5.0
RELAY_READY = re.compile(r"relaying on udp (?P<host>[\d.]+):(?P<port>\d+) ")
VOLUNTEER = (
    "--allow-supernode", "--min-uptime", "0.5", "--heartbeat", "2", "--max-load", "1000",
)  # fmt: skip


def _overlay(
    processes: Processes,
    login_data: Path,
    short_dir: Any,
    *,
    sn_options: tuple[str, ...],
    alice_options: tuple[str, ...],
    bob_options: tuple[str, ...] = (),
    servers: list[Any] | None = None,
) -> tuple[DaemonProcess, DaemonProcess, DaemonProcess]:
    server = start_login_server(processes, login_data, "--min-supernodes", "1")
    if servers is not None:
        servers.append(server)
    sn = node(processes, short_dir() / "sn", server, *VOLUNTEER, *sn_options)
    wait_for(lambda: status(sn)["supernode"].get("active"), "the volunteer becoming a supernode")
    alice = node(processes, short_dir() / "alice", server, *alice_options)
    bob = node(processes, short_dir() / "bob", server, *bob_options)
    log_in(alice, "alice")
    log_in(bob, "bob")
    for daemon in (alice, bob):
        wait_for(lambda d=daemon: status(d)["overlay"]["published_replicas"] > 0, "publishing")
    wait_for(lambda: "is online" in ctl(alice, "search", "bob")[1], "bob being findable")
    return sn, alice, bob


def _call(
    processes: Processes, alice: DaemonProcess, bob: DaemonProcess, out: Path, seconds: float
) -> tuple[Process, Process, Path, Path]:
    alice_says, bob_says = speech_files()
    alice_heard, bob_heard = out / "alice-heard.wav", out / "bob-heard.wav"
    answering = processes.start(
        "answer", VOIPCTL, "--socket", bob.socket, "answer", "--wait", "30",
        "--play", str(bob_says), "--record", str(bob_heard), "--json",
    )  # fmt: skip
    calling = processes.start(
        "call", VOIPCTL, "--socket", alice.socket, "call", "bob",
        "--play", str(alice_says), "--record", str(alice_heard),
        "--duration", str(seconds), "--json",
    )  # fmt: skip
    return calling, answering, alice_heard, bob_heard


def _finish(calling: Process, answering: Process, seconds: float) -> tuple[dict, dict]:
    assert calling.wait_exit(seconds + 30) == 0, calling.describe()
    assert answering.wait_exit(20) == 0, answering.describe()
    return json.loads(calling.stdout), json.loads(answering.stdout)


def _pesq(alice_heard: Path, bob_heard: Path) -> tuple[float, float]:
    quality = pytest.importorskip("tools.audio.quality")
    alice_says, bob_says = speech_files()
    return quality.pesq_wb(alice_says, bob_heard), quality.pesq_wb(bob_says, alice_heard)


def _secret_file(directory: Path, secret: str) -> Path:
    path = directory / "relay-secret"
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return path


def test_a_relay_only_call_goes_through_the_supernodes_relay(
    processes: Processes, login_data: Path, short_dir: Any
) -> None:
    sn, alice, bob = _overlay(
        processes,
        login_data,
        short_dir,
        sn_options=("--relay-allow-peers", "127.0.0.0/8"),
        alice_options=("--relay-only",),
    )
    calling, answering, alice_heard, bob_heard = _call(
        processes, alice, bob, short_dir(), CALL_SECONDS
    )
    wait_for(lambda: "In a call with bob" in ctl(alice, "status")[1], "the call being up")
    _code, text, _ = ctl(alice, "status")
    assert "relay 127.0.0.1:" in text and "Why: " in text, text
    relay = status(sn)["supernode"]["relay"]
    assert relay["allocations"] >= 2, relay  # one per side (and a backup when offered)
    mine, theirs = _finish(calling, answering, CALL_SECONDS)
    for summary in (mine, theirs):
        assert summary["outcome"] == "completed", summary
        assert summary["path"]["kind"].startswith("relay 127.0.0.1:"), summary["path"]
        assert summary["path"]["kind"].endswith("(UDP)"), summary["path"]
        assert "relay only" in summary["path"]["why"], summary["path"]
    assert mine["path"]["relay_server"] == theirs["path"]["relay_server"]
    assert mine["path"]["why"] == theirs["path"]["why"]  # the same on both ends
    # Both relayed addresses belong to the relay, neither to the other side.
    assert mine["path"]["remote"] == theirs["path"]["relayed"]
    to_bob, to_alice = _pesq(alice_heard, bob_heard)
    print(f"\nthrough the supernode's relay: PESQ-WB {to_bob:.2f} / {to_alice:.2f}")
    assert to_bob >= 3.5 and to_alice >= 3.5


def test_a_call_goes_through_coturn_as_the_callers_relay(
    processes: Processes, login_data: Path, short_dir: Any
) -> None:
    coturn_module = pytest.importorskip("tools.coturn")
    if not coturn_module.turnserver_installed():
        pytest.skip("coturn's turnserver is not installed (tools/setup-env installs it)")
    with coturn_module.CoturnServer() as coturn:
        host, port = coturn.udp_address
        secret = _secret_file(short_dir(), coturn.secret)
        uri = f"turn:{host}:{port}"
        _sn, alice, bob = _overlay(
            processes,
            login_data,
            short_dir,
            sn_options=("--no-relay",),  # coturn is the only relay there is
            alice_options=("--relay-only", "--relay", uri, "--relay-secret-file", str(secret)),
        )
        calling, answering, alice_heard, bob_heard = _call(
            processes, alice, bob, short_dir(), CALL_SECONDS
        )
        mine, theirs = _finish(calling, answering, CALL_SECONDS)
    for summary in (mine, theirs):
        assert summary["outcome"] == "completed", summary
        assert summary["path"]["relay_server"] == f"{host}:{port}", summary["path"]
    to_bob, to_alice = _pesq(alice_heard, bob_heard)
    print(f"\nthrough coturn: PESQ-WB {to_bob:.2f} / {to_alice:.2f}")
    assert to_bob >= 3.5 and to_alice >= 3.5


def _start_relay(processes: Processes, name: str, secret: Path) -> tuple[Process, str]:
    process = processes.start(
        name, RELAY, "serve", "--listen", "127.0.0.1:0", "--secret-file", str(secret),
        "--allow-peers", "127.0.0.0/8",
    )  # fmt: skip
    match = process.wait_ready(RELAY_READY)
    return process, f"{match['host']}:{match['port']}"


def test_a_relay_killed_mid_call_is_replaced_within_3_s(
    processes: Processes, login_data: Path, short_dir: Any
) -> None:
    first = _secret_file(short_dir(), "first-relay-secret")
    second = _secret_file(short_dir(), "second-relay-secret")
    relays: dict[str, Process] = {}
    for name, secret in (("relay-1", first), ("relay-2", second)):
        process, address = _start_relay(processes, name, secret)
        relays[address] = process
    one, two = relays
    _sn, alice, bob = _overlay(
        processes,
        login_data,
        short_dir,
        sn_options=("--no-relay",),
        alice_options=("--relay-only", "--relay", f"turn:{one}", "--relay-secret-file", str(first)),
        bob_options=("--relay", f"turn:{two}", "--relay-secret-file", str(second)),
    )
    seconds = 9.0
    calling, answering, _, _ = _call(processes, alice, bob, short_dir(), seconds)
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            code, out, _ = ctl(bob, "status", "--json")
            call = (json.loads(out).get("call") or {}) if code == 0 else {}
            received = (call.get("media") or {}).get("packets_received", 0)
            samples.append((time.monotonic(), int(received)))
            stop.wait(0.1)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        used: list[str] = []

        def relayed() -> bool:
            call = status(alice).get("call") or {}
            server = (call.get("path") or {}).get("relay_server")
            flowing = ((call.get("media") or {}).get("packets_received") or 0) > 50
            if server and flowing:
                used.append(server)
            return bool(used)

        wait_for(relayed, "the call flowing through a relay")
        killed_at = time.monotonic()
        relays[used[0]].popen.kill()  # SIGKILL: the relay vanishes without a word
        mine, theirs = _finish(calling, answering, seconds)
    finally:
        stop.set()
        poller.join(5)
    gap, since, count = 0.0, killed_at, None
    for t, n in samples:
        if t >= killed_at and count is not None and n > count:
            gap = max(gap, t - since)
            since = t
        count = n
    print(f"\nrelay {used[0]} killed: longest stretch without packets {gap:.2f} s")
    print(f"switches: {theirs['path'].get('switches')}")
    for summary in (mine, theirs):
        assert summary["outcome"] == "completed", summary
        assert summary["path"]["relay_server"] != used[0], summary["path"]
        assert summary["path"]["switches"], summary["path"]
    assert gap < 3.0, samples


def test_ping_reports_the_path_and_round_trip_one_line_per_reply(
    processes: Processes, login_data: Path, short_dir: Any
) -> None:
    _, alice, bob = _overlay(
        processes,
        login_data,
        short_dir,
        sn_options=("--relay-allow-peers", "127.0.0.0/8"),
        alice_options=(),
    )
    code, out, err = ctl(alice, "ping", "bob", "-c", "3", "-i", "0.3")
    assert code == 0, err
    replies = [line for line in out.splitlines() if line.startswith("Reply from bob")]
    assert len(replies) == 3, out
    assert all(re.search(r"over direct host: time=\d+\.\d ms$", r) for r in replies), out
    assert "--- bob: 3 sent, 3 received, 0.0 % lost; path direct host" in out
    code, out, _ = ctl(alice, "ping", "bob", "--until-direct", "--json")
    result = json.loads(out)
    assert code == 0 and result["sent"] == 1 and result["received"] == 1, result
    assert result["path"]["kind"] == "direct host"
    # bob's side answered without ringing, and no call is left on either side.
    wait_for(
        lambda: status(bob)["call"] is None and status(alice)["call"] is None, "sessions ending"
    )
    code, out, err = ctl(alice, "ping", "nobody-here")
    assert code == 1 and "nobody-here is not online." in err, (out, err)


def test_ping_through_a_relay(processes: Processes, login_data: Path, short_dir: Any) -> None:
    _, alice, _ = _overlay(
        processes,
        login_data,
        short_dir,
        sn_options=("--relay-allow-peers", "127.0.0.0/8"),
        alice_options=("--relay-only",),
    )
    code, out, err = ctl(alice, "ping", "bob", "-c", "2", "-i", "0.3")
    assert code == 0, err
    replies = [line for line in out.splitlines() if line.startswith("Reply from bob")]
    assert len(replies) == 2 and all("over relay 127.0.0.1:" in r for r in replies), out


def test_a_changed_key_blocks_the_call_until_accepted(
    processes: Processes, login_data: Path, short_dir: Any
) -> None:
    """alice pins bob's key on their first call; bob logs in from a new device (a new key,
    certified by the same login server); alice's call is refused until she compares safety
    numbers and accepts it."""
    servers: list[Any] = []
    _, alice, bob = _overlay(
        processes,
        login_data,
        short_dir,
        sn_options=("--relay-allow-peers", "127.0.0.0/8"),
        alice_options=(),
        servers=servers,
    )
    code, out, err = ctl(alice, "ping", "bob", "-c", "1")
    assert code == 0, err  # the first contact pins bob's key
    _, mine, _ = ctl(alice, "verify", "bob")
    _, theirs, _ = ctl(bob, "verify", "alice")
    number = re.findall(r"(?:\d{5} ){11}\d{5}", mine)
    assert number and number == re.findall(r"(?:\d{5} ){11}\d{5}", theirs), (mine, theirs)
    assert "the same as first seen" in mine

    bob.process.stop()  # bob moves to a new device: a new key for the same name
    new_bob = node(processes, short_dir() / "bob2", servers[0])
    code, _, err = ctl(new_bob, "login", "bob", "--password-stdin", input="pw-bob-12345\n")
    assert code == 0, err
    wait_for(lambda: "is online" in ctl(alice, "search", "bob")[1], "the new bob being findable")
    code, out, err = ctl(alice, "ping", "bob", "-c", "1")
    assert code == 1 and "bob's key has CHANGED" in err, (out, err)
    code, out, _ = ctl(alice, "verify", "bob")
    assert "CHANGED" in out and "voipctl verify bob --accept" in out
    code, out, _ = ctl(alice, "verify", "bob", "--accept")
    assert code == 0 and "accepted" in out
    code, out, err = ctl(alice, "ping", "bob", "-c", "1")
    assert code == 0, err
