"""The TURN client's timers, retries and choices, on a Clock against a scripted TURN server.

The server here is a few lines that answer like RFC 8656 says (401 challenge, long-term
MESSAGE-INTEGRITY on every success) and can be told to stay silent, answer 438 once, refuse,
or drop the integrity; interoperability with a real server is tests/integration.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from client.turnclient import (
    CHANNEL_REFRESH,
    CLOSE_TIMEOUT,
    PADDED_ALLOCATE,
    PERMISSION_REFRESH,
    SCHEDULE,
    State,
    TurnClient,
    TurnRefused,
    TurnTimeout,
)
from client.turntcp import TurnStream
from overlay.stun import (
    ERROR_CODE,
    MAGIC_COOKIE,
    NONCE,
    PADDING,
    REALM,
    UNKNOWN_ATTRIBUTES,
    USERNAME,
    XOR_MAPPED_ADDRESS,
    Method,
    StunClass,
    StunMessage,
    long_term_key,
)
from overlay.turn import (
    CHANNEL_NUMBER,
    DATA,
    LIFETIME,
    XOR_PEER_ADDRESS,
    XOR_RELAYED_ADDRESS,
    ChannelData,
    StreamFramer,
    mint_credential,
)

SERVER = ("10.0.0.9", 3478)  # in memory only: nothing here reaches a socket
CLIENT = ("10.0.0.1", 5000)
RELAYED = ("10.0.0.9", 50000)
PEER = ("10.0.0.2", 6000)
REALM_NAME = "voip.test"
USER, PASSWORD = "1900000000:alice", "secret"
LATENCY = 0.01


class ScriptedServer:
    """Answers TURN requests like a server would, with knobs to misbehave."""

    def __init__(self, password: str = PASSWORD) -> None:
        self.key = long_term_key(USER, REALM_NAME, password)
        self.nonce = "nonce-1"
        self.lifetime = 600
        self.silent: set[int] = set()  # methods never answered
        self.stale_once: set[int] = set()  # methods answered 438 (with a new nonce) once
        self.refuse: dict[int, int] = {}  # method -> error code
        self.no_integrity = False
        self.reject_padding = False
        self.received: list[tuple[float, bytes]] = []
        self.requests: list[tuple[float, StunMessage]] = []
        self.challenges: list[bytes] = []
        self.now: Callable[[], float] = lambda: 0.0

    def handle(self, data: bytes) -> bytes | None:
        self.received.append((self.now(), data))
        if data[0] >= 0x40:
            return None
        message = StunMessage.parse(data)
        if message.message_class is not StunClass.REQUEST:
            return None
        self.requests.append((self.now(), message))
        if message.method in self.silent:
            return None
        if self.reject_padding and message.has(PADDING):
            return bytes(
                message.error(420, UNKNOWN_ATTRIBUTES((PADDING.code,)), reason="Unknown Attribute")
            )
        if not message.has(USERNAME):
            challenge = bytes(message.error(401, REALM(REALM_NAME), NONCE(self.nonce)))
            self.challenges.append(challenge)
            return challenge
        if not message.check_integrity(self.key) or message.get(REALM) != REALM_NAME:
            return bytes(message.error(401, REALM(REALM_NAME), NONCE(self.nonce)))
        if message.method in self.stale_once:
            self.stale_once.discard(message.method)
            self.nonce += "x"
            return bytes(message.error(438, REALM(REALM_NAME), NONCE(self.nonce)))
        if message.get(NONCE) != self.nonce:
            return bytes(message.error(438, REALM(REALM_NAME), NONCE(self.nonce)))
        if message.method in self.refuse:
            return bytes(message.error(self.refuse[message.method]).with_integrity(self.key))
        attributes: tuple[Any, ...] = ()
        if message.method == Method.ALLOCATE:
            attributes = (
                XOR_RELAYED_ADDRESS(RELAYED),
                XOR_MAPPED_ADDRESS(CLIENT),
                LIFETIME(self.lifetime),
            )
        elif message.method == Method.REFRESH:
            lifetime = message.get(LIFETIME)
            attributes = (LIFETIME(self.lifetime if lifetime else 0),)
        success = message.success(*attributes)
        return bytes(success if self.no_integrity else success.with_integrity(self.key))

    def sent(self, method: int) -> list[tuple[float, StunMessage]]:
        return [(t, m) for t, m in self.requests if m.method == method]


class Rig:
    """A UDP client wired to the scripted server through the clock (LATENCY each way)."""

    def __init__(self, password: str = PASSWORD, **kw: Any) -> None:
        self.clock = Clock()
        self.server = ScriptedServer()
        self.server.now = self.clock.seconds
        self.client = TurnClient(self.clock, SERVER, (USER, password), send=self.send, **kw)
        self.data: list[tuple[bytes, tuple[str, int]]] = []
        self.failures: list[str] = []
        self.client.on_data = lambda data, peer: self.data.append((data, peer))
        self.client.on_failed = self.failures.append

    def send(self, data: bytes, address: tuple[str, int]) -> None:
        assert address == SERVER
        answer = self.server.handle(data)
        if answer is not None:
            self.clock.callLater(2 * LATENCY, self.client.datagram_received, answer, SERVER)

    def run(self, coroutine: Any, seconds: float = 5.0) -> Any:
        """Drive ``coroutine`` on the clock; its result (or raise its error)."""
        from twisted.internet.defer import Deferred

        results: list[Any] = []
        running = Deferred.fromCoroutine(coroutine)
        running.addBoth(results.append)
        step = 0.01
        for _ in range(int(seconds / step)):
            if results:
                break
            self.clock.advance(step)
        assert results, "the coroutine did not finish"
        result = results[0]
        from twisted.python.failure import Failure

        if isinstance(result, Failure):
            result.raiseException()
        return result

    def advance(self, seconds: float, step: float = 0.05) -> None:
        """Let time pass in small steps, so answers arrive when they are due."""
        for _ in range(round(seconds / step)):
            self.clock.advance(step)

    def allocated(self) -> Rig:
        self.run(self.client.allocate())
        return self

    def deliver(self, data: bytes, source: tuple[str, int] = SERVER) -> bool:
        return self.client.datagram_received(data, source)


# -- allocation --------------------------------------------------------------------------------


def test_allocate_answers_the_challenge_and_learns_the_addresses() -> None:
    rig = Rig()
    assert rig.run(rig.client.allocate()) == RELAYED
    first, second = (m for _, m in rig.server.sent(Method.ALLOCATE))
    assert not first.has(USERNAME) and second.get(USERNAME) == USER
    assert second.get(REALM) == REALM_NAME and second.get(NONCE) == "nonce-1"
    # The unauthenticated request is padded past the challenge it draws (our relay's rule).
    assert len(bytes(first)) >= PADDED_ALLOCATE >= len(rig.server.challenges[0])
    assert len(bytes(second)) < PADDED_ALLOCATE  # the authenticated one is not padded
    client = rig.client
    assert (client.relayed, client.mapped, client.lifetime) == (RELAYED, CLIENT, 600)
    assert client.rtt == pytest.approx(2 * LATENCY)
    assert client.state is State.ALLOCATED
    assert client.describe()["relayed"] == "10.0.0.9:50000"


def test_a_turn_credential_is_accepted() -> None:
    credential = mint_credential(b"s", "alice", 0)
    clock = Clock()
    client = TurnClient(clock, SERVER, credential, send=lambda d, a: None)
    assert (client.username, client.password) == (credential.username, credential.password)


def test_unpadded_allocate_when_asked() -> None:
    rig = Rig(pad_first_allocate=False)
    rig.allocated()
    first = rig.server.sent(Method.ALLOCATE)[0][1]
    assert not first.has(PADDING)


def test_a_server_that_does_not_know_padding_gets_it_without() -> None:
    rig = Rig()
    rig.server.reject_padding = True
    assert rig.run(rig.client.allocate()) == RELAYED
    sent = [m for _, m in rig.server.sent(Method.ALLOCATE)]
    assert [m.has(PADDING) for m in sent] == [True, False, False]


def test_retransmits_on_the_schedule_then_times_out() -> None:
    rig = Rig()
    rig.server.silent.add(Method.ALLOCATE)
    with pytest.raises(TurnTimeout) as caught:
        rig.run(rig.client.allocate())
    assert str(caught.value) == "The relay 10.0.0.9:3478 did not answer (UDP)."
    times = [t for t, _ in rig.server.sent(Method.ALLOCATE)]
    assert times == pytest.approx([0.0, 0.1, 0.3, 0.7, 1.5], abs=0.011)
    assert rig.clock.seconds() == pytest.approx(sum(SCHEDULE), abs=0.011)
    assert len({m.transaction_id for _, m in rig.server.sent(Method.ALLOCATE)}) == 1
    assert rig.client.counters["retransmissions"] == 4
    assert rig.client.state is State.FAILED and rig.failures == []  # never allocated
    assert rig.clock.getDelayedCalls() == []


def test_wrong_password_is_refused_clearly() -> None:
    rig = Rig(password="wrong")
    with pytest.raises(TurnRefused) as caught:
        rig.run(rig.client.allocate())
    assert caught.value.status == 401
    assert str(caught.value) == (
        "The relay 10.0.0.9:3478 refused the allocation: 401 Unauthorized "
        "(wrong or expired credentials)."
    )
    assert len(rig.server.sent(Method.ALLOCATE)) == 2  # no endless retrying


def test_quota_refusal_names_the_relay() -> None:
    rig = Rig()
    rig.server.refuse[Method.ALLOCATE] = 486
    with pytest.raises(TurnRefused) as caught:
        rig.run(rig.client.allocate())
    assert caught.value.status == 486 and caught.value.code == "turn-refused"
    assert str(caught.value) == (
        "The relay 10.0.0.9:3478 refused the allocation: 486 Allocation Quota Reached."
    )


def test_a_success_without_integrity_is_dropped_as_forged() -> None:
    rig = Rig()
    rig.server.no_integrity = True
    with pytest.raises(TurnTimeout):
        rig.run(rig.client.allocate())
    assert rig.client.counters["bad-integrity"] >= 1 and rig.client.relayed is None


# -- refreshes ---------------------------------------------------------------------------------


def test_refreshes_at_half_the_lifetime_the_server_granted() -> None:
    rig = Rig()
    rig.server.lifetime = 60
    rig.allocated()
    rig.advance(29.9)
    assert rig.server.sent(Method.REFRESH) == []
    rig.advance(30.5)
    refreshes = rig.server.sent(Method.REFRESH)
    assert [round(t) for t, _ in refreshes] == [30, 60]
    assert all(m.get(LIFETIME) == 600 for _, m in refreshes)  # asks for what it wants
    assert rig.client.counters["refreshes"] == 2 and rig.failures == []


def test_stale_nonce_is_retried_with_the_new_one() -> None:
    rig = Rig().allocated()
    rig.server.stale_once.add(Method.REFRESH)
    rig.advance(300.1)
    rig.clock.advance(0.1)
    nonces = [m.get(NONCE) for _, m in rig.server.sent(Method.REFRESH)]
    assert nonces == ["nonce-1", "nonce-1x"]
    assert rig.client.nonce == "nonce-1x"
    assert rig.client.counters["stale-nonces"] == 1 and rig.failures == []


def test_a_refresh_without_answer_fails_the_allocation_once() -> None:
    rig = Rig().allocated()
    rig.run(rig.client.permit(PEER))
    rig.server.silent.add(Method.REFRESH)
    rig.advance(300)
    for _ in range(40):
        rig.clock.advance(0.1)
    assert rig.failures == ["The relay 10.0.0.9:3478 did not answer (UDP)."]
    assert rig.client.state is State.FAILED
    assert rig.clock.getDelayedCalls() == []  # no refresh of anything is left
    rig.client.send(b"x", PEER)
    assert rig.client.counters["send-dropped"] == 1
    rig.run(rig.client.close())
    assert len(rig.failures) == 1


def test_a_refused_refresh_fails_the_allocation() -> None:
    rig = Rig().allocated()
    rig.server.refuse[Method.REFRESH] = 437
    rig.advance(300.1)
    assert rig.failures == ["The relay 10.0.0.9:3478 refused the refresh: 437 Allocation Mismatch."]


def test_permissions_are_refreshed_for_every_ip_until_close() -> None:
    rig = Rig().allocated()
    rig.run(rig.client.permit(PEER, (PEER[0], 7000), ("10.0.0.3", 1)))
    first = rig.server.sent(Method.CREATE_PERMISSION)[0][1]
    assert [a.value[0] for a in first.attributes if a.type == XOR_PEER_ADDRESS.code] == [
        "10.0.0.2",
        "10.0.0.3",
    ]
    rig.advance(3 * PERMISSION_REFRESH + 1)
    times = [t for t, _ in rig.server.sent(Method.CREATE_PERMISSION)]
    assert len(times) == 4
    assert times[1] - times[0] == pytest.approx(PERMISSION_REFRESH, abs=0.1)
    rig.run(rig.client.close())
    rig.clock.advance(1000)
    assert len(rig.server.sent(Method.CREATE_PERMISSION)) == 4
    assert rig.client.describe()["permissions"] == ["10.0.0.2", "10.0.0.3"]


def test_a_failed_permission_refresh_is_retried_sooner() -> None:
    rig = Rig().allocated()
    rig.run(rig.client.permit(PEER))
    rig.server.refuse[Method.CREATE_PERMISSION] = 403
    rig.advance(PERMISSION_REFRESH + 0.1)
    del rig.server.refuse[Method.CREATE_PERMISSION]
    rig.advance(20.1)
    times = [round(t) for t, _ in rig.server.sent(Method.CREATE_PERMISSION)]
    assert times == [0, 240, 260]
    assert rig.client.counters["maintenance-failures"] == 1 and rig.failures == []


def test_permit_refused_raises() -> None:
    rig = Rig().allocated()
    rig.server.refuse[Method.CREATE_PERMISSION] = 403
    with pytest.raises(TurnRefused, match=r"refused the permission for 10\.0\.0\.2: 403"):
        rig.run(rig.client.permit(PEER))


# -- data --------------------------------------------------------------------------------------


def last_frame(rig: Rig) -> bytes:
    return rig.server.received[-1][1]


def test_send_uses_an_indication_until_a_channel_is_bound() -> None:
    rig = Rig().allocated()
    rig.run(rig.client.permit(PEER))
    rig.client.send(b"hello", PEER)
    indication = StunMessage.parse(last_frame(rig))
    assert (indication.method, indication.message_class) == (Method.SEND, StunClass.INDICATION)
    assert indication.get(XOR_PEER_ADDRESS) == PEER and indication.get(DATA) == b"hello"
    channel = rig.run(rig.client.bind(PEER))
    assert channel == 0x4000
    assert rig.run(rig.client.bind(PEER)) == channel  # bound again: the same number
    bind = rig.server.sent(Method.CHANNEL_BIND)[0][1]
    assert bind.get(CHANNEL_NUMBER) == channel and bind.get(XOR_PEER_ADDRESS) == PEER
    rig.client.send(b"hello", PEER)
    assert last_frame(rig) == bytes(ChannelData(channel, b"hello"))  # UDP: not padded
    rig.client.send(b"other", ("10.0.0.2", 6001))  # another port of the same host: no channel
    assert StunMessage.parse(last_frame(rig)).method == Method.SEND
    assert rig.client.describe()["packets_sent"] == 3


def test_channels_are_rebound_before_they_expire() -> None:
    rig = Rig().allocated()
    rig.run(rig.client.bind(PEER))
    rig.advance(CHANNEL_REFRESH + 0.1)
    rig.advance(CHANNEL_REFRESH + 0.1)
    times = [round(t) for t, _ in rig.server.sent(Method.CHANNEL_BIND)]
    assert times == [0, 300, 600]
    # the peer's permission is kept too (ChannelBind's lasts only 300 s)
    assert len(rig.server.sent(Method.CREATE_PERMISSION)) == 2


def test_data_from_peers_is_delivered_with_their_address() -> None:
    rig = Rig().allocated()
    channel = rig.run(rig.client.bind(PEER))
    indication = StunMessage(
        Method.DATA,
        StunClass.INDICATION,
        b"\x01" * 12,
        (XOR_PEER_ADDRESS(("10.0.0.3", 9)), DATA(b"one")),
    )
    assert rig.deliver(bytes(indication))
    assert rig.deliver(bytes(ChannelData(channel, b"two")))
    assert rig.deliver(bytes(ChannelData(0x4FFF, b"unknown channel")))
    assert rig.data == [(b"one", ("10.0.0.3", 9)), (b"two", PEER)]
    assert rig.client.counters["unknown-channel"] == 1
    assert rig.client.describe()["bytes_received"] == 6


def test_only_its_own_datagrams_are_claimed() -> None:
    rig = Rig().allocated()
    channel_data = bytes(ChannelData(0x4000, b"x"))
    assert not rig.deliver(channel_data, ("10.0.0.66", 3478))  # not from the server
    assert not rig.deliver(b"\x80" + bytes(30))  # RTP
    assert not rig.deliver(b"V" + bytes(30))  # a connectivity check
    other = StunMessage.request().success(XOR_MAPPED_ADDRESS(CLIENT))
    assert not rig.deliver(bytes(other))  # another client's Binding response
    assert not rig.deliver(bytes(StunMessage.request()))  # a request


def test_sending_before_allocation_is_dropped() -> None:
    rig = Rig()
    rig.client.send(b"x", PEER)
    assert rig.server.received == [] and rig.client.counters["send-dropped"] == 1
    with pytest.raises(ValueError, match="not allocated"):
        rig.run(rig.client.permit(PEER))


# -- close -------------------------------------------------------------------------------------


def test_close_deletes_the_allocation_once() -> None:
    rig = Rig().allocated()
    rig.run(rig.client.bind(PEER))
    rig.run(rig.client.close())
    rig.run(rig.client.close())
    refreshes = rig.server.sent(Method.REFRESH)
    assert [m.get(LIFETIME) for _, m in refreshes] == [0]
    assert rig.client.state is State.CLOSED and rig.failures == []
    assert rig.clock.getDelayedCalls() == []
    assert rig.client.counters["deallocations"] == 1


def test_close_is_bounded_when_the_relay_is_silent() -> None:
    rig = Rig().allocated()
    rig.server.silent.add(Method.REFRESH)
    started = rig.clock.seconds()
    rig.run(rig.client.close())
    assert rig.clock.seconds() - started == pytest.approx(CLOSE_TIMEOUT, abs=0.02)
    assert rig.client.counters["deallocation-failures"] == 1 and rig.failures == []


def test_close_while_allocating_abandons_the_allocation() -> None:
    rig = Rig()
    rig.server.silent.add(Method.ALLOCATE)
    from twisted.internet.defer import Deferred

    outcome: list[Any] = []
    Deferred.fromCoroutine(rig.client.allocate()).addBoth(outcome.append)
    rig.clock.advance(0.05)
    rig.run(rig.client.close())
    assert outcome and outcome[0].check(TurnTimeout)
    assert rig.clock.getDelayedCalls() == []


# -- TCP ---------------------------------------------------------------------------------------


class Pipe(StringTransport):
    """A connection whose bytes go straight to the scripted server's stream."""

    def __init__(self, rig: TcpRig) -> None:
        super().__init__()
        self.rig = rig

    def write(self, data: bytes) -> None:
        super().write(data)
        self.rig.from_client(data)

    def loseConnection(self) -> None:
        super().loseConnection()
        self.rig.stream.connectionLost()


