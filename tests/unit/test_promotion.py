"""Self-promotion and demotion on an injected clock, with the login server's answers faked
by a recording client (the real registry is tested in test_registry and the grid)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from client.promotion import PromotionPolicy, SupernodeRole
from overlay.certificate import Role, issue
from overlay.identity import IdentityKey
from overlay.login_protocol import NotReachable, UnknownSupernode, supernode_name
from overlay.messages import Message
from overlay.overlay_protocol import Ack, Migrate, SnAdmitted, SnState
from overlay.slotmap import SlotMap, SupernodeInfo
from overlay.supernode import Supernode

CA = IdentityKey.from_seed(bytes(range(32)))
POLICY = PromotionPolicy(
    min_uptime=30.0, check_every=10.0, heartbeat_every=5.0, retry_refused=100.0, handover_grace=2.0
)


class FakeLoginServer:
    """Answers like the login server: admits into a real slot map signed by the CA."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.ca_key = CA.public_key
        self.calls: list[str] = []
        self.refuse: Exception | None = None
        self.forget = False
        self.slow_leave: Deferred[None] | None = None
        self.map = SlotMap.empty()

    async def sn_apply(self, key: IdentityKey, tcp: int, udp: int) -> SnAdmitted:
        self.calls.append("apply")
        if self.refuse is not None:
            raise self.refuse
        info = SupernodeInfo(key.public_key, "127.0.0.1", tcp, udp)
        if key.public_key not in self.map:
            self.map = self.map.with_supernode(info)
        cert = issue(
            CA,
            supernode_name(key.public_key),
            key.public_key,
            serial=1,
            now=self.clock.seconds(),
            role=Role.SUPERNODE,
        )
        view = bytes(self.map.view_for(key.public_key).sign(CA))
        return SnAdmitted(1, bytes(cert), view, "127.0.0.1")

    async def sn_heartbeat(self, key: IdentityKey, attached: int, version: int) -> SnState:
        self.calls.append("heartbeat")
        if self.forget:
            raise UnknownSupernode()
        if version == self.map.version:
            return SnState(1, version, None)
        return SnState(1, self.map.version, bytes(self.map.view_for(key.public_key).sign(CA)))

    async def sn_leave(self, key: IdentityKey) -> None:
        self.calls.append("leave")
        if self.slow_leave is not None:
            await self.slow_leave


