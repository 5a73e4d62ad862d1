"""The relay on real sockets on 127.0.0.1: our own allocations over UDP and TCP, coturn's client.

    two allocations of our relay (UDP+UDP, TCP+UDP) exchange data both ways, with Send/Data
      indications and with channels, through a blocking test client run in a thread
    coturn's turnutils_uclient (use-auth-secret credentials minted by us) against our relay,
      with turnutils_peer as the echoing peer
    voip-relay serve / credential as programs: addresses printed, errors one line

coturn's programs are installed by tools/setup-env; a test skips, saying so, without them.
Every process is bounded by a timeout and stopped by its PID, also on failure.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from overlay.stun import (
    NONCE,
    REALM,
    SOFTWARE,
    USERNAME,
    Address,
    Attribute,
    Method,
    StunClass,
    StunMessage,
    long_term_key,
)
from overlay.turn import (
    CHANNEL_NUMBER,
    DATA,
    REQUESTED_TRANSPORT,
    XOR_PEER_ADDRESS,
    XOR_RELAYED_ADDRESS,
    ChannelData,
    StreamFramer,
    TurnCredential,
    mint_credential,
)
from relay.server import RelayConfig
from relay.service import Relay

pytestmark = pytest.mark.integration

UCLIENT = shutil.which("turnutils_uclient")
PEER = shutil.which("turnutils_peer")
SECRET = b"interop secret"
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)


class BlockingTurnClient:
    """A minimal TURN client on a blocking socket (run it in a thread, never in the reactor)."""

    def __init__(self, transport: str, server: Address, credential: TurnCredential) -> None:
        kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
        self.sock = socket.socket(socket.AF_INET, kind)
        self.sock.settimeout(3)
        self.sock.connect(server)
        self.transport, self.credential = transport, credential
        self.framer = StreamFramer()
        self.frames: list[bytes] = []
        self.nonce = ""
        self.relayed: Address = ("", 0)

    def close(self) -> None:
        self.sock.close()

    def _send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def receive(self) -> bytes:
        if self.transport == "udp":
            return self.sock.recv(4096)
        while not self.frames:
            chunk = self.sock.recv(4096)
            assert chunk, "the relay closed the connection"
            self.frames += self.framer.feed(chunk)
        return self.frames.pop(0)

    def transact(self, message: StunMessage) -> StunMessage:
        self._send(bytes(message))
        for _ in range(20):
            reply = self.receive()
            if reply[0] < 0x40:
                parsed = StunMessage.parse(reply)
                if parsed.transaction_id == message.transaction_id:
                    return parsed
        raise AssertionError("no answer from the relay")

    def request(self, method: int, *attributes: Attribute) -> StunMessage:
        c = self.credential
        key = long_term_key(c.username, "voip", c.password)
        message = StunMessage.request(
            *attributes, USERNAME(c.username), REALM("voip"), NONCE(self.nonce), method=method
        )
        reply = self.transact(message.with_integrity(key))
        assert reply.message_class is StunClass.SUCCESS, reply
        assert reply.check_integrity(key)
        return reply

    def allocate(self) -> Address:
        # Our client pads its first Allocate so the challenge fits (no amplification over UDP).
        first = StunMessage.request(
            REQUESTED_TRANSPORT(17), SOFTWARE("voip-overlay test client"), method=Method.ALLOCATE
        )
        challenge = self.transact(first)
        self.nonce = challenge.get(NONCE) or ""
        reply = self.request(Method.ALLOCATE, REQUESTED_TRANSPORT(17))
        relayed = reply.get(XOR_RELAYED_ADDRESS)
        assert relayed is not None
        self.relayed = relayed
        return relayed

    def send_to(self, peer: Address, data: bytes) -> None:
        indication = StunMessage(
            Method.SEND, StunClass.INDICATION, bytes(12), (XOR_PEER_ADDRESS(peer), DATA(data))
        )
        self._send(bytes(indication))

    def send_channel(self, channel: int, data: bytes) -> None:
        self._send(ChannelData(channel, data).to_bytes(padded=self.transport == "tcp"))

    def data(self) -> tuple[int | Address, bytes]:
        """The next relayed data: (channel, data) or (peer, data)."""
        for _ in range(20):
            frame = self.receive()
            if 0x40 <= frame[0] <= 0x4F:
                channel = ChannelData.parse(frame)
                return channel.channel, channel.data
            message = StunMessage.parse(frame)
            if message.method == Method.DATA:
                peer, data = message.get(XOR_PEER_ADDRESS), message.get(DATA)
                assert peer is not None and data is not None
                return peer, data
        raise AssertionError("no data from the relay")


def exchange(relay_address: Address, tcp_address: Address, first: str) -> None:
    now = time.time()
    a = BlockingTurnClient(
        first, tcp_address if first == "tcp" else relay_address, mint_credential(SECRET, "a", now)
    )
    b = BlockingTurnClient("udp", relay_address, mint_credential(SECRET, "b", now))
    try:
        a_relayed, b_relayed = a.allocate(), b.allocate()
        a.request(Method.CREATE_PERMISSION, XOR_PEER_ADDRESS(b_relayed))
        b.request(Method.CREATE_PERMISSION, XOR_PEER_ADDRESS(a_relayed))
        a.send_to(b_relayed, b"hello b")
        assert b.data() == (a_relayed, b"hello b")
        b.request(Method.CHANNEL_BIND, CHANNEL_NUMBER(0x4000), XOR_PEER_ADDRESS(a_relayed))
        a.request(Method.CHANNEL_BIND, CHANNEL_NUMBER(0x4ABC), XOR_PEER_ADDRESS(b_relayed))
        b.send_channel(0x4000, b"hello a, by channel")
        assert a.data() == (0x4ABC, b"hello a, by channel")
        a.send_channel(0x4ABC, b"odd")  # 3 bytes: padded on TCP
        assert b.data() == (0x4000, b"odd")
        a.request(Method.REFRESH, Attribute(0x000D, 0))
    finally:
        a.close()
        b.close()


@pytest_twisted.async_yield_fixture
async def relay() -> AsyncIterator[Relay]:
    from twisted.internet import reactor

    config = RelayConfig(secret=SECRET, udp_port=0, tcp_port=0, allow_peers=LOOPBACK)
    relay = Relay(reactor, config)
    relay.start()
    try:
        yield relay
    finally:
        await relay.stop()


@pytest.mark.parametrize("first", ["udp", "tcp"])
@pytest_twisted.ensureDeferred
async def test_two_allocations_exchange_data_through_our_relay(relay: Relay, first: str) -> None:
    assert relay.udp_address[1] == relay.tcp_address[1]
    await deferToThread(exchange, relay.udp_address, relay.tcp_address, first)
    counters = relay.counters
    assert counters["relayed-to-peer"] == 3 and counters["relayed-to-client"] == 3
    assert counters["allocations-created"] == 2 and counters["allocations-deleted"] >= 1
    if first == "tcp":
        assert counters["tcp-connections"] == 1


@pytest_twisted.ensureDeferred
async def test_a_closed_tcp_connection_frees_its_allocation(relay: Relay) -> None:
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    def allocate_and_close() -> None:
        client = BlockingTurnClient("tcp", relay.tcp_address, mint_credential(SECRET, "c", 0.0))
        client.credential = mint_credential(SECRET, "c", time.time())
        try:
            client.allocate()
        finally:
            client.close()

    await deferToThread(allocate_and_close)
    for _ in range(50):
        if not relay.server.allocations:
            break
        await deferLater(reactor, 0.02, lambda: None)
    assert not relay.server.allocations and relay.spare() == 1000


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest_twisted.ensureDeferred
async def test_coturn_uclient_relays_through_our_relay(relay: Relay) -> None:
    if UCLIENT is None or PEER is None:
        pytest.skip("turnutils_uclient/turnutils_peer (coturn) are not installed; see setup-env")
    peer_port = _free_udp_port()
    peer = subprocess.Popen(
        [PEER, "-L", "127.0.0.1", "-p", str(peer_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    credential = mint_credential(SECRET, "coturn", time.time(), ttl=600)
    # -s: Send/Data indications (uclient picks channel numbers from RFC 5766's wider range,
    # which RFC 8656 no longer allows); -c: no RTCP allocation; 10 messages, one client.
    argv = [UCLIENT, "-s", "-c", "-n", "10", "-m", "1", "-e", "127.0.0.1", "-r", str(peer_port)]
    argv += ["-u", credential.username, "-w", credential.password]
    argv += ["-p", str(relay.udp_address[1]), "127.0.0.1"]
    try:
        done = await deferToThread(
            subprocess.run, argv, capture_output=True, text=True, timeout=20, check=False
        )
    finally:
        peer.send_signal(signal.SIGTERM)
        try:
            peer.wait(timeout=5)
        except subprocess.TimeoutExpired:
            peer.kill()
            peer.wait()
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "tot_send_msgs=10, tot_recv_msgs=10" in output, output
    counters = relay.counters
    assert counters["relayed-to-peer"] >= 10 and counters["relayed-to-client"] >= 10, counters
    assert counters["challenge-too-big"] == 0 and counters["unauthenticated"] == 0


# -- the program --------------------------------------------------------------------------------


def _voip_relay(*args: str, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_credential_mints_a_use_auth_secret_credential(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"abc\n")
    done = _voip_relay("credential", "bob", "--secret-file", str(secret), "--json", "--ttl", "60")
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert document["schema_version"] == 1 and document["username"].endswith(":bob")
    expected = mint_credential(b"abc", "bob", document["expires"] - 60, ttl=60)
    assert document["password"] == expected.password


def test_errors_are_one_line(tmp_path: Path) -> None:
    missing = _voip_relay("credential", "bob", "--secret-file", str(tmp_path / "none"))
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1
    assert "Cannot read the secret file" in missing.stderr
    secret = tmp_path / "secret"
    secret.write_text("s")
    bad = _voip_relay("serve", "--secret-file", str(secret), "--allow-peers", "10.0.0.0/99")
    assert bad.returncode == 2 and "is not a network" in bad.stderr
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as held:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        busy = _voip_relay("serve", "--secret-file", str(secret), "--listen", f"127.0.0.1:{port}")
    assert busy.returncode == 1 and "Cannot listen on" in busy.stderr, busy.stderr


def test_serve_prints_its_addresses_and_stops_on_sigterm(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s")
    argv = [sys.executable, "-m", "relay.cli", "serve", "--listen", "127.0.0.1:0"]
    argv += ["--secret-file", str(secret), "--allow-peers", "127.0.0.0/8", "--json"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        document = json.loads(line)
        host, port = document["udp"].rsplit(":", 1)
        assert host == "127.0.0.1" and document["tcp"] == document["udp"]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.settimeout(3)
            request = StunMessage.request(SOFTWARE("padding for a strict answer"))
            probe.sendto(bytes(request), (host, int(port)))
            reply = StunMessage.parse(probe.recv(2048))
        assert reply.transaction_id == request.transaction_id
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