class TcpRig:
    def __init__(self) -> None:
        self.clock = Clock()
        self.server = ScriptedServer()
        self.server.now = self.clock.seconds
        self.framer = StreamFramer()
        self.client = TurnClient(self.clock, SERVER, (USER, PASSWORD), transport="tcp")
        self.failures: list[str] = []
        self.data: list[tuple[bytes, tuple[str, int]]] = []
        self.client.on_failed = self.failures.append
        self.client.on_data = lambda data, peer: self.data.append((data, peer))
        self.stream = TurnStream(self.client)
        self.stream.makeConnection(Pipe(self))
        self.frames: list[bytes] = []

    def from_client(self, data: bytes) -> None:
        for frame in self.framer.feed(data):
            self.frames.append(frame)
            answer = self.server.handle(frame)
            if answer is not None:
                self.clock.callLater(2 * LATENCY, self.stream.dataReceived, answer)

    def run(self, coroutine: Any) -> Any:
        rig = Rig.__new__(Rig)
        rig.clock = self.clock
        return Rig.run(rig, coroutine, seconds=10)


def test_tcp_allocates_without_retransmitting_and_pads_channel_data() -> None:
    rig = TcpRig()
    assert rig.run(rig.client.allocate()) == RELAYED
    channel = rig.run(rig.client.bind(PEER))
    rig.client.send(b"abc", PEER)
    assert rig.stream.transport is not None
    assert rig.stream.transport.value().endswith(ChannelData(channel, b"abc").to_bytes(padded=True))
    # Frames from the server may arrive split anywhere.
    answer = ChannelData(channel, b"hello").to_bytes(padded=True) * 2
    for index in range(len(answer)):
        rig.stream.dataReceived(answer[index : index + 1])
    assert rig.data == [(b"hello", PEER), (b"hello", PEER)]


