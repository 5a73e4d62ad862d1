"""The media path of a call: direct and relayed tried at once, the best one used, switched live.

``MediaPaths`` belongs to one ``client.calls.Call`` and starts when both sides know each other's
keys (the ACCEPT):

- **Direct**: the connectivity checker (``client.connectivity``) on the call socket, over the
  host and reflexive candidates — unless the two NAT kinds already say it cannot work
  (``client.relaypath.direct_possible``), then no direct check is made.
- **Relayed**, at the same time: the caller picks a primary and a backup relay and both sides
  allocate there (``client.relaypath``).  Only a relay already checked end to end is used.
- **Decision.** Direct wins whenever it works.  A relayed pair that is ready first is used when
  the direct checks have failed, cannot work, or have not succeeded within ``RELAY_GRACE``
  seconds of it; a direct path that succeeds later replaces the relay mid-call.  While on a
  relay after direct checks failed, the caller checks the direct pairs again every
  ``DIRECT_RETRY`` seconds, and a check arriving from the peer starts a fresh round on this
  side too (a firewall opened, a NAT mapping changed).
- **Failover.** Media flows every 20 ms in both directions, even in silence, so a path that
  has carried nothing for ``PATH_SILENCE`` seconds is broken: the call moves to the next path
  that is ready (direct, then the primary relay, then the backup), both sides independently.
  Checked every ``WATCH_EVERY`` seconds, so a dead relay is left within about 1.5 s.

The path chosen, and why, is in ``describe()`` (``voipctl status`` and the call summary); the
reasons come from what both sides know alike (NAT kinds, probes, offers), so both ends say the
same.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import CancelledError, Deferred, fail, gatherResults
from twisted.logger import Logger
from twisted.python.failure import Failure

from client.callsocket import Address
from client.checkpacket import is_check
from client.relaypath import Choice, Probe, RelayLeg, choose, direct_possible
from client.signalling import CallSignal, CandidateInfo, signal
from overlay.errors import VoipError
from overlay.overlay_protocol import RelayOffer

if TYPE_CHECKING:
    from client.calls import Call

log = Logger()

RELAY_GRACE = 1.0
DIRECT_RETRY = 10.0
PATH_SILENCE = 1.0
WATCH_EVERY = 0.25
#: How long a side waits for the other's ``relay`` signal.
RELAY_SIGNAL_TIMEOUT = 10.0


class MediaPaths:
    def __init__(self, call: Call) -> None:
        self.call = call
        self.reactor = call.env.reactor
        self.direct: Any = None  # the SelectedPair of the direct checks
        self.direct_checker: Any = None
        self.direct_state = "not started"
        self.direct_reason = ""
        self.legs: list[RelayLeg] = []
        self.relay_state = "not started"
        self.relay_reason = ""
        self.choice: Choice | None = None
        self.route: str | RelayLeg | None = None  # "direct" or a leg
        self.why = ""
        self.switches: list[str] = []
        self.heard_direct: float | None = None
        self._peer_relay: Deferred[CallSignal] = Deferred()
        self._grace: Any = None
        self._retry: Any = None
        self._stopped = False
        self.direct_rounds = 0

    # -- start ---------------------------------------------------------------------------------

    def start(self) -> None:
        call = self.call
        possible, why = direct_possible(call.nat_kind, call.peer_nat)
        if call.env.relay_only:
            possible, why = False, f"{call.me} asked for relay only"
        elif not call.remote_candidates:
            possible, why = False, f"{call.peer} asked for relay only"
        if possible:
            call.socket.handlers.append(self._direct_datagram)
            self._check_direct()
        else:
            self.direct_state = "skipped"
            self.direct_reason = f"direct cannot work: {why}"
            log.info("{call}: not trying direct ({why})", call=call.peer, why=why)
        self.relay_state = "choosing"
        setup = Deferred.fromCoroutine(self._relay_setup())
        setup.addErrback(self._relay_failed)

    def _checker(self, send: Any, local: list[CandidateInfo], remote: Any) -> Any:
        call = self.call
        assert call.keys is not None
        return call.env.checker(
            self.reactor,
            send,
            call.keys.check,
            call.call_id[:8],
            call.side == "caller",
            local,
            list(call.remote_candidates) if remote is None else remote,
            call.peer,
        )

    # -- direct ---------------------------------------------------------------------------------

    def _check_direct(self) -> None:
        """A round of direct checks (the first, or a retry while on a relay)."""
        self._retry = None
        if self._stopped or self.route == "direct":
            return
        self.direct_rounds += 1
        self.direct_state = "checking"
        checker = self._checker(self.call.socket.send, self.call.local_candidates, None)
        self.direct_checker = checker
        started: Deferred[Any] = checker.start()
        started.addCallbacks(self._direct_ready, self._direct_failed, errbackArgs=(checker,))

    def _direct_datagram(self, data: bytes, address: Address) -> bool:
        """Check packets on the call socket: to the running checker, or they start a round."""
        if not is_check(data):
            return False
        checker = self.direct_checker
        if checker is None or self.direct_state == "failed":
            if self._stopped or self.route == "direct" or self.direct_state == "skipped":
                return True
            if self._retry is not None and self._retry.active():
                self._retry.cancel()
            self._check_direct()  # the peer checks again: so do we
            checker = self.direct_checker
        result: bool = checker.datagram_received(data, address)
        return result

    def _direct_ready(self, pair: Any) -> None:
        self.direct = pair
        self.direct_state = "ready"
        self.heard_direct = self.reactor.seconds()
        if self.route is None:
            self._use("direct", "a direct pair answered both ways")
        elif self.route != "direct":
            self._use("direct", "a direct path opened: leaving the relay")

    def _direct_failed(self, failure: Failure, checker: Any) -> None:
        if isinstance(failure.value, CancelledError) or checker is not self.direct_checker:
            return
        self.direct_state = "failed"
        if self.direct_rounds == 1:
            self.direct_reason = failure.getErrorMessage()
        if not isinstance(failure.value, VoipError):
            log.failure("direct checks failed", failure)
        self._maybe_relay_now()
        self._check_no_path()
        if self.call.side == "caller" and not self._stopped and self.relay_state != "failed":
            self._retry = self.reactor.callLater(DIRECT_RETRY, self._check_direct)

    # -- relayed --------------------------------------------------------------------------------

    async def _relay_setup(self) -> None:
        call = self.call
        offers = call.all_offers()
        if not offers:
            raise VoipError("no relay was offered")
        if call.side == "caller":
            mine = [await self._probe(o) for o in offers]
            choice = choose(offers, mine, list(call.peer_rtts))
            if choice is None:
                raise VoipError(f"none of {len(offers)} relays is reachable by both sides")
            self.choice = choice
            log.info("{peer}: {why}", peer=call.peer, why=choice.reason)
            legs = await self._open_legs(offers, choice.legs, mine)
            self._send_relay(legs)
            theirs = await self._wait_peer_relay()
        else:
            theirs = await self._wait_peer_relay()
            mine = [await self._probe(o) for o in offers]
            # The caller's reason, so that both ends say the same.
            self.choice = Choice(theirs.legs, theirs.reason or f"chosen by {call.peer}")
            legs = await self._open_legs(offers, theirs.legs, mine)
            self._send_relay(legs)
        remote = dict(zip(theirs.legs, theirs.candidates, strict=True))
        self.relay_state = "checking"
        connecting = [
            Deferred.fromCoroutine(self._connect(leg, remote[leg.index]))
            for leg in legs
            if leg.index in remote
        ]
        if not connecting:
            raise VoipError("the relays of both sides differ")
        await gatherResults(connecting, consumeErrors=True).addErrback(lambda _: None)
        if not any(leg.selected is not None for leg in self.legs):
            raise VoipError("no relayed pair answered")

    async def _probe(self, offer: RelayOffer) -> Probe:
        call = self.call
        known = call.probes.get(offer.label)
        if known is None:
            known = await call.probe_relay(offer)
        return known

    async def _open_legs(
        self, offers: list[RelayOffer], indexes: tuple[int, ...], mine: list[Probe]
    ) -> list[RelayLeg]:
        opening = [
            Deferred.fromCoroutine(self._open_leg(i, offers[i], mine[i]))
            for i in indexes
            if i < len(offers)
        ]
        gathered = gatherResults(opening, consumeErrors=True)
        results: list[RelayLeg | None] = await gathered.addErrback(lambda _: [])
        legs = [leg for leg in results if leg is not None]
        if not legs:
            raise VoipError("no relay gave us an allocation")
        return legs

    async def _open_leg(self, index: int, offer: RelayOffer, mine: Probe) -> RelayLeg | None:
        call = self.call
        transport = "tcp" if mine.transport == "tcp" else "udp"
        try:
            turn = await call.turn_client(offer, transport)
            leg = RelayLeg(
                self.reactor, index, offer, transport, turn, self._relay_media, self._leg_failed
            )
            self.legs.append(leg)
            candidate = await leg.open()
        except VoipError as exc:
            log.info("relay {relay}: {error}", relay=offer.label, error=exc)
            return None
        log.info(
            "relay {relay}: allocated {c}", relay=leg.label, c=f"{candidate.host}:{candidate.port}"
        )
        return leg

    def _send_relay(self, legs: list[RelayLeg]) -> None:
        call = self.call
        candidates = []
        for leg in legs:
            assert leg.relayed is not None
            candidates.append(CandidateInfo("relay", leg.relayed[0], leg.relayed[1], 0))
        body = bytes(
            signal(
                "relay",
                call.call_id,
                legs=tuple(leg.index for leg in legs),
                candidates=tuple(candidates),
                reason=self.choice.reason[:200] if self.choice else None,
            )
        )
        call.send_body(body, "relay")

    def relay_signal(self, message: CallSignal) -> None:
        if not self._peer_relay.called:
            self._peer_relay.callback(message)

    async def _wait_peer_relay(self) -> CallSignal:
        waiting = self._peer_relay
        waiting.addTimeout(RELAY_SIGNAL_TIMEOUT, self.reactor)
        try:
            return await waiting
        except (TimeoutError, CancelledError):
            raise VoipError(f"{self.call.peer} named no relay in time") from None

    async def _connect(self, leg: RelayLeg, remote: CandidateInfo) -> None:
        try:
            await leg.connect(remote, self._checker)
        except VoipError as exc:
            log.info("relay {relay}: {error}", relay=leg.label, error=exc)
            return
        if self._stopped:
            return
        self._leg_ready(leg)

    def _leg_ready(self, leg: RelayLeg) -> None:
        log.info("relay {relay}: ready", relay=leg.label)
        route = self.route
        if isinstance(route, RelayLeg) and self._rank(leg) < self._rank(route):
            # The backup was ready first; both sides settle on the primary.
            self._use(leg, f"the primary relay {leg.offer.label} is ready")
        if self.relay_state != "ready":
            self.relay_state = "ready"
            self._maybe_relay_now()

    def _relay_failed(self, failure: Failure) -> None:
        if isinstance(failure.value, CancelledError) or self._stopped:
            return
        self.relay_state = "failed"
        self.relay_reason = failure.getErrorMessage()
        if not isinstance(failure.value, VoipError):
            log.failure("relay set-up failed", failure)
        log.info("{peer}: no relay: {why}", peer=self.call.peer, why=self.relay_reason)
        self._check_no_path()

    def _leg_failed(self, leg: RelayLeg, reason: str) -> None:
        log.info("relay {relay} lost: {reason}", relay=leg.label, reason=reason)
        if self.route is leg:
            self._failover(f"relay {leg.offer.label} lost ({reason})")

    def _rank(self, leg: RelayLeg) -> int:
        """0 for the primary relay, 1 for the backup (the same order on both sides)."""
        order = self.choice.legs if self.choice is not None else ()
        return order.index(leg.index) if leg.index in order else len(order)

    def _ready_legs(self) -> list[RelayLeg]:
        ready = [leg for leg in self.legs if leg.selected is not None and leg.failed is None]
        return sorted(ready, key=self._rank)

    def _maybe_relay_now(self) -> None:
        """Use the relay now, or after a grace while direct checks still run."""
        if self.route is not None or not self._ready_legs() or self._stopped:
            return
        if self.direct_state == "checking":
            if self._grace is None:
                self._grace = self.reactor.callLater(RELAY_GRACE, self._grace_over)
            return
        leg = self._ready_legs()[0]
        why = self.direct_reason or "no direct path"
        self._use(leg, f"{why}; {self.choice.reason if self.choice else 'relayed'}")

    def _grace_over(self) -> None:
        self._grace = None
        if self.route is None and self._ready_legs():
            leg = self._ready_legs()[0]
            reason = self.choice.reason if self.choice else "relayed"
            self._use(leg, f"no direct pair answered within {RELAY_GRACE:g} s of it; {reason}")

    def _check_no_path(self) -> None:
        if self.route is not None or self._stopped:
            return
        direct_done = self.direct_state in ("failed", "skipped")
        if direct_done and self.relay_state == "failed":
            parts = [p for p in (self.direct_reason, f"relay: {self.relay_reason}") if p]
            self.call.no_path(
                f"No media path to {self.call.peer} could be opened ({'; '.join(parts)})."
            )

    # -- using a path ---------------------------------------------------------------------------

    def _use(self, route: str | RelayLeg, why: str) -> None:
        first = self.route is None
        old = self.describe_route()
        self.route, self.why = route, why
        if self._grace is not None and self._grace.active():
            self._grace.cancel()
        self._grace = None
        if route == "direct":
            self.heard_direct = self.reactor.seconds()
        elif isinstance(route, RelayLeg):
            route.last_heard = self.reactor.seconds()
        if first:
            self.call.path_ready(self.direct if route == "direct" else route.selected)  # type: ignore[union-attr]
        else:
            note = f"{old} -> {self.describe_route()}: {why}"
            self.switches.append(note)
            log.info("{peer}: path {note}", peer=self.call.peer, note=note)
            self.call.say(f"Media path now {self.describe_route()} ({why}).")
        if route == "direct":  # the relays are no longer needed
            for leg in self.legs:
                leg.close()

    def send(self, data: bytes) -> None:
        route = self.route
        if route == "direct":
            remote = self.direct.remote
            self.call.socket.send(data, (remote[0], remote[1]))
        elif isinstance(route, RelayLeg):
            route.send_media(data)

    def probe(self, timeout: float = 2.0) -> Deferred[float]:
        """A connectivity check on the path in use: its round-trip time (``voipctl ping``)."""
        route = self.route
        checker = self.direct_checker if route == "direct" else getattr(route, "checker", None)
        if checker is None:
            return fail(VoipError("No path is in use yet."))
        result: Deferred[float] = checker.probe(timeout)
        return result

    def direct_media(self, data: bytes, address: Address) -> None:
        if self.direct is not None and (address[0], address[1]) == tuple(self.direct.remote):
            self.heard_direct = self.reactor.seconds()
        self.call.media_in(data)

    def _relay_media(self, data: bytes) -> None:
        self.call.media_in(data)

    def watch(self) -> None:
        """Leave a path that has carried nothing for ``PATH_SILENCE`` seconds."""
        route = self.route
        if route is None or self._stopped:
            return
        now = self.reactor.seconds()
        heard = self.heard_direct if route == "direct" else route.last_heard  # type: ignore[union-attr]
        if heard is not None and now - heard > PATH_SILENCE:
            self._failover(f"{self.describe_route()} carried nothing for {now - heard:.1f} s")

    def _failover(self, why: str) -> None:
        current = self.route
        for leg in self._ready_legs():
            if leg is not current:
                self._use(leg, why)
                return
        if isinstance(current, RelayLeg) and current.failed is None:
            return  # nothing better: stay, the media watchdog ends the call if it stays silent

    # -- reports --------------------------------------------------------------------------------

    def describe_route(self) -> str:
        route = self.route
        if route is None:
            return "none"
        if route == "direct":
            remote_kind = getattr(getattr(self.direct, "remote_candidate", None), "kind", "prflx")
            host = self.direct.local.kind == "host" and remote_kind == "host"
            return "direct host" if host else "direct reflexive"
        assert isinstance(route, RelayLeg)
        return f"relay {route.offer.label} ({route.transport.upper()})"

    def describe(self) -> dict[str, Any]:
        route = self.route
        document: dict[str, Any] = {
            "kind": self.describe_route(),
            "why": self.why,
            "direct": self.direct_state
            + (f" ({self.direct_reason})" if self.direct_reason else ""),
            "relay": self.relay_state + (f" ({self.relay_reason})" if self.relay_reason else ""),
            "relay_choice": self.choice.reason if self.choice else None,
            "legs": [leg.describe() for leg in self.legs],
            "switches": list(self.switches),
        }
        if route == "direct":
            pair = self.direct
            document["local"] = f"{pair.local.host}:{pair.local.port}"
            document["remote"] = f"{pair.remote[0]}:{pair.remote[1]}"
            document["rtt_ms"] = round(pair.rtt * 1000, 1) if pair.rtt else None
        elif isinstance(route, RelayLeg):
            pair = route.selected
            document["local"] = document["relayed"] = route.describe()["relayed"]
            document["remote"] = f"{pair.remote[0]}:{pair.remote[1]}"
            document["rtt_ms"] = round(pair.rtt * 1000, 1) if pair.rtt else None
            document["relay_server"] = route.offer.label
            document["transport"] = route.transport
        return document

    def stop(self) -> None:
        self._stopped = True
        for timer in (self._grace, self._retry):
            if timer is not None and timer.active():
                timer.cancel()
        if self.direct_checker is not None:
            self.direct_checker.stop()
        if not self._peer_relay.called:
            self._peer_relay.cancel()
            self._peer_relay.addErrback(lambda _: None)
        for leg in self.legs:
            leg.close()


def _state(state: str, reason: str) -> str:
    return f"{state} ({reason})" if reason else state
