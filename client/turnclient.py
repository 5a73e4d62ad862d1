"""A TURN client (RFC 8656, client side): a relayed address for a call when no direct path works.

Works with any standard TURN server (coturn is the interoperability peer) and with ours
(``relay``).  Over UDP it shares the call's socket, like ``overlay.stun_client``: it sends with
the ``send`` callable it was given, and the socket's owner offers it every datagram with
``datagram_received(data, addr)``, which takes only what comes from the server address and is
its own: responses to its transactions, Data indications and ChannelData.  Over TCP
(``connect_tcp``, in ``client.turntcp``) it owns a connection, framed by ``StreamFramer``.

Message table (client -> server; every request but the first carries USERNAME, REALM, NONCE and
MESSAGE-INTEGRITY under the long-term key MD5(user:realm:password)):

    request                   when                                   success gives
    Allocate (unauthenticated, allocate(); padded to PADDED_ALLOCATE,  401 + REALM, NONCE
      REQUESTED-TRANSPORT UDP) so a server that never answers with
                              more bytes than it got still answers
    Allocate (authenticated)  after the 401 challenge                XOR-RELAYED-ADDRESS,
                                                                     XOR-MAPPED-ADDRESS, LIFETIME
    Refresh (LIFETIME)        at lifetime/2; LIFETIME 0 in close()   LIFETIME
    CreatePermission          permit(*peers), all permitted IPs      -
      (XOR-PEER-ADDRESS...)   again every PERMISSION_REFRESH s
    ChannelBind               bind(peer), every bound channel again  - (ChannelData may flow)
      (CHANNEL-NUMBER, PEER)  every CHANNEL_REFRESH s
    Send indication           send() to a peer without a channel     (none: an indication)
    ChannelData               send() to a peer with a channel        (none)
  server -> client: Data indication (XOR-PEER-ADDRESS, DATA) or ChannelData -> ``on_data``.

Errors: 438 Stale Nonce (and a 401 naming a new realm or nonce) is retried with the new nonce, at
most AUTH_RETRIES times; a 420 that names PADDING is retried without it; any other error response
raises ``TurnRefused`` naming the relay, the request and the error.  A success response must
carry a valid MESSAGE-INTEGRITY when the request did (RFC 8489 s.9.2.5); one that does not is
dropped as forged.  Over UDP a request is retransmitted after 0.1, 0.2, 0.4, 0.8 s and given up
1.6 s after the last (``TurnTimeout``); over TCP it is sent once and given up after TCP_TIMEOUT.

Life cycle (``state``): new -> allocating -> allocated -> closed, or -> failed when the allocation
is lost (a refresh refused or unanswered, the TCP connection closed): then ``on_failed`` is called
once with a one-line reason, timers stop and ``send`` drops.  ``close()`` deletes the allocation
(best effort, within CLOSE_TIMEOUT) and never calls ``on_failed``.  Every timer runs on the
injected reactor, so tests drive it with ``twisted.internet.task.Clock``.
"""

from __future__ import annotations

import ipaddress
import itertools
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from overlay.errors import ProtocolError, VoipError
from overlay.stun import (
    ERROR_CODE,
    NONCE,
    PADDING,
    REALM,
    SOFTWARE,
    UNKNOWN_ATTRIBUTES,
    USERNAME,
    XOR_MAPPED_ADDRESS,
    Address,
    Attribute,
    Method,
    StunClass,
    StunMessage,
    is_stun,
    long_term_key,
    new_transaction_id,
)
from overlay.turn import (
    CHANNEL_MAX,
    CHANNEL_MIN,
    CHANNEL_NUMBER,
    DATA,
    DEFAULT_LIFETIME,
    LIFETIME,
    REQUESTED_TRANSPORT,
    TRANSPORT_UDP,
    XOR_PEER_ADDRESS,
    XOR_RELAYED_ADDRESS,
    ChannelData,
    TurnCredential,
    is_channel_data,
)

