"""The login server's supernode registry: admission, heartbeats, eviction, bootstrap lists."""

from __future__ import annotations

import math
import random
import re
from collections.abc import Coroutine
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from login_server.registry import SN_CERT_LIFETIME, SupernodeRegistry
from overlay.certificate import Role, SignedCertificate
from overlay.identity import IdentityKey, key_fingerprint
from overlay.keyspace import KEY_SPACE
from overlay.login_protocol import (
    BadProof,
    NotNeeded,
    NotReachable,
    UnknownSupernode,
    proof_message,
    supernode_name,
)
from overlay.overlay_protocol import SnAdmitted, SnApply, SnHeartbeat, SnLeave, SnState
from overlay.slotmap import Refer, RoutingView, Serve, SignedRoutingView

START = 1_700_000_000.0
CA = IdentityKey.from_seed(bytes(range(32)))
TRANSCRIPT = bytes(range(32, 64))  # the channel transcript the proofs are bound to
SOURCE = "198.51.100.7"  # the address the login server saw the request come from


class FakeProber:
    """Records every probe; answers ``reason`` (None = reachable), after ``gate`` if set."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int, bytes]] = []
        self.reason: str | None = None
        self.gate: Deferred[None] | None = None

    async def __call__(
        self, host: str, tcp_port: int, udp_port: int, node_key: bytes
    ) -> str | None:
        self.calls.append((host, tcp_port, udp_port, node_key))
        if self.gate is not None:
            await self.gate
        return self.reason


class Rig:
    def __init__(self, **options: Any) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.prober = FakeProber()
        options.setdefault("rng", random.Random(3))
        self.registry = SupernodeRegistry(self.clock, CA, self.prober, **options)

    def apply(
        self,
        key: IdentityKey,
        source: str = SOURCE,
        *,
        tcp_port: int = 7000,
        udp_port: int = 7001,
        transcript: bytes = TRANSCRIPT,
        signer: IdentityKey | None = None,
    ) -> Any:
        """The reply (or the failure) of an application that completes at once."""
        return outcome(
            self.registry.apply(
                SnApply(
                    1, key.public_key, prove(signer or key, key, transcript), tcp_port, udp_port
                ),
                source,
                transcript,
            )
        )

    def admitted(self, key: IdentityKey, source: str = SOURCE, **options: Any) -> SnAdmitted:
        reply = self.apply(key, source, **options)
        assert isinstance(reply, SnAdmitted), reply
        return reply

    def heartbeat(self, key: IdentityKey, version: int, attached: int = 0) -> SnState:
        proof = prove(key, key, TRANSCRIPT)
        return self.registry.heartbeat(
            SnHeartbeat(2, key.public_key, proof, attached, version), TRANSCRIPT
        )

    def leave(self, key: IdentityKey) -> SnState:
        return self.registry.leave(
            SnLeave(3, key.public_key, prove(key, key, TRANSCRIPT)), TRANSCRIPT
        )


def prove(signer: IdentityKey, key: IdentityKey, transcript: bytes) -> bytes:
    return signer.sign(proof_message(transcript, supernode_name(key.public_key), key.public_key))


def outcome(work: Coroutine[Any, Any, Any]) -> Any:
    results: list[Any] = []
    Deferred.fromCoroutine(work).addBoth(results.append)
    assert results, "the coroutine did not finish"
    return results[0]


def failed_with(result: Any, kind: type[Exception]) -> Exception:
    assert isinstance(result, Failure), result
    assert isinstance(result.value, kind), result.value
    return result.value


def keys(count: int, base: int = 0) -> list[IdentityKey]:
    return [IdentityKey.from_seed((base + i).to_bytes(32, "big")) for i in range(count)]


def view_of(reply: SnAdmitted | SnState, key: IdentityKey) -> RoutingView:
    assert reply.view is not None
    return SignedRoutingView.parse(reply.view).verify(CA.public_key, key.public_key)


# -- admission ---------------------------------------------------------------------------------


def test_a_valid_application_is_admitted_with_a_certificate_and_a_view() -> None:
    rig = Rig()
    key = IdentityKey.generate()
    reply = rig.admitted(key, tcp_port=7100, udp_port=7101)
    cert = SignedCertificate.parse(reply.certificate).verify(
        CA.public_key, rig.clock.seconds(), Role.SUPERNODE
    )
    assert cert.username == "sn-" + key_fingerprint(key.public_key)
    assert cert.public_key == key.public_key
    assert cert.not_after - cert.not_before == SN_CERT_LIFETIME
    # A supernode certificate is not a user certificate.
    with pytest.raises(Exception, match="for a supernode, not a user"):
        SignedCertificate.parse(reply.certificate).verify(CA.public_key, START, Role.USER)
    view = view_of(reply, key)
    assert view.version == rig.registry.map.version == 1
    [me] = view.own_slot.members
    assert (me.node_id, me.host, me.tcp_port, me.udp_port) == (key.public_key, SOURCE, 7100, 7101)
    assert view.route(0) == Serve() and view.route(KEY_SPACE - 1) == Serve()
    assert reply.host == SOURCE
    # The reachability check went to the observed source, with the node's own key.
    assert rig.prober.calls == [(SOURCE, 7100, 7101, key.public_key)]


def test_the_view_is_for_the_applicant_and_no_one_else() -> None:
    rig = Rig()
    key = IdentityKey.generate()
    reply = rig.admitted(key)
    assert reply.view
    with pytest.raises(Exception, match=re.escape("The routing view is for another supernode.")):
        SignedRoutingView.parse(reply.view).verify(CA.public_key, IdentityKey.generate().public_key)
    with pytest.raises(
        Exception, match=re.escape("The routing view was not signed by our login server.")
    ):
        SignedRoutingView.parse(reply.view).verify(IdentityKey.generate().public_key)


def test_the_host_is_the_observed_source_whatever_the_applicant_is() -> None:
    rig = Rig()
    first, second = keys(2)
    assert rig.admitted(first, "203.0.113.5").host == "203.0.113.5"
    reply = rig.admitted(second, "203.0.113.99")
    assert reply.host == "203.0.113.99"
    hosts = {info.host for info in rig.registry.map.supernodes}
    assert hosts == {"203.0.113.5", "203.0.113.99"}
    assert [call[0] for call in rig.prober.calls] == ["203.0.113.5", "203.0.113.99"]


@pytest.mark.parametrize(
    "case",
    ["another key signed", "another transcript", "another node key in the proof"],
)
def test_a_bad_proof_is_refused_before_any_probe(case: str) -> None:
    rig = Rig()
    key = IdentityKey.generate()
    if case == "another key signed":
        result = rig.apply(key, signer=IdentityKey.generate())
    elif case == "another transcript":
        # A proof made for another channel cannot be replayed on this one.
        proof = prove(key, key, bytes(32))
        result = outcome(
            rig.registry.apply(SnApply(1, key.public_key, proof, 7000, 7001), SOURCE, TRANSCRIPT)
        )
    else:
        other = IdentityKey.generate()
        proof = prove(key, other, TRANSCRIPT)
        result = outcome(
            rig.registry.apply(SnApply(1, key.public_key, proof, 7000, 7001), SOURCE, TRANSCRIPT)
        )
    error = failed_with(result, BadProof)
    assert str(error) == "The proof of the node key did not verify."
    assert error.code == "bad-proof"
    assert rig.prober.calls == []
    assert rig.registry.map.supernode_count == 0 and not rig.registry.members
    assert rig.registry.counters["bad-proof"] == 1


def test_a_node_key_of_the_wrong_size_is_a_bad_proof_not_a_crash() -> None:
    rig = Rig()
    result = outcome(
        rig.registry.apply(SnApply(1, b"short", bytes(64), 7000, 7001), SOURCE, TRANSCRIPT)
    )
    assert str(failed_with(result, BadProof)) == "The proof of the node key did not verify."


def test_an_unreachable_applicant_is_refused_with_the_probe_reason() -> None:
    rig = Rig()
    rig.prober.reason = "TCP port 7000: connection refused"
    error = failed_with(rig.apply(IdentityKey.generate()), NotReachable)
    assert str(error) == (
        "The login server could not reach 198.51.100.7:7000 from outside "
        "(TCP port 7000: connection refused); only reachable nodes become supernodes."
    )
    assert error.code == "not-reachable"
    assert rig.registry.map.version == 0 and not rig.registry.members


def test_not_needed_once_enough_supernodes_then_needed_again_under_load() -> None:
    rig = Rig(min_supernodes=3, max_ons_per_supernode=100)
    members = keys(3)
    for key in members:
        rig.admitted(key)
    late = IdentityKey.generate()
    error = failed_with(rig.apply(late), NotNeeded)
    assert str(error) == "The overlay has enough supernodes for now."
    assert error.code == "not-needed"
    assert len(rig.prober.calls) == 3  # no probe for a node that is not needed
    # 50 attached nodes per supernode is exactly half the maximum: still not needed.
    for key in members:
        rig.heartbeat(key, rig.registry.map.version, attached=50)
    failed_with(rig.apply(late), NotNeeded)
    rig.heartbeat(members[0], rig.registry.map.version, attached=53)
    reply = rig.admitted(late)
    assert late.public_key in rig.registry.map
    assert view_of(reply, late).version == rig.registry.map.version == 4


def test_a_known_supernode_may_reapply_when_not_needed_and_moves_to_its_new_address() -> None:
    rig = Rig(min_supernodes=1)
    key = IdentityKey.generate()
    rig.admitted(key, "203.0.113.1")
    assert not rig.registry.needed()
    reply = rig.admitted(key, "203.0.113.2", tcp_port=7200)
    assert reply.host == "203.0.113.2"
    info = rig.registry.map.info(key.public_key)
    assert (info.host, info.tcp_port) == ("203.0.113.2", 7200)
    assert rig.registry.map.version == 2
    # The same address again changes nothing in the map.
    rig.admitted(key, "203.0.113.2", tcp_port=7200)
    assert rig.registry.map.version == 2
    assert rig.registry.counters["admitted"] == 1


def test_two_applications_of_one_node_while_probing_admit_it_once() -> None:
    rig = Rig()
    key = IdentityKey.generate()
    rig.prober.gate = Deferred()
    request = SnApply(1, key.public_key, prove(key, key, TRANSCRIPT), 7000, 7001)
    results: list[Any] = []
    for _ in range(2):
        work = rig.registry.apply(request, SOURCE, TRANSCRIPT)
        Deferred.fromCoroutine(work).addBoth(results.append)
    assert results == []
    rig.prober.gate.callback(None)
    assert len(results) == 2 and all(isinstance(r, SnAdmitted) for r in results), results
    assert rig.registry.map.supernode_count == 1 and rig.registry.map.version == 1


def test_a_supernode_evicted_while_it_reapplies_is_admitted_again() -> None:
    rig = Rig(evict_after=90.0)
    key = IdentityKey.generate()
    rig.admitted(key)
    rig.clock.advance(100)
    rig.prober.gate = Deferred()
    request = SnApply(1, key.public_key, prove(key, key, TRANSCRIPT), 7000, 7001)
    results: list[Any] = []
    Deferred.fromCoroutine(rig.registry.apply(request, SOURCE, TRANSCRIPT)).addBoth(results.append)
    assert rig.registry.evict_silent() == 1
    rig.prober.gate.callback(None)
    [reply] = results
    assert isinstance(reply, SnAdmitted), reply
    assert key.public_key in rig.registry.map and key.public_key in rig.registry.members


def test_certificate_serials_come_from_the_recorder() -> None:
    recorded: list[tuple[str, bytes, str, float, float]] = []

    def record(name: str, key: bytes, role: str, issued: float, not_after: float) -> int:
        recorded.append((name, key, role, issued, not_after))
        return 500 + len(recorded)

    rig = Rig(record_certificate=record)
    first, second = keys(2)
    serials = [
        SignedCertificate.parse(rig.admitted(key).certificate).cert.serial
        for key in (first, second, first)
    ]
    assert serials == [501, 502, 503]
    assert recorded[0] == (
        supernode_name(first.public_key),
        first.public_key,
        "supernode",
        START,
        START + SN_CERT_LIFETIME,
    )
    assert [r[0] for r in recorded] == [
        supernode_name(k.public_key) for k in (first, second, first)
    ]


def test_without_a_recorder_serials_still_differ() -> None:
    rig = Rig()
    serials = {SignedCertificate.parse(rig.admitted(k).certificate).cert.serial for k in keys(3)}
    assert len(serials) == 3


# -- heartbeats, leaving, eviction -------------------------------------------------------------


def test_a_heartbeat_sends_a_view_only_when_the_version_differs() -> None:
    rig = Rig()
    first, second = keys(2)
    version = view_of(rig.admitted(first), first).version
    state = rig.heartbeat(first, version, attached=7)
    assert (state.rid, state.version, state.view) == (2, version, None)
    assert rig.registry.members[first.public_key].attached == 7
    rig.admitted(second)
    state = rig.heartbeat(first, version)
    assert state.version == version + 1
    view = view_of(state, first)
    assert view.version == version + 1
    assert {m.node_id for m in view.own_slot.members} == {first.public_key, second.public_key}


def test_a_heartbeat_needs_a_valid_proof() -> None:
    rig = Rig()
    key = IdentityKey.generate()
    rig.admitted(key)
    forged = SnHeartbeat(2, key.public_key, prove(IdentityKey.generate(), key, TRANSCRIPT), 0, 0)
    with pytest.raises(BadProof, match=r"^The proof of the node key did not verify\.$"):
        rig.registry.heartbeat(forged, TRANSCRIPT)


def test_a_heartbeat_from_an_unknown_supernode_says_apply_again() -> None:
    rig = Rig()
    with pytest.raises(UnknownSupernode) as caught:
        rig.heartbeat(IdentityKey.generate(), 0)
    assert str(caught.value) == "This node is not a supernode (any more); apply again."
    assert caught.value.code == "unknown-supernode"


def test_silent_supernodes_are_evicted_and_the_map_version_moves_on() -> None:
    rig = Rig(evict_after=90.0)
    quiet, chatty = keys(2)
    rig.admitted(quiet)
    rig.admitted(chatty)
    assert rig.registry.map.version == 2
    rig.clock.advance(60)
    rig.heartbeat(chatty, 2)
    rig.clock.advance(30)
    assert rig.registry.evict_silent() == 0  # exactly 90 s of silence is not yet too long
    rig.clock.advance(1)
    assert rig.registry.evict_silent() == 1
    assert quiet.public_key not in rig.registry.map
    assert quiet.public_key not in rig.registry.members
    assert rig.registry.map.version == 3
    with pytest.raises(UnknownSupernode):
        rig.heartbeat(quiet, 3)
    # The survivor learns the new map at its next heartbeat.
    view = view_of(rig.heartbeat(chatty, 2), chatty)
    assert [m.node_id for m in view.own_slot.members] == [chatty.public_key]
    assert rig.registry.status()["supernodes"] == 1


def test_leaving_removes_the_supernode_at_once() -> None:
    rig = Rig()
    first, second = keys(2)
    rig.admitted(first)
    rig.admitted(second)
    state = rig.leave(first)
    assert (state.rid, state.version, state.view) == (3, 3, None)
    assert first.public_key not in rig.registry.map
    assert [info.node_id for info in rig.registry.map.supernodes] == [second.public_key]
    # Leaving twice is harmless; the map does not change again.
    assert rig.leave(first).version == 3
    with pytest.raises(BadProof):
        rig.registry.leave(
            SnLeave(3, second.public_key, prove(first, second, TRANSCRIPT)), TRANSCRIPT
        )
    assert second.public_key in rig.registry.map


# -- bootstrap lists ---------------------------------------------------------------------------


@pytest.mark.parametrize("count", [0, 4, 10, 15])
def test_bootstrap_lists_up_to_ten_distinct_supernodes(count: int) -> None:
    rig = Rig(min_supernodes=1000)
    for i, key in enumerate(keys(count)):
        rig.admitted(key, f"203.0.113.{i + 1}", tcp_port=7000 + i, udp_port=8000 + i)
    contacts = rig.registry.bootstrap()
    assert len(contacts) == min(10, count)
    assert len({c.node_id for c in contacts}) == len(contacts)
    for contact in contacts:
        assert contact.node_id is not None
        info = rig.registry.map.info(contact.node_id)
        assert (contact.host, contact.port, contact.udp_port) == (
            info.host,
            info.tcp_port,
            info.udp_port,
        )


# -- a large overlay ---------------------------------------------------------------------------


def test_a_hundred_supernodes_make_ten_slots_that_route_any_key_in_three_rounds() -> None:
    rig = Rig(min_supernodes=1000)
    members = keys(100, base=1000)
    for i, key in enumerate(members):
        rig.admitted(key, f"10.2.{i // 200}.{i % 200 + 1}")
    registry = rig.registry
    assert registry.map.supernode_count == 100
    assert len(registry.map) == math.ceil(100 / 10) == 10
    assert registry.map.block_count == 2
    assert {len(slot.members) for slot in registry.map.slots} == {10}
    status = registry.status()
    assert (status["supernodes"], status["slots"], status["blocks"]) == (100, 10, 2)
    # Every supernode asks for the current view (its own version is older).
    views = {key.public_key: view_of(rig.heartbeat(key, 0), key) for key in members}
    assert all(v.version == registry.map.version == 100 for v in views.values())
    spot = random.Random(11)
    for _ in range(200):
        key = spot.randrange(KEY_SPACE)
        asked = spot.choice(members).public_key
        rounds = 1
        route = views[asked].route(key)
        while isinstance(route, Refer):
            rounds += 1
            asked = route.contacts[spot.randrange(len(route.contacts))].node_id
            route = views[asked].route(key)
        assert rounds <= 3
        assert views[asked].prefix.contains(key)
        assert registry.map.slot_of(asked) == registry.map.slot_index_for_key(key)
