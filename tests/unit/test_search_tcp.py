"""Searching through the supernode (``find`` over the TCP link) for nodes whose UDP is blocked.

An in-memory overlay on one Clock: 20 supernodes (2 slots) on the in-memory UDP network, each
searching for its nodes with a ``Searcher`` (``serve_lookups_for``, as the daemon wires it), and
ordinary nodes attached over in-memory TCP (iosim).  A node's UDP is "blocked" by cutting every
link between its host and the supernodes, after it attached.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock, LoopingCall
from twisted.python.failure import Failure
from twisted.test import iosim

from client.overlaynode import FIND_TIMEOUT, NoSupernode, OverlayNode, Searcher, SupernodeSilent
from overlay.certificate import Role, issue
from overlay.connection import ClientConnection
from overlay.datagram import DatagramEndpoint
from overlay.errors import ProtocolError, VoipError
from overlay.framing import MAX_PAYLOAD, Frame
from overlay.hostcache import HostCache
from overlay.identity import IdentityKey
from overlay.login_protocol import Contact, supernode_name
from overlay.messages import Error, Message, MessageError, decode
from overlay.overlay_protocol import FIND_OUTCOMES, Find, FindResult
from overlay.presence import Attachment, PresenceRecord, Status, sign
from overlay.search import SearchResult
from overlay.slotmap import SlotMap, SupernodeInfo
from overlay.supernode import (
    FIND_IN_FLIGHT,
    FIND_PER_WINDOW,
    FIND_WINDOW,
    FindBudget,
    Supernode,
)
from tools.memnet import MemoryNetwork

CA = IdentityKey.from_seed(bytes(range(32)))
OTHER_CA = IdentityKey.from_seed(bytes(range(1, 33)))
NOW = 1_700_000_000.0
HOUR = 3600

Hook = Callable[[str], Deferred[tuple[SearchResult, bytes | None]]]


class Overlay:
    """Admitted supernodes with working search hooks, and nodes attached to them."""

    def __init__(self, count: int = 20) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.udp = MemoryNetwork(self.clock, latency=0.001)
        self.pumps: list[Any] = []
        self.sns: dict[bytes, Supernode] = {}
        self.keys: dict[str, IdentityKey] = {}
        self.certs: dict[str, bytes] = {}
        self.nodes: dict[str, OverlayNode] = {}
        infos = []
        for n in range(count):
            key = IdentityKey.from_seed((2000 + n).to_bytes(32, "big"))
            info = SupernodeInfo(key.public_key, f"10.9.0.{n + 1}", 7100, 7101)
            sn = Supernode(self.clock, key, CA.public_key)
            self.udp.attach(sn.udp, (info.host, info.udp_port))
            Searcher(self.clock, sn.udp, CA.public_key).serve_lookups_for(sn)
            self.sns[key.public_key] = sn
            infos.append(info)
        self.infos = infos
        slot_map = SlotMap.empty().with_supernodes(infos)
        for info in infos:
            cert = issue(
                CA,
                supernode_name(info.node_id),
                info.node_id,
                serial=1,
                now=NOW,
                role=Role.SUPERNODE,
            )
            self.sns[info.node_id].admitted(bytes(cert), slot_map.view_for(info.node_id), info)
        self.flusher = LoopingCall(self.flush)
        self.flusher.clock = self.clock
        self.flusher.start(0.001)
        self.run(0.5)
        assert all(sn.synced for sn in self.sns.values())
        self._hosts = 0

    def flush(self) -> None:
        for pump in list(self.pumps):
            pump.flush()

    def endpoint(self, reactor: Any, host: str, port: int, timeout: float) -> Any:
        net = self

        class Endpoint:
            def connect(self, factory: Any) -> Deferred[Any]:
                sn = next(s for s in net.sns.values() if s.info and s.info.host == host)
                client = factory.buildProtocol(None)
                server = sn.factory().buildProtocol(None)
                net.pumps.append(
                    iosim.connect(
                        server,
                        iosim.FakeTransport(server, True),
                        client,
                        iosim.FakeTransport(client, False),
                        greet=False,
                    )
                )
                return succeed(client)

        return Endpoint()

    def node(self, name: str) -> OverlayNode:
        """A node for ``name``, attached and published (UDP still working)."""
        self._hosts += 1
        host = f"10.9.1.{self._hosts}"
        udp = DatagramEndpoint(self.clock)
        self.udp.attach(udp, (host, 5000))
        node = OverlayNode(
            self.clock,
            CA.public_key,
            HostCache(None, self.clock),
            udp,
            keepalive=15.0,
            silence_timeout=2.0,
            endpoint_factory=self.endpoint,
        )
        identity = IdentityKey.from_seed(name.encode().ljust(32, b"."))
        cert = issue(CA, name, identity.public_key, serial=1, now=NOW - HOUR, lifetime=24 * HOUR)
        self.keys[name], self.certs[name] = identity, bytes(cert)
        node.start(
            identity,
            cert,
            tuple(Contact(i.host, i.tcp_port, i.udp_port, i.node_id) for i in self.infos),
        )
        self.run(0.5)
        assert node.link is not None and node.replicas > 0, node.last_error
        self.nodes[name] = node
        return node

    def block_udp(self, node: OverlayNode) -> None:
        """Cut every UDP path between ``node`` and the supernodes (TCP goes on)."""
        assert node.udp.transport is not None
        host = node.udp.transport.getHost().host
        for info in self.infos:
            self.udp.link_loss[(host, info.host)] = 1.0
            self.udp.link_loss[(info.host, host)] = 1.0

    def sn_of(self, node: OverlayNode) -> Supernode:
        assert node.link is not None
        return self.sns[node.link.info.node_id]

    def run(self, seconds: float, step: float = 0.005) -> None:
        for _ in range(round(seconds / step)):
            self.clock.advance(step)

    def wait(self, d: Deferred[Any], seconds: float = 10.0, step: float = 0.01) -> Any:
        """Advance the clock until ``d`` fires (at most ``seconds``); its result, or raise."""
        got: list[Any] = []
        d.addBoth(got.append)
        for _ in range(round(seconds / step)):
            if got:
                break
            self.clock.advance(step)
        assert got, "did not finish in time"
        if isinstance(got[0], Failure):
            got[0].raiseException()
        return got[0]

    def search(self, node: OverlayNode, name: str, seconds: float = 10.0) -> SearchResult:
        result = self.wait(Deferred.fromCoroutine(node.search(name)), seconds)
        assert isinstance(result, SearchResult)
        return result

    def record(
        self,
        name: str,
        *,
        signer: str | None = None,
        certificate: bytes | None = None,
        issued_at: int | None = None,
        lifetime: int = 900,
    ) -> bytes:
        """A presence record of ``name`` (forgeries: another signer or certificate)."""
        issued = int(self.clock.seconds()) if issued_at is None else issued_at
        info = self.infos[0]
        presence = PresenceRecord(
            username=name,
            certificate=certificate if certificate is not None else self.certs[name],
            supernode=Attachment(info.node_id, info.host, info.tcp_port, info.udp_port),
            reflexive=None,
            nat_type="unknown",
            status=Status.ONLINE,
            sequence=issued * 1000,
            issued_at=issued,
            expires_at=issued + lifetime,
        )
        return bytes(sign(presence, self.keys[signer or name]))


@pytest.fixture(scope="module")
def overlay() -> Overlay:
    """Built once (20 supernodes, alice, bob and carol online, alice's UDP cut)."""
    net = Overlay()
    alice = net.node("alice")
    net.node("bob")
    net.node("carol")
    net.block_udp(alice)
    return net


@pytest.fixture
def alice(overlay: Overlay) -> Iterator[OverlayNode]:
    """alice, UDP blocked, her supernode's counters and her find budget afresh."""
    node = overlay.nodes["alice"]
    node.udp_blocked = True
    sn = overlay.sn_of(node)
    hook = sn.search_for_node
    sn.counters.clear()
    sn.attached["alice"].finds = FindBudget(overlay.clock)
    yield node
    node.udp_blocked = False
    sn.search_for_node = hook  # undo a test's tampering supernode


# -- a node whose UDP is blocked searches through its supernode ---------------------------------


def test_a_node_with_udp_blocked_finds_an_online_user_through_its_supernode(
    overlay: Overlay, alice: OverlayNode
) -> None:
    bob = overlay.nodes["bob"]
    assert bob.link is not None
    sn = overlay.sn_of(alice)
    lost, asked = overlay.udp.counters["lost"], alice.udp.counters["requests"]
    result = overlay.search(alice, "bob")
    assert result.outcome == "found"
    assert result.record is not None and result.record.username == "bob"
    assert result.record.supernode.node_id == bob.link.info.node_id
    assert 1 <= result.rounds <= 3
    assert result.path == [[sn.node_id]] and result.bad_records == 0
    assert overlay.udp.counters["lost"] == lost  # not one datagram was even tried
    assert alice.udp.counters["requests"] == asked
    assert (sn.counters["finds"], sn.counters["finds-found"]) == (1, 1)


def test_the_rounds_are_those_the_supernode_reported(overlay: Overlay, alice: OverlayNode) -> None:
    sn = overlay.sn_of(alice)
    hook = sn.search_for_node
    assert hook is not None

    def reporting(name: str) -> Deferred[tuple[SearchResult, bytes | None]]:
        def rounds_two(got: tuple[SearchResult, bytes | None]) -> Any:
            got[0].rounds = 2
            return got

        return hook(name).addCallback(rounds_two)

    sn.search_for_node = reporting
    result = overlay.search(alice, "carol")
    assert (result.outcome, result.rounds) == ("found", 2)


def test_not_found_through_the_supernode(overlay: Overlay, alice: OverlayNode) -> None:
    result = overlay.search(alice, "nobody-uses-this")
    assert (result.outcome, result.record, result.bad_records) == ("not-found", None, 0)
    assert overlay.sn_of(alice).counters["finds-not-found"] == 1


def test_offline_through_the_supernode_and_the_node_judges_freshness_itself(
    overlay: Overlay, alice: OverlayNode
) -> None:
    dave = overlay.node("dave")
    overlay.wait(Deferred.fromCoroutine(dave.stop()))  # logs out: an "offline" record
    result = overlay.search(alice, "dave")
    assert result.outcome == "offline"
    assert result.record is not None and result.record.status is Status.OFFLINE
    # A supernode that calls a stale record "found" does not make the user online.
    stale = overlay.record("bob", issued_at=int(overlay.clock.seconds()) - 1000, lifetime=900)
    tamper(overlay, alice, lambda result, blob: ("found", stale))
    result = overlay.search(alice, "bob")
    assert (result.outcome, result.bad_records) == ("offline", 0)
    assert result.record is not None and result.record.username == "bob"


def tamper(
    overlay: Overlay,
    node: OverlayNode,
    change: Callable[[SearchResult, bytes | None], tuple[str, bytes | None]],
) -> None:
    """Make ``node``'s supernode alter what its real search found before answering."""
    sn = overlay.sn_of(node)
    hook = sn.search_for_node
    assert hook is not None

    def tampering(name: str) -> Deferred[tuple[SearchResult, bytes | None]]:
        def alter(got: tuple[SearchResult, bytes | None]) -> tuple[SearchResult, bytes | None]:
            result, blob = got
            outcome, forged = change(result, blob)
            result.outcome = outcome  # type: ignore[assignment]
            return result, forged

        return hook(name).addCallback(alter)

    sn.search_for_node = tampering


def _flip_last_byte(blob: bytes) -> bytes:
    return blob[:-1] + bytes([blob[-1] ^ 1])


FORGERIES: dict[str, Callable[[Overlay, bytes | None], bytes | None]] = {
    "a flipped signature bit": lambda net, blob: _flip_last_byte(blob or b""),
    "someone else's record": lambda net, blob: net.record("carol"),
    "signed by another user's key": lambda net, blob: net.record("bob", signer="carol"),
    "a certificate of another CA": lambda net, blob: net.record(
        "bob",
        certificate=bytes(
            issue(OTHER_CA, "bob", net.keys["bob"].public_key, serial=9, now=NOW - HOUR)
        ),
    ),
    "garbage": lambda net, blob: b"\xa1\x00\x00",
    "no record at all": lambda net, blob: None,
}


@pytest.mark.parametrize("forgery", list(FORGERIES))
def test_a_record_the_supernode_forged_or_altered_is_refused(
    overlay: Overlay, alice: OverlayNode, forgery: str
) -> None:
    tamper(overlay, alice, lambda result, blob: ("found", FORGERIES[forgery](overlay, blob)))
    result = overlay.search(alice, "bob")
    assert (result.outcome, result.record, result.bad_records) == ("failed", None, 1)


def test_an_error_from_the_supernode_is_raised_with_its_text(
    overlay: Overlay, alice: OverlayNode
) -> None:
    with pytest.raises(VoipError, match=r"^Cannot search 'X': 'X' is not a valid username"):
        overlay.search(alice, "X")
    sn = overlay.sn_of(alice)
    sn.search_for_node = None
    with pytest.raises(VoipError, match=r"^This supernode cannot search\.$"):
        overlay.search(alice, "bob")
    assert sn.counters["finds"] == 0


def test_a_silent_supernode_is_given_up_after_the_find_timeout(
    overlay: Overlay, alice: OverlayNode
) -> None:
    sn = overlay.sn_of(alice)
    pending: list[Deferred[tuple[SearchResult, bytes | None]]] = []

    def never(name: str) -> Deferred[tuple[SearchResult, bytes | None]]:
        pending.append(Deferred())
        return pending[-1]

    sn.search_for_node = never
    searching = Deferred.fromCoroutine(alice.search("bob"))
    got: list[Any] = []
    searching.addBoth(got.append)
    overlay.run(FIND_TIMEOUT - 0.5, step=0.05)
    assert not got  # longer than a plain request's 4 s: the supernode's search takes time
    overlay.run(1.0, step=0.05)
    assert len(got) == 1 and isinstance(got[0].value, SupernodeSilent)
    assert alice.link is not None  # the keep-alive kept the link; only this search failed
    pending[0].callback((SearchResult("found"), None))  # a late answer goes nowhere
    overlay.run(0.1)
    assert sn.search_for_node is never and sn.attached["alice"].finds.running == 0


# -- the rate limit ------------------------------------------------------------------------------


def _find(overlay: Overlay, node: OverlayNode, name: str) -> list[Message]:
    assert node.link is not None
    got: list[Message] = []
    node.link.request(lambda rid: Find(rid, name)).addCallback(got.append)
    return got


def test_too_many_searches_at_once_are_refused(overlay: Overlay, alice: OverlayNode) -> None:
    sn = overlay.sn_of(alice)
    pending: list[Deferred[tuple[SearchResult, bytes | None]]] = []

    def held(name: str) -> Deferred[tuple[SearchResult, bytes | None]]:
        pending.append(Deferred())
        return pending[-1]

    sn.search_for_node = held
    answers = [_find(overlay, alice, "bob") for _ in range(FIND_IN_FLIGHT + 1)]
    overlay.run(0.1)
    assert len(pending) == FIND_IN_FLIGHT
    assert all(not got for got in answers[:-1])
    [refused] = answers[-1]
    assert isinstance(refused, Error)
    assert (refused.request, refused.code) == ("find", "too-many-searches")
    assert refused.message == "Too many searches: at most 10 at once; wait for one to finish."
    assert sn.counters["finds-refused"] == 1
    for d in pending:  # they finish: there is room again
        d.callback((SearchResult("not-found", rounds=1), None))
    overlay.run(0.1)
    assert all(isinstance(got[0], FindResult) for got in answers[:-1])
    again = _find(overlay, alice, "bob")
    overlay.run(0.1)
    assert len(pending) == FIND_IN_FLIGHT + 1 and not again  # taken, running
    pending[-1].callback((SearchResult("failed", rounds=3), None))
    overlay.run(0.1)
    assert isinstance(again[0], FindResult) and again[0].outcome == "failed"
    assert sn.attached["alice"].finds.running == 0


def test_too_many_searches_in_a_window_are_refused_until_it_moves_on(
    overlay: Overlay, alice: OverlayNode
) -> None:
    sn = overlay.sn_of(alice)
    sn.search_for_node = lambda name: succeed((SearchResult("not-found", rounds=1), None))
    overlay.run(FIND_WINDOW)  # earlier tests' finds are out of the window
    for _ in range(FIND_PER_WINDOW):
        assert overlay.search(alice, "bob").outcome == "not-found"
        overlay.run(0.1)
    got = _find(overlay, alice, "bob")
    overlay.run(0.05)
    [error] = got
    assert isinstance(error, Error) and error.code == "too-many-searches"
    assert error.message.startswith("Too many searches: at most 20 in 10 s; try again in ")
    assert error.retry_after is not None and 0 < error.retry_after <= FIND_WINDOW
    with pytest.raises(VoipError, match="Too many searches"):
        overlay.search(alice, "bob")
    overlay.run(error.retry_after + 0.1)
    assert overlay.search(alice, "bob").outcome == "not-found"


# -- falling back to the supernode when UDP got no answer ----------------------------------------


def test_a_udp_search_nobody_answered_falls_back_to_the_supernode(
    overlay: Overlay, alice: OverlayNode
) -> None:
    alice.udp_blocked = False  # the daemon has not noticed (yet): UDP is tried first
    sn = overlay.sn_of(alice)
    result = overlay.search(alice, "bob", seconds=30.0)
    assert result.outcome == "found"
    assert result.record is not None and result.record.username == "bob"
    assert result.timeouts + result.errors >= 1  # the UDP asks that went unanswered
    assert result.path[-1] == [sn.node_id]
    assert sn.counters["finds"] == 1


def test_a_node_whose_udp_works_never_asks_its_supernode_to_search(overlay: Overlay) -> None:
    bob = overlay.nodes["bob"]
    sn = overlay.sn_of(bob)
    finds = sn.counters["finds"]
    result = overlay.search(bob, "carol")
    assert result.outcome == "found" and result.timeouts == 0
    not_found = overlay.search(bob, "nobody-uses-this")
    assert not_found.outcome == "not-found"
    assert sn.counters["finds"] == finds


def test_with_udp_blocked_and_no_supernode_the_search_says_so() -> None:
    clock = Clock()
    node = OverlayNode(clock, CA.public_key, HostCache(None, clock), DatagramEndpoint(clock))
    node.udp_blocked = True
    failures: list[Failure] = []
    Deferred.fromCoroutine(node.search("bob")).addErrback(failures.append)
    assert isinstance(failures[0].value, NoSupernode)


# -- the supernode's side ------------------------------------------------------------------------


def test_find_before_attach_is_refused(overlay: Overlay) -> None:
    sn = next(iter(overlay.sns.values()))
    client = ClientConnection(overlay.clock, sn.node_id, 600.0, "the supernode")
    server = sn.factory().buildProtocol(None)
    pump = iosim.connect(
        server, iosim.FakeTransport(server, True), client, iosim.FakeTransport(client, False)
    )
    assert client.session is not None
    got: list[Message] = []
    client.request(lambda rid: Find(rid, "bob")).addCallback(got.append)
    pump.flush()
    [error] = got
    assert isinstance(error, Error)
    assert (error.request, error.code, error.message) == ("find", "not-attached", "Attach first.")
    client.close()
    pump.flush()


# -- the messages --------------------------------------------------------------------------------


def _roundtrip(message: Message) -> Message:
    return decode(Frame.parse(bytes(message), MAX_PAYLOAD))


@given(
    rid=st.integers(0, 2**32),
    outcome=st.sampled_from(FIND_OUTCOMES),
    rounds=st.integers(0, 1000),
    record=st.none() | st.binary(max_size=2048),
    username=st.text(max_size=40),
)
def test_find_messages_round_trip(
    rid: int, outcome: str, rounds: int, record: bytes | None, username: str
) -> None:
    for message in (Find(rid, username), FindResult(rid, outcome, rounds, record)):
        assert _roundtrip(message) == message


@given(payload=st.binary(max_size=200), code=st.sampled_from([Find.TYPE, FindResult.TYPE]))
def test_garbage_find_messages_raise_only_protocol_errors(payload: bytes, code: int) -> None:
    with contextlib.suppress(ProtocolError):
        decode(Frame(code, payload))


@given(
    document=st.dictionaries(
        st.sampled_from(["rid", "outcome", "rounds", "record"]),
        st.none() | st.integers(-(2**70), 2**70) | st.text(max_size=12) | st.binary(max_size=8),
    )
)
def test_odd_find_results_raise_only_protocol_errors(document: dict[str, Any]) -> None:
    try:
        message = FindResult.from_map(document)
    except ProtocolError:
        return
    assert message.outcome in FIND_OUTCOMES and 0 <= message.rounds <= 1000


def test_an_unknown_outcome_is_refused_by_name() -> None:
    with pytest.raises(MessageError, match=r"^find-result outcome 'maybe' is not known\.$"):
        FindResult.from_map({"rid": 1, "outcome": "maybe"})
    with pytest.raises(MessageError, match=r"^find-result rounds must be in 0-1000\.$"):
        FindResult.from_map({"rid": 1, "outcome": "found", "rounds": -1})