def test_tcp_request_times_out_once() -> None:
    rig = TcpRig()
    rig.server.silent.add(Method.ALLOCATE)
    with pytest.raises(TurnTimeout, match=r"did not answer \(TCP\)"):
        rig.run(rig.client.allocate())
    assert len(rig.server.sent(Method.ALLOCATE)) == 1
    assert rig.clock.seconds() == pytest.approx(5.0, abs=0.02)


def test_tcp_connection_lost_fails_the_allocation() -> None:
    rig = TcpRig()
    rig.run(rig.client.allocate())
    rig.stream.connectionLost()
    assert rig.failures == ["The TCP connection to the relay 10.0.0.9:3478 closed."]
    assert rig.clock.getDelayedCalls() == []


def test_tcp_garbage_closes_the_connection() -> None:
    rig = TcpRig()
    rig.run(rig.client.allocate())
    rig.stream.dataReceived(b"\xff" * 8)
    assert rig.failures and "sent a bad TCP frame" in rig.failures[0]
    assert rig.client.state is State.FAILED


# -- robustness --------------------------------------------------------------------------------


def stun_shaped(body: bytes, tid: bytes, first: int) -> bytes:
    body = body[: len(body) - len(body) % 4]
    header = bytes([first & 0x3F, 0x13]) + len(body).to_bytes(2, "big")
    return header + MAGIC_COOKIE.to_bytes(4, "big") + tid + body


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=200),
        st.builds(lambda b: b"\x40" + b, st.binary(max_size=80)),
        st.tuples(st.binary(max_size=120), st.integers(0, 255)),
    ),
    st.booleans(),
)
def test_no_datagram_from_the_server_raises(data: Any, pending: bool) -> None:
    rig = Rig().allocated()
    rig.run(rig.client.bind(PEER))
    if pending:  # a request in flight, so the datagram may claim its transaction id
        rig.server.silent.add(Method.CREATE_PERMISSION)
        from twisted.internet.defer import Deferred

        Deferred.fromCoroutine(rig.client.permit(PEER)).addErrback(lambda _: None)
    tid = next(iter(rig.client._pending), b"\x00" * 12)
    if isinstance(data, tuple):
        body, first = data
        data = stun_shaped(body, tid, first)
    rig.deliver(data)
    for _ in range(40):
        rig.clock.advance(0.1)
    assert rig.client.state is State.ALLOCATED


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=60), max_size=6))
def test_no_tcp_stream_raises(chunks: list[bytes]) -> None:
    rig = TcpRig()
    rig.run(rig.client.allocate())
    for chunk in chunks:
        rig.stream.dataReceived(chunk)
    assert rig.client.state in (State.ALLOCATED, State.FAILED)


def test_errors_and_codes() -> None:
    error = TurnRefused("x", 486, "Allocation Quota Reached")
    assert (error.status, error.reason, error.code) == (
        486,
        "Allocation Quota Reached",
        "turn-refused",
    )
    assert TurnTimeout().code == "turn-timeout"
    with pytest.raises(ValueError, match="needs the socket"):
        TurnClient(Clock(), SERVER, (USER, PASSWORD))
    assert ERROR_CODE.code == 0x0009
