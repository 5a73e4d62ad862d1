"""Garbage on a supernode's UDP port, on real sockets of 127.0.0.1 (``tools.grid``).

Anyone on the internet may send anything to a supernode's UDP port.  What a user notices: the
supernode goes on answering real searches while it is flooded; what an operator notices: the
garbage is counted (``voipctl status --json``, "supernode" / "udp"); what the rest of the
internet notices: the port never answers with more bytes than it was sent (it is no traffic
amplifier), and what does not parse is not answered.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import deferLater

from overlay.datagram import encode
from overlay.framing import HEADER, MAX_DATAGRAM_PAYLOAD, WIRE_VERSION, Frame
from overlay.messages import Error, Message, Pong, parse_datagram
from overlay.overlay_protocol import PING_PAD, SEARCH_PAD, Publish, Search, SearchNone, SnPing
from tools.grid import HOST, Grid

pytestmark = pytest.mark.integration


@dataclass
class Sent:
    kind: str
    data: bytes


class Sender(DatagramProtocol):
    """Sends datagrams from one UDP port and records every answer it gets."""

    def __init__(self) -> None:
        self.answers: list[tuple[bytes, tuple[str, int]]] = []

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.answers.append((datagram, (addr[0], addr[1])))


def garbage(rng: random.Random, rids: Iterator[int]) -> list[Sent]:
    """One datagram of every kind of garbage (and of a few well-formed but odd requests)."""
    ping = bytes(SnPing(next(rids)))
    unknown = Frame(0x7777, cbor2.dumps({"rid": next(rids)}))
    wrong_fields = Frame(Search.TYPE, cbor2.dumps({"rid": "one", "username": 5}))
    return [
        Sent("random", rng.randbytes(rng.randint(1, 1400))),
        Sent("empty", b""),
        Sent("truncated", ping[: rng.randint(1, len(ping) - 1)]),
        Sent("too-long", ping + b"\x00"),
        Sent("bad-version", bytes([WIRE_VERSION + 1]) + ping[1:]),
        Sent("unknown-type", bytes(unknown)),
        Sent("not-cbor", bytes(Frame(SnPing.TYPE, b"\xff\xfe\xfd"))),
        Sent("wrong-fields", bytes(wrong_fields)),
        Sent("no-rid", bytes(Frame(SnPing.TYPE, cbor2.dumps({})))),
        Sent("stray-reply", bytes(Pong(next(rids), 1.0))),
        # A header that claims more than a datagram may carry, and a datagram that does.
        Sent("oversized-header", HEADER.pack(WIRE_VERSION, SnPing.TYPE, 60_000) + b"\xa0"),
        Sent("oversized", bytes(Frame(Search.TYPE, b"\x00" * (MAX_DATAGRAM_PAYLOAD + 1)))),
        Sent("huge", rng.randbytes(60_000)),
        # Well-formed requests: answered only when the answer is not larger than the request.
        Sent("small-ping", ping),
        Sent("padded-ping", encode(SnPing(next(rids)), PING_PAD)),
        Sent("small-publish", bytes(Publish(next(rids), b""))),
        Sent("padded-publish", encode(Publish(next(rids), b""), 200)),
        Sent("bad-username", encode(Search(next(rids), "x"), SEARCH_PAD)),
        Sent("nobody", encode(Search(next(rids), "nobody-here"), SEARCH_PAD)),
    ]


#: What the supernode does with each kind: answer it, or drop it (and count it as what).
DROPPED = {
    "random": "bad-datagrams",
    "empty": "bad-datagrams",
    "truncated": "bad-datagrams",
    "too-long": "bad-datagrams",
    "bad-version": "bad-datagrams",
    "unknown-type": "bad-datagrams",
    "not-cbor": "bad-datagrams",
    "wrong-fields": "bad-datagrams",
    "no-rid": "bad-datagrams",
    "oversized-header": "bad-datagrams",
    "oversized": "bad-datagrams",
    "huge": "bad-datagrams",
    "stray-reply": "stray-replies",
    "small-ping": "amplification-refused",
    "small-publish": "amplification-refused",
}
ANSWERED = {"padded-ping", "padded-publish", "bad-username", "nobody"}


@pytest_twisted.async_yield_fixture
async def grid(tmp_path: Path) -> AsyncIterator[Grid]:
    from twisted.internet import reactor

    g = Grid(reactor, tmp_path)
    await g.start_login_server()
    try:
        await g.add_supernodes(2)
        await g.add_users(2)
        yield g
    finally:
        await g.stop()


@pytest_twisted.ensureDeferred
async def test_garbage_is_dropped_or_answered_small_and_counted_while_searches_go_on(
    grid: Grid,
) -> None:
    from twisted.internet import reactor

    alice, bob = grid.users["user0"], grid.users["user1"]
    assert alice.node.link is not None
    victim = next(s for s in grid.supernodes if s.info == alice.node.link.info)
    assert victim.info is not None
    target = (victim.info.host, victim.info.udp_port)
    sender = Sender()
    port = reactor.listenUDP(0, sender, interface=HOST)
    rng, rids = random.Random(4), itertools.count(1)
    sent: list[Sent] = []
    rounds = 30
    searches_before = victim.supernode.counters["search"]
    udp_before = Counter(victim.supernode.udp.counters)
    try:
        for burst in range(rounds):
            # The user's real search, answered by the flooded supernode itself, goes out
            # amid the garbage: before, during and after each burst.
            searching = Deferred.fromCoroutine(alice.node.search(bob.name))
            for datagram in garbage(rng, rids):
                sent.append(datagram)
                sender.transport.write(datagram.data, target)  # type: ignore[union-attr]
            result = await searching
            assert result.outcome == "found", (burst, result)
            assert result.rounds == 1 and result.record.username == bob.name
        await deferLater(reactor, 0.3, lambda: None)  # the last answers arrive
    finally:
        await port.stopListening()

    assert victim.supernode.counters["search"] - searches_before >= rounds
    counted = Counter(victim.supernode.udp.counters)
    counted.subtract(udp_before)
    expected = Counter(DROPPED[s.kind] for s in sent if s.kind in DROPPED)
    for counter, count in expected.items():
        # (Real traffic may add a stray reply, a late answer to a retransmitted request.)
        if counter == "stray-replies":
            assert counted[counter] >= count, (counter, counted)
        else:
            assert counted[counter] == count, (counter, counted)
    assert counted["internal-errors"] == 0
    # ... and an operator sees them in ``voipctl status --json``.
    shown = victim.role.status()["udp"]
    assert shown["bad-datagrams"] == victim.supernode.udp.counters["bad-datagrams"] > 0
    assert shown["amplification-refused"] >= expected["amplification-refused"]

    # Every answer is to one of our well-formed requests, names it, and is never larger.
    by_rid = {parse_datagram(s.data).rid: s for s in sent if s.kind in ANSWERED}  # type: ignore[attr-defined]
    answers: Counter[str] = Counter()
    for data, source in sender.answers:
        assert source == target
        reply = parse_datagram(data)
        kind = _kind_of(reply)
        answers[kind] += 1
        request = by_rid[reply.rid]  # type: ignore[attr-defined]
        assert request.kind == kind, (request.kind, reply)
        assert len(data) <= len(request.data), (kind, len(data), len(request.data))
    assert answers == Counter({k: rounds for k in ANSWERED})
    assert sum(len(d) for d, _ in sender.answers) < sum(len(s.data) for s in sent)


def _kind_of(reply: Message) -> str:
    """Which of our well-formed requests ``reply`` answers (and that it answers it rightly)."""
    if isinstance(reply, Pong):
        return "padded-ping"
    if isinstance(reply, SearchNone):
        return "nobody"
    assert isinstance(reply, Error), reply
    if reply.request == "publish":
        assert reply.message == "publish is not a supernode request."
        return "padded-publish"
    assert reply.request == "search" and "Cannot search 'x'" in reply.message, reply
    return "bad-username"


@pytest_twisted.ensureDeferred
async def test_garbage_at_a_nodes_own_port_does_not_disturb_its_searches(grid: Grid) -> None:
    from twisted.internet import reactor

    alice, bob = grid.users["user0"], grid.users["user1"]
    endpoint = alice.node.udp
    target = (HOST, alice.udp_port.getHost().port)
    sender = Sender()
    port = reactor.listenUDP(0, sender, interface=HOST)
    rng, rids = random.Random(5), itertools.count(1)
    try:
        for burst in range(10):
            searching = Deferred.fromCoroutine(alice.node.search(bob.name))
            for datagram in garbage(rng, rids):
                sender.transport.write(datagram.data, target)  # type: ignore[union-attr]
            result = await searching
            assert result.outcome == "found", (burst, result)
        await deferLater(reactor, 0.3, lambda: None)
    finally:
        await port.stopListening()
    assert sender.answers == []  # a node serves nobody over UDP
    assert endpoint.counters["bad-datagrams"] >= 10 * 12
    assert endpoint.counters["unhandled"] == 10 * len(ANSWERED | {"small-ping", "small-publish"})
