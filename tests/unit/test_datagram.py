"""The UDP request/reply layer over the in-memory network, on an injected clock."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock

from overlay.datagram import DatagramEndpoint, PeerTimeout, encode
from overlay.errors import VoipError
from overlay.framing import MAX_DATAGRAM_PAYLOAD
from overlay.messages import Error, Message, Ping, Pong, parse_datagram
from overlay.stun import (
    ERROR_CODE,
    FINGERPRINT,
    PADDING,
    UNKNOWN_ATTRIBUTES,
    XOR_MAPPED_ADDRESS,
    Attribute,
    ErrorCode,
    Method,
    StunClass,
    StunMessage,
)
from overlay.stun_server import StunResponder
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


# -- STUN on the same port (supernodes) ---------------------------------------------------------


class StunRig:
    """A STUN-serving endpoint at B and a raw client socket at A that records what comes back."""

    def __init__(self, *, strict: bool = False) -> None:
        self.clock = Clock()
        self.net = MemoryNetwork(self.clock, latency=0.01)
        self.server = DatagramEndpoint(self.clock, self.handle, stun_server=True)
        if strict:
            assert self.server.stun is not None
            self.server.stun.strict = True
        self.received: list[bytes] = []
        self.net.attach(self.server, B)
        self.net.attach(Recorder(self.received), A)

    async def handle(self, message: Message, address: tuple[str, int]) -> Message | None:
        assert isinstance(message, Ping)
        return Pong(message.rid, 7.0)

    def exchange(self, data: bytes) -> list[StunMessage]:
        self.received.clear()
        self.net.send(A, B, data)
        pump(self.clock, 0.05)
        return [StunMessage.parse(d) for d in self.received]


class Recorder(DatagramProtocol):
    def __init__(self, into: list[bytes]) -> None:
        self.into = into

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.into.append(datagram)


def test_a_supernode_port_answers_binding_requests_and_overlay_messages() -> None:
    rig = StunRig()
    request = StunMessage.request()
    (reply,) = rig.exchange(bytes(request))
    assert reply.message_class is StunClass.SUCCESS
    assert reply.transaction_id == request.transaction_id
    assert reply.get(XOR_MAPPED_ADDRESS) == A
    assert not reply.has(FINGERPRINT) and len(rig.received[0]) == 32  # the 1.6x of the docs
    # With FINGERPRINT asked, FINGERPRINT answered; the overlay still works on the same port.
    (reply,) = rig.exchange(bytes(StunMessage.request().with_fingerprint()))
    assert reply.has(FINGERPRINT) and len(rig.received[0]) == 40
    client = DatagramEndpoint(rig.clock)
    rig.net.attach(client, ("10.0.0.3", 3000))
    got = results(client.request(B, Ping, pad_to=64))
    pump(rig.clock, 0.05)
    assert isinstance(got[0], Pong)
    assert rig.server.counters["stun-requests"] == 2 and rig.server.counters["stun-answers"] == 2
    assert rig.server.counters["bad-datagrams"] == 0


def test_stun_errors_name_the_problem_and_never_outgrow_the_request() -> None:
    rig = StunRig()
    padding = PADDING(bytes(40))
    # An unknown comprehension-required attribute: 420 listing it (optional ones are ignored).
    request = StunMessage.request(Attribute(0x7F01, b"abcd"), Attribute(0xC001, b"x"), padding)
    (reply,) = rig.exchange(bytes(request))
    assert reply.get(ERROR_CODE) == ErrorCode(420, "Unknown Attribute")
    assert reply.get(UNKNOWN_ATTRIBUTES) == (0x7F01,)
    # A method this server does not serve: 400.
    (reply,) = rig.exchange(bytes(StunMessage.request(padding, method=Method.ALLOCATE)))
    assert reply.get(ERROR_CODE) == ErrorCode(400, "Bad Request") and reply.method == 3
    # Attributes that do not parse: 400, still naming the transaction.
    broken = bytearray(bytes(StunMessage.request(XOR_MAPPED_ADDRESS(A), padding)))
    broken[25] = 9  # address family 9
    (reply,) = rig.exchange(bytes(broken))
    assert reply.get(ERROR_CODE) == ErrorCode(400, "Bad Request")
    assert reply.transaction_id == bytes(broken[8:20])
    # Too small for the phrase: the phrase goes; too small for any error: no answer.
    small = StunMessage.request(PADDING(bytes(8)), method=Method.ALLOCATE).with_fingerprint()
    (reply,) = rig.exchange(bytes(small))
    assert reply.get(ERROR_CODE) == ErrorCode(400, "") and reply.has(FINGERPRINT)
    assert len(rig.received[0]) <= len(bytes(small)) == 40
    assert rig.exchange(bytes(StunMessage.request(method=Method.ALLOCATE))) == []
    counters = rig.server.counters
    assert counters["stun-errors-420"] == 1 and counters["stun-errors-400"] == 3
    assert counters["stun-malformed"] == 1 and counters["stun-amplification-refused"] == 1


def test_stun_indications_responses_and_bad_fingerprints_get_no_answer() -> None:
    rig = StunRig()
    request = StunMessage.request()
    indication = StunMessage(Method.BINDING, StunClass.INDICATION, request.transaction_id)
    assert rig.exchange(bytes(indication)) == []
    assert rig.exchange(bytes(request.success(XOR_MAPPED_ADDRESS(A)))) == []
    damaged = bytearray(bytes(request.with_fingerprint()))
    damaged[-1] ^= 1
    assert rig.exchange(bytes(damaged)) == []
    counters = rig.server.counters
    assert counters["stun-indications"] == 1 and counters["stun-stray-responses"] == 1
    assert counters["stun-bad-fingerprint"] == 1 and counters["stun-received"] == 3


def test_strict_mode_answers_only_requests_as_large_as_the_answer() -> None:
    rig = StunRig(strict=True)
    assert rig.exchange(bytes(StunMessage.request())) == []
    assert rig.server.counters["stun-amplification-refused"] == 1
    (reply,) = rig.exchange(bytes(StunMessage.request(PADDING(bytes(12)))))
    assert reply.get(XOR_MAPPED_ADDRESS) == A and len(rig.received[0]) == 32


def test_an_endpoint_without_the_stun_server_counts_stun_as_garbage() -> None:
    rig = Rig()
    rig.net.send(A, B, bytes(StunMessage.request()))
    pump(rig.clock, 0.05)
    assert rig.server.counters["bad-datagrams"] == 1
    assert rig.net.counters["delivered"] == 1


def test_supernodes_serve_stun() -> None:
    from overlay.identity import IdentityKey
    from overlay.supernode import Supernode

    node = Supernode(Clock(), IdentityKey.from_seed(bytes(32)), bytes(32))
    assert node.udp.stun is not None and not node.udp.stun.strict


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120), st.sampled_from([b"", bytes(StunMessage.request())]))
def test_the_stun_server_survives_anything(junk: bytes, prefix: bytes) -> None:
    responder = StunResponder()
    for data in (junk, prefix[:20] + junk, _stunlike(prefix + junk)):
        answer = responder.respond(data, A)
        if answer is not None:
            message = StunMessage.parse(answer)
            assert len(answer) <= len(data) or message.message_class is StunClass.SUCCESS


def _stunlike(data: bytes) -> bytes:
    """``data`` with a STUN header whose length fits, so it gets past ``is_stun``."""
    body = data[20:]
    body += bytes(-len(body) % 4)
    head = bytearray(data[:20].ljust(20, b"\x00"))
    head[0] &= 0x3F
    head[2:8] = len(body).to_bytes(2, "big") + b"\x21\x12\xa4\x42"
    return bytes(head) + body
