"""The login server's side of a connection, driven in memory on a Clock."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection
from twisted.python.failure import Failure
from twisted.test import iosim

from client.loginclient import LoginServerNotTrusted, _Connection
from login_server.protocol import (
    HANDSHAKE_TIMEOUT,
    IDLE_TIMEOUT,
    MAX_PENDING,
    LoginServerConnection,
    LoginServerFactory,
)
from overlay.certificate import Role, SignedCertificate
from overlay.channel import ClientHandshake, Hello, HelloReply, Sealed, Session
from overlay.framing import HEADER, MAX_PAYLOAD, Frame, FrameDecoder
from overlay.identity import IdentityKey
from overlay.login_protocol import (
    CertificateReply,
    Login,
    Register,
    Registered,
    proof_message,
)
from overlay.messages import Error, Message, Ping, Pong, decode
from tests.support.loginserver import LoginServerFixture, make_login_server

START = 1_700_000_000.0
PASSWORD = "alice's password"
CLIENT_ADDRESS = IPv4Address("TCP", "198.51.100.7", 40000)


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(START)
    return clock


def _fixture(tmp_path: Path, clock: Clock, **options: Any) -> LoginServerFixture:
    ls = make_login_server(tmp_path, clock, open_registration=True, **options)
    results: list[Any] = []
    Deferred.fromCoroutine(
        ls.server.register(Register(1, "alice", PASSWORD), "203.0.113.1")
    ).addBoth(results.append)
    assert isinstance(results[0], Registered)
    return ls


@pytest.fixture
def ls(tmp_path: Path, clock: Clock) -> Iterator[LoginServerFixture]:
    fixture = _fixture(tmp_path, clock)
    yield fixture
    fixture.server.store.close()


@pytest.fixture
def factory(ls: LoginServerFixture, clock: Clock) -> LoginServerFactory:
    return LoginServerFactory(ls.server, clock)


class RawFrame:
    """Any frame, to be sealed like a message (for types no message class has)."""

    NAME = "raw"

    def __init__(self, frame: Frame) -> None:
        self.frame = frame

    def __bytes__(self) -> bytes:
        return bytes(self.frame)


class Wire:
    """One server connection over an in-memory transport, and a client made by hand."""

    def __init__(self, factory: LoginServerFactory, ca_public: bytes) -> None:
        self.protocol = factory.buildProtocol(CLIENT_ADDRESS)
        assert isinstance(self.protocol, LoginServerConnection)
        self.transport = StringTransportWithDisconnection()
        self.transport.protocol = self.protocol
        self.protocol.makeConnection(self.transport)
        self.ca_public = ca_public
        self.decoder = FrameDecoder()
        self.session: Session | None = None

    @property
    def open(self) -> bool:
        return bool(self.transport.connected)

    def write(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def send(self, message: Any) -> None:
        self.write(bytes(message if self.session is None else self.session.seal(message)))

    def received(self) -> list[Message]:
        data = self.transport.value()
        self.transport.clear()
        messages = []
        for frame in self.decoder.feed(data):
            message = decode(frame)
            if self.session is not None:
                assert isinstance(message, Sealed), f"{message.NAME} came in the clear"
                message = self.session.open(message)
            messages.append(message)
        return messages

    def one(self) -> Message:
        messages = self.received()
        assert len(messages) == 1, messages
        return messages[0]

    def handshake(self) -> Session:
        client = ClientHandshake(self.ca_public)
        self.send(client.hello())
        reply = self.one()
        assert isinstance(reply, HelloReply)
        self.session = client.finish(reply)
        return self.session

    def ping(self, rid: int = 99) -> Pong:
        self.send(Ping(rid))
        reply = self.one()
        assert isinstance(reply, Pong), reply
        assert reply.rid == rid
        return reply

    def login_message(self, rid: int, key: IdentityKey, password: str = PASSWORD) -> Login:
        assert self.session is not None
        proof = key.sign(proof_message(self.session.transcript, "alice", key.public_key))
        return Login(rid, "alice", password, key.public_key, proof)


def _error(message: Message) -> Error:
    assert isinstance(message, Error), message
    return message


# -- the whole exchange ------------------------------------------------------------------


def test_handshake_then_login_with_the_real_client_protocol(
    ls: LoginServerFixture, factory: LoginServerFactory, clock: Clock
) -> None:
    server = factory.buildProtocol(CLIENT_ADDRESS)
    client = _Connection(clock, ls.ca_public, 15.0)
    pump = iosim.connect(
        server, iosim.FakeTransport(server, True), client, iosim.FakeTransport(client, False)
    )
    ready: list[Any] = []
    client.ready.addBoth(ready.append)
    pump.flush()
    assert ready == [client]
    assert client.session is not None

    key = IdentityKey.generate()
    transcript = client.session.transcript
    replies: list[Any] = []
    client.request(
        lambda rid: Login(
            rid,
            "alice",
            PASSWORD,
            key.public_key,
            key.sign(proof_message(transcript, "alice", key.public_key)),
        )
    ).addBoth(replies.append)
    pump.flush()
    [reply] = replies
    assert isinstance(reply, CertificateReply)
    assert reply.rid == 1
    cert = SignedCertificate.parse(reply.certificate).verify(
        ls.ca_public, clock.seconds(), Role.USER, username="alice"
    )
    assert cert.public_key == key.public_key

    pings: list[Any] = []
    client.request(Ping).addBoth(pings.append)
    pump.flush()
    assert isinstance(pings[0], Pong)
    assert pings[0].rid == 2
    assert pings[0].time == clock.seconds()


def test_the_real_client_refuses_a_server_with_another_key(
    factory: LoginServerFactory, clock: Clock
) -> None:
    server = factory.buildProtocol(CLIENT_ADDRESS)
    client = _Connection(clock, IdentityKey.generate().public_key, 15.0)
    pump = iosim.connect(
        server, iosim.FakeTransport(server, True), client, iosim.FakeTransport(client, False)
    )
    ready: list[Any] = []
    client.ready.addBoth(ready.append)
    pump.flush()
    [failure] = ready
    assert isinstance(failure, Failure)
    assert isinstance(failure.value, LoginServerNotTrusted)
    assert client.session is None
    assert client.closed


def test_login_by_hand(ls: LoginServerFixture, factory: LoginServerFactory) -> None:
    wire = Wire(factory, ls.ca_public)
    session = wire.handshake()
    key = IdentityKey.generate()
    wire.send(wire.login_message(5, key))
    reply = wire.one()
    assert isinstance(reply, CertificateReply)
    assert reply.rid == 5
    assert SignedCertificate.parse(reply.certificate).public_key == key.public_key
    # A wrong password is an error naming the request, and the connection stays usable.
    wire.send(wire.login_message(6, key, password="wrong password"))
    error = _error(wire.one())
    assert (error.rid, error.request, error.code) == (6, "login", "wrong-password")
    assert error.message == "Wrong password for alice."
    assert wire.open
    assert session.tx_counter == 2
    wire.ping()


def test_handshake_reply_is_in_the_clear_and_then_everything_is_sealed(
    ls: LoginServerFixture, factory: LoginServerFactory
) -> None:
    wire = Wire(factory, ls.ca_public)
    client = ClientHandshake(ls.ca_public)
    wire.write(bytes(client.hello()))
    raw = wire.transport.value()
    reply = decode(Frame.parse(raw, MAX_PAYLOAD))
    assert isinstance(reply, HelloReply)
    wire.transport.clear()
    wire.session = client.finish(reply)
    wire.send(Ping(1))
    assert decode(Frame.parse(wire.transport.value(), MAX_PAYLOAD)).NAME == "sealed"


# -- malformed input ---------------------------------------------------------------------


def test_garbage_gets_a_frame_error_and_the_connection_is_closed(
    ls: LoginServerFixture, factory: LoginServerFactory
) -> None:
    wire = Wire(factory, ls.ca_public)
    wire.write(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n")
    error = _error(wire.one())
    assert (error.rid, error.request, error.code) == (0, "frame", "bad-frame")
    assert error.message == "Unsupported wire version 71."
    assert not wire.open
    assert ls.server.counters["bad-frames"] == 1
    wire.write(bytes(Ping(1)))  # ignored: the connection is gone
    assert wire.transport.value() == b""


def test_garbage_after_the_handshake_is_answered_sealed(
    ls: LoginServerFixture, factory: LoginServerFactory
) -> None:
    wire = Wire(factory, ls.ca_public)
    wire.handshake()
    wire.write(b"\x07" * 64)
    error = _error(wire.one())
    assert (error.request, error.code) == ("frame", "bad-frame")
    assert error.message == "Unsupported wire version 7."
    assert not wire.open


def test_a_huge_frame_is_refused_before_it_is_buffered(
    ls: LoginServerFixture, factory: LoginServerFactory
) -> None:
    wire = Wire(factory, ls.ca_public)
    wire.handshake()
    wire.write(HEADER.pack(1, Sealed.TYPE, 10_000_000) + b"x" * 4096)
    error = _error(wire.one())
    assert (error.request, error.code) == ("frame", "bad-frame")
    assert error.message == "Frame of 10000000 bytes exceeds the limit of 65536."
    assert not wire.open
    assert wire.protocol.decoder.buffered == 0
    wire.write(b"x" * 65536)
    assert wire.protocol.decoder.buffered == 0
    assert ls.server.counters["bad-frames"] == 1


def test_an_unknown_sealed_message_type_is_answered_and_the_connection_goes_on(
    ls: LoginServerFixture, factory: LoginServerFactory
) -> None:
    wire = Wire(factory, ls.ca_public)
    session = wire.handshake()
    wire.write(bytes(session.seal(RawFrame(Frame(0x0FFF, cbor2.dumps({"rid": 3}))))))
    error = _error(wire.one())
    assert error.code == "unknown-type"
    assert error.message == "Unknown message type 0x0fff."
    assert wire.open
    assert ls.server.counters["bad-messages"] == 1
    wire.ping()


def test_a_known_message_with_bad_fields_is_answered_and_the_connection_goes_on(
    ls: LoginServerFixture, factory: LoginServerFactory
) -> None:
    wire = Wire(factory, ls.ca_public)
    session = wire.handshake()
    wire.write(bytes(session.seal(RawFrame(Frame(Login.TYPE, cbor2.dumps({"rid": "x"}))))))
    error = _error(wire.one())
    assert error.code == "bad-message"
    assert error.message == "login.rid must be int, not str."
    assert wire.open
    wire.ping()


def test_errors_for_bad_sealed_messages_name_the_inner_request(
    ls: LoginServerFixture, factory: LoginServerFactory
) -> None:
    wire = Wire(factory, ls.ca_public)
    session = wire.handshake()
    wire.write(bytes(session.seal(RawFrame(Frame(Login.TYPE, cbor2.dumps({"rid": "x"}))))))
    wire.write(bytes(session.seal(RawFrame(Frame(0x0FFF, cbor2.dumps({"rid": 3}))))))
    assert [_error(m).request for m in wire.received()] == ["login", "type 0x0fff"]


def test_a_message_in_the_clear_after_the_handshake_closes_the_connection(
    ls: LoginServerFixture, factory: LoginServerFactory
) -> None:
    wire = Wire(factory, ls.ca_public)
    session = wire.handshake()
    wire.write(bytes(Ping(1)))
    error = _error(wire.one())  # still sealed: the server's side of the channel is intact
    assert (error.request, error.code) == ("frame", "channel-error")
    assert error.message == "Got ping in the clear after the handshake."
    assert not wire.open
    assert session.rx_counter == 1


def test_a_tampered_sealed_frame_closes_the_connection(
    ls: LoginServerFixture, factory: LoginServerFactory
) -> None:
    wire = Wire(factory, ls.ca_public)
    session = wire.handshake()
    sealed = session.seal(Ping(1))
    wire.write(bytes(Sealed(sealed.box[:-1] + bytes([sealed.box[-1] ^ 1]))))
    error = _error(wire.one())
    assert error.message == "A sealed frame failed to decrypt (altered or replayed)."
    assert not wire.open


def test_a_replayed_sealed_frame_closes_the_connection(
    ls: LoginServerFixture, factory: LoginServerFactory
) -> None:
    wire = Wire(factory, ls.ca_public)
    session = wire.handshake()
    sealed = bytes(session.seal(Ping(1)))
    wire.write(sealed)
    assert isinstance(wire.one(), Pong)
    wire.write(sealed)
    assert _error(wire.one()).message == "A sealed frame failed to decrypt (altered or replayed)."
    assert not wire.open


def test_the_first_message_must_be_hello(
    ls: LoginServerFixture, factory: LoginServerFactory
) -> None:
    wire = Wire(factory, ls.ca_public)
    wire.send(Ping(4))
    error = _error(wire.one())
    assert (error.rid, error.request, error.code) == (0, "ping", "protocol-error")
    assert error.message == "Expected hello first."
    assert not wire.open


def test_a_hello_with_a_bad_key_closes_the_connection(
    ls: LoginServerFixture, factory: LoginServerFactory
) -> None:
    wire = Wire(factory, ls.ca_public)
    wire.send(Hello(b"short"))
    error = _error(wire.one())
    assert (error.request, error.code) == ("hello", "channel-error")
    assert error.message == "The client's handshake key has the wrong size."
    assert not wire.open


def test_a_reply_is_not_a_request(ls: LoginServerFixture, factory: LoginServerFactory) -> None:
    wire = Wire(factory, ls.ca_public)
    wire.handshake()
    wire.send(Pong(8, 0.0))
    error = _error(wire.one())
    assert (error.rid, error.request, error.code) == (8, "pong", "protocol-error")
    assert error.message == "pong is not a request."
    assert wire.open


def test_one_bad_connection_does_not_affect_another(
    ls: LoginServerFixture, factory: LoginServerFactory
) -> None:
    good = Wire(factory, ls.ca_public)
    good.handshake()
    bad = Wire(factory, ls.ca_public)
    bad.handshake()
    bad.write(b"\xff" * 32)
    assert not bad.open
    third = Wire(factory, ls.ca_public)
    third.write(HEADER.pack(1, 0x0010, 5_000_000))
    assert not third.open
    assert good.open
    good.ping()
    good.send(good.login_message(2, IdentityKey.generate()))
    assert isinstance(good.one(), CertificateReply)
    assert ls.server.counters["bad-frames"] == 2


# -- time --------------------------------------------------------------------------------


def test_a_connection_that_never_says_hello_is_closed_after_the_handshake_timeout(
    ls: LoginServerFixture, factory: LoginServerFactory, clock: Clock
) -> None:
    wire = Wire(factory, ls.ca_public)
    wire.write(bytes(Ping(1))[:3])  # a partial frame does not count as a hello
    clock.advance(HANDSHAKE_TIMEOUT - 0.1)
    assert wire.open
    clock.advance(0.1)
    assert not wire.open
    assert wire.transport.value() == b""
    assert HANDSHAKE_TIMEOUT == 10.0


def test_an_idle_connection_is_closed_after_the_idle_timeout(
    ls: LoginServerFixture, factory: LoginServerFactory, clock: Clock
) -> None:
    wire = Wire(factory, ls.ca_public)
    wire.handshake()
    # After the handshake the longer idle timeout applies, counted from the last frame.
    clock.advance(IDLE_TIMEOUT - 1)
    assert wire.open
    wire.ping()
    clock.advance(IDLE_TIMEOUT - 1)
    assert wire.open
    clock.advance(1)
    assert not wire.open
    assert IDLE_TIMEOUT == 120.0


def test_the_idle_timer_is_cancelled_when_the_peer_leaves(
    ls: LoginServerFixture, factory: LoginServerFactory, clock: Clock
) -> None:
    wire = Wire(factory, ls.ca_public)
    wire.handshake()
    wire.transport.loseConnection()
    assert wire.protocol.closed
    assert clock.getDelayedCalls() == []


# -- concurrency -------------------------------------------------------------------------


def test_too_many_requests_at_once(tmp_path: Path, clock: Clock) -> None:
    held: list[tuple[Deferred[Any], Any]] = []

    def run_slow(work: Any) -> Deferred[Any]:
        waiting: Deferred[Any] = Deferred()
        held.append((waiting, work))
        return waiting

    ls = _fixture(tmp_path, clock)
    ls.server.run_slow = run_slow  # from now on, password checks wait until we say
    try:
        wire = Wire(LoginServerFactory(ls.server, clock), ls.ca_public)
        wire.handshake()
        key = IdentityKey.generate()
        for rid in range(1, MAX_PENDING + 2):
            wire.send(wire.login_message(rid, key))
        error = _error(wire.one())
        assert (error.rid, error.request, error.code) == (MAX_PENDING + 1, "login", "server-error")
        assert error.message == "Too many requests at once on one connection."
        assert ls.server.counters["busy"] == 1
        assert len(held) == MAX_PENDING
        assert wire.open
        wire.ping()  # a ping is answered at once even now

        for waiting, work in held:
            waiting.callback(work())
        replies = wire.received()
        assert [r.rid for r in replies if isinstance(r, CertificateReply)] == [1, 2, 3, 4]
        # The slots are free again.
        wire.send(wire.login_message(10, key))
        held[-1][0].callback(held[-1][1]())
        assert isinstance(wire.one(), CertificateReply)
    finally:
        ls.server.store.close()


def test_an_internal_failure_is_a_server_error_without_details(
    ls: LoginServerFixture, factory: LoginServerFactory, no_logged_errors: Any
) -> None:
    wire = Wire(factory, ls.ca_public)
    wire.handshake()
    ls.server.store.close()  # the database goes away under the server
    no_logged_errors.expect(1)
    wire.send(wire.login_message(3, IdentityKey.generate()))
    error = _error(wire.one())
    assert (error.rid, error.request, error.code) == (3, "login", "server-error")
    assert error.message == "The login server failed; try again later."
    assert str(ls.data.path) not in error.message
    assert ls.server.counters["internal-error"] == 1
    assert len(no_logged_errors.events) == 1
    assert wire.open
