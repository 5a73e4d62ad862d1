"""STUN client transactions on an injected clock, against our STUN server on the in-memory net."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock

from overlay.datagram import DatagramEndpoint
from overlay.stun import (
    FINGERPRINT,
    MAPPED_ADDRESS,
    PADDING,
    SOFTWARE,
    XOR_MAPPED_ADDRESS,
    Method,
    StunClass,
    StunError,
    StunMessage,
)
from overlay.stun_client import (
    SCHEDULE,
    StunClient,
    StunRefused,
    StunResponse,
    StunTimeout,
    mapped_address,
)
from tools.memnet import MemoryNetwork

CLIENT = ("10.1.0.1", 5000)  # in-memory only: these addresses never reach a socket
SERVER = ("10.1.0.9", 3478)


class Socket(DatagramProtocol):
    """A media socket's owner: offers every datagram to the STUN client, keeps the rest."""

    def __init__(self) -> None:
        self.client: StunClient | None = None
        self.others: list[bytes] = []
        self.sent: list[bytes] = []

    def send(self, data: bytes, address: tuple[str, int]) -> None:
        self.sent.append(data)
        assert self.transport is not None
        self.transport.write(data, address)

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        assert self.client is not None
        if not self.client.datagram_received(datagram, addr):
            self.others.append(datagram)


class Rig:
    def __init__(self, *, strict: bool = False, latency: float = 0.01) -> None:
        self.clock = Clock()
        self.net = MemoryNetwork(self.clock, latency=latency)
        self.server = DatagramEndpoint(self.clock, stun_server=True)
        assert self.server.stun is not None
        self.server.stun.strict = strict
        self.net.attach(self.server, SERVER)
        self.socket = Socket()
        self.net.attach(self.socket, CLIENT)
        self.client = StunClient(self.clock, self.socket.send)
        self.socket.client = self.client

    def pump(self, seconds: float, step: float = 0.005) -> None:
        for _ in range(round(seconds / step)):
            self.clock.advance(step)


def results(d: Deferred[Any]) -> list[Any]:
    out: list[Any] = []
    d.addBoth(out.append)
    return out


def test_binding_learns_the_reflexive_address_even_from_a_strict_server() -> None:
    rig = Rig(strict=True)
    got = results(rig.client.binding(SERVER))
    rig.pump(0.05)
    assert got == [CLIENT]
    assert len(rig.socket.sent[0]) == 52  # padded: the server never answers with more
    request = StunMessage.parse(rig.socket.sent[0])
    assert request.has(PADDING) and request.has(FINGERPRINT)
    assert not rig.client.pending and not rig.clock.getDelayedCalls()
    assert rig.socket.others == []


def test_response_details_are_reported() -> None:
    rig = Rig(latency=0.02)
    got = results(rig.client.binding_response(SERVER))
    rig.pump(0.1)
    response = got[0]
    assert isinstance(response, StunResponse)
    assert response.server == response.source == SERVER
    assert response.rtt == pytest.approx(0.04) and response.transmissions == 1
    assert response.message.get(XOR_MAPPED_ADDRESS) == CLIENT


def test_lost_requests_are_retransmitted_on_the_schedule_then_time_out() -> None:
    rig = Rig()
    rig.net.link_loss[(CLIENT[0], SERVER[0])] = 1.0
    got = results(rig.client.binding(SERVER))
    assert SCHEDULE == (0.1, 0.2, 0.4, 0.8, 1.6)
    sends = []
    for moment in (0.05, 0.15, 0.35, 0.75, 1.55, 3.05):
        rig.clock.advance(moment - rig.clock.seconds())
        sends.append(len(rig.socket.sent))
    assert sends == [1, 2, 3, 4, 5, 5]
    assert got == []
    rig.clock.advance(0.1)
    assert got[0].check(StunTimeout)
    assert str(got[0].value) == "No STUN answer from 10.1.0.9:3478 within 3.1 s."
    assert rig.client.counters["stun-retransmissions"] == 4
    assert not rig.client.pending and not rig.clock.getDelayedCalls()


