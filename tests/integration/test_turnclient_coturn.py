"""Our TURN client against coturn's real ``turnserver`` on 127.0.0.1 (``tools/coturn.py``).

Two clients, each on its own call socket (``client.callsocket.CallSocket``, as in a call), get
relayed addresses from coturn, permit each other and exchange data through the relay, first
with Send/Data indications, then on channels; one test does it over TCP.  Refusals (a wrong
password, coturn's per-user quota) must read clearly, and ``close()`` must really delete the
allocation: coturn refuses a second allocation on the same 5-tuple (437) until it does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.task import deferLater

from client.callsocket import CallSocket
from client.turnclient import State, TurnClient, TurnRefused
from tools.coturn import CoturnServer, turnserver_installed

pytestmark = pytest.mark.integration

Address = tuple[str, int]
Received = list[tuple[bytes, Address]]


@pytest.fixture(scope="module")
def coturn() -> Iterator[CoturnServer]:
    if not turnserver_installed():
        pytest.skip("turnserver (coturn) is not installed; tools/setup-env installs it")
    with CoturnServer(extra=("--user-quota=2",)) as server:
        yield server


def reactor() -> Any:
    from twisted.internet import reactor

    return reactor


@asynccontextmanager
async def call_socket() -> AsyncIterator[CallSocket]:
    sock = CallSocket()
    sock.port = reactor().listenUDP(0, sock, interface="127.0.0.1")
    try:
        yield sock
    finally:
        port, sock.port = sock.port, None
        if port is not None:
            await port.stopListening()


def udp_client(sock: CallSocket, coturn: CoturnServer, user: str, **kw: Any) -> TurnClient:
    kw.setdefault("send", sock.send)
    client = TurnClient(reactor(), coturn.udp_address, coturn.credential(user), **kw)
    sock.handlers.append(client.datagram_received)
    return client


def collect(client: TurnClient) -> Received:
    received: Received = []
    client.on_data = lambda data, peer: received.append((data, peer))
    return received


async def until(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await deferLater(reactor(), 0.01, lambda: None)
    raise AssertionError("timed out waiting")


async def exchange(a: TurnClient, b: TurnClient, tag: bytes) -> tuple[Received, Received]:
    """a and b send each other one message; what each received."""
    got_a, got_b = collect(a), collect(b)
    assert a.relayed is not None and b.relayed is not None
    a.send(b"from a " + tag, b.relayed)
    b.send(b"from b " + tag, a.relayed)
    await until(lambda: bool(got_a and got_b))
    return got_a, got_b


@pytest_twisted.ensureDeferred
async def test_two_udp_clients_relay_both_ways(coturn: CoturnServer) -> None:
    async with call_socket() as sock_a, call_socket() as sock_b:
        sizes: list[tuple[str, int]] = []  # what a sent and received, to compare sizes

        def send_a(data: bytes, address: Address) -> None:
            sizes.append(("out", len(data)))
            sock_a.send(data, address)

        sock_a.handlers.append(lambda data, address: sizes.append(("in", len(data))) or False)
        a = udp_client(sock_a, coturn, "alice", send=send_a)
        b = udp_client(sock_b, coturn, "bob")
        try:
            relayed_a, relayed_b = await a.allocate(), await b.allocate()
            assert relayed_a[0] == relayed_b[0] == "127.0.0.1" and relayed_a != relayed_b
            assert a.mapped == ("127.0.0.1", sock_a.local_port)
            # The padded first Allocate is no smaller than coturn's 401 challenge to it.
            assert sizes[0][0] == "out" and sizes[1][0] == "in"
            assert sizes[0][1] >= sizes[1][1], sizes
            assert a.rtt is not None and 0 < a.rtt < 1 and a.lifetime == 600
            await a.permit(relayed_b)
            await b.permit(relayed_a)

            got_a, got_b = await exchange(a, b, b"by indication")
            assert got_a == [(b"from b by indication", relayed_b)]
            assert got_b == [(b"from a by indication", relayed_a)]
            assert a.counters["send-indications"] == 1

            assert await a.bind(relayed_b) == 0x4000
            assert await b.bind(relayed_a) == 0x4000
            got_a, got_b = await exchange(a, b, b"on a channel")
            assert got_a == [(b"from b on a channel", relayed_b)]
            assert got_b == [(b"from a on a channel", relayed_a)]
            assert a.counters["channel-data-sent"] == 1

            big = bytes(range(256)) * 4 + b"odd"  # not a multiple of 4: ChannelData unpadded
            got_b = collect(b)
            a.send(big, relayed_b)
            await until(lambda: bool(got_b))
            assert got_b == [(big, relayed_a)]
            description = a.describe()
            assert description["channels"] == {f"{relayed_b[0]}:{relayed_b[1]}": 0x4000}
            assert description["packets_received"] == 2
            assert sock_a.unclaimed == 0 and sock_b.unclaimed == 0
        finally:
            await a.close()
            await b.close()
    assert a.counters["deallocations"] == 1 and b.counters["deallocations"] == 1


@pytest_twisted.ensureDeferred
async def test_tcp_client_and_udp_client(coturn: CoturnServer) -> None:
    async with call_socket() as sock:
        udp = udp_client(sock, coturn, "udp-user")
        tcp = await TurnClient.connect_tcp(reactor(), coturn.tcp_address, coturn.credential("t"))
        failures: list[str] = []
        tcp.on_failed = failures.append
        try:
            relayed_udp, relayed_tcp = await udp.allocate(), await tcp.allocate()
            await udp.permit(relayed_tcp)
            await tcp.permit(relayed_udp)
            got_udp, got_tcp = await exchange(udp, tcp, b"by indication")
            assert got_tcp == [(b"from a by indication", relayed_udp)]
            assert got_udp == [(b"from b by indication", relayed_tcp)]
            await tcp.bind(relayed_udp)
            await udp.bind(relayed_tcp)
            got_udp, got_tcp = await exchange(udp, tcp, b"x")  # 8 bytes + 4: TCP pads to 12
            assert got_tcp == [(b"from a x", relayed_udp)]
            assert got_udp == [(b"from b x", relayed_tcp)]
            assert tcp.counters["channel-data-sent"] == 1
            assert tcp.describe()["transport"] == "tcp"
        finally:
            await udp.close()
            await tcp.close()
    assert tcp.counters["deallocations"] == 1 and failures == []


@pytest_twisted.ensureDeferred
async def test_wrong_password_is_refused_clearly(coturn: CoturnServer) -> None:
    async with call_socket() as sock:
        username = coturn.credential("mallory").username
        client = TurnClient(reactor(), coturn.udp_address, (username, "guess"), send=sock.send)
        sock.handlers.append(client.datagram_received)
        with pytest.raises(TurnRefused) as caught:
            await client.allocate()
        await client.close()
    host, port = coturn.udp_address
    assert caught.value.status == 401
    assert str(caught.value) == (
        f"The relay {host}:{port} refused the allocation: 401 Unauthorized "
        "(wrong or expired credentials)."
    )


@pytest_twisted.ensureDeferred
async def test_quota_refusal_reads_clearly(coturn: CoturnServer) -> None:
    credential = coturn.credential("greedy")
    clients: list[TurnClient] = []
    async with call_socket() as s1, call_socket() as s2, call_socket() as s3:
        try:
            for sock in (s1, s2, s3):
                client = TurnClient(reactor(), coturn.udp_address, credential, send=sock.send)
                sock.handlers.append(client.datagram_received)
                clients.append(client)
            await clients[0].allocate()
            await clients[1].allocate()
            with pytest.raises(TurnRefused) as caught:
                await clients[2].allocate()
        finally:
            for client in clients:
                await client.close()
    assert caught.value.status == 486
    assert "refused the allocation: 486 Allocation Quota Reached" in str(caught.value)


@pytest_twisted.ensureDeferred
async def test_close_deletes_the_allocation(coturn: CoturnServer) -> None:
    async with call_socket() as sock:
        first = udp_client(sock, coturn, "carol")
        await first.allocate()
        # The same 5-tuple cannot hold two allocations: coturn says 437 while the first lives.
        second = udp_client(sock, coturn, "carol")
        with pytest.raises(TurnRefused) as caught:
            await second.allocate()
        assert caught.value.status == 437
        await first.close()
        assert first.counters["deallocations"] == 1
        # coturn frees the 5-tuple about 1 s after the deallocation; without it, never (600 s).
        for _ in range(30):
            third = udp_client(sock, coturn, "carol")
            try:
                assert await third.allocate()
                break
            except TurnRefused as exc:
                assert exc.status == 437
                await deferLater(reactor(), 0.1, lambda: None)
        assert third.state is State.ALLOCATED
        await third.close()
        await first.close()  # idempotent: nothing more is sent
        assert first.counters["requests"] == 3  # challenge, Allocate, Refresh(0)
