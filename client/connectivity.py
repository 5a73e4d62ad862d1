"""Connectivity checks: find a direct UDP path between the two sides of a call, punching holes.

Our simple take on ICE (RFC 8445), on the one call socket each side opens.  Both sides know each
other's candidates (``client.candidates``), the check key and the call id from the signed call
set-up, and which side controls (the caller).  Packets: ``client.checkpacket``.

- **Pairs** (``client.checklist``): one per remote address of a family we have, in RFC 8445
  priority order; the local half of a pair is learned from the address the peer saw.
- **Checks.** Every pair is checked at once, highest priority first, ``pace`` seconds apart; each
  pair retransmits after 0.1, 0.2, 0.4 and 0.8 s and then every second until it succeeds or the
  ``timeout`` ends everything.  Both sides send at the same time, so each side's outgoing check
  opens its own NAT for the other's: two port-restricted cone NATs meet (hole punching).
- **Answers.** Every authenticated request is answered from the socket it came to, with the
  source address seen (like XOR-MAPPED-ADDRESS).  A request from an address we did not know adds
  a peer-reflexive remote candidate (RFC 8445 7.3.1.3), and any request on a pair that has not
  succeeded triggers a check on it at once (7.3.1.4).
- **Valid.** A pair is valid when a response to one of our requests on it comes back from the
  address the request went to.  Each transmission has its own transaction id, so the round-trip
  time is exact.
- **Nomination** (regular nomination, RFC 8445 8.1.1): the controlling side takes the first valid
  pair, stops checking the others and sends it checks with the nominate flag; the response to
  one selects the pair.  The controlled side selects a pair when a nominating request arrives on
  it and its own check on it succeeded (a nominated pair that has not is checked at once).  A
  nomination still in flight at the timeout gets ``NOMINATION_GRACE`` more seconds, once.
- **Role conflict** (7.3.1.1): a packet claiming our role makes the side with the lower
  tie-breaker switch.  Roles come from the call set-up, so this only guards against bugs.
- **After selection** every check is still answered; the controlling side sends a keep-alive
  check on the selected pair every ``keepalive`` seconds (RFC 7675-style consent; each answer
  refreshes both NATs' mappings) and ``last_heard`` says when the peer last answered or asked.
- **Failure.** At ``timeout`` without a selected pair, ``start()``'s Deferred fails with
  ``NoDirectPath``, whose text says what was seen; the call then needs a relay.  A side that
  failed or was stopped answers nothing more, so the two sides never disagree for long.

Forged, mis-keyed or malformed check packets are dropped and counted (``counters``).  All time
comes from the reactor given.
"""

from __future__ import annotations

import enum
import os
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from client.candidates import (
    Address,
    Candidate,
    CandidateError,
    CandidateLike,
    check_host,
    format_address,
    priority,
)
from client.checklist import CheckList, Pair, SelectedPair
from client.checkpacket import (
    KEY_SIZE,
    TOKEN_SIZE,
    TXID_SIZE,
    CheckAuthError,
    CheckError,
    CheckPacket,
    CheckType,
    is_check,
)
from overlay.errors import VoipError

__all__ = ["ConnectivityChecker", "NoDirectPath", "SelectedPair", "State"]

RETRANSMIT = (0.1, 0.2, 0.4, 0.8)
RETRANSMIT_EVERY = 1.0
KEEPALIVE = 2.5
NOMINATION_GRACE = 2.0
TRANSACTION_MEMORY = 10.0
Send = Callable[[bytes, Address], None]
Trace = Callable[[str, str, str], None]


class NoDirectPath(VoipError):
    """No direct path to the peer could be opened; the call needs a relay."""

    code = "no-direct-path"


class State(enum.Enum):
    IDLE = "idle"
    CHECKING = "checking"
    SELECTED = "selected"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(frozen=True)
class _Transaction:
    remote: Address
    sent_at: float
    nominate: bool
    #: ``probe()``'s waiter: fired with the round-trip time when the answer comes.
    waiter: Deferred[float] | None = None