#: UDP: waits after each transmission (retransmit after each but the last, then give up).
SCHEDULE = (0.1, 0.2, 0.4, 0.8, 1.6)
#: TCP: a request is sent once and given up after this long.
TCP_TIMEOUT = 5.0
#: close(): the Refresh with LIFETIME 0 is given up after this long.
CLOSE_TIMEOUT = 1.0
#: The first (unauthenticated) Allocate is padded to this size: more than a 401 challenge
#: (ERROR-CODE, REALM, NONCE and maybe SOFTWARE and FINGERPRINT: ~100 bytes from coturn).
PADDED_ALLOCATE = 128
#: Permissions last 300 s and channels 600 s at the server; both are refreshed well before.
PERMISSION_REFRESH = 240.0
CHANNEL_REFRESH = 300.0
#: A refresh of permissions or channels that failed is tried again this much later.
RETRY_AFTER = 20.0
#: How many times one request is re-sent with a new nonce (438, or 401 with a new nonce).
AUTH_RETRIES = 2

Send = Callable[[bytes, Address], None]


class TurnRefused(VoipError):
    """The relay refused the request."""

    code = "turn-refused"

    def __init__(self, message: str | None = None, status: int = 0, reason: str = "") -> None:
        super().__init__(message)
        #: The TURN error code (401, 437, 486...); ``code`` is this family's stable name.
        self.status = status
        self.reason = reason


class TurnTimeout(VoipError):
    """The relay did not answer."""

    code = "turn-timeout"


class State(Enum):
    NEW = "new"
    ALLOCATING = "allocating"
    ALLOCATED = "allocated"
    CLOSED = "closed"
    FAILED = "failed"


@dataclass
class _Transaction:
    request: StunMessage
    key: bytes | None
    result: Deferred[tuple[StunMessage, float]]
    started: float
    transmissions: int = 0
    timer: IDelayedCall | None = None


@dataclass
class _Periodic:
    """A refresh that re-arms itself while the allocation lives."""

    interval: float
    timer: IDelayedCall | None = field(default=None)


