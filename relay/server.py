"""The TURN server core (RFC 8656): transport-independent, clock-injected, no sockets of its own.

``TurnServer.handle(client, data)`` takes one datagram (UDP) or one frame (TCP, from
``overlay.turn.StreamFramer``) from a client 5-tuple and returns the bytes to send back, or None.
Data from peers arrives through the relayed sockets the injected ``RelayFactory`` opens, and
goes to clients through the injected ``deliver(client, data)``.  ``relay.service`` wires this to
Twisted's UDP and TCP listeners; the unit tests wire it to memory and a ``task.Clock``.

    from client (5-tuple)           answer                          errors (counter)
    Binding request                 Binding success (StunResponder; UDP: only when it is not
                                    larger than the request)
    Allocate request                XOR-RELAYED-ADDRESS, LIFETIME,  401/438 (see relay.auth),
                                    XOR-MAPPED-ADDRESS              437 has one (mismatch),
                                                                    442 not UDP (bad-transport),
                                                                    440 family, 420 DONT-FRAGMENT,
                                                                    486 (quota-user),
                                                                    508 (capacity)
    Refresh request                 LIFETIME (0 deletes)            437 none, 441 other username
    CreatePermission request        empty success                   403 (peer-forbidden), 400
    ChannelBind request             empty success                   403, 400 number or rebinding
    Send indication                 none: DATA goes to the peer     dropped: no-permission,
                                                                    no-allocation, bandwidth
    ChannelData                     none: data goes to the peer     dropped: no-channel, ...
    other request                   400
    response, other indication      none (stray)
    undecodable / >1564 bytes       none (malformed / oversized)
    to client (from a peer)         ChannelData when a channel is bound to the peer, else a
                                    Data indication; dropped without a permission
                                    (no-permission) or over the bandwidth (bandwidth)

Every request but Binding is authenticated (``relay.auth``); responses to authenticated requests
carry MESSAGE-INTEGRITY, and FINGERPRINT when the request had one.

Amplification: over UDP an unauthenticated request is never answered with more bytes than it
had.  The 401 challenge (ERROR-CODE, REALM, NONCE) is kept small: the reason phrase, then the
FINGERPRINT, are left out when needed, and when even that does not fit the request is dropped
and counted ``challenge-too-big``.  With a realm of at most 4 bytes (``voip``) the smallest
challenge is 52 bytes, which answers coturn's ``turnutils_uclient`` (52 or 60 bytes; 44 with
``-y``, see ``challenge_slack``); our own client pads its first Allocate (PADDING) to be
sure.  Over TCP the rule does not apply (the handshake proves the source address).

Quotas: allocations per user (``user_quota``) and in all (``max_allocations``), bandwidth per
allocation and direction, and an idle timeout: an allocation that has relayed nothing for
``idle_timeout`` seconds (Refresh does not count) is deleted by the sweep, as are expired ones.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from overlay.stun import (
    FINGERPRINT,
    NONCE,
    REALM,
    UNKNOWN_ATTRIBUTES,
    XOR_MAPPED_ADDRESS,
    Address,
    Attribute,
    Method,
    StunClass,
    StunError,
    StunIntegrityError,
    StunMessage,
)
from overlay.stun_server import StunResponder
from overlay.turn import (
    CHANNEL_MAX,
    CHANNEL_MIN,
    CHANNEL_NUMBER,
    DONT_FRAGMENT,
    EVEN_PORT,
    FAMILY_IPV4,
    FAMILY_IPV6,
    LIFETIME,
    MAX_MESSAGE,
    REQUESTED_ADDRESS_FAMILY,
    REQUESTED_TRANSPORT,
    RESERVATION_TOKEN,
    TRANSPORT_UDP,
    XOR_PEER_ADDRESS,
    XOR_RELAYED_ADDRESS,
)
from relay.allocations import Allocation, ClientKey, RelayedSocket, RelayFactory, TokenBucket
from relay.auth import Authenticator, Verdict
from relay.config import IPNetwork, RelayConfig
from relay.datapath import DataPath

__all__ = ["IPNetwork", "RelayConfig", "TurnServer"]
Deliver = Callable[[ClientKey, bytes], None]
TURN_METHODS = (Method.ALLOCATE, Method.REFRESH, Method.CREATE_PERMISSION, Method.CHANNEL_BIND)
#: Tries to get an even relayed port when EVEN-PORT asks for one.
EVEN_PORT_TRIES = 8


@dataclass
class _Request:
    message: StunMessage
    client: ClientKey
    #: Over UDP, the size an unauthenticated answer may not exceed.
    limit: int | None
    key: bytes = b""
    username: str = ""
    user: str = ""
    extra: list[Attribute] = field(default_factory=list)


class TurnServer:
    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        config: RelayConfig,
        relay_factory: RelayFactory,
        deliver: Deliver,
        counters: Counter[str] | None = None,
    ) -> None:
        self.clock = clock
        self.config = config
        self.relay_factory = relay_factory
        self.deliver = deliver
        self.counters: Counter[str] = counters if counters is not None else Counter()
        self.auth = Authenticator(config.secret, config.realm, config.nonce_lifetime)
        self.allocations: dict[ClientKey, Allocation] = {}
        self._stun_udp = StunResponder(self.counters, strict=True)
        self._stun_tcp = StunResponder(self.counters)
        family = ipaddress.ip_address(config.relay_ip).version
        self.relay_family = FAMILY_IPV4 if family == 4 else FAMILY_IPV6
        self._sweeper: IDelayedCall | None = None
        self.data = DataPath(clock, self.allocations, deliver, self.counters)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the periodic sweep (expiry, idle timeout)."""
        if self._sweeper is None:
            self._sweeper = self.clock.callLater(self.config.sweep_interval, self._tick)

    def stop(self) -> list[object]:
        """Stop the sweep and delete every allocation; what the sockets' close() returned."""
        if self._sweeper is not None and self._sweeper.active():
            self._sweeper.cancel()
        self._sweeper = None
        return [self._delete(a, "relay stopped") for a in list(self.allocations.values())]

    def _tick(self) -> None:
        self._sweeper = self.clock.callLater(self.config.sweep_interval, self._tick)
        self.sweep()

    def sweep(self) -> None:
        now = self.clock.seconds()
        idle = self.config.idle_timeout
        for allocation in list(self.allocations.values()):
            if allocation.expires <= now:
                self.counters["allocations-expired"] += 1
                self._delete(allocation, "expired")
            elif idle > 0 and now - allocation.last_relayed >= idle:
                self.counters["allocations-idle"] += 1
                self._delete(allocation, "idle")
            else:
                allocation.expire(now)

    def connection_lost(self, client: ClientKey) -> None:
        """A TCP client went away: its allocation goes with it (RFC 8656 s.3.1)."""
        allocation = self.allocations.get(client)
        if allocation is not None:
            self._delete(allocation, "connection closed")

    # -- status ------------------------------------------------------------------------------

    def spare(self) -> int:
        return max(0, self.config.max_allocations - len(self.allocations))

    def describe(self) -> dict[str, object]:
        now = self.clock.seconds()
        return {
            "allocations": len(self.allocations),
            "capacity": self.config.max_allocations,
            "spare": self.spare(),
            "users": len({a.user for a in self.allocations.values()}),
            "counters": dict(self.counters),
            "allocation_list": [a.describe(now) for a in self.allocations.values()],
        }

    # -- from clients ------------------------------------------------------------------------

    def handle(self, client: ClientKey, data: bytes) -> bytes | None:
        """The answer to one datagram or frame from ``client``, or None; never raises."""
        self.counters["received"] += 1
        if len(data) > MAX_MESSAGE:
            self.counters["oversized"] += 1
            return None
        if data and 0x40 <= data[0] <= 0x4F:
            self.data.channel_data(client, data)
            return None
        if not data or data[0] >= 0x40:
            self.counters["malformed"] += 1
            return None
        limit = len(data) if client[0] == "udp" else None
        try:
            message = StunMessage.parse(data)
        except StunIntegrityError:
            self.counters["malformed"] += 1
            return None
        except StunError:
            self.counters["malformed"] += 1
            return self._bad_header(client, data, limit)
        if message.method == Method.BINDING:
            if message.message_class is StunClass.REQUEST:
                responder = self._stun_udp if client[0] == "udp" else self._stun_tcp
                return responder.respond(data, client[1])
            self.counters["stray"] += 1
            return None
        if message.message_class is StunClass.INDICATION and message.method == Method.SEND:
            self.data.send_indication(client, message)
            return None
        if message.message_class is not StunClass.REQUEST:
            self.counters["stray"] += 1
            return None
        if message.method not in TURN_METHODS:
            self.counters["bad-method"] += 1
            return self._unsigned_error(_Request(message, client, limit), 400)
        return self._request(_Request(message, client, limit))

    def _bad_header(self, client: ClientKey, data: bytes, limit: int | None) -> bytes | None:
        """400 to a request whose header is sound but whose attributes are not."""
        if len(data) < 20 or int.from_bytes(data[4:8], "big") != 0x2112A442:
            return None
        type_ = int.from_bytes(data[:2], "big")
        if type_ & 0x0110:  # not a request
            return None
        method = (type_ & 0x000F) | ((type_ & 0x00E0) >> 1) | ((type_ & 0x3E00) >> 2)
        request = StunMessage(method, StunClass.REQUEST, data[8:20])
        return self._unsigned_error(_Request(request, client, limit), 400)

    def _request(self, request: _Request) -> bytes | None:
        message, (_, (host, _)) = request.message, request.client
        outcome = self.auth.check(message, self.clock.seconds(), host)
        if outcome.verdict is not Verdict.OK:
            self.counters[outcome.verdict.value] += 1
            if outcome.verdict is Verdict.MALFORMED:
                return self._unsigned_error(request, 400)
            code = 438 if outcome.verdict is Verdict.STALE else 401
            return self._challenge(request, code)
        request.key, request.username, request.user = outcome.key, outcome.username, outcome.user
        unknown = message.unknown_required()
        if unknown:
            self.counters["unknown-attribute"] += 1
            return self._error(request, 420, UNKNOWN_ATTRIBUTES(unknown))
        if message.method == Method.ALLOCATE:
            return self._allocate(request)
        allocation = self.allocations.get(request.client)
        if allocation is None:
            self.counters["mismatch"] += 1
            return self._error(request, 437)
        if allocation.username != request.username:
            self.counters["wrong-credentials"] += 1
            return self._error(request, 441)
        if message.method == Method.REFRESH:
            return self._refresh(request, allocation)
        if message.method == Method.CREATE_PERMISSION:
            return self._create_permission(request, allocation)
        return self._channel_bind(request, allocation)

    # -- answers -----------------------------------------------------------------------------

    def _signed(self, request: _Request, reply: StunMessage) -> bytes:
        reply = reply.with_integrity(request.key)
        if request.message.has(FINGERPRINT):
            reply = reply.with_fingerprint()
        return bytes(reply)

    def _success(self, request: _Request, *attributes: Attribute) -> bytes:
        return self._signed(request, request.message.success(*attributes))

    def _error(self, request: _Request, code: int, *attributes: Attribute) -> bytes:
        return self._signed(request, request.message.error(code, *attributes))

    def _unsigned_error(self, request: _Request, code: int, *attributes: Attribute) -> bytes | None:
        """An error to an unauthenticated request, made to fit ``request.limit`` or dropped."""
        fingerprint = request.message.has(FINGERPRINT)
        for reason, with_fp in ((None, fingerprint), ("", fingerprint), ("", False)):
            reply = request.message.error(code, *attributes, reason=reason)
            data = bytes(reply.with_fingerprint() if with_fp else reply)
            if request.limit is None or len(data) <= request.limit:
                return data
        self.counters["challenge-too-big" if code in (401, 438) else "amplification"] += 1
        return None

    def _challenge(self, request: _Request, code: int) -> bytes | None:
        nonce = self.auth.nonce(self.clock.seconds(), request.client[1][0])
        if request.limit is not None:
            request.limit += self.config.challenge_slack
        return self._unsigned_error(request, code, REALM(self.config.realm), NONCE(nonce))

    # -- methods -----------------------------------------------------------------------------

    def _lifetime(self, message: StunMessage) -> int:
        asked = message.get(LIFETIME)
        if asked is None:
            return self.config.default_lifetime
        return min(max(asked, self.config.default_lifetime), self.config.max_lifetime)

    def _allocate(self, request: _Request) -> bytes | None:
        message, config, now = request.message, self.config, self.clock.seconds()
        existing = self.allocations.get(request.client)
        if existing is not None:
            if existing.allocate_tid == message.transaction_id:
                return existing.allocate_reply  # a retransmission: the same answer
            self.counters["mismatch"] += 1
            return self._error(request, 437)
        transport = message.get(REQUESTED_TRANSPORT)
        if transport is None:
            self.counters["malformed"] += 1
            return self._error(request, 400)
        if transport != TRANSPORT_UDP:
            self.counters["bad-transport"] += 1
            return self._error(request, 442)
        if message.has(DONT_FRAGMENT):
            self.counters["unknown-attribute"] += 1
            return self._error(request, 420, UNKNOWN_ATTRIBUTES((DONT_FRAGMENT.code,)))
        family = message.get(REQUESTED_ADDRESS_FAMILY)
        if family is not None and family != self.relay_family:
            self.counters["bad-family"] += 1
            return self._error(request, 440)
        if message.has(RESERVATION_TOKEN):
            self.counters["reservation"] += 1
            return self._error(request, 508)
        if sum(a.user == request.user for a in self.allocations.values()) >= config.user_quota:
            self.counters["quota-user"] += 1
            return self._error(request, 486)
        if len(self.allocations) >= config.max_allocations:
            self.counters["capacity"] += 1
            return self._error(request, 508)
        holder: list[Allocation] = []
        socket = self._open_socket(holder, even=message.get(EVEN_PORT) is True)
        if socket is None:
            self.counters["capacity"] += 1
            return self._error(request, 508)
        lifetime = self._lifetime(message)
        allocation = Allocation(
            key=request.client,
            username=request.username,
            user=request.user,
            integrity_key=request.key,
            socket=socket,
            created=now,
            expires=now + lifetime,
            to_peer=TokenBucket(config.bandwidth, now),
            to_client=TokenBucket(config.bandwidth, now),
            allocate_tid=message.transaction_id,
            last_relayed=now,
        )
        holder.append(allocation)
        reply = self._success(
            request,
            XOR_RELAYED_ADDRESS(socket.address),
            LIFETIME(lifetime),
            XOR_MAPPED_ADDRESS(request.client[1]),
        )
        allocation.allocate_reply = reply
        self.allocations[request.client] = allocation
        self.counters["allocations-created"] += 1
        transport_name, (host, port) = request.client
        self.log.info(
            "relay: allocated {relayed} for {user} ({transport} {host}:{port}, {lifetime} s)",
            relayed="{}:{}".format(*socket.address),
            user=request.user,
            transport=transport_name,
            host=host,
            port=port,
            lifetime=lifetime,
        )
        return reply

    def _open_socket(self, holder: list[Allocation], even: bool) -> RelayedSocket | None:
        def from_peer(data: bytes, peer: Address) -> None:
            if holder:
                self.data.from_peer(holder[0], data, peer)

        for _ in range(EVEN_PORT_TRIES if even else 1):
            try:
                socket = self.relay_factory(from_peer)
            except OSError as exc:
                self.log.warn("relay: cannot open a relayed socket: {error}", error=exc)
                return None
            if not even or socket.address[1] % 2 == 0:
                return socket
            socket.close()
        return None

    def _refresh(self, request: _Request, allocation: Allocation) -> bytes:
        asked = request.message.get(LIFETIME)
        if asked == 0:
            reply = self._success(request, LIFETIME(0))
            self._delete(allocation, "refreshed to 0")
            return reply
        lifetime = self._lifetime(request.message)
        allocation.expires = self.clock.seconds() + lifetime
        self.counters["refreshes"] += 1
        return self._success(request, LIFETIME(lifetime))

    def _peers(self, request: _Request) -> list[Address] | bytes:
        """The XOR-PEER-ADDRESSes of a request, or the error to answer."""
        peers = [a.value for a in request.message.attributes if a.type == XOR_PEER_ADDRESS.code]
        if not peers:
            self.counters["malformed"] += 1
            return self._error(request, 400)
        for peer in peers:
            if _family(peer[0]) != self.relay_family:
                self.counters["bad-family"] += 1
                return self._error(request, 443)
            if not self.peer_allowed(peer[0]):
                self.counters["peer-forbidden"] += 1
                return self._error(request, 403)
        return peers

    def _create_permission(self, request: _Request, allocation: Allocation) -> bytes:
        peers = self._peers(request)
        if isinstance(peers, bytes):
            return peers
        until = self.clock.seconds() + self.config.permission_lifetime
        for host, _ in peers:
            allocation.permit(host, until)
        self.counters["permissions"] += 1
        return self._success(request)

    def _channel_bind(self, request: _Request, allocation: Allocation) -> bytes:
        number = request.message.get(CHANNEL_NUMBER)
        if number is None or not CHANNEL_MIN <= number <= CHANNEL_MAX:
            self.counters["malformed"] += 1
            return self._error(request, 400)
        peers = self._peers(request)
        if isinstance(peers, bytes):
            return peers
        now, peer = self.clock.seconds(), peers[0]
        if allocation.bind_conflict(number, peer, now) is not None:
            self.counters["channel-conflict"] += 1
            return self._error(request, 400)
        allocation.bind(number, peer, now + self.config.channel_lifetime)
        allocation.permit(peer[0], now + self.config.permission_lifetime)
        self.counters["channel-binds"] += 1
        return self._success(request)

    def peer_allowed(self, host: str) -> bool:
        return self.config.peer_allowed(host)

    # -- deleting ----------------------------------------------------------------------------

    def _delete(self, allocation: Allocation, why: str) -> object:
        if self.allocations.get(allocation.key) is allocation:
            del self.allocations[allocation.key]
        self.counters["allocations-deleted"] += 1
        transport, (host, port) = allocation.key
        self.log.info(
            "relay: deleted {relayed} of {user} ({transport} {host}:{port}): {why}; {stats}",
            relayed="{}:{}".format(*allocation.relayed),
            user=allocation.user,
            transport=transport,
            host=host,
            port=port,
            why=why,
            stats=dict(allocation.stats),
        )
        return allocation.socket.close()


def _family(host: str) -> int:
    return FAMILY_IPV4 if ipaddress.ip_address(host).version == 4 else FAMILY_IPV6
