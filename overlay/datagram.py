"""Request and reply over UDP: retransmission, duplicate suppression, no amplification.

One datagram carries one frame (``overlay.framing``).  A request carries a ``rid``; the reply
(a message registered with ``reply=True``) carries the same ``rid`` and must come from the
address the request went to.  The requester retransmits on a schedule until the reply arrives
or ``timeout`` passes on the injected clock; the responder remembers its recent replies and
answers a retransmitted request from that memory, so handlers run once per request.

Our UDP services answer anyone, so they must never be a traffic amplifier: a reply larger than
the request datagram is not sent (it is counted).  A requester that expects a larger reply pads
its request (``pad_to``), QUIC-style: the padding is an ``_pad`` key in the CBOR map, which every
receiver ignores.  A datagram that does not parse is dropped and counted, never answered.
"""

from __future__ import annotations

import random
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import cbor2
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from overlay.errors import ProtocolError, VoipError
from overlay.framing import MAX_DATAGRAM_PAYLOAD, Frame
from overlay.messages import Error, Message, parse_datagram
from overlay.stun import is_stun
from overlay.stun_server import StunResponder

Address = tuple[str, int]
Handler = Callable[[Message, Address], Awaitable[Message | None]]
RETRANSMIT = (0.25, 0.5, 1.0, 2.0)
REPLY_MEMORY = 10.0
MAX_REMEMBERED = 4096


class PeerTimeout(VoipError):
    """The peer did not answer in time."""

    code = "timeout"


def encode(message: Message, pad_to: int = 0) -> bytes:
    """The datagram for ``message``, padded so the whole datagram is at least ``pad_to`` bytes."""
    frame = message.to_frame()
    data = bytes(frame)
    if len(data) >= pad_to:
        return data
    document = message.to_map()
    need = pad_to - len(data) - 8  # "_pad" key and byte-string header
    document["_pad"] = b"\x00" * max(0, need)
    padded = bytes(Frame(message.TYPE, bytes(cbor2.dumps(document, canonical=True))))
    if len(padded) - 7 > MAX_DATAGRAM_PAYLOAD:
        raise ProtocolError(f"{message.NAME} padded to {pad_to} bytes exceeds a datagram.")
    return padded


@dataclass
class _Pending:
    address: Address
    data: bytes
    result: Deferred[Message]
    timers: list[IDelayedCall]