def show(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def canonical(address: Address) -> Address:
    """(host, port) with the host as ``ipaddress`` prints it (as STUN address attributes parse)."""
    return (str(ipaddress.ip_address(address[0])), int(address[1]))


class TurnClient:
    """One allocation on one TURN server, over UDP (a shared socket) or TCP (``connect_tcp``).

    ``server`` is an IP address and port (resolve names first).  After ``allocate()``:
    ``relayed`` (the relayed address peers send to), ``mapped`` (our address as the server saw
    it), ``rtt`` (seconds from the first send of the authenticated Allocate to its answer) and
    ``lifetime`` (what the server granted).  Call ``close()`` in every case, also after a
    failure: it closes the TCP connection.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        server: Address,
        credential: TurnCredential | tuple[str, str],
        *,
        send: Send | None = None,
        transport: str = "udp",
        lifetime: int = DEFAULT_LIFETIME,
        software: str | None = "voip",
        pad_first_allocate: bool = True,
        schedule: Sequence[float] = SCHEDULE,
        tcp_timeout: float = TCP_TIMEOUT,
    ) -> None:
        if transport not in ("udp", "tcp"):
            raise ValueError(f"TURN transport {transport!r} is neither udp nor tcp")
        if transport == "udp" and send is None:
            raise ValueError("a TURN client over UDP needs the socket's send")
        if not schedule or min(schedule) <= 0:
            raise ValueError("a TURN retransmission schedule needs positive waits")
        self.reactor = reactor
        self.server = canonical(server)
        if isinstance(credential, TurnCredential):
            self.username, self.password = credential.username, credential.password
        else:
            self.username, self.password = credential
        self.transport = transport
        self.requested_lifetime = lifetime
        self.software = software
        self.pad_first_allocate = pad_first_allocate
        self.schedule = tuple(schedule)
        self.tcp_timeout = tcp_timeout
        self._send = send
        #: TCP: writes to the connection and closes it (set by ``client.turntcp``).
        self._write_stream: Callable[[bytes], None] | None = None
        self._close_stream: Callable[[], None] | None = None

        self.on_data: Callable[[bytes, Address], None] | None = None
        self.on_failed: Callable[[str], None] | None = None

        self.state = State.NEW
        self.relayed: Address | None = None
        self.mapped: Address | None = None
        self.rtt: float | None = None
        self.lifetime: int | None = None
        self.failure: str | None = None
        self.realm: str | None = None
        self.nonce: str | None = None
        self._key: bytes | None = None
        self._pending: dict[bytes, _Transaction] = {}
        self.permissions: set[str] = set()
        #: Channels the server confirmed (ChannelData may flow) and those being bound.
        self.channels: dict[Address, int] = {}
        self._peers: dict[int, Address] = {}
        self._reserved: dict[Address, int] = {}
        self._numbers = itertools.count(CHANNEL_MIN)
        self._refresh_timer: IDelayedCall | None = None
        self._permission_refresh = _Periodic(PERMISSION_REFRESH)
        self._channel_refresh = _Periodic(CHANNEL_REFRESH)
        self._closing: Deferred[None] | None = None
        self.counters: Counter[str] = Counter()

    @classmethod
    async def connect_tcp(
        cls,
        reactor: Any,
        server: Address,
        credential: TurnCredential | tuple[str, str],
        **kw: Any,
    ) -> TurnClient:
        """A client over a TCP connection to ``server`` (connected, not yet allocated)."""
        from client.turntcp import connect

        return await connect(cls(reactor, server, credential, transport="tcp", **kw), reactor)

    # -- the allocation --------------------------------------------------------------------

    async def allocate(self) -> Address:
        """Allocate a relayed address (handling the 401 challenge); returns it."""
        if self.state is not State.NEW:
            raise ValueError(f"this TURN client is {self.state.value}, not new")
        self.state = State.ALLOCATING
        attributes = (REQUESTED_TRANSPORT(TRANSPORT_UDP), LIFETIME(self.requested_lifetime))
        try:
            response, rtt = await self._transact(
                Method.ALLOCATE, attributes, "the allocation", pad=self.pad_first_allocate
            )
        except BaseException:
            if self.state is State.ALLOCATING:
                self.state = State.FAILED
                self._stop()
            raise
        relayed = response.get(XOR_RELAYED_ADDRESS)
        if relayed is None:
            self.state = State.FAILED
            self._stop()
            raise TurnRefused(
                f"The relay {show(self.server)} allocated without a XOR-RELAYED-ADDRESS."
            )
        if self.state is not State.ALLOCATING:  # closed or failed while we waited
            raise TurnTimeout(f"The allocation on the relay {show(self.server)} was abandoned.")
        self.relayed, self.mapped, self.rtt = relayed, response.get(XOR_MAPPED_ADDRESS), rtt
        self.lifetime = response.get(LIFETIME) or self.requested_lifetime
        self.state = State.ALLOCATED
        self.counters["allocations"] += 1
        self._schedule_refresh()
        return relayed

    def _schedule_refresh(self) -> None:
        assert self.lifetime is not None
        self._refresh_timer = self.reactor.callLater(max(1.0, self.lifetime / 2), self._refresh)

    def _refresh(self) -> None:
        self._refresh_timer = None
        attributes = (LIFETIME(self.requested_lifetime),)
        running = Deferred.fromCoroutine(self._transact(Method.REFRESH, attributes, "the refresh"))

        def refreshed(result: tuple[StunMessage, float]) -> None:
            if self.state is not State.ALLOCATED:
                return
            self.counters["refreshes"] += 1
            self.lifetime = result[0].get(LIFETIME) or self.requested_lifetime
            self._schedule_refresh()

        def failed(failure: Failure) -> None:
            if self.state is State.ALLOCATED:
                self.counters["refresh-failures"] += 1
                self._fail(failure.getErrorMessage())

        running.addCallbacks(refreshed, failed)

    async def permit(self, *peers: Address) -> None:
        """CreatePermission for the peers' IP addresses; refreshed while the allocation lives."""
        hosts = list(dict.fromkeys(canonical(peer)[0] for peer in peers))
        if not hosts:
            return
        self._require_allocated()
        await self._create_permission(hosts)
        self.permissions.update(hosts)
        self._arm(self._permission_refresh, self._refresh_permissions)

    async def _create_permission(self, hosts: list[str]) -> None:
        attributes = tuple(XOR_PEER_ADDRESS((host, 0)) for host in hosts)
        what = f"the permission for {', '.join(hosts)}"
        await self._transact(Method.CREATE_PERMISSION, attributes, what)
        self.counters["permissions"] += 1

    def _refresh_permissions(self) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._create_permission(sorted(self.permissions)))

    async def bind(self, peer: Address) -> int:
        """ChannelBind a channel to ``peer`` (refreshed while the allocation lives); its number."""
        peer = canonical(peer)
        self._require_allocated()
        number = self._reserved.get(peer)
        if number is None:
            number = next(self._numbers)
            if number > CHANNEL_MAX:
                raise TurnRefused(f"No TURN channel left on the relay {show(self.server)}.")
            self._reserved[peer] = number
        await self._channel_bind(peer, number)
        self.channels[peer] = number
        self._peers[number] = peer
        self.permissions.add(peer[0])  # the bind installed it; keep it refreshed
        self._arm(self._permission_refresh, self._refresh_permissions)
        self._arm(self._channel_refresh, self._refresh_channels)
        return number

    async def _channel_bind(self, peer: Address, number: int) -> None:
        attributes = (CHANNEL_NUMBER(number), XOR_PEER_ADDRESS(peer))
        what = f"channel {number:#06x} for {show(peer)}"
        await self._transact(Method.CHANNEL_BIND, attributes, what)
        self.counters["channel-binds"] += 1

    def _refresh_channels(self) -> Deferred[Any]:
        running = [
            Deferred.fromCoroutine(self._channel_bind(peer, number))
            for peer, number in sorted(self.channels.items())
        ]
        return gatherResults(running, consumeErrors=True)

    def _arm(self, periodic: _Periodic, work: Callable[[], Deferred[Any]]) -> None:
        """Run ``work`` every ``periodic.interval`` s (RETRY_AFTER after a failure)."""
        if periodic.timer is not None or self.state is not State.ALLOCATED:
            return

        def tick() -> None:
            periodic.timer = None
            if self.state is not State.ALLOCATED:
                return

            def done(result: object) -> None:
                if self.state is State.ALLOCATED and periodic.timer is None:
                    failed = isinstance(result, Failure)
                    if failed:
                        self.counters["maintenance-failures"] += 1
                    wait = RETRY_AFTER if failed else periodic.interval
                    periodic.timer = self.reactor.callLater(wait, tick)

            work().addBoth(done)

        periodic.timer = self.reactor.callLater(periodic.interval, tick)

    def _require_allocated(self) -> None:
        if self.state is not State.ALLOCATED:
            raise ValueError(f"this TURN client is {self.state.value}, not allocated")

    # -- data ------------------------------------------------------------------------------

    def send(self, data: bytes, peer: Address) -> None:
        """Relay ``data`` to ``peer``: ChannelData on its channel, else a Send indication."""
        if self.state is not State.ALLOCATED:
            self.counters["send-dropped"] += 1
            return
        channel = self.channels.get(peer)
        if channel is None:
            peer = canonical(peer)
            channel = self.channels.get(peer)
        if channel is not None:
            frame = ChannelData(channel, data).to_bytes(padded=self.transport == "tcp")
            self.counters["channel-data-sent"] += 1
        else:
            indication = StunMessage(
                Method.SEND,
                StunClass.INDICATION,
                new_transaction_id(),
                (XOR_PEER_ADDRESS(peer), DATA(data)),
            )
            frame = bytes(indication)
            self.counters["send-indications"] += 1
        self.counters["packets-sent"] += 1
        self.counters["bytes-sent"] += len(data)
        self._write(frame)

    def datagram_received(self, data: bytes, addr: Address) -> bool:
        """Take a datagram from the server that is ours; False leaves it to the socket's owner."""
        if not data or not (data[0] < 0x04 or 0x40 <= data[0] <= 0x4F):
            return False  # neither STUN nor ChannelData (RTP, checks): cheap to tell
        if (addr[0], addr[1]) != self.server:
            return False
        return self.frame_received(data)

    def frame_received(self, data: bytes) -> bool:
        """One message from the server (a datagram, or a frame of the TCP stream)."""
        try:
            if is_channel_data(data):
                self._channel_data(ChannelData.parse(data))
                return True
            if not is_stun(data):
                return False
            return self._stun(StunMessage.parse(data))
        except ProtocolError:
            self.counters["malformed"] += 1
            return True

    def _channel_data(self, message: ChannelData) -> None:
        peer = self._peers.get(message.channel)
        if peer is None:
            self.counters["unknown-channel"] += 1
            return
        self._deliver(message.data, peer)

    def _stun(self, message: StunMessage) -> bool:
        klass = message.message_class
        if klass is StunClass.INDICATION:
            if message.method != Method.DATA:
                self.counters["unexpected-indications"] += 1
                return True
            peer, payload = message.get(XOR_PEER_ADDRESS), message.get(DATA)
            if peer is None or payload is None:
                self.counters["malformed"] += 1
                return True
            self._deliver(payload, peer)
            return True
        transaction = self._pending.get(message.transaction_id)
        if klass is StunClass.REQUEST or transaction is None:
            return False
        if message.method != transaction.request.method:
            self.counters["malformed"] += 1
            return True
        if (
            klass is StunClass.SUCCESS
            and transaction.key is not None
            and not message.check_integrity(transaction.key)
        ):
            self.counters["bad-integrity"] += 1  # forged, or a broken server: keep waiting
            return True
        self._finish(message.transaction_id)
        rtt = self.reactor.seconds() - transaction.started
        transaction.result.callback((message, rtt))
        return True

    def _deliver(self, payload: bytes, peer: Address) -> None:
        if self.state is not State.ALLOCATED:
            self.counters["received-dropped"] += 1
            return
        self.counters["packets-received"] += 1
        self.counters["bytes-received"] += len(payload)
        if self.on_data is not None:
            self.on_data(payload, peer)

    # -- transactions ----------------------------------------------------------------------

    async def _transact(
        self,
        method: Method,
        attributes: tuple[Attribute, ...],
        what: str,
        *,
        pad: bool = False,
        timeout: float | None = None,
    ) -> tuple[StunMessage, float]:
        """One request, retried on a new nonce; the success response and its round trip."""
        retries = 0
        while True:
            message, key = self._build(method, attributes, pad=pad)
            response, rtt = await self._exchange(message, key, timeout)
            if response.message_class is StunClass.SUCCESS:
                return response, rtt
            error = response.get(ERROR_CODE)
            status = error.code if error is not None else 0
            if pad and status == 420 and PADDING.code in (response.get(UNKNOWN_ATTRIBUTES) or ()):
                pad = False
                continue
            nonce, realm = response.get(NONCE), response.get(REALM)
            fresh = nonce is not None and (key is None or nonce != self.nonce or status == 438)
            if status in (401, 438) and fresh and retries < AUTH_RETRIES:
                retries += 1
                pad = False
                if status == 438:
                    self.counters["stale-nonces"] += 1
                self.nonce = nonce
                if realm is not None and realm != self.realm:
                    self.realm = realm
                    self._key = long_term_key(self.username, realm, self.password)
                if self._key is None:  # a 438 before any 401: the realm is still unknown
                    raise self._refused(what, status, error.reason if error else "")
                continue
            raise self._refused(what, status, error.reason if error is not None else "")

    def _refused(self, what: str, status: int, reason: str) -> TurnRefused:
        self.counters[f"error-{status}"] += 1
        reason = " ".join(reason.split()).rstrip(".")  # coturn's reasons may end in " ."
        text = f"{status} {reason}".strip() if status else "an error without a code"
        hint = " (wrong or expired credentials)" if status in (401, 441) and self._key else ""
        message = f"The relay {show(self.server)} refused {what}: {text}{hint}."
        return TurnRefused(message, status, reason)

    def _build(
        self, method: Method, attributes: tuple[Attribute, ...], *, pad: bool
    ) -> tuple[StunMessage, bytes | None]:
        extra: tuple[Attribute, ...] = (SOFTWARE(self.software),) if self.software else ()
        message = StunMessage.request(*attributes, *extra, method=method)
        key = self._key
        if key is not None and self.realm is not None and self.nonce is not None:
            credentials = (USERNAME(self.username), REALM(self.realm), NONCE(self.nonce))
            message = StunMessage.request(
                *message.attributes, *credentials, method=method
            ).with_integrity(key)
            return message, key
        if pad:
            missing = PADDED_ALLOCATE - len(bytes(message)) - 4
            if missing > 0:
                message = StunMessage.request(
                    *message.attributes, PADDING(bytes(missing)), method=method
                )
        return message, None

    def _exchange(
        self, message: StunMessage, key: bytes | None, timeout: float | None
    ) -> Deferred[tuple[StunMessage, float]]:
        if self.state in (State.CLOSED, State.FAILED) and message.method != Method.REFRESH:
            raise TurnTimeout(
                f"The allocation on the relay {show(self.server)} is {self.state.value}."
            )
        tid = message.transaction_id
        data = bytes(message)

        def cancel(_: Deferred[tuple[StunMessage, float]]) -> None:
            self._finish(tid)

        transaction = _Transaction(message, key, Deferred(cancel), self.reactor.seconds())
        self._pending[tid] = transaction
        self.counters["requests"] += 1
        stream = self.transport == "tcp"
        limit = (self.tcp_timeout if stream else sum(self.schedule)) if timeout is None else timeout
        deadline = transaction.started + limit

        def transmit(index: int) -> None:
            if self._pending.get(tid) is not transaction:
                return
            transaction.transmissions += 1
            if transaction.transmissions > 1:
                self.counters["retransmissions"] += 1
            self._write(data)
            now = self.reactor.seconds()
            wait = self.schedule[index] if index < len(self.schedule) else 0.0
            if not stream and index + 1 < len(self.schedule) and now + wait < deadline:
                transaction.timer = self.reactor.callLater(wait, transmit, index + 1)
            else:
                transaction.timer = self.reactor.callLater(max(0.0, deadline - now), expire)

        def expire() -> None:
            if self._finish(tid) is not None:
                self.counters["timeouts"] += 1
                transaction.result.errback(
                    TurnTimeout(
                        f"The relay {show(self.server)} did not answer ({self.transport.upper()})."
                    )
                )

        transmit(0)
        return transaction.result

    def _finish(self, tid: bytes) -> _Transaction | None:
        transaction = self._pending.pop(tid, None)
        timer = transaction.timer if transaction is not None else None
        if timer is not None and timer.active():
            timer.cancel()
        return transaction

    def _write(self, data: bytes) -> None:
        try:
            if self._write_stream is not None:
                self._write_stream(data)
            elif self._send is not None:
                self._send(data, self.server)
        except OSError:
            self.counters["send-errors"] += 1

    # -- the end ---------------------------------------------------------------------------

    def _stop(self, reason: str | None = None) -> None:
        """Cancel every timer; fail every transaction still waiting."""
        for timer in (
            self._refresh_timer,
            self._permission_refresh.timer,
            self._channel_refresh.timer,
        ):
            if timer is not None and timer.active():
                timer.cancel()
        self._refresh_timer = self._permission_refresh.timer = self._channel_refresh.timer = None
        text = reason or f"The TURN client of the relay {show(self.server)} was closed."
        for tid in list(self._pending):
            transaction = self._finish(tid)
            if transaction is not None:
                transaction.result.errback(TurnTimeout(text))

    def _fail(self, reason: str) -> None:
        """The allocation is lost: stop, tell ``on_failed`` once."""
        if self.state in (State.CLOSED, State.FAILED):
            return
        allocated = self.state is State.ALLOCATED
        self.state = State.FAILED
        self.failure = reason
        self.counters["failures"] += 1
        self._stop(reason)
        if self._close_stream is not None:
            self._close_stream()
        if allocated and self.on_failed is not None:
            self.on_failed(reason)

    def connection_lost(self, reason: str) -> None:
        """The TCP connection closed (called by ``client.turntcp``)."""
        self._write_stream = None
        self._close_stream = None
        self._fail(reason)

    async def close(self) -> None:
        """Delete the allocation (Refresh LIFETIME 0, best effort), stop every timer; idempotent."""
        if self._closing is None:
            self._closing = Deferred.fromCoroutine(self._close())
        waiter: Deferred[None] = Deferred()
        self._closing.addBoth(lambda _: waiter.callback(None))
        await waiter

    async def _close(self) -> None:
        allocated = self.state is State.ALLOCATED
        self.state = State.CLOSED
        self._stop()
        if allocated:
            try:
                await self._transact(
                    Method.REFRESH, (LIFETIME(0),), "the deallocation", timeout=CLOSE_TIMEOUT
                )
                self.counters["deallocations"] += 1
            except (VoipError, ValueError):
                self.counters["deallocation-failures"] += 1
        if self._close_stream is not None:
            close, self._close_stream, self._write_stream = self._close_stream, None, None
            close()

    # -- reporting -------------------------------------------------------------------------

    def describe(self) -> dict[str, object]:
        return {
            "server": show(self.server),
            "transport": self.transport,
            "state": self.state.value,
            "relayed": show(self.relayed) if self.relayed else None,
            "mapped": show(self.mapped) if self.mapped else None,
            "rtt_ms": round(self.rtt * 1000, 1) if self.rtt is not None else None,
            "lifetime": self.lifetime,
            "channels": {show(peer): number for peer, number in sorted(self.channels.items())},
            "permissions": sorted(self.permissions),
            "bytes_sent": self.counters["bytes-sent"],
            "packets_sent": self.counters["packets-sent"],
            "bytes_received": self.counters["bytes-received"],
            "packets_received": self.counters["packets-received"],
            "failure": self.failure,
        }


__all__ = [
    "SCHEDULE",
    "State",
    "TurnClient",
    "TurnRefused",
    "TurnTimeout",
]
