"""The node's login client against an in-process login server on 127.0.0.1."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection
from twisted.python.failure import Failure

from client.loginclient import (
    LoginClient,
    LoginServerNotTrusted,
    LoginServerUnreachable,
    parse_address,
)
from login_server.protocol import LoginServerFactory
from overlay.certificate import CLOCK_SKEW, Role
from overlay.channel import Hello
from overlay.errors import VoipError
from overlay.framing import FrameDecoder
from overlay.identity import IdentityKey
from overlay.login_protocol import (
    InvalidUsernameReply,
    RateLimited,
    SessionExpired,
    UnknownUser,
    UsernameTaken,
    WrongPassword,
)
from overlay.messages import decode
from tests.support.loginserver import LoginServerFixture, make_login_server

PASSWORD = "alice's password"
LIFETIME = 3600


@dataclass
class Served:
    ls: LoginServerFixture
    #: The login server's own clock (rate limits, certificate times); sockets use the reactor.
    clock: Clock
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, ca_key: bytes | None = None, timeout: float = 5.0) -> LoginClient:
        return LoginClient(reactor, self.address, ca_key or self.ls.ca_public, timeout)


@pytest_twisted.async_yield_fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    clock = Clock()
    # The server's clock runs behind the real one, so tests may move it on (rate-limit windows)
    # and the certificates it issues still verify against the client's real clock.
    clock.advance(reactor.seconds() - 1000)
    ls = make_login_server(tmp_path, clock, open_registration=True, cert_lifetime=LIFETIME)
    port = reactor.listenTCP(0, LoginServerFactory(ls.server, reactor), interface="127.0.0.1")
    try:
        yield Served(ls, clock, port.getHost().port)
    finally:
        await port.stopListening()
        ls.server.store.close()


async def _failure_of(work: Any) -> BaseException:
    try:
        await work
    except Exception as exc:
        return exc
    raise AssertionError("the call did not fail")


# -- the happy path ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_register_login_renew_ping(served: Served) -> None:
    client = served.client()
    assert await client.register("Alice", PASSWORD) == "alice"

    identity = IdentityKey.generate()
    result = await client.login("alice", PASSWORD, identity)
    cert = result.certificate.verify(
        served.ls.ca_public, reactor.seconds(), Role.USER, username="alice"
    )
    assert cert.public_key == identity.public_key
    assert cert.not_after - cert.not_before == LIFETIME
    assert result.server_time == served.clock.seconds()
    assert result.bootstrap == ()

    renewed = await client.renew(result.certificate, identity)
    assert renewed.certificate.username == "alice"
    assert renewed.certificate.public_key == identity.public_key
    assert renewed.certificate.cert.serial > result.certificate.cert.serial

    rtt = await client.ping()
    assert rtt >= 0.0
    assert served.ls.server.counters["login"] == 1
    assert served.ls.server.counters["renew"] == 1


@pytest_twisted.ensureDeferred
async def test_login_with_capitals_in_the_name(served: Served) -> None:
    client = served.client()
    await client.register("alice", PASSWORD)
    result = await client.login("Alice", PASSWORD, IdentityKey.generate())
    assert result.certificate.username == "alice"


@pytest_twisted.ensureDeferred
async def test_many_clients_at_once(served: Served) -> None:
    from twisted.internet.defer import gatherResults

    client = served.client()
    await client.register("alice", PASSWORD)
    identities = [IdentityKey.generate() for _ in range(8)]
    results = await gatherResults(
        [Deferred.fromCoroutine(client.login("alice", PASSWORD, i)) for i in identities]
    )
    assert [r.certificate.public_key for r in results] == [i.public_key for i in identities]
    assert len({r.certificate.cert.serial for r in results}) == 8


# -- the server is not who we think, or not there ---------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_server_with_another_ca_key_is_not_trusted(served: Served) -> None:
    client = served.client(ca_key=IdentityKey.generate().public_key)
    exc = await _failure_of(client.ping())
    assert isinstance(exc, LoginServerNotTrusted)
    assert str(exc) == (
        f"The server at {served.address} did not prove it holds the CA key you trust "
        "(wrong --ca, or not our login server)."
    )
    # Nothing was sent inside a channel to the wrong server.
    assert served.ls.server.counters["login"] == 0


@pytest_twisted.ensureDeferred
async def test_connection_refused() -> None:
    port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    number = port.getHost().port
    await port.stopListening()
    client = LoginClient(reactor, f"127.0.0.1:{number}", IdentityKey.generate().public_key, 5.0)
    exc = await _failure_of(client.ping())
    assert isinstance(exc, LoginServerUnreachable)
    assert str(exc) == f"Cannot reach the login server at 127.0.0.1:{number}: connection refused."


@pytest_twisted.ensureDeferred
async def test_a_server_that_never_answers_on_a_real_socket() -> None:
    received = bytearray()

    class Silent(Protocol):
        def dataReceived(self, data: bytes) -> None:
            received.extend(data)

    port = reactor.listenTCP(0, Factory.forProtocol(Silent), interface="127.0.0.1")
    number = port.getHost().port
    try:
        client = LoginClient(
            reactor, f"127.0.0.1:{number}", IdentityKey.generate().public_key, timeout=0.3
        )
        exc = await _failure_of(client.ping())
    finally:
        await port.stopListening()
    assert isinstance(exc, LoginServerUnreachable)
    assert str(exc) == f"The login server at 127.0.0.1:{number} did not answer within 0.3 s."
    # The client did say hello first.
    [frame] = FrameDecoder().feed(bytes(received))
    assert isinstance(decode(frame), Hello)


class _SilentEndpoint:
    """Connects at once to a peer that never answers; records what the client sent."""

    def __init__(self) -> None:
        self.transport = StringTransportWithDisconnection()

    def connect(self, factory: Factory) -> Deferred[Any]:
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 7000))
        assert protocol is not None
        self.transport.protocol = protocol
        protocol.makeConnection(self.transport)
        return succeed(protocol)


def test_a_server_that_never_answers_on_a_clock() -> None:
    clock = Clock()
    endpoint = _SilentEndpoint()
    client = LoginClient(
        clock,
        "127.0.0.1:7000",
        IdentityKey.generate().public_key,
        timeout=15.0,
        endpoint_factory=lambda _r, _h, _p, _t: endpoint,
    )
    outcome: list[Any] = []
    Deferred.fromCoroutine(client.ping()).addBoth(outcome.append)
    clock.advance(14.9)
    assert outcome == []
    assert endpoint.transport.connected
    clock.advance(0.1)
    [failure] = outcome
    assert isinstance(failure, Failure)
    assert isinstance(failure.value, LoginServerUnreachable)
    assert str(failure.value) == "The login server at 127.0.0.1:7000 did not answer within 15 s."
    assert not endpoint.transport.connected
    assert clock.getDelayedCalls() == []


# -- error replies -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_error_replies_become_the_matching_exceptions(served: Served) -> None:
    client = served.client()
    await client.register("alice", PASSWORD)
    identity = IdentityKey.generate()

    exc = await _failure_of(client.login("alice", "not the password", identity))
    assert isinstance(exc, WrongPassword)
    assert str(exc) == "Wrong password for alice."

    exc = await _failure_of(client.login("bob", PASSWORD, identity))
    assert isinstance(exc, UnknownUser)
    assert str(exc) == "There is no account named bob."

    exc = await _failure_of(client.register("ALICE", PASSWORD))
    assert isinstance(exc, UsernameTaken)
    assert str(exc) == "The username alice is taken."

    exc = await _failure_of(client.register("a b", PASSWORD))
    assert isinstance(exc, InvalidUsernameReply)


@pytest_twisted.ensureDeferred
async def test_rate_limited_carries_retry_after(served: Served) -> None:
    client = served.client()
    await client.register("alice", PASSWORD)
    identity = IdentityKey.generate()
    for _ in range(5):
        assert isinstance(
            await _failure_of(client.login("alice", "guess", identity)), WrongPassword
        )
    served.clock.advance(100)
    exc = await _failure_of(client.login("alice", PASSWORD, identity))
    assert isinstance(exc, RateLimited)
    assert exc.retry_after == 200.0
    assert str(exc) == "Too many failed logins for alice; try again in 200 s."

    served.clock.advance(200)
    result = await client.login("alice", PASSWORD, identity)
    assert result.certificate.username == "alice"


@pytest_twisted.ensureDeferred
async def test_renewing_an_expired_certificate(served: Served) -> None:
    client = served.client()
    await client.register("alice", PASSWORD)
    identity = IdentityKey.generate()
    result = await client.login("alice", PASSWORD, identity)
    served.clock.advance(LIFETIME + CLOCK_SKEW + 1)
    exc = await _failure_of(client.renew(result.certificate, identity))
    assert isinstance(exc, SessionExpired)
    assert str(exc) == "Your certificate has expired; log in again."


# -- addresses ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:7000", ("127.0.0.1", 7000)),
        ("login.example.org:443", ("login.example.org", 443)),
        ("[::1]:7000", ("::1", 7000)),
        ("[2001:db8::5]:65535", ("2001:db8::5", 65535)),
        ("localhost:1", ("localhost", 1)),
    ],
)
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "nonsense", "127.0.0.1", "127.0.0.1:", ":7000", "host:0", "host:65536", "host:-1",
     "host:7000x", "host:seven", "[::1]", "host:\u00b2", "host:\u0667"],
)  # fmt: skip
def test_parse_address_refuses_garbage(text: str) -> None:
    with pytest.raises(VoipError) as caught:
        parse_address(text)
    assert str(caught.value) == f"{text!r} is not an address like 127.0.0.1:7000."


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=30))
@example("x:\u00b9")
def test_parse_address_never_fails_any_other_way(text: str) -> None:
    try:
        host, port = parse_address(text)
    except VoipError as exc:
        assert "is not an address like 127.0.0.1:7000." in str(exc)
    else:
        assert host
        assert 0 < port < 65536
