"""The login server as membership authority: admit supernodes, keep the slot map, evict the dead.

A node that volunteers (``voipd --allow-supernode``) applies with ``sn-apply``.  The registry
checks, in order: the proof that the applicant holds its node key; that the overlay needs
another supernode (none yet, fewer than ``min_supernodes``, or too many ordinary nodes per
supernode); and that the applicant is reachable from outside: the login server connects back
to the *observed* source address (never an address the applicant claims) on the TCP port,
where the applicant must complete a handshake signed by its node key, and sends a UDP
reachability check that must come back signed.  Then it issues a supernode certificate, adds
the node to the slot map (``overlay.slotmap``: slots of at most 10, blocks of 8, split and
merge, version bumped) and answers with the applicant's signed routing view.

Supernodes heartbeat; one silent for ``evict_after`` seconds is removed from the map.  Every
node that logs in gets up to ``bootstrap_count`` supernodes.  The map lives in memory: after a
restart of the login server, supernodes re-apply at their next heartbeat.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.logger import Logger

from overlay import certificate
from overlay.certificate import Role
from overlay.identity import IdentityKey, verify_signature
from overlay.login_protocol import (
    BadProof,
    Contact,
    NotNeeded,
    NotReachable,
    UnknownSupernode,
    proof_message,
    supernode_name,
)
from overlay.overlay_protocol import SnAdmitted, SnApply, SnHeartbeat, SnLeave, SnState
from overlay.slotmap import SlotMap, SupernodeInfo

SN_CERT_LIFETIME = 24 * 3600


class Clock(Protocol):
    def seconds(self) -> float: ...


#: ``probe(host, tcp_port, udp_port, node_key)`` -> None when reachable, else the reason.
Prober = Callable[[str, int, int, bytes], Awaitable[str | None]]


@dataclass
class Member:
    info: SupernodeInfo
    last_heartbeat: float
    attached: int = 0


class SupernodeRegistry:
    log = Logger()

    def __init__(
        self,
        clock: Clock,
        ca_key: IdentityKey,
        prober: Prober,
        *,
        record_certificate: Callable[[str, bytes, str, float, float], int] | None = None,
        min_supernodes: int = 10,
        max_ons_per_supernode: int = 400,
        evict_after: float = 90.0,
        heartbeat_interval: float = 20.0,
        bootstrap_count: int = 10,
        contacts_per_block: int = 3,
        rng: random.Random | None = None,
    ) -> None:
        self.clock = clock
        self.ca_key = ca_key
        self.prober = prober
        self.record_certificate = record_certificate
        self.min_supernodes = min_supernodes
        self.max_ons_per_supernode = max_ons_per_supernode
        self.evict_after = evict_after
        self.heartbeat_interval = heartbeat_interval
        self.bootstrap_count = bootstrap_count
        self.contacts_per_block = contacts_per_block
        self.rng = rng or random.Random()  # noqa: S311 - spreading load, not cryptography
        self.map = SlotMap.empty()
        self.members: dict[bytes, Member] = {}
        self.counters: Counter[str] = Counter()
        self._serial = 0

    # -- decisions --------------------------------------------------------------------------------

    def needed(self) -> bool:
        count = len(self.members)
        if count < self.min_supernodes:
            return True
        attached = sum(m.attached for m in self.members.values())
        return attached / count > self.max_ons_per_supernode / 2

    def _check_proof(self, node_key: bytes, proof: bytes, transcript: bytes) -> None:
        name = supernode_name(node_key) if len(node_key) == 32 else "?"
        if not verify_signature(node_key, proof_message(transcript, name, node_key), proof):
            self.counters["bad-proof"] += 1
            raise BadProof("The proof of the node key did not verify.")

    async def apply(self, request: SnApply, source: str, transcript: bytes) -> SnAdmitted:
        self._check_proof(request.node_key, request.proof, transcript)
        known = request.node_key in self.members
        if not known and not self.needed():
            self.counters["not-needed"] += 1
            raise NotNeeded()
        reason = await self.prober(source, request.tcp_port, request.udp_port, request.node_key)
        if reason is not None:
            self.counters["not-reachable"] += 1
            raise NotReachable(
                f"The login server could not reach {source}:{request.tcp_port} from outside "
                f"({reason}); only reachable nodes become supernodes."
            )
        info = SupernodeInfo(request.node_key, source, request.tcp_port, request.udp_port)
        now = self.clock.seconds()
        # Asked again: while the probe ran, another application of this node may have been
        # admitted, or the node may have been evicted.
        known = request.node_key in self.members
        if known:
            if self.members[request.node_key].info != info:
                self.map = self.map.with_updated_info(info)
            self.members[request.node_key].info = info
            self.members[request.node_key].last_heartbeat = now
        else:
            self.map = self.map.with_supernode(info)
            self.members[request.node_key] = Member(info, now)
            self.counters["admitted"] += 1
            self.log.info(
                "admitted supernode {name} at {host}:{port}; {count} supernodes, map version {v}",
                name=supernode_name(request.node_key),
                host=source,
                port=request.tcp_port,
                count=len(self.members),
                v=self.map.version,
            )
        signed = self._certificate(request.node_key, now)
        view = bytes(self.map.view_for(request.node_key, self.contacts_per_block).sign(self.ca_key))
        return SnAdmitted(request.rid, signed, view, source)

    def _certificate(self, node_key: bytes, now: float) -> bytes:
        name = supernode_name(node_key)
        if self.record_certificate is not None:
            serial = self.record_certificate(
                name, node_key, Role.SUPERNODE.value, now, now + SN_CERT_LIFETIME
            )
        else:
            self._serial += 1
            serial = self._serial
        signed = certificate.issue(
            self.ca_key,
            name,
            node_key,
            serial=serial,
            now=now,
            lifetime=SN_CERT_LIFETIME,
            role=Role.SUPERNODE,
        )
        return bytes(signed)

    def heartbeat(self, request: SnHeartbeat, transcript: bytes) -> SnState:
        self._check_proof(request.node_key, request.proof, transcript)
        member = self.members.get(request.node_key)
        if member is None:
            raise UnknownSupernode()
        member.last_heartbeat = self.clock.seconds()
        member.attached = max(0, request.attached)
        self.counters["heartbeats"] += 1
        view = None
        if request.version != self.map.version:
            signed = self.map.view_for(request.node_key, self.contacts_per_block).sign(self.ca_key)
            view = bytes(signed)
        return SnState(request.rid, self.map.version, view)

    def leave(self, request: SnLeave, transcript: bytes) -> SnState:
        self._check_proof(request.node_key, request.proof, transcript)
        if request.node_key in self.members:
            self._remove(request.node_key, "left")
        return SnState(request.rid, self.map.version, None)

    def _remove(self, node_key: bytes, why: str) -> None:
        del self.members[node_key]
        self.map = self.map.without_supernode(node_key)
        self.counters[why] += 1
        self.log.info(
            "supernode {name} {why}; {count} supernodes, map version {v}",
            name=supernode_name(node_key),
            why=why,
            count=len(self.members),
            v=self.map.version,
        )

    def evict_silent(self) -> int:
        """Remove every supernode that missed its heartbeats; returns how many."""
        horizon = self.clock.seconds() - self.evict_after
        dead = [key for key, m in self.members.items() if m.last_heartbeat < horizon]
        for key in dead:
            self._remove(key, "evicted")
        return len(dead)

    def bootstrap(self) -> tuple[Contact, ...]:
        """Supernodes for a node that logs in: a random sample, so load spreads."""
        infos = [m.info for m in self.members.values()]
        chosen = self.rng.sample(infos, min(self.bootstrap_count, len(infos)))
        return tuple(Contact(i.host, i.tcp_port, i.udp_port, i.node_id) for i in chosen)

    def status(self) -> dict[str, Any]:
        return {
            "supernodes": len(self.members),
            "slots": len(self.map.slots),
            "blocks": self.map.block_count,
            "map_version": self.map.version,
            "attached": sum(m.attached for m in self.members.values()),
        }