def test_a_retransmission_gets_the_answer_and_a_shorter_timeout_is_kept() -> None:
    rig = Rig()
    rig.net.link_loss[(CLIENT[0], SERVER[0])] = 1.0
    got = results(rig.client.binding_response(SERVER))
    rig.pump(0.2)
    rig.net.link_loss.clear()
    rig.pump(0.2)  # the retransmission at 0.3 s gets through
    assert got[0].transmissions == 3 and got[0].rtt == pytest.approx(0.32)
    rig.net.link_loss[(CLIENT[0], SERVER[0])] = 1.0
    got = results(rig.client.binding(SERVER, timeout=0.5))
    rig.pump(0.49)
    assert got == []
    rig.pump(0.02)
    assert got[0].check(StunTimeout) and "within 0.5 s" in str(got[0].value)


def test_an_error_response_fails_the_transaction_with_its_code() -> None:
    rig = Rig()
    allocate = StunMessage.request(PADDING(bytes(40)), method=Method.ALLOCATE)
    got = results(rig.client.request(SERVER, allocate))
    rig.pump(0.05)
    assert got[0].check(StunRefused)
    assert str(got[0].value) == "The STUN server at 10.1.0.9:3478 answered 400 Bad Request."


def test_only_answers_to_our_own_transactions_are_taken() -> None:
    clock = Clock()
    sent: list[bytes] = []
    client = StunClient(clock, lambda data, address: sent.append(data))
    got = results(client.binding(SERVER))
    request = StunMessage.parse(sent[0])
    other = StunMessage.request()
    # Not STUN, someone else's transaction, a request reusing our id: left to the socket owner.
    assert not client.datagram_received(b"\x80\x00rtp", SERVER)
    assert not client.datagram_received(bytes(other.success(XOR_MAPPED_ADDRESS(CLIENT))), SERVER)
    assert not client.datagram_received(bytes(request), SERVER)
    # Ours but unusable (bad fingerprint, wrong method): taken, and still waiting.
    damaged = bytearray(bytes(request.success(XOR_MAPPED_ADDRESS(CLIENT)).with_fingerprint()))
    damaged[-1] ^= 1
    assert client.datagram_received(bytes(damaged), SERVER)
    wrong = StunMessage(Method.ALLOCATE, StunClass.SUCCESS, request.transaction_id)
    assert client.datagram_received(bytes(wrong), SERVER)
    assert got == [] and client.counters["stun-malformed-responses"] == 2
    # The answer may come from another address (RFC 5780 CHANGE-REQUEST): still ours.
    answer = request.success(MAPPED_ADDRESS(CLIENT))  # an old server: MAPPED-ADDRESS only
    assert client.datagram_received(bytes(answer), ("10.1.0.10", 3479))
    assert got == [CLIENT]
    # A late duplicate is no longer ours.
    assert not client.datagram_received(bytes(answer), SERVER)


def test_a_success_without_an_address_is_a_protocol_error() -> None:
    clock = Clock()
    sent: list[bytes] = []
    client = StunClient(clock, lambda data, address: sent.append(data))
    got = results(client.binding(SERVER))
    request = StunMessage.parse(sent[0])
    client.datagram_received(bytes(request.success(SOFTWARE("x"))), SERVER)
    assert got[0].check(StunError)
    assert (
        str(got[0].value) == "The STUN server at 10.1.0.9:3478 answered without a mapped address."
    )
    with pytest.raises(StunError):
        mapped_address(StunResponse(request.success(), SERVER, SERVER, 0.0, 1))


def test_cancel_and_close_forget_transactions_and_their_timers() -> None:
    clock = Clock()
    errors: list[OSError] = []

    def send(data: bytes, address: tuple[str, int]) -> None:
        errors.append(OSError("network unreachable"))
        raise errors[-1]

    client = StunClient(clock, send)
    first = client.binding(SERVER)
    first.addErrback(lambda _: None)
    first.cancel()
    second = results(client.binding(SERVER))
    client.close()
    assert second[0].check(StunTimeout) and "closed" in str(second[0].value)
    assert not client.pending and not clock.getDelayedCalls()
    assert client.counters["stun-send-errors"] == 2
    request = StunMessage.request()
    client.request(SERVER, request).addErrback(lambda _: None)
    with pytest.raises(ValueError, match="already in use"):
        client.request(SERVER, request)
    client.close()
    with pytest.raises(ValueError, match="positive"):
        StunClient(clock, send, schedule=())