class DatagramEndpoint(DatagramProtocol):
    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        handler: Handler | None = None,
        *,
        retransmit: Sequence[float] = RETRANSMIT,
        rng: random.Random | None = None,
        stun_server: bool = False,
    ) -> None:
        self.clock = clock
        self.handler = handler
        self.retransmit = tuple(retransmit)
        self.rng = rng or random.SystemRandom()
        self.pending: dict[tuple[Address, int], _Pending] = {}
        self.replies: OrderedDict[tuple[Address, int, int], tuple[float, bytes | None]] = (
            OrderedDict()
        )
        self.counters: Counter[str] = Counter()
        #: Answers STUN Binding requests on this port (supernodes); None: STUN is garbage here.
        self.stun = StunResponder(self.counters) if stun_server else None

    # -- requesting ----------------------------------------------------------------------------

    def _rid(self, address: Address) -> int:
        while True:
            rid = self.rng.getrandbits(31) + 1
            if (address, rid) not in self.pending:
                return rid

    def request(
        self,
        address: Address,
        build: Callable[[int], Message],
        *,
        timeout: float = 2.0,
        pad_to: int = 0,
    ) -> Deferred[Message]:
        """Send a request; the Deferred fires with the reply (possibly an ``Error``)."""
        rid = self._rid(address)
        data = encode(build(rid), pad_to)
        key = (address, rid)

        def cancel(_: Deferred[Message]) -> None:
            self._finish(key)

        result: Deferred[Message] = Deferred(cancel)
        pending = _Pending(address, data, result, [])
        self.pending[key] = pending
        self._send(data, address)
        for delay in self.retransmit:
            if delay < timeout:
                pending.timers.append(self.clock.callLater(delay, self._send, data, address))
        pending.timers.append(self.clock.callLater(timeout, self._timed_out, key, timeout))
        self.counters["requests"] += 1
        return result

    def _send(self, data: bytes, address: Address) -> None:
        if self.transport is None:
            return
        try:
            self.transport.write(data, address)
        except OSError as exc:
            self.counters["send-errors"] += 1
            self.log.debug("send to {address} failed: {error}", address=address, error=exc)

    def _finish(self, key: tuple[Address, int]) -> _Pending | None:
        pending = self.pending.pop(key, None)
        if pending is not None:
            for timer in pending.timers:
                if timer.active():
                    timer.cancel()
        return pending

    def _timed_out(self, key: tuple[Address, int], timeout: float) -> None:
        pending = self._finish(key)
        if pending is not None:
            self.counters["timeouts"] += 1
            host, port = pending.address
            pending.result.errback(
                PeerTimeout(f"No answer from {host}:{port} within {timeout:g} s.")
            )

    # -- receiving -----------------------------------------------------------------------------

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        address: Address = (addr[0], addr[1])
        if self.stun is not None and is_stun(datagram):
            answer = self.stun.respond(datagram, address)
            if answer is not None:
                self._send(answer, address)
            return
        try:
            message = parse_datagram(datagram)
        except ProtocolError:
            self.counters["bad-datagrams"] += 1
            return
        rid = getattr(message, "rid", None)
        if not isinstance(rid, int):
            self.counters["bad-datagrams"] += 1
            return
        if message.REPLY:
            pending = self._finish((address, rid))
            if pending is None:
                self.counters["stray-replies"] += 1
                return
            pending.result.callback(message)
            return
        self._serve(message, rid, address, len(datagram))

    def _serve(self, message: Message, rid: int, address: Address, size: int) -> None:
        key = (address, rid, message.TYPE)
        now = self.clock.seconds()
        self._forget(now)
        remembered = self.replies.get(key)
        if remembered is not None:
            self.counters["duplicates"] += 1
            if remembered[1] is not None:
                self._send(remembered[1], address)
            return
        if self.handler is None:
            self.counters["unhandled"] += 1
            return
        self.replies[key] = (now, None)  # in progress: retransmissions are ignored
        if len(self.replies) > MAX_REMEMBERED:
            self.replies.popitem(last=False)

        def answered(reply: Message | None) -> None:
            if reply is None:
                return
            data = encode(reply)
            if len(data) > size:
                self.counters["amplification-refused"] += 1
                self.log.debug(
                    "not answering {request}: reply of {big} bytes to a {small}-byte request",
                    request=message.NAME,
                    big=len(data),
                    small=size,
                )
                return
            if key in self.replies:
                self.replies[key] = (self.replies[key][0], data)
            self._send(data, address)

        def failed(failure: Failure) -> None:
            exc = failure.value
            if isinstance(exc, VoipError):
                answered(Error(rid, message.NAME, exc.code, str(exc)))
            else:
                self.counters["internal-errors"] += 1
                self.log.failure("handling {request} failed", failure, request=message.NAME)
                answered(Error(rid, message.NAME, "server-error", "The peer failed."))

        async def run() -> Message | None:
            assert self.handler is not None
            return await self.handler(message, address)

        self.counters["served"] += 1
        Deferred.fromCoroutine(run()).addCallbacks(answered, failed)

    def _forget(self, now: float) -> None:
        while self.replies:
            key, (when, _) = next(iter(self.replies.items()))
            if now - when < REPLY_MEMORY:
                break
            del self.replies[key]

    def stopProtocol(self) -> None:
        for key in list(self.pending):
            pending = self._finish(key)
            if pending is not None:
                pending.result.errback(PeerTimeout("The local UDP port was closed."))