class Rig:
    def __init__(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.server = FakeLoginServer(self.clock)
        self.key = IdentityKey.generate()
        self.supernode = Supernode(self.clock, self.key, CA.public_key)
        self.load = 0.1
        self.listening = 0
        self.role = SupernodeRole(
            self.clock,
            self.server,
            self.key,
            self.supernode,  # type: ignore[arg-type]
            listen=self.listen,
            unlisten=self.unlisten,
            policy=POLICY,
            load=lambda: self.load,
        )

    def listen(self) -> tuple[int, int]:
        self.listening += 1
        return 7100, 7101

    def unlisten(self) -> Deferred[None]:
        self.listening -= 1
        return succeed(None)

    def attach(self, username: str) -> AttachedNode:
        node = AttachedNode(self.supernode, username)
        self.supernode.attached[username] = node  # type: ignore[assignment]
        return node


class AttachedNode:
    """Stands for an attached node's connection: records what it is told, moves on request."""

    def __init__(self, supernode: Supernode, username: str) -> None:
        self.supernode = supernode
        self.username = username
        self.told: list[Migrate] = []
        self.closed = False

    def push(self, build: Callable[[int], Message]) -> Deferred[Message]:
        message = build(1)
        assert isinstance(message, Migrate)
        self.told.append(message)
        return succeed(Ack(1))

    def moved(self) -> None:
        """The node attached elsewhere and closed this connection."""
        del self.supernode.attached[self.username]

    def close(self) -> None:
        self.closed = True
        self.supernode.attached.pop(self.username, None)


@pytest.fixture
def rig() -> Rig:
    r = Rig()
    r.role.start()
    return r


def test_not_before_the_minimum_uptime(rig: Rig) -> None:
    rig.clock.advance(10.0)
    assert rig.server.calls == []
    assert rig.role.last_refusal == "not eligible: up 10 s of the 30 s required"
    assert rig.listening == 0


def test_promotes_once_eligible_and_heartbeats(rig: Rig) -> None:
    rig.clock.advance(30.0)
    assert rig.server.calls == ["apply"]
    assert rig.role.active and rig.listening == 1
    assert rig.supernode.view is not None and rig.supernode.synced
    assert rig.role.status()["slot"] == 0
    rig.clock.advance(5.5)
    assert rig.server.calls == ["apply", "heartbeat"]


def test_a_busy_machine_does_not_volunteer(rig: Rig) -> None:
    rig.load = 0.9
    rig.clock.advance(40.0)
    assert rig.server.calls == []
    assert rig.role.last_refusal == "not eligible: CPU load 0.90 per core is above 0.70"


def test_refused_as_unreachable_closes_its_ports_and_waits(rig: Rig) -> None:
    rig.server.refuse = NotReachable("The login server could not reach 1.2.3.4:7100.")
    rig.clock.advance(30.0)
    assert rig.server.calls == ["apply"] and not rig.role.active
    assert rig.listening == 0
    assert rig.role.last_refusal == "The login server could not reach 1.2.3.4:7100."
    rig.clock.advance(80.0)  # retry_refused is 100 s, with +-10% jitter
    assert rig.server.calls == ["apply"]
    rig.server.refuse = None
    rig.clock.advance(40.0)
    assert rig.server.calls == ["apply", "apply"] and rig.role.active


def test_a_forgotten_supernode_applies_again(rig: Rig) -> None:
    rig.clock.advance(30.0)
    rig.server.forget = True  # e.g. the login server restarted and lost its map
    rig.clock.advance(5.5)
    # It applies again at once, not a check interval later.
    assert rig.server.calls == ["apply", "heartbeat", "apply"] and rig.role.active


def test_losing_eligibility_demotes_gracefully(rig: Rig) -> None:
    rig.clock.advance(30.0)
    node = rig.attach("alice")
    rig.load = 0.95
    rig.clock.advance(5.5)
    assert rig.server.calls[-1] == "leave" and not rig.role.active
    assert [m.contacts for m in node.told] == [()]  # told to move (no other supernode known)
    assert rig.listening == 1  # attached nodes get the handover grace first
    rig.clock.advance(2.0)
    assert rig.listening == 0 and rig.supernode.view is None
    assert rig.role.last_refusal is not None and "lost eligibility" in rig.role.last_refusal
    rig.load = 0.1  # eligible again: it volunteers again
    rig.clock.advance(11.0)
    assert rig.server.calls[-1] == "apply" and rig.role.active


def test_demotion_ends_as_soon_as_every_node_has_moved(rig: Rig) -> None:
    rig.clock.advance(30.0)
    alice, bob = rig.attach("alice"), rig.attach("bob")
    demoting = Deferred.fromCoroutine(rig.role.demote("asked to"))
    rig.clock.advance(0.5)
    assert rig.listening == 1 and alice.told and bob.told
    alice.moved()
    rig.clock.advance(0.5)
    assert rig.listening == 1 and not demoting.called  # bob is still here
    bob.moved()
    rig.clock.advance(0.2)
    assert demoting.called and rig.listening == 0  # well before the 2 s grace
    assert not alice.closed and not bob.closed  # they left by themselves


def test_nodes_move_at_once_even_while_the_login_server_is_slow_to_answer(rig: Rig) -> None:
    rig.clock.advance(30.0)
    alice = rig.attach("alice")
    rig.server.slow_leave = Deferred()
    demoting = Deferred.fromCoroutine(rig.role.demote("asked to"))
    assert alice.told  # at once, not after the login server answered
    alice.moved()
    rig.clock.advance(1.0)
    assert not demoting.called and rig.listening == 1
    rig.server.slow_leave.callback(None)  # (its wait is bounded by the login client's timeout)
    assert demoting.called and rig.listening == 0


def test_nodes_that_do_not_move_are_cut_off_after_the_grace(rig: Rig) -> None:
    rig.clock.advance(30.0)
    stuck = rig.attach("alice")
    demoting = Deferred.fromCoroutine(rig.role.demote("asked to"))
    rig.clock.advance(1.9)
    assert not stuck.closed and not demoting.called
    rig.clock.advance(0.2)
    assert demoting.called and rig.listening == 0
    assert stuck.closed  # not left attached to a node that serves nobody


def test_no_application_while_handing_over(rig: Rig) -> None:
    role = SupernodeRole(
        rig.clock,
        rig.server,  # type: ignore[arg-type]
        rig.key,
        rig.supernode,
        listen=rig.listen,
        unlisten=rig.unlisten,
        policy=replace(POLICY, handover_grace=30.0),
        load=lambda: rig.load,
    )
    rig.role.stop()
    role.start()
    rig.clock.advance(30.0)
    assert role.active and rig.server.calls == ["apply"]
    rig.attach("alice")  # never moves: the whole grace passes
    Deferred.fromCoroutine(role.demote("asked to"))
    for _ in range(29):  # checks (every 10 s) and heartbeats (5 s) fall due meanwhile
        rig.clock.advance(1.0)
        assert rig.server.calls == ["apply", "leave"] and not role.active
    rig.clock.advance(2.0)  # the grace is over; still eligible: it may volunteer again
    assert rig.server.calls[-1] == "apply" and role.active and rig.listening == 1


def test_leaving_for_good_stops_volunteering(rig: Rig) -> None:
    rig.clock.advance(30.0)
    leaving = Deferred.fromCoroutine(rig.role.leave("voipd is stopping"))
    rig.clock.advance(0.1)
    assert leaving.called and rig.listening == 0
    rig.clock.advance(1000.0)
    assert rig.server.calls == ["apply", "leave"] and not rig.role.active
    assert rig.role.status()["refusal"] == "voipd is stopping"


def test_demoting_a_node_that_is_no_supernode_does_nothing(rig: Rig) -> None:
    Deferred.fromCoroutine(rig.role.demote("asked to"))
    rig.clock.advance(30.0)
    assert rig.server.calls == ["apply"] and rig.role.active


def test_a_new_view_at_heartbeat_is_taken(rig: Rig) -> None:
    rig.clock.advance(30.0)
    before = rig.role.version
    other = SupernodeInfo(IdentityKey.generate().public_key, "127.0.0.2", 7100, 7101)
    rig.server.map = rig.server.map.with_supernode(other)
    rig.clock.advance(5.5)
    assert rig.role.version == rig.server.map.version > before
    assert other.node_id in {p.node_id for p in rig.supernode.view.peers}  # type: ignore[union-attr]
