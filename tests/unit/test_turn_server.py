"""The TURN server core (relay.server) on an injected Clock and in-memory relayed sockets.

``MemoryNet`` plays the relay's UDP sockets and the peers: a relayed socket's ``send`` lands in
``net.to_peers``, and ``net.from_peer`` makes a peer send to a relayed address.  ``Client``
speaks TURN to the server the way a client would: it takes the challenge, then signs.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport

from overlay.stun import (
    ERROR_CODE,
    FINGERPRINT,
    MESSAGE_INTEGRITY,
    NONCE,
    PADDING,
    REALM,
    SOFTWARE,
    UNKNOWN_ATTRIBUTES,
    USERNAME,
    XOR_MAPPED_ADDRESS,
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
    EVEN_PORT,
    LIFETIME,
    REQUESTED_ADDRESS_FAMILY,
    REQUESTED_TRANSPORT,
    XOR_PEER_ADDRESS,
    XOR_RELAYED_ADDRESS,
    ChannelData,
    TurnCredential,
    mint_credential,
)
from relay.allocations import ClientKey, PeerHandler
from relay.server import RelayConfig, TurnServer
from relay.service import Relay, TurnStreamFactory

SECRET = b"correct horse battery staple"
NOW = 1_700_000_000.0
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)
PEER = ("127.0.0.9", 40000)
PEER2 = ("127.0.0.10", 40001)


# -- in-memory relayed sockets and peers --------------------------------------------------------


@dataclass
class MemorySocket:
    net: MemoryNet
    address: Address
    handler: PeerHandler
    closed: bool = False

    def send(self, data: bytes, peer: Address) -> None:
        self.net.to_peers.append((self.address, peer, data))

    def close(self) -> None:
        self.closed = True
        self.net.sockets.pop(self.address, None)


@dataclass
class MemoryNet:
    sockets: dict[Address, MemorySocket] = field(default_factory=dict)
    to_peers: list[tuple[Address, Address, bytes]] = field(default_factory=list)
    to_clients: list[tuple[ClientKey, bytes]] = field(default_factory=list)
    next_port: int = 50001
    broken: bool = False

    def factory(self, handler: PeerHandler) -> MemorySocket:
        if self.broken:
            raise OSError("no more sockets")
        socket = MemorySocket(self, ("127.0.0.1", self.next_port), handler)
        self.next_port += 1
        self.sockets[socket.address] = socket
        return socket

    def deliver(self, client: ClientKey, data: bytes) -> None:
        self.to_clients.append((client, data))

    def from_peer(self, peer: Address, relayed: Address, data: bytes) -> None:
        self.sockets[relayed].handler(data, peer)


@dataclass
class Rig:
    clock: Clock
    net: MemoryNet
    server: TurnServer

    def client(self, user: str = "alice", port: int = 6000, transport: str = "udp") -> Client:
        credential = mint_credential(SECRET, user, self.clock.seconds(), ttl=3600)
        return Client(self, (transport, ("127.0.0.1", port)), credential)


def make_rig(**options: Any) -> Rig:
    clock = Clock()
    clock.advance(NOW)
    net = MemoryNet()
    config = RelayConfig(secret=SECRET, **{"allow_peers": LOOPBACK, **options})
    server = TurnServer(clock, config, net.factory, net.deliver)
    server.start()
    return Rig(clock, net, server)


@pytest.fixture
def rig() -> Iterator[Rig]:
    rig = make_rig()
    yield rig
    rig.server.stop()


class Client:
    def __init__(self, rig: Rig, key: ClientKey, credential: TurnCredential) -> None:
        self.rig, self.key, self.credential = rig, key, credential
        self.nonce: str | None = None
        self.relayed: Address | None = None

    @property
    def integrity_key(self) -> bytes:
        return long_term_key(self.credential.username, "voip", self.credential.password)

    def send(self, data: bytes) -> StunMessage | None:
        reply = self.rig.server.handle(self.key, data)
        return None if reply is None else StunMessage.parse(reply)

    def challenge(self) -> StunMessage:
        request = StunMessage.request(REQUESTED_TRANSPORT(17), method=Method.ALLOCATE)
        padded = StunMessage.request(
            *request.attributes, PADDING(bytes(40)), method=Method.ALLOCATE
        )
        reply = self.send(bytes(padded))
        assert reply is not None and reply.message_class is StunClass.ERROR
        self.nonce = reply.get(NONCE)
        return reply

    def signed(
        self,
        method: int,
        *attributes: Attribute,
        password: str | None = None,
        fingerprint: bool = False,
    ) -> bytes:
        if self.nonce is None:
            self.challenge()
        assert self.nonce is not None
        username = self.credential.username
        key = long_term_key(username, "voip", password or self.credential.password)
        message = StunMessage.request(
            *attributes, USERNAME(username), REALM("voip"), NONCE(self.nonce), method=method
        ).with_integrity(key)
        return bytes(message.with_fingerprint() if fingerprint else message)

    def request(self, method: int, *attributes: Attribute, **options: Any) -> StunMessage:
        """A signed request; a 438 (stale nonce) is retried once with the new nonce."""
        reply = self.send(self.signed(method, *attributes, **options))
        assert reply is not None
        if code(reply) == 438 and method != Method.ALLOCATE:
            self.nonce = reply.get(NONCE)
            reply = self.send(self.signed(method, *attributes, **options))
            assert reply is not None
        return reply

    def allocate(self, *attributes: Attribute) -> StunMessage:
        reply = self.request(Method.ALLOCATE, REQUESTED_TRANSPORT(17), *attributes)
        if reply.message_class is StunClass.SUCCESS:
            assert reply.check_integrity(self.integrity_key)
            self.relayed = reply.get(XOR_RELAYED_ADDRESS)
        return reply

    def permit(self, *peers: Address) -> StunMessage:
        return self.request(Method.CREATE_PERMISSION, *(XOR_PEER_ADDRESS(p) for p in peers))

    def bind(self, channel: int, peer: Address) -> StunMessage:
        return self.request(Method.CHANNEL_BIND, CHANNEL_NUMBER(channel), XOR_PEER_ADDRESS(peer))

    def send_indication(self, peer: Address, data: bytes) -> None:
        message = StunMessage(
            Method.SEND, StunClass.INDICATION, bytes(12), (XOR_PEER_ADDRESS(peer), DATA(data))
        )
        assert self.rig.server.handle(self.key, bytes(message)) is None


def code(reply: StunMessage | None) -> int:
    assert reply is not None
    if reply.message_class is StunClass.SUCCESS:
        return 200
    error = reply.get(ERROR_CODE)
    assert error is not None
    return error.code


# -- Allocate and authentication ----------------------------------------------------------------


def test_an_allocate_without_credentials_gets_a_small_challenge(rig: Rig) -> None:
    client = rig.client()
    challenge = client.challenge()
    assert code(challenge) == 401
    assert challenge.get(REALM) == "voip" and challenge.get(NONCE)
    assert not challenge.has(MESSAGE_INTEGRITY)
    assert rig.server.counters["challenged"] == 1


def test_allocate_succeeds_with_a_minted_credential(rig: Rig) -> None:
    client = rig.client()
    reply = client.allocate()
    assert code(reply) == 200
    assert reply.get(LIFETIME) == 600
    assert reply.get(XOR_MAPPED_ADDRESS) == ("127.0.0.1", 6000)
    assert reply.get(XOR_RELAYED_ADDRESS) in rig.net.sockets
    assert rig.server.describe()["allocations"] == 1 and rig.server.spare() == 999
    assert rig.server.counters["allocations-created"] == 1


def test_a_response_carries_a_fingerprint_when_the_request_did(rig: Rig) -> None:
    reply = rig.client().request(Method.ALLOCATE, REQUESTED_TRANSPORT(17), fingerprint=True)
    assert reply.has(FINGERPRINT) and reply.has(MESSAGE_INTEGRITY)


@pytest.mark.parametrize(("asked", "granted"), [(10, 600), (1200, 1200), (100_000, 3600)])
def test_the_lifetime_is_clamped(rig: Rig, asked: int, granted: int) -> None:
    assert rig.client().allocate(LIFETIME(asked)).get(LIFETIME) == granted


def test_a_retransmitted_allocate_gets_the_same_answer_another_gets_437(rig: Rig) -> None:
    client = rig.client()
    data = client.signed(Method.ALLOCATE, REQUESTED_TRANSPORT(17))
    first, again = rig.server.handle(client.key, data), rig.server.handle(client.key, data)
    assert first is not None and first == again
    assert code(client.allocate()) == 437
    assert len(rig.net.sockets) == 1 and rig.server.counters["mismatch"] == 1


def test_a_wrong_password_gets_401(rig: Rig) -> None:
    client = rig.client()
    reply = client.request(Method.ALLOCATE, REQUESTED_TRANSPORT(17), password="guess")
    assert code(reply) == 401 and reply.get(NONCE)
    assert rig.server.counters["unauthenticated"] == 1 and not rig.server.allocations


def test_a_username_without_expiry_gets_401(rig: Rig) -> None:
    client = rig.client()
    client.credential = TurnCredential("alice", "x", 0)
    assert code(client.allocate()) == 401


def test_an_expired_username_gets_401(rig: Rig) -> None:
    client = rig.client()
    client.challenge()
    rig.clock.advance(3601)  # the credential expires; the nonce (just taken again) does not
    client.challenge()
    assert code(client.allocate()) == 401
    assert rig.server.counters["expired-credential"] == 1 and not rig.server.allocations


def test_a_stale_nonce_gets_438_with_a_fresh_one_that_works(rig: Rig) -> None:
    client = rig.client()
    client.challenge()
    rig.clock.advance(601)
    reply = client.allocate()
    assert code(reply) == 438 and reply.get(NONCE) not in (None, client.nonce)
    assert rig.server.counters["stale-nonce"] == 1
    client.nonce = reply.get(NONCE)
    assert code(client.allocate()) == 200


def test_a_nonce_of_another_client_address_is_stale(rig: Rig) -> None:
    alice = rig.client()
    alice.challenge()
    other = Client(rig, ("udp", ("127.0.0.2", 6000)), alice.credential)
    other.nonce = alice.nonce
    assert code(other.allocate()) == 438


def test_integrity_without_username_gets_400(rig: Rig) -> None:
    client = rig.client()
    client.challenge()
    message = StunMessage.request(REQUESTED_TRANSPORT(17), method=Method.ALLOCATE)
    assert code(client.send(bytes(message.with_integrity(b"k" * 16)))) == 400


def test_only_udp_can_be_relayed(rig: Rig) -> None:
    client = rig.client()
    assert code(client.request(Method.ALLOCATE, REQUESTED_TRANSPORT(6))) == 442
    assert code(client.request(Method.ALLOCATE)) == 400
    assert code(client.allocate(REQUESTED_ADDRESS_FAMILY(2))) == 440
    assert rig.server.counters["bad-transport"] == 1 and not rig.server.allocations
    assert code(client.allocate()) == 200


def test_even_port_is_honoured(rig: Rig) -> None:
    rig.net.next_port = 50001
    client = rig.client()
    assert code(client.allocate(EVEN_PORT(False))) == 200  # R bit clear: any port will do
    other = rig.client(port=6001)
    assert code(other.allocate(EVEN_PORT(True))) == 200
    assert other.relayed is not None and other.relayed[1] % 2 == 0


def test_unknown_required_attributes_get_420(rig: Rig) -> None:
    client = rig.client()
    reply = client.request(Method.ALLOCATE, REQUESTED_TRANSPORT(17), Attribute(0x7777, b"x"))
    assert code(reply) == 420 and reply.get(UNKNOWN_ATTRIBUTES) == (0x7777,)


def test_another_username_on_an_allocation_gets_441(rig: Rig) -> None:
    alice = rig.client()
    assert code(alice.allocate()) == 200
    mallory = Client(rig, alice.key, mint_credential(SECRET, "mallory", NOW, ttl=60))
    assert code(mallory.request(Method.REFRESH)) == 441
    assert rig.server.counters["wrong-credentials"] == 1
    assert code(alice.request(Method.REFRESH)) == 200


def test_the_user_quota_gives_486_and_other_users_still_allocate() -> None:
    rig = make_rig(user_quota=2)
    assert [code(rig.client(port=p).allocate()) for p in (1, 2, 3)] == [200, 200, 486]
    assert rig.server.counters["quota-user"] == 1
    assert code(rig.client("bob", port=4).allocate()) == 200


def test_capacity_gives_508() -> None:
    rig = make_rig(max_allocations=2)
    codes = [code(rig.client(f"u{p}", port=p).allocate()) for p in (1, 2, 3)]
    assert codes == [200, 200, 508]
    assert rig.server.counters["capacity"] == 1 and rig.server.spare() == 0


def test_a_socket_that_cannot_be_opened_gives_508(rig: Rig) -> None:
    rig.net.broken = True
    assert code(rig.client().allocate()) == 508


# -- Refresh, lifetimes, sweep ------------------------------------------------------------------


def test_refresh_without_an_allocation_gets_437(rig: Rig) -> None:
    assert code(rig.client().request(Method.REFRESH)) == 437


def test_an_allocation_expires_without_refresh() -> None:
    rig = make_rig(idle_timeout=0)
    client = rig.client()
    client.allocate()
    rig.clock.advance(595)
    assert client.key in rig.server.allocations
    assert code(client.request(Method.REFRESH)) == 200  # 600 s more from now
    rig.clock.advance(595)
    assert client.key in rig.server.allocations
    rig.clock.advance(10)
    assert client.key not in rig.server.allocations and not rig.net.sockets
    assert rig.server.counters["allocations-expired"] == 1


def test_refresh_to_zero_deletes_the_allocation(rig: Rig) -> None:
    client = rig.client()
    client.allocate()
    socket = rig.net.sockets[client.relayed]  # type: ignore[index]
    reply = client.request(Method.REFRESH, LIFETIME(0))
    assert code(reply) == 200 and reply.get(LIFETIME) == 0
    assert socket.closed and not rig.server.allocations
    assert code(client.request(Method.REFRESH)) == 437


def test_an_idle_allocation_is_deleted() -> None:
    rig = make_rig(idle_timeout=120)
    idle, busy = rig.client(port=1), rig.client("bob", port=2)
    idle.allocate()
    busy.allocate()
    busy.permit(PEER)
    for _ in range(30):
        rig.clock.advance(5)
        busy.send_indication(PEER, b"voice")
    assert idle.key not in rig.server.allocations and busy.key in rig.server.allocations
    assert rig.server.counters["allocations-idle"] == 1


def test_a_closed_tcp_connection_deletes_its_allocation(rig: Rig) -> None:
    client = rig.client(transport="tcp")
    client.allocate()
    rig.server.connection_lost(("tcp", ("127.0.0.1", 9)))
    assert rig.server.allocations
    rig.server.connection_lost(client.key)
    assert not rig.server.allocations and not rig.net.sockets


# -- permissions and data -----------------------------------------------------------------------


def test_send_and_data_indications_need_a_permission(rig: Rig) -> None:
    client = rig.client()
    client.allocate()
    relayed = client.relayed
    assert relayed is not None
    client.send_indication(PEER, b"early")
    rig.net.from_peer(PEER, relayed, b"unasked")
    assert not rig.net.to_peers and not rig.net.to_clients
    assert rig.server.counters["no-permission"] == 2
    assert code(client.permit(PEER)) == 200
    client.send_indication(("127.0.0.9", 1234), b"hello")  # a permission is for the IP only
    assert rig.net.to_peers == [(relayed, ("127.0.0.9", 1234), b"hello")]
    rig.net.from_peer(PEER, relayed, b"answer")
    [(key, data)] = rig.net.to_clients
    indication = StunMessage.parse(data)
    assert key == client.key and indication.method == Method.DATA
    assert indication.get(XOR_PEER_ADDRESS) == PEER and indication.get(DATA) == b"answer"
    stats = rig.server.allocations[client.key].stats
    assert stats["packets-to-peer"] == 1 and stats["bytes-to-client"] == 6
    assert stats["dropped"] == 2


def test_a_permission_lasts_300_seconds() -> None:
    rig = make_rig(idle_timeout=0)
    client = rig.client()
    client.allocate()
    client.permit(PEER)
    rig.clock.advance(299)
    client.send_indication(PEER, b"a")
    rig.clock.advance(2)
    client.send_indication(PEER, b"b")
    assert [d for _, _, d in rig.net.to_peers] == [b"a"]
    assert rig.server.counters["no-permission"] == 1


def test_a_peer_outside_the_allowed_networks_gets_403(rig: Rig) -> None:
    client = rig.client()
    client.allocate()
    assert code(client.permit(("192.0.2.1", 5))) == 403
    assert code(client.permit(PEER, ("8.8.8.8", 53))) == 403  # all or nothing
    assert code(client.bind(0x4000, ("10.0.0.1", 5))) == 403
    assert code(client.permit(("::1", 5))) == 443
    assert rig.server.counters["peer-forbidden"] == 3
    client.send_indication(PEER, b"x")
    assert not rig.net.to_peers


def test_public_peers_when_the_operator_allows_them() -> None:
    rig = make_rig(allow_public_peers=True)
    assert rig.server.peer_allowed("8.8.8.8")
    assert not rig.server.peer_allowed("10.1.2.3") and not rig.server.peer_allowed("224.0.0.1")
    assert not make_rig(allow_peers=()).server.peer_allowed("127.0.0.1")  # none by default


def test_create_permission_needs_a_peer(rig: Rig) -> None:
    client = rig.client()
    client.allocate()
    assert code(client.request(Method.CREATE_PERMISSION)) == 400


# -- channels -----------------------------------------------------------------------------------


def test_channel_data_flows_both_ways(rig: Rig) -> None:
    client = rig.client()
    client.allocate()
    relayed = client.relayed
    assert relayed is not None
    assert code(client.bind(0x4001, PEER)) == 200
    assert rig.server.handle(client.key, bytes(ChannelData(0x4001, b"up"))) is None
    assert rig.net.to_peers == [(relayed, PEER, b"up")]
    rig.net.from_peer(PEER, relayed, b"down!")
    assert rig.net.to_clients == [(client.key, bytes(ChannelData(0x4001, b"down!")))]
    rig.server.handle(client.key, bytes(ChannelData(0x4002, b"unbound")))
    assert rig.server.counters["no-channel"] == 1 and len(rig.net.to_peers) == 1


def test_channel_data_to_a_tcp_client_is_padded(rig: Rig) -> None:
    client = rig.client(transport="tcp")
    client.allocate()
    client.bind(0x4000, PEER)
    assert client.relayed is not None
    rig.net.from_peer(PEER, client.relayed, b"abcde")
    assert rig.net.to_clients == [(client.key, b"\x40\x00\x00\x05abcde\x00\x00\x00")]


def test_channel_rebinding_rules(rig: Rig) -> None:
    client = rig.client()
    client.allocate()
    assert code(client.bind(0x4000, PEER)) == 200
    assert code(client.bind(0x4000, PEER)) == 200  # a refresh
    assert code(client.bind(0x4000, PEER2)) == 400  # the number is taken
    assert code(client.bind(0x4001, PEER)) == 400  # the peer has a number
    assert code(client.bind(0x3FFF, PEER2)) == 400
    assert code(client.bind(0x5000, PEER2)) == 400
    assert code(client.bind(0x4001, PEER2)) == 200
    assert rig.server.counters["channel-conflict"] == 2


def test_a_channel_expires_and_its_number_waits_five_minutes() -> None:
    rig = make_rig(idle_timeout=0)
    client = rig.client()
    client.allocate(LIFETIME(3600))
    client.bind(0x4000, PEER)
    rig.clock.advance(601)
    client.permit(PEER)  # the permission is back, the channel is not
    assert client.relayed is not None
    rig.server.handle(client.key, bytes(ChannelData(0x4000, b"late")))
    assert not rig.net.to_peers and rig.server.counters["no-channel"] == 1
    rig.net.from_peer(PEER, client.relayed, b"x")
    assert StunMessage.parse(rig.net.to_clients[-1][1]).method == Method.DATA
    assert code(client.bind(0x4000, PEER2)) == 400  # still reserved for PEER
    rig.clock.advance(300)
    assert code(client.bind(0x4000, PEER2)) == 200


# -- bandwidth ----------------------------------------------------------------------------------


def test_bandwidth_is_limited_per_allocation() -> None:
    rig = make_rig(bandwidth=4000)
    client = rig.client()
    client.allocate()
    client.permit(PEER)
    for _ in range(10):
        client.send_indication(PEER, bytes(1000))
    assert len(rig.net.to_peers) == 4  # a burst of one second
    assert rig.server.counters["bandwidth"] == 6
    rig.clock.advance(0.5)
    for _ in range(3):
        client.send_indication(PEER, bytes(1000))
    assert len(rig.net.to_peers) == 6
    other = rig.client("bob", port=7)
    other.allocate()
    other.permit(PEER)
    other.send_indication(PEER, bytes(1000))
    assert len(rig.net.to_peers) == 7  # the limit is per allocation


# -- bad input, Binding, amplification ---------------------------------------------------------


def test_bad_input_is_counted_and_others_are_still_served(rig: Rig) -> None:
    client = rig.client()
    client.allocate()
    key = ("udp", ("127.0.0.1", 1))
    assert rig.server.handle(key, bytes(2000)) is None
    assert rig.server.handle(key, b"\xff" * 40) is None
    assert rig.server.handle(key, b"") is None
    assert rig.server.handle(key, b"\x40\x00\x00\x09abc") is None
    counters = rig.server.counters
    assert (counters["oversized"], counters["malformed"]) == (1, 3)
    assert code(client.request(Method.REFRESH)) == 200


def test_a_request_with_a_bad_attribute_gets_400(rig: Rig) -> None:
    request = bytes(StunMessage.request(SOFTWARE("x" * 40), method=Method.ALLOCATE))
    bad = request[:20] + b"\x00\x0d\x00\x03abc\x00" + request[28:]  # a 3-byte LIFETIME
    reply = rig.server.handle(("udp", ("127.0.0.1", 1)), bad)
    assert reply is not None and len(reply) <= len(bad)
    assert code(StunMessage.parse(reply)) == 400


def test_a_non_turn_request_gets_400(rig: Rig) -> None:
    request = StunMessage.request(PADDING(bytes(16)), method=0x0055)
    assert code(rig.client().send(bytes(request))) == 400


def test_binding_requests_are_answered_for_rtt_probes(rig: Rig) -> None:
    padded = StunMessage.request(PADDING(bytes(12)))
    udp = rig.client()
    assert udp.send(bytes(padded)) is not None
    assert udp.send(bytes(StunMessage.request())) is None  # 20 bytes: no amplification
    tcp = rig.client(transport="tcp")
    reply = tcp.send(bytes(StunMessage.request()))
    assert reply is not None and reply.get(XOR_MAPPED_ADDRESS) == ("127.0.0.1", 6000)


def test_coturns_first_allocate_is_answered(rig: Rig) -> None:
    # turnutils_uclient's first Allocate, captured: 60 bytes (REQUESTED-TRANSPORT, LIFETIME,
    # EVEN-PORT, REQUESTED-ADDRESS-FAMILY, FINGERPRINT).
    data = bytes.fromhex(
        "000300282112a4423de19f848777cabef588473c0019000411000000000d000400000309"
        "0018000180000000001700040100000080280004b5e99fd6"
    )
    reply = rig.server.handle(("udp", ("127.0.0.1", 1)), data)
    assert reply is not None and len(reply) <= len(data)
    assert code(StunMessage.parse(reply)) == 401


def test_a_challenge_that_cannot_fit_is_not_sent() -> None:
    rig = make_rig(realm="a-realm-far-too-long-to-fit.example.org")
    bare = bytes(StunMessage.request(REQUESTED_TRANSPORT(17), method=Method.ALLOCATE))
    assert rig.server.handle(("udp", ("127.0.0.1", 1)), bare) is None
    assert rig.server.counters["challenge-too-big"] == 1
    reply = rig.server.handle(("tcp", ("127.0.0.1", 1)), bare)  # TCP: no limit
    assert reply is not None and code(StunMessage.parse(reply)) == 401


unauthenticated_requests = st.builds(
    lambda method, attributes, fingerprint, tid: _message(method, attributes, fingerprint, tid),
    st.sampled_from([*Method, 0x00B]),
    st.lists(
        st.sampled_from(
            [
                REQUESTED_TRANSPORT(17),
                LIFETIME(3600),
                USERNAME("1:bob"),
                REALM("voip"),
                NONCE("x"),
                CHANNEL_NUMBER(0x4000),
                XOR_PEER_ADDRESS(PEER),
                SOFTWARE("s"),
                Attribute(0x7000, b""),
            ]
        ),
        max_size=4,
    ),
    st.booleans(),
    st.binary(min_size=12, max_size=12),
)


def _message(method: int, attributes: list[Attribute], fingerprint: bool, tid: bytes) -> bytes:
    message = StunMessage(method, StunClass.REQUEST, tid, tuple(attributes))
    return bytes(message.with_fingerprint() if fingerprint else message)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(unauthenticated_requests, st.booleans())
def test_no_answer_to_an_unauthenticated_request_is_larger_than_it(
    data: bytes, with_bogus_integrity: bool
) -> None:
    rig = make_rig()
    if with_bogus_integrity:
        message = StunMessage.parse(data)
        data = bytes(message.with_integrity(b"0" * 16))
    reply = rig.server.handle(("udp", ("127.0.0.1", 1)), data)
    assert reply is None or len(reply) <= len(data)
    assert not rig.server.allocations


@settings(max_examples=300)
@given(st.binary(max_size=1600), st.sampled_from(["udp", "tcp"]))
def test_arbitrary_datagrams_never_raise(data: bytes, transport: str) -> None:
    rig = make_rig()
    client = rig.client(transport=transport)
    client.allocate()
    client.bind(0x4000, PEER)
    before = sum(rig.server.counters.values())
    rig.server.handle(client.key, data)
    assert sum(rig.server.counters.values()) > before
    assert code(client.request(Method.REFRESH)) in (200, 437)  # 437: it was a Refresh to 0


@settings(max_examples=200)
@given(st.lists(st.binary(max_size=300), max_size=6))
def test_arbitrary_tcp_streams_never_raise(chunks: list[bytes]) -> None:
    clock = Clock()
    clock.advance(NOW)
    relay = Relay(MemoryReactor(), RelayConfig(secret=SECRET, allow_peers=LOOPBACK), clock)
    protocol = TurnStreamFactory(relay).buildProtocol(None)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5555))
    protocol.makeConnection(transport)
    for chunk in chunks:
        if transport.disconnecting:
            break
        protocol.dataReceived(chunk)
    assert transport.disconnecting or relay.counters["tcp-framing"] == 0
    protocol.connectionLost(None)
    assert not relay.connections


def test_a_framing_error_closes_only_that_connection() -> None:
    clock = Clock()
    clock.advance(NOW)
    relay = Relay(MemoryReactor(), RelayConfig(secret=SECRET, allow_peers=LOOPBACK), clock)
    factory = TurnStreamFactory(relay)
    good, bad = factory.buildProtocol(None), factory.buildProtocol(None)
    good_transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 1))
    bad_transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 2))
    good.makeConnection(good_transport)
    bad.makeConnection(bad_transport)
    bad.dataReceived(b"\xff\xff\xff\xff")
    assert bad_transport.disconnecting and relay.counters["tcp-framing"] == 1
    request = bytes(StunMessage.request())
    good.dataReceived(request[:7])
    good.dataReceived(request[7:])
    reply = StunMessage.parse(good_transport.value())
    assert reply.get(XOR_MAPPED_ADDRESS) == ("127.0.0.1", 1)
    assert not good_transport.disconnecting


def test_describe_reports_allocations_and_counters(rig: Rig) -> None:
    client = rig.client()
    client.allocate()
    client.permit(PEER)
    client.send_indication(PEER, b"abc")
    status = rig.server.describe()
    assert (status["allocations"], status["capacity"], status["spare"]) == (1, 1000, 999)
    [entry] = status["allocation_list"]  # type: ignore[misc]
    assert entry["user"] == "alice" and entry["counters"]["bytes-to-peer"] == 3
    assert status["counters"]["relayed-to-peer"] == 1  # type: ignore[index]


def test_challenge_slack_lets_a_44_byte_allocate_be_answered() -> None:
    data = bytes(
        StunMessage.request(
            REQUESTED_TRANSPORT(17), LIFETIME(600), method=Method.ALLOCATE
        ).with_fingerprint()
    )
    assert len(data) == 44  # turnutils_uclient -y
    assert make_rig().server.handle(("udp", ("127.0.0.1", 1)), data) is None
    reply = make_rig(challenge_slack=8).server.handle(("udp", ("127.0.0.1", 1)), data)
    assert reply is not None and len(reply) == 52
