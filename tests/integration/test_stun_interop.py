"""Our STUN server and client against coturn's, over real UDP sockets on 127.0.0.1.

    turnutils_stunclient -> our server (a supernode's DatagramEndpoint): prints our answer
    our StunClient / discover -> coturn's turnserver (STUN only, on 127.0.0.1 and 127.0.0.2,
                                 so RFC 5780 OTHER-ADDRESS and CHANGE-REQUEST work)
    our StunClient -> our server

The coturn programs are installed by tools/setup-env; a test skips, saying so, without them.
Every process is stopped by its PID, also on failure.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.threads import deferToThread

from client.natcheck import discover
from overlay.datagram import DatagramEndpoint
from overlay.stun import StunMessage
from overlay.stun_client import StunClient

pytestmark = pytest.mark.integration

STUNCLIENT = shutil.which("turnutils_stunclient")
TURNSERVER = shutil.which("turnserver")
REFLEXIVE = re.compile(r"UDP reflexive addr: (?P<host>[\d.]+):(?P<port>\d+)")
HOSTS = ("127.0.0.1", "127.0.0.2")


class Owner(DatagramProtocol):
    """A socket owner that hands every datagram to its STUN client."""

    def __init__(self) -> None:
        self.client: StunClient | None = None

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        assert self.client is not None
        self.client.datagram_received(datagram, addr)


@contextlib.asynccontextmanager
async def stun_socket() -> Any:
    from twisted.internet import reactor

    owner = Owner()
    port = reactor.listenUDP(0, owner, interface="127.0.0.1")  # type: ignore[attr-defined]
    owner.client = StunClient(reactor, lambda data, address: port.write(data, address))
    try:
        yield owner.client, ("127.0.0.1", port.getHost().port)
    finally:
        owner.client.close()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_turnutils_stunclient_learns_its_address_from_our_server() -> None:
    if STUNCLIENT is None:
        pytest.skip("turnutils_stunclient (coturn) is not installed; tools/setup-env installs it")
    from twisted.internet import reactor

    server = DatagramEndpoint(reactor, stun_server=True)
    assert server.stun is not None
    seen: list[tuple[str, int]] = []
    respond = server.stun.respond

    def spy(data: bytes, source: tuple[str, int]) -> bytes | None:
        seen.append(source)
        return respond(data, source)

    server.stun.respond = spy  # type: ignore[method-assign]
    port = reactor.listenUDP(0, server, interface="127.0.0.1")  # type: ignore[attr-defined]
    try:
        argv = [STUNCLIENT, "-p", str(port.getHost().port), "127.0.0.1"]
        done = await deferToThread(
            subprocess.run, argv, capture_output=True, text=True, timeout=10, check=False
        )
    finally:
        await port.stopListening()
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    found = REFLEXIVE.search(output)
    assert found is not None, output
    assert seen and (found["host"], int(found["port"])) == seen[0]
    assert server.counters["stun-answers"] >= 1 and server.counters["stun-errors-400"] == 0


@pytest_twisted.ensureDeferred
async def test_our_client_and_our_server_over_loopback() -> None:
    from twisted.internet import reactor

    server = DatagramEndpoint(reactor, stun_server=True)
    assert server.stun is not None
    server.stun.strict = True  # our client pads its requests, so even a strict server answers
    port = reactor.listenUDP(0, server, interface="127.0.0.1")  # type: ignore[attr-defined]
    try:
        async with stun_socket() as (client, local):
            assert await client.binding(("127.0.0.1", port.getHost().port)) == local
    finally:
        await port.stopListening()
    assert server.counters["stun-amplification-refused"] == 0


# -- coturn's server ----------------------------------------------------------------------------


def _free_port_pair() -> int:
    """A port P such that P and P+1 (coturn's alternate port) are free on both hosts."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind((HOSTS[0], 0))
            base = probe.getsockname()[1]
        if base >= 65535:
            continue
        try:
            with contextlib.ExitStack() as stack:
                for host in HOSTS:
                    for port in (base, base + 1):
                        for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                            held = stack.enter_context(socket.socket(socket.AF_INET, kind))
                            held.bind((host, port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free pair of ports on 127.0.0.1/127.0.0.2")


def _answers(address: tuple[str, int]) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.settimeout(0.2)
        request = StunMessage.request()
        probe.sendto(bytes(request), address)
        try:
            data, _ = probe.recvfrom(2048)
        except OSError:
            return False
        return StunMessage.parse(data).transaction_id == request.transaction_id


@pytest.fixture
def coturn(tmp_path: Path) -> Iterator[int]:
    """coturn's turnserver answering STUN only, on 127.0.0.1 and 127.0.0.2; yields its port."""
    if TURNSERVER is None:
        pytest.skip("turnserver (coturn) is not installed; tools/setup-env installs it")
    port = _free_port_pair()
    log = tmp_path / "turnserver.log"
    argv = [
        TURNSERVER,
        "-n",
        *(f"--listening-ip={host}" for host in HOSTS),
        f"--listening-port={port}",
        "--stun-only",
        "--no-auth",
        "--no-cli",
        "--no-tls",
        "--no-dtls",
        "--simple-log",
        "--log-file=stdout",
        f"--pidfile={tmp_path / 'turnserver.pid'}",
        f"--db={tmp_path / 'turndb.sqlite'}",
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while not _answers((HOSTS[0], port)):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"turnserver did not start:\n{log.read_text(errors='replace')}")
        yield port
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest_twisted.ensureDeferred
async def test_our_client_learns_its_address_from_coturn(coturn: int) -> None:
    async with stun_socket() as (client, local):
        response = await client.binding_response((HOSTS[0], coturn))
        assert await client.binding((HOSTS[0], coturn)) == local
    assert response.source == (HOSTS[0], coturn)
    assert response.message.transaction_id and response.transmissions >= 1


@pytest_twisted.ensureDeferred
async def test_discover_runs_the_rfc5780_tests_against_coturn(coturn: int) -> None:
    async with stun_socket() as (client, local):
        report = await discover(client, local, [(HOSTS[0], coturn), (HOSTS[1], coturn)])
    assert (report.udp_works, report.mapping, report.kind) == (True, "none", "public")
    assert report.reflexive == local
    # coturn names its alternate address and honours CHANGE-REQUEST; loopback filters nothing.
    assert report.probes[0].other == (HOSTS[1], coturn + 1)
    assert report.filtering == "endpoint-independent"
    assert set(report.rtts) == {(HOSTS[0], coturn), (HOSTS[1], coturn)}