class ConnectivityChecker:
    log = Logger()

    def __init__(  # noqa: PLR0917 - the signature the call engine was promised
        self,
        reactor: IReactorTime,
        send: Send,
        key: bytes,
        call_token: bytes,
        controlling: bool,
        local: Sequence[CandidateLike],
        remote: Sequence[CandidateLike],
        timeout: float = 8.0,
        pace: float = 0.02,
        *,
        peer: str = "the peer",
        keepalive: float | None = KEEPALIVE,
        tie_breaker: int | None = None,
        trace: Trace | None = None,
    ) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError("the check key is 32 bytes")
        if len(call_token) != TOKEN_SIZE:
            raise ValueError("the call token is 8 bytes")
        self.reactor = reactor
        self.send = send
        self.key = bytes(key)
        self.call_token = bytes(call_token)
        self.checklist = CheckList([Candidate.of(c) for c in local], controlling, Counter())
        self.counters = self.checklist.counters
        self.pairs = self.checklist.pairs
        self.timeout = timeout
        self.pace = pace
        self.peer = peer
        self.keepalive = keepalive
        self.tie_breaker = (
            tie_breaker if tie_breaker is not None else int.from_bytes(os.urandom(8), "big")
        )
        self.trace = trace
        self.state = State.IDLE
        self.selected: SelectedPair | None = None
        self.last_heard: float | None = None
        self._transactions: OrderedDict[bytes, _Transaction] = OrderedDict()
        self._nominating: Pair | None = None
        self._heard_peer = False
        self._grace_given = False
        self._next_slot = 0.0
        self._deadline: IDelayedCall | None = None
        self._keepalive: IDelayedCall | None = None
        self._result: Deferred[SelectedPair] = Deferred(lambda _: self.stop())
        self._add_remotes(remote)

    # -- the API -------------------------------------------------------------------------------

    def start(self) -> Deferred[SelectedPair]:
        """Check every pair; fires with the ``SelectedPair`` or fails with ``NoDirectPath``."""
        if self.state is not State.IDLE:
            raise RuntimeError("the connectivity checks were already started")
        self._set_state(State.CHECKING, "start")
        self._deadline = self.reactor.callLater(self.timeout, self._timed_out)
        self._schedule(list(self.pairs.values()))
        return self._result

    def add_remote(self, candidates: Iterable[CandidateLike]) -> None:
        """More remote candidates (trickled); checked at once while checking."""
        if self.state in (State.SELECTED, State.FAILED, State.STOPPED):
            self.counters["late-candidates"] += 1
            return
        self._schedule(self._add_remotes(candidates))

    def probe(self, timeout: float = 2.0) -> Deferred[float]:
        """One check on the selected pair; fires with its round-trip time (``voipctl ping``),
        or fails with ``NoDirectPath`` when not selected, ``TimeoutError`` after ``timeout``."""
        if self.state is not State.SELECTED or self.selected is None:
            return fail(NoDirectPath("No path is selected to probe."))
        pair = self.pairs.get(self.selected.remote)
        if pair is None:  # pragma: no cover - a selected pair is always in the list
            return fail(NoDirectPath("The selected pair is gone."))
        waiter: Deferred[float] = Deferred()
        self._check(pair, waiter=waiter)
        return waiter.addTimeout(timeout, self.reactor)

    def stop(self) -> None:
        """Cancel every timer and stop answering; a pending ``start()`` fails (CancelledError)."""
        if self.state is State.STOPPED:
            return
        pending = self.state in (State.IDLE, State.CHECKING)
        self._set_state(State.STOPPED, "stop")
        self._cancel_timers()
        if pending and not self._result.called:
            self._result.cancel()

    def datagram_received(self, data: bytes, addr: Address) -> bool:
        """Handle one datagram of the call socket; True when it was a check packet."""
        if not is_check(data):
            return False
        if self.state in (State.FAILED, State.STOPPED):
            self.counters["after-end"] += 1
            return True
        try:
            packet = CheckPacket.parse(data, self.key)
            source = (check_host(addr[0]), int(addr[1]))
        except CheckAuthError:
            self.counters["unauthenticated"] += 1
            return True
        except (CheckError, CandidateError):
            self.counters["malformed"] += 1
            return True
        if packet.call_token != self.call_token:
            self.counters["wrong-call"] += 1
            return True
        if self.state is not State.SELECTED and packet.controlling == self.controlling:
            self._role_conflict(packet.tie_breaker)
        if packet.type is CheckType.REQUEST:
            self._request(packet, source)
        else:
            self._response(packet, source)
        return True

    # -- sending -------------------------------------------------------------------------------

    def _add_remotes(self, candidates: Iterable[CandidateLike]) -> list[Pair]:
        added = []
        for candidate in candidates:
            pair = self.checklist.add(Candidate.of(candidate))
            if pair is not None:
                added.append(pair)
        return added

    def _schedule(self, pairs: list[Pair]) -> None:
        """First checks of new pairs, best first, ``pace`` apart (not once we nominate)."""
        if self.state is not State.CHECKING or self._nominating is not None:
            return
        now = self.reactor.seconds()
        for pair in sorted(pairs, key=lambda p: p.priority, reverse=True):
            slot = max(now, self._next_slot)
            self._next_slot = slot + self.pace
            pair.due = slot
            if slot <= now:
                self._transmit(pair)
            else:
                pair.timer = self.reactor.callLater(slot - now, self._transmit, pair)

    def _transmit(self, pair: Pair) -> None:
        """One scheduled check on ``pair``, and the timer for the next."""
        pair.timer = None
        nominate = pair is self._nominating
        self._check(pair, nominate)
        step = pair.sends - 1
        pair.due += RETRANSMIT[step] if step < len(RETRANSMIT) else RETRANSMIT_EVERY
        now = self.reactor.seconds()
        pair.due = max(pair.due, now)  # after a stall (a sleeping laptop): no burst to catch up
        pair.timer = self.reactor.callLater(pair.due - now, self._transmit, pair)

    def _check(
        self, pair: Pair, nominate: bool = False, waiter: Deferred[float] | None = None
    ) -> None:
        now = self.reactor.seconds()
        while self._transactions:
            oldest = next(iter(self._transactions.values()))
            if now - oldest.sent_at < TRANSACTION_MEMORY:
                break
            self._transactions.popitem(last=False)
        txid = os.urandom(TXID_SIZE)
        self._transactions[txid] = _Transaction(pair.remote.address, now, nominate, waiter)
        pair.sends += 1
        self.counters["requests-sent"] += 1
        request = CheckPacket(
            CheckType.REQUEST,
            self.call_token,
            txid,
            self.tie_breaker,
            priority("prflx"),
            self.controlling,
            nominate,
        )
        self._send(request, pair.remote.address)

    def _send(self, packet: CheckPacket, address: Address) -> None:
        try:
            self.send(packet.to_bytes(self.key), address)
        except OSError as exc:  # e.g. no route to a host candidate of another LAN
            self.counters["send-errors"] += 1
            self.log.debug("check to {a} failed: {e}", a=format_address(address), e=exc)

    # -- receiving -----------------------------------------------------------------------------

    def _request(self, packet: CheckPacket, source: Address) -> None:
        self.counters["requests-received"] += 1
        self._heard_peer = True
        response = CheckPacket(
            CheckType.RESPONSE,
            self.call_token,
            packet.transaction_id,
            self.tie_breaker,
            priority("prflx"),
            self.controlling,
            packet.nominate,
            observed=source,
        )
        self._send(response, source)
        self.counters["responses-sent"] += 1
        pair = self.pairs.get(source)
        if pair is None:
            pair = self.checklist.add(Candidate("prflx", source[0], source[1], packet.priority))
            if pair is None:
                return
            self.counters["prflx-learned"] += 1
            self._schedule([pair])
        if self.state is State.SELECTED:
            if self.selected is not None and source == self.selected.remote:
                self.last_heard = self.reactor.seconds()
            elif packet.nominate:
                self.counters["late-nominations"] += 1
            return
        if packet.nominate and not self.controlling:
            pair.nominated = True
        if (
            self.state is State.CHECKING
            and not pair.valid
            and (self._nominating is None or pair is self._nominating)
        ):
            self.counters["triggered-checks"] += 1
            self._check(pair, pair is self._nominating)
        self._maybe_select()

    def _response(self, packet: CheckPacket, source: Address) -> None:
        transaction = self._transactions.pop(packet.transaction_id, None)
        if transaction is None:
            self.counters["stray-responses"] += 1
            return
        if source != transaction.remote:
            self.counters["asymmetric-responses"] += 1
            return
        pair = self.pairs.get(source)
        if pair is None or packet.observed is None:
            self.counters["stray-responses"] += 1
            return
        self.counters["responses-received"] += 1
        now = self.reactor.seconds()
        self._heard_peer = True
        pair.rtt = now - transaction.sent_at
        pair.local = self.checklist.local_for(packet.observed)
        if transaction.waiter is not None and not transaction.waiter.called:
            transaction.waiter.callback(pair.rtt)
        if self.state is State.SELECTED:
            if self.selected is not None and source == self.selected.remote:
                self.last_heard = now
            return
        if not pair.valid:
            pair.valid = True
            self.counters["valid-pairs"] += 1
        if pair.timer is not None and pair is not self._nominating:
            pair.timer.cancel()
            pair.timer = None
        if self.controlling and self.state is State.CHECKING:
            if transaction.nominate and pair is self._nominating:
                pair.nominated = True
            elif self._nominating is None:
                self._nominate(pair)
        self._maybe_select()

    def _nominate(self, pair: Pair) -> None:
        """Controlling side: stop checking the others, send nominating checks on ``pair``."""
        self._nominating = pair
        for other in self.pairs.values():
            if other.timer is not None:
                other.timer.cancel()
                other.timer = None
        pair.sends = 0
        pair.due = self.reactor.seconds()
        self._transmit(pair)

    def _maybe_select(self) -> None:
        if self.state is not State.CHECKING:
            return
        for pair in self.pairs.values():
            if pair.valid and pair.nominated and pair.local is not None:
                self._select(pair)
                return

    def _select(self, pair: Pair) -> None:
        assert pair.local is not None
        self._cancel_timers()
        self.selected = SelectedPair(pair.local, pair.remote.address, pair.rtt, pair.remote)
        self.last_heard = self.reactor.seconds()
        self._set_state(State.SELECTED, "nominated")
        self.log.info(
            "direct path to {peer}: {local} -> {remote} ({rtt:.1f} ms)",
            peer=self.peer,
            local=str(pair.local),
            remote=str(pair.remote),
            rtt=pair.rtt * 1000,
        )
        if self.controlling and self.keepalive:
            self._keepalive = self.reactor.callLater(self.keepalive, self._keep_alive, pair)
        self._result.callback(self.selected)

    def _keep_alive(self, pair: Pair) -> None:
        self._check(pair)
        assert self.keepalive is not None
        self._keepalive = self.reactor.callLater(self.keepalive, self._keep_alive, pair)

    def _role_conflict(self, their_tie_breaker: int) -> None:
        self.counters["role-conflicts"] += 1
        if self.tie_breaker >= their_tie_breaker:
            return  # we keep our role; the peer switches when it sees our packets
        self.checklist.set_role(not self.controlling)
        self.counters["role-switches"] += 1
        self.log.info("role conflict with {peer}: now {r}", peer=self.peer, r=self._role)
        if self.controlling:
            valid = [p for p in self.pairs.values() if p.valid]
            if valid and self.state is State.CHECKING:
                self._nominate(max(valid, key=lambda p: p.priority))
        else:
            self._nominating = None

    # -- the end -------------------------------------------------------------------------------

    def _timed_out(self) -> None:
        self._deadline = None
        if self.state is not State.CHECKING:
            return
        if not self._grace_given and self._nomination_in_flight():
            self._grace_given = True
            self._deadline = self.reactor.callLater(NOMINATION_GRACE, self._timed_out)
            return
        self._cancel_timers()
        self._set_state(State.FAILED, "timeout")
        text = self.checklist.failure_text(self.peer, self.timeout, self._heard_peer)
        self._result.errback(NoDirectPath(text))

    def _nomination_in_flight(self) -> bool:
        """Controlling: nominating, no answer yet; controlled: nominated, own check pending."""
        if self.controlling:
            return self._nominating is not None
        return any(p.nominated and not p.valid for p in self.pairs.values())

    def _cancel_timers(self) -> None:
        for pair in self.pairs.values():
            if pair.timer is not None:
                if pair.timer.active():
                    pair.timer.cancel()
                pair.timer = None
        for timer in (self._deadline, self._keepalive):
            if timer is not None and timer.active():
                timer.cancel()
        self._deadline = self._keepalive = None

    @property
    def controlling(self) -> bool:
        return self.checklist.controlling

    @property
    def _role(self) -> str:
        return "controlling" if self.controlling else "controlled"

    def _set_state(self, new: State, why: str) -> None:
        old, self.state = self.state, new
        if self.trace is not None:
            self.trace(old.value, why, new.value)

    def describe(self) -> dict[str, Any]:
        """A snapshot for ``voipctl status --json`` and debugging."""
        return {
            "state": self.state.value,
            "role": self._role,
            "pairs": self.checklist.describe(),
            "counters": dict(self.counters),
        }
