"""Self-promotion to supernode, and graceful demotion.

A daemon started with ``--allow-supernode`` runs a ``SupernodeRole``.  Every ``check_every``
seconds, while it is not a supernode, it asks itself whether it is eligible:

- it has been up at least ``min_uptime`` seconds;
- CPU headroom: the 1-minute load average per core is below ``max_load``;
- bandwidth headroom: the configured ``bandwidth_kbps`` is at least ``min_bandwidth_kbps``
  (we do not measure a link without sending traffic nobody asked for; operators state it);

and when eligible it opens its supernode ports and applies to the login server, which decides
whether the overlay needs it and checks that it is reachable from outside.  Once admitted it
heartbeats every ``heartbeat_every`` seconds, taking a new routing view when the map changed,
and re-applies if the login server forgot it.  It demotes when it loses its eligibility (load;
it may volunteer again later) or when told to (``leave``: for good): it tells the login server,
hands its attached nodes a list of other supernodes (``migrate``) and closes its ports once they
have all moved, or after a grace period.

Time comes from the injected reactor; the load figure from an injected function.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from client.loginclient import LoginClient
from overlay.errors import VoipError
from overlay.identity import IdentityKey
from overlay.login_protocol import NotNeeded, NotReachable, UnknownSupernode
from overlay.slotmap import SignedRoutingView, SupernodeInfo
from overlay.supernode import Supernode

#: While handing over, how often to look whether every attached node has moved.
HANDOVER_POLL = 0.1
#: The counters of the supernode's UDP port that ``voipctl status --json`` shows.
UDP_COUNTERS = ("served", "bad-datagrams", "amplification-refused", "stray-replies")


@dataclass(frozen=True)
class PromotionPolicy:
    min_uptime: float = 60.0
    max_load: float = 0.7
    bandwidth_kbps: int = 10_000
    min_bandwidth_kbps: int = 1_000
    check_every: float = 60.0
    heartbeat_every: float = 20.0
    retry_refused: float = 600.0
    handover_grace: float = 5.0


def load_per_core() -> float:
    return os.getloadavg()[0] / (os.cpu_count() or 1)


class SupernodeRole:
    log = Logger()

    def __init__(
        self,
        reactor: Any,
        client: LoginClient,
        node_key: IdentityKey,
        supernode: Supernode,
        *,
        listen: Callable[[], tuple[int, int]],
        unlisten: Callable[[], Deferred[None]],
        policy: PromotionPolicy = PromotionPolicy(),
        load: Callable[[], float] = load_per_core,
        rng: random.Random | None = None,
    ) -> None:
        self.reactor = reactor
        self.client = client
        self.node_key = node_key
        self.supernode = supernode
        self.listen = listen
        self.unlisten = unlisten
        self.policy = policy
        self.load = load
        self.rng = rng or random.Random()  # noqa: S311 - timer jitter, not cryptography
        self.started_at = reactor.seconds()
        self.active = False
        self.ports: tuple[int, int] | None = None
        self.last_refusal: str | None = None
        self.version = -1
        self._timer: IDelayedCall | None = None
        self._busy = False
        self._demoting = False
        self._stopped = False

    # -- eligibility ----------------------------------------------------------------------------

    def ineligible_because(self) -> str | None:
        """None when this node may volunteer, else why not (shown by ``voipctl status``)."""
        uptime = self.reactor.seconds() - self.started_at
        if uptime < self.policy.min_uptime:
            return f"up {uptime:.0f} s of the {self.policy.min_uptime:.0f} s required"
        load = self.load()
        if load >= self.policy.max_load:
            return f"CPU load {load:.2f} per core is above {self.policy.max_load:.2f}"
        if self.policy.bandwidth_kbps < self.policy.min_bandwidth_kbps:
            return (
                f"bandwidth {self.policy.bandwidth_kbps} kbit/s is below "
                f"{self.policy.min_bandwidth_kbps} kbit/s"
            )
        return None

    # -- the loop -------------------------------------------------------------------------------

    def start(self) -> None:
        self._schedule(min(self.policy.check_every, self.policy.min_uptime))

    def _schedule(self, delay: float) -> None:
        if self._stopped:
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self.reactor.callLater(max(0.0, delay), self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self._busy or self._demoting:
            self._schedule(1.0)
            return
        self._busy = True
        work = self._heartbeat() if self.active else self._try_promote()
        d = Deferred.fromCoroutine(work)
        d.addErrback(self._failed)

        def done(next_delay: float | None) -> None:
            self._busy = False
            jitter = self.rng.uniform(0.9, 1.1)
            delay = self.policy.check_every if next_delay is None else next_delay
            self._schedule(delay * jitter)

        d.addCallback(done)

    def _failed(self, failure: Failure) -> float:
        if isinstance(failure.value, VoipError):
            self.log.info("supernode role: {error}", error=failure.value)
        else:
            self.log.failure("supernode role failed", failure)
        return self.policy.check_every

    async def _try_promote(self) -> float:
        reason = self.ineligible_because()
        if reason is not None:
            self.last_refusal = f"not eligible: {reason}"
            return self.policy.check_every
        self.ports = self.ports or self.listen()
        tcp_port, udp_port = self.ports
        try:
            admitted = await self.client.sn_apply(self.node_key, tcp_port, udp_port)
        except (NotReachable, NotNeeded) as exc:
            self.last_refusal = str(exc)
            await self._close_ports()
            return self.policy.retry_refused
        except VoipError as exc:
            self.last_refusal = str(exc)
            await self._close_ports()
            return self.policy.check_every
        view = SignedRoutingView.parse(admitted.view).verify(
            self.client.ca_key, self.node_key.public_key
        )
        info = SupernodeInfo(self.node_key.public_key, admitted.host, tcp_port, udp_port)
        self.supernode.admitted(admitted.certificate, view, info)
        self.version = view.version
        self.active = True
        self.last_refusal = None
        self.log.info(
            "promoted to supernode at {host}:{port}, slot {slot}",
            host=admitted.host,
            port=tcp_port,
            slot=view.slot_index,
        )
        return self.policy.heartbeat_every

    async def _heartbeat(self) -> float:
        reason = self.ineligible_because()
        if reason is not None and not reason.startswith("up "):
            await self.demote(f"lost eligibility: {reason}")
            return self.policy.check_every
        try:
            state = await self.client.sn_heartbeat(
                self.node_key, len(self.supernode.attached), self.version
            )
        except UnknownSupernode:
            self.active = False
            return 0.0  # apply again at once
        if state.view is not None:
            view = SignedRoutingView.parse(state.view).verify(
                self.client.ca_key, self.node_key.public_key
            )
            self.supernode.set_view(view)
            self.version = view.version
        return self.policy.heartbeat_every

    async def demote(self, why: str) -> None:
        """Leave the overlay gracefully: tell the login server, hand over attached nodes.

        The ports stay open (searches are still answered) until every attached node has moved
        or ``handover_grace`` has passed (then the rest are cut off); meanwhile this node does
        not apply again.
        """
        if not self.active or self._demoting:
            return
        self.log.info("demoting: {why}", why=why)
        self._demoting = True
        self.active = False
        self.last_refusal = why
        try:
            # Nodes move while the login server hears of it: a slow login server delays nobody.
            telling = Deferred.fromCoroutine(self._tell_leaving())
            self.supernode.migrate_all(self.supernode.contacts_for_nodes())
            deadline = self.reactor.seconds() + self.policy.handover_grace
            while self.supernode.attached and self.reactor.seconds() < deadline:
                await _sleep(self.reactor, min(HANDOVER_POLL, deadline - self.reactor.seconds()))
            await telling
            await self._close_ports()
            # Closing the port leaves accepted connections open: cut off the nodes that did not
            # move, or they would stay attached to a node that no longer serves them.
            for connection in list(self.supernode.attached.values()):
                connection.close()
            self.supernode.view = None
        finally:
            self._demoting = False

    async def _tell_leaving(self) -> None:
        try:
            await self.client.sn_leave(self.node_key)
        except VoipError as exc:
            self.log.info("could not tell the login server: {error}", error=exc)

    async def leave(self, why: str) -> None:
        """Stop volunteering and demote gracefully (the daemon stops, or its user asks)."""
        self.stop()
        await self.demote(why)

    async def _close_ports(self) -> None:
        if self.ports is not None:
            self.ports = None
            await self.unlisten()

    def stop(self) -> None:
        self._stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def status(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "allowed": True,
            "active": self.active,
            "refusal": self.last_refusal,
        }
        view = self.supernode.view
        if self.active and view is not None:
            document.update(
                slot=view.slot_index,
                block=view.block_index,
                slots=view.slot_count,
                map_version=view.version,
                attached=len(self.supernode.attached),
                records=len(self.supernode.index),
                synced=self.supernode.synced,
                ports={"tcp": self.ports[0], "udp": self.ports[1]} if self.ports else None,
                # What its UDP port had to put up with (garbage is dropped, never answered).
                udp={name: self.supernode.udp.counters[name] for name in UDP_COUNTERS},
            )
        return document


def _sleep(reactor: Any, seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d
