"""The UDP request/reply layer over the in-memory network, on an injected clock."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from overlay.datagram import DatagramEndpoint, PeerTimeout, encode
from overlay.errors import VoipError
from overlay.framing import MAX_DATAGRAM_PAYLOAD
from overlay.messages import Error, Message, Ping, Pong, parse_datagram
from tools.memnet import MemoryNetwork

A = ("10.0.0.1", 1000)  # in-memory only: these addresses never reach a socket
B = ("10.0.0.2", 2000)


class Rig:
    def __init__(self, loss: float = 0.0, latency: float = 0.01) -> None:
        self.clock = Clock()
        self.net = MemoryNetwork(self.clock, latency=latency, loss=loss, seed=7)
        self.calls: list[Message] = []
        self.client = DatagramEndpoint(self.clock)
        self.server = DatagramEndpoint(self.clock, self.handle)
        self.net.attach(self.client, A)
        self.net.attach(self.server, B)
        self.behaviour = "pong"

    async def handle(self, message: Message, address: tuple[str, int]) -> Message | None:
        self.calls.append(message)
        if self.behaviour == "silent":
            return None
        if self.behaviour == "voip-error":
            raise VoipError("No such thing.")
        if self.behaviour == "crash":
            raise RuntimeError("boom")
        if self.behaviour == "big":
            return Error(getattr(message, "rid", 0), message.NAME, "x", "y" * 300)
        assert isinstance(message, Ping)
        return Pong(message.rid, 42.0)

    def ping(self, timeout: float = 2.0, pad_to: int = 0) -> Any:
        return self.client.request(B, Ping, timeout=timeout, pad_to=pad_to)


def pump(clock: Clock, seconds: float, step: float = 0.005) -> None:
    """Advance in small steps so datagrams sent along the way are delivered too."""
    for _ in range(round(seconds / step)):
        clock.advance(step)


def results(d: Any) -> list[Any]:
    out: list[Any] = []
    d.addBoth(out.append)
    return out


def test_request_gets_its_reply() -> None:
    rig = Rig()
    got = results(rig.ping(pad_to=64))
    pump(rig.clock, 0.05)
    assert isinstance(got[0], Pong) and got[0].time == 42.0
    assert rig.client.counters["requests"] == 1 and not rig.client.pending


def test_lost_datagrams_are_retransmitted_and_the_handler_runs_once() -> None:
    rig = Rig(latency=0.01)
    rig.net.link_loss[(A[0], B[0])] = 1.0  # the first sends are lost
    got = results(rig.ping(pad_to=64))
    pump(rig.clock, 0.3)  # first retransmission at 0.25 s, also lost
    rig.net.link_loss.clear()
    pump(rig.clock, 0.3)  # the retransmission at 0.5 s gets through
    assert isinstance(got[0], Pong)
    assert len(rig.calls) == 1


def test_a_retransmitted_request_is_answered_from_memory() -> None:
    rig = Rig(latency=0.01)
    rig.net.link_loss[(B[0], A[0])] = 1.0  # replies are lost
    got = results(rig.ping(pad_to=64))
    pump(rig.clock, 0.3)
    rig.net.link_loss.clear()
    pump(rig.clock, 0.3)
    assert isinstance(got[0], Pong)
    assert len(rig.calls) == 1
    assert rig.server.counters["duplicates"] >= 1


def test_no_answer_fails_after_the_timeout_and_not_before() -> None:
    rig = Rig()
    rig.behaviour = "silent"
    got = results(rig.ping(timeout=1.5))
    pump(rig.clock, 1.49)
    assert got == []
    pump(rig.clock, 0.02)
    assert got[0].check(PeerTimeout)
    assert str(got[0].value) == "No answer from 10.0.0.2:2000 within 1.5 s."
    assert not rig.client.pending and not rig.clock.getDelayedCalls()


def test_errors_come_back_as_error_replies_naming_the_request(no_logged_errors: Any) -> None:
    rig = Rig()
    rig.behaviour = "voip-error"
    got = results(rig.ping(pad_to=200))
    pump(rig.clock, 0.05)
    assert isinstance(got[0], Error)
    assert (got[0].request, got[0].code, got[0].message) == ("ping", "error", "No such thing.")
    rig.behaviour = "crash"
    no_logged_errors.expect(1)
    got = results(rig.ping(pad_to=200))
    pump(rig.clock, 0.05)
    assert (got[0].code, got[0].message) == ("server-error", "The peer failed.")
    assert rig.server.counters["internal-errors"] == 1


def test_a_reply_larger_than_the_request_is_never_sent() -> None:
    rig = Rig()
    rig.behaviour = "big"
    got = results(rig.ping(timeout=1.0))
    pump(rig.clock, 1.1)
    assert got[0].check(PeerTimeout)
    assert rig.server.counters["amplification-refused"] >= 1
    # Padded enough, the same request gets its answer.
    got = results(rig.ping(timeout=1.0, pad_to=600))
    pump(rig.clock, 0.05)
    assert isinstance(got[0], Error)


def test_garbage_is_dropped_and_counted_never_answered() -> None:
    rig = Rig()
    for junk in (b"", b"\x00" * 3, b"\x01\x00\x02\x00\x00\x00\x05hello", bytes(Pong(1, 2.0))[:-1]):
        rig.net.send(A, B, junk)
    rig.net.send(A, B, bytes(Pong(99, 1.0)))  # a reply nobody waits for
    pump(rig.clock, 0.05)
    assert rig.server.counters["bad-datagrams"] == 4
    assert rig.server.counters["stray-replies"] == 1
    assert rig.net.counters["delivered"] == 5  # nothing came back


def test_padding_reaches_the_size_and_is_ignored_by_the_receiver() -> None:
    data = encode(Ping(5), pad_to=300)
    assert len(data) >= 300
    assert parse_datagram(data) == Ping(5)
    with pytest.raises(VoipError, match="exceeds a datagram"):
        encode(Ping(5), pad_to=MAX_DATAGRAM_PAYLOAD + 100)


@pytest_twisted.ensureDeferred
async def test_over_real_udp_sockets_on_loopback() -> None:
    from twisted.internet import reactor

    async def pong(message: Message, address: tuple[str, int]) -> Message:
        assert isinstance(message, Ping)
        return Pong(message.rid, 1.0)

    server = DatagramEndpoint(reactor, pong)
    client = DatagramEndpoint(reactor)
    server_port = reactor.listenUDP(0, server, interface="127.0.0.1")  # type: ignore[attr-defined]
    client_port = reactor.listenUDP(0, client, interface="127.0.0.1")  # type: ignore[attr-defined]
    try:
        reply = await client.request(
            ("127.0.0.1", server_port.getHost().port), Ping, timeout=2.0, pad_to=64
        )
        assert isinstance(reply, Pong)
    finally:
        await server_port.stopListening()
        await client_port.stopListening()
