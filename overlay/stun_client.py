"""STUN client transactions over a socket someone else owns (RFC 8489 s.6.2.1, shortened).

A call's media socket carries RTP, connectivity checks and STUN at once, so the client does not
own it: it sends through the ``send`` callable it was given, and the socket's owner offers it
every datagram with ``datagram_received(data, addr)``, which returns True only for a STUN
response to one of its own transactions (matched by transaction id).  Anything else, including
STUN requests and responses to other transactions, is left to the owner.

A request is retransmitted after 0.1, 0.2, 0.4, 0.8 s (the RFC's doubling RTO starting at 100 ms
instead of 500 ms) and given up 1.6 s after the last send, 3.1 s in all, on the injected clock;
``timeout`` bounds it further.  Binding requests are padded (PADDING, RFC 5780) to at least the
size of our supernodes' largest answer, so they are answered even by a server that never sends
more bytes than it received, and carry FINGERPRINT for demultiplexing.

    binding(server)          -> the reflexive (host, port) (XOR-MAPPED-ADDRESS, else MAPPED-)
    binding_response(server) -> StunResponse: the message, its source, time to answer, sends
    request(server, message) -> StunResponse for any request (TURN later)
Errors: ``StunTimeout`` (no answer), ``StunRefused`` (error response), ``StunError`` (a success
without a mapped address).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from overlay.errors import VoipError
from overlay.stun import (
    CHANGE_REQUEST,
    ERROR_CODE,
    HEADER_SIZE,
    MAPPED_ADDRESS,
    PADDING,
    XOR_MAPPED_ADDRESS,
    Address,
    Attribute,
    ChangeRequest,
    StunClass,
    StunError,
    StunMessage,
    is_stun,
)

#: Waits after each transmission: retransmit after each but the last, then give up.
SCHEDULE = (0.1, 0.2, 0.4, 0.8, 1.6)
#: A padded Binding request is this long: our server's largest answer (IPv6 + FINGERPRINT).
PADDED_BINDING = 52

Send = Callable[[bytes, Address], None]


class StunTimeout(VoipError):
    """The STUN server did not answer in time."""

    code = "stun-timeout"


class StunRefused(VoipError):
    """The STUN server refused the request."""

    code = "stun-refused"


@dataclass(frozen=True)
class StunResponse:
    message: StunMessage
    #: Where the request went, and where the response came from (differ after CHANGE-REQUEST).
    server: Address
    source: Address
    #: Seconds from the first transmission to the response.
    rtt: float
    transmissions: int


@dataclass
class _Transaction:
    request: StunMessage
    server: Address
    result: Deferred[StunResponse]
    started: float
    transmissions: int = 0
    timer: IDelayedCall | None = None


class StunClient:
    def __init__(
        self, reactor: IReactorTime, send: Send, *, schedule: Sequence[float] = SCHEDULE
    ) -> None:
        if not schedule or min(schedule) <= 0:
            raise ValueError("a STUN schedule needs positive waits")
        self.reactor = reactor
        self.send = send
        self.schedule = tuple(schedule)
        self.pending: dict[bytes, _Transaction] = {}
        self.counters: Counter[str] = Counter()

    # -- transactions ----------------------------------------------------------------------

    def request(
        self, server: Address, message: StunMessage, *, timeout: float | None = None
    ) -> Deferred[StunResponse]:
        """Run one transaction; fires with the success response, fails on error or silence."""
        tid = message.transaction_id
        if tid in self.pending:
            raise ValueError("STUN transaction id already in use")
        data = bytes(message)
        limit = sum(self.schedule) if timeout is None else timeout
        server = (server[0], server[1])

        def cancel(_: Deferred[StunResponse]) -> None:
            self._finish(tid)

        transaction = _Transaction(message, server, Deferred(cancel), self.reactor.seconds())
        self.pending[tid] = transaction
        deadline = transaction.started + limit
        self.counters["stun-requests"] += 1

        def transmit(index: int) -> None:
            if self.pending.get(tid) is not transaction:
                return
            transaction.transmissions += 1
            if transaction.transmissions > 1:
                self.counters["stun-retransmissions"] += 1
            try:
                self.send(data, server)
            except OSError:
                self.counters["stun-send-errors"] += 1
            now = self.reactor.seconds()
            if index + 1 < len(self.schedule) and now + self.schedule[index] < deadline:
                transaction.timer = self.reactor.callLater(
                    self.schedule[index], transmit, index + 1
                )
            else:
                transaction.timer = self.reactor.callLater(max(0.0, deadline - now), expire)

        def expire() -> None:
            if self._finish(tid) is not None:
                self.counters["stun-timeouts"] += 1
                transaction.result.errback(
                    StunTimeout(f"No STUN answer from {server[0]}:{server[1]} within {limit:g} s.")
                )

        transmit(0)
        return transaction.result

    def binding_response(
        self,
        server: Address,
        *,
        timeout: float | None = None,
        change: ChangeRequest | None = None,
    ) -> Deferred[StunResponse]:
        """A Binding transaction (with CHANGE-REQUEST when given, for RFC 5780 tests)."""
        attributes: tuple[Attribute, ...] = (CHANGE_REQUEST(change),) if change else ()
        message = StunMessage.request(*attributes).with_fingerprint()
        padding = PADDED_BINDING - len(bytes(message)) - 4
        if padding >= 0:
            attributes += (PADDING(bytes(padding)),)
            message = replace(message, attributes=attributes).with_fingerprint()
        return self.request(server, message, timeout=timeout)

    def binding(self, server: Address, *, timeout: float | None = None) -> Deferred[Address]:
        """Our reflexive transport address as ``server`` sees it."""
        return self.binding_response(server, timeout=timeout).addCallback(mapped_address)

    def close(self) -> None:
        """Abandon every transaction (the socket is closing): each fails with StunTimeout."""
        for tid in list(self.pending):
            transaction = self._finish(tid)
            if transaction is not None:
                transaction.result.errback(StunTimeout("The STUN client was closed."))

    def _finish(self, tid: bytes) -> _Transaction | None:
        transaction = self.pending.pop(tid, None)
        timer = transaction.timer if transaction is not None else None
        if timer is not None and timer.active():
            timer.cancel()
        return transaction

    # -- receiving -------------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: Address) -> bool:
        """Take ``data`` if it answers one of our transactions; False leaves it to the owner."""
        if not is_stun(data) or data[8:HEADER_SIZE] not in self.pending:
            return False
        tid = data[8:HEADER_SIZE]
        try:
            message = StunMessage.parse(data)
        except StunError:
            self.counters["stun-malformed-responses"] += 1
            return True  # ours, but unusable: keep waiting (it may be forged)
        transaction = self.pending[tid]
        if message.message_class not in (StunClass.SUCCESS, StunClass.ERROR):
            return False  # a request or indication that happens to reuse the id: not ours
        if message.method != transaction.request.method:
            self.counters["stun-malformed-responses"] += 1
            return True
        self._finish(tid)
        source = (addr[0], addr[1])
        if message.message_class is StunClass.ERROR:
            self.counters["stun-error-responses"] += 1
            error = message.get(ERROR_CODE)
            what = f"{error.code} {error.reason}".strip() if error else "an error without a code"
            server = transaction.server
            transaction.result.errback(
                StunRefused(f"The STUN server at {server[0]}:{server[1]} answered {what}.")
            )
            return True
        self.counters["stun-responses"] += 1
        rtt = self.reactor.seconds() - transaction.started
        transaction.result.callback(
            StunResponse(message, transaction.server, source, rtt, transaction.transmissions)
        )
        return True


def mapped_address(response: StunResponse) -> Address:
    """The reflexive address a success response reports (XOR-MAPPED-ADDRESS, else MAPPED-)."""
    found = response.message.get(XOR_MAPPED_ADDRESS) or response.message.get(MAPPED_ADDRESS)
    if found is None:
        host, port = response.server
        raise StunError(f"The STUN server at {host}:{port} answered without a mapped address.")
    return found
