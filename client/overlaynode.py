"""An ordinary node in the overlay: attach to the best supernode, publish presence, search, send.

- The host cache (``overlay.hostcache``) is fed at login (bootstrap) and by supernodes.
- Attaching: probe up to ``probe_count`` cached supernodes over UDP for round-trip time, connect
  over TCP to the best, prove the user's certificate key on the supernode's channel (whose
  node key is pinned and whose supernode certificate is checked), then publish a signed
  presence record.  The record is republished every third of its lifetime, and a refused
  republish is tried again after ``PUBLISH_RETRY`` seconds, so it never lapses while attached.
- A keep-alive ping every ``keepalive`` seconds (below NAT timeouts); a supernode that does not
  answer within ``silence_timeout``, or whose connection drops, is left, and the node attaches
  to the next best at once; repeated failures back off with jitter (0.5 s doubling to 10 s).
- A supernode that leaves sends ``migrate``: the node attaches elsewhere and publishes its new
  record first, then lets go (so messages for it never find it unreachable).
- Searching is iterative (``overlay.search``) over UDP, starting at the attached supernode.
  A node whose UDP is blocked (``udp_blocked``, set from the daemon's NAT check) asks its
  supernode over the TCP link instead (``find``): the supernode runs the search on its behalf
  and returns the signed record, which the node verifies exactly as a UDP search does
  (``Searcher.verify_record``: certificate chain to the CA, the user's signature, freshness),
  so the supernode can refuse or fail the search, never forge it.  A UDP search that no
  supernode answered at all falls back to ``find`` in the same way.

Time and randomness are injected; nothing here sleeps.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from overlay.certificate import Role, SignedCertificate
from overlay.channel import HelloReply
from overlay.connection import ClientConnection
from overlay.datagram import DatagramEndpoint
from overlay.errors import ProtocolError, VoipError
from overlay.hostcache import HostCache
from overlay.identity import IdentityKey
from overlay.login_protocol import Contact, proof_message
from overlay.mailbox import Post, Posted
from overlay.messages import Error, Message, Ping
from overlay.overlay_protocol import (
    PING_PAD,
    SEARCH_PAD,
    Ack,
    Attach,
    Attached,
    Find,
    FindResult,
    Incoming,
    Migrate,
    Publish,
    Published,
    RelayOffer,
    RelayRequest,
    Relays,
    Search,
    SearchFound,
    SearchNone,
    SearchReferral,
    Send,
    Sent,
    SnPing,
)
from overlay.presence import (
    Address,
    Attachment,
    PresenceRecord,
    SignedPresence,
    Status,
    is_current,
    sign,
)
from overlay.search import Found, NotFound, Referral, Reply, SearchResult, iterative_search
from overlay.slotmap import SupernodeInfo
from overlay.supernode import Supernode

RECORD_LIFETIME = 15 * 60
OFFLINE_LIFETIME = 72 * 3600
PUBLISH_RETRY = 2.0
#: How long a ``find`` may take: the supernode's search runs up to 3 rounds of 2 s asks, each
#: round trying fallbacks when its first asks fail.
FIND_TIMEOUT = 20.0
#: How long a ``post`` may take: a search and a forward (up to 5 s), then deposits (2 s).
POST_TIMEOUT = 30.0


#: Delivered envelopes kept for inspection.
INBOX_MEMORY = 100


class SupernodeSilent(VoipError):
    """The supernode did not answer in time."""

    code = "supernode-silent"


class NoSupernode(VoipError):
    """Not attached to any supernode yet; the overlay is not reachable."""

    code = "no-supernode"


def contact_to_info(contact: Contact) -> SupernodeInfo | None:
    if contact.node_id is None or contact.udp_port is None:
        return None
    return SupernodeInfo(contact.node_id, contact.host, contact.port, contact.udp_port)


class Searcher:
    """Iterative search over UDP; shared by ordinary nodes and supernodes."""

    def __init__(
        self, clock: Any, udp: DatagramEndpoint, ca_public_key: bytes, timeout: float = 2.0
    ):
        self.clock = clock
        self.udp = udp
        self.ca_public_key = ca_public_key
        self.timeout = timeout

    def ask(self, sn: SupernodeInfo, username: str) -> Deferred[Reply]:
        request = self.udp.request(
            (sn.host, sn.udp_port),
            lambda rid: Search(rid, username),
            timeout=self.timeout,
            pad_to=SEARCH_PAD,
        )

        def convert(reply: Message) -> Reply:
            if isinstance(reply, SearchFound):
                return Found((reply.record,))
            if isinstance(reply, SearchReferral):
                return Referral(reply.contacts, reply.level)
            if isinstance(reply, SearchNone):
                return NotFound()
            if isinstance(reply, Error):
                raise VoipError(reply.message)
            raise ProtocolError(f"search answered with {reply.NAME}")

        return request.addCallback(convert)

    def verify_record(self, username: str, blob: bytes) -> PresenceRecord:
        """Check a signed presence record of ``username`` whoever handed it over: the
        certificate chain to our CA, the user's signature, the times; ``ProtocolError`` else."""
        return SignedPresence.parse(blob).verify(self.ca_public_key, self.clock.seconds(), username)

    def classify(self, record: PresenceRecord) -> str:
        now = self.clock.seconds()
        if record.status in (Status.OFFLINE, Status.INVISIBLE) or not is_current(record, now):
            return "offline"  # invisible: shown offline (docs/everyday.md)
        cert = SignedCertificate.parse(record.certificate).cert
        return "found" if cert.not_after > now else "offline"

    async def search(
        self,
        username: str,
        start: list[SupernodeInfo],
        spares: Sequence[SupernodeInfo] = (),
    ) -> SearchResult:
        """Search from ``start``; when that learns nothing (every referral dead, say), search
        once more from ``spares`` (other supernodes, whose referrals differ)."""

        def verify(blob: bytes) -> PresenceRecord:
            return self.verify_record(username, blob)

        result = await iterative_search(
            self.clock, username, start, self.ask, verify, self.classify, timeout=self.timeout
        )
        asked = {node_id for ids in result.path for node_id in ids}
        others = [s for s in spares if s.node_id not in asked][:4]
        if result.outcome != "failed" or not others:
            return result
        again = await iterative_search(
            self.clock, username, others, self.ask, verify, self.classify, timeout=self.timeout
        )
        again.rounds += result.rounds
        again.asked += result.asked
        again.elapsed += result.elapsed
        again.timeouts += result.timeouts
        again.errors += result.errors
        again.bad_records += result.bad_records
        again.path = result.path + again.path
        return again

    async def attachment_of(
        self, username: str, start: list[SupernodeInfo]
    ) -> SupernodeInfo | None:
        """The supernode ``username`` is attached to, if online (a search from ``start``)."""
        result = await self.search(username, start)
        record = result.record
        if result.outcome != "found" or record is None or record.supernode is None:
            return None
        a = record.supernode
        return SupernodeInfo(a.node_id, a.host, a.tcp_port, a.udp_port)

    async def search_signed(
        self, username: str, start: list[SupernodeInfo]
    ) -> tuple[SearchResult, bytes | None]:
        """A search from ``start`` that also returns the chosen record's signed bytes (None
        without a record): a supernode searching for a node hands those on unaltered."""
        signed: dict[PresenceRecord, bytes] = {}

        def verify(blob: bytes) -> PresenceRecord:
            record = self.verify_record(username, blob)
            signed.setdefault(record, blob)
            return record

        result = await iterative_search(
            self.clock, username, start, self.ask, verify, self.classify, timeout=self.timeout
        )
        record = result.record
        return result, (signed.get(record) if record is not None else None)

    def serve_lookups_for(self, supernode: Supernode) -> None:
        """Let ``supernode`` find where users are attached (to forward messages to them), and
        search for attached nodes that cannot search themselves (``find``)."""

        def locate(username: str) -> Deferred[SupernodeInfo | None]:
            assert supernode.info is not None
            return Deferred.fromCoroutine(self.attachment_of(username, [supernode.info]))

        def search_for_node(username: str) -> Deferred[tuple[SearchResult, bytes | None]]:
            if supernode.info is None:
                raise VoipError("This supernode cannot search: it is not admitted.")
            return Deferred.fromCoroutine(self.search_signed(username, [supernode.info]))

        supernode.locate_user = locate
        supernode.search_for_node = search_for_node


class SupernodeLink(ClientConnection):
    """The TCP connection to the supernode a node is attached to."""

    def __init__(self, node: OverlayNode, info: SupernodeInfo) -> None:
        # Silence longer than a keep-alive round means the supernode is gone (the keep-alive's
        # answer resets this timer); shorter would drop a healthy link between keep-alives.
        idle = node.keepalive + 2 * node.silence_timeout
        super().__init__(node.clock, info.node_id, idle, "the supernode")
        self.node = node
        self.info = info

    def check_hello(self, reply: HelloReply) -> None:
        if reply.certificate is None:
            raise ProtocolError("The supernode showed no supernode certificate.")
        signed = SignedCertificate.parse(reply.certificate)
        signed.verify(self.node.ca_public_key, self.clock.seconds(), Role.SUPERNODE)
        if signed.public_key != self.info.node_id:
            raise ProtocolError("The supernode's certificate is for another key.")

    def on_request(self, message: Message) -> None:
        rid = getattr(message, "rid", 0)
        if isinstance(message, Incoming):
            self.node.received(message.envelope)
            self.send(Ack(rid))
        elif isinstance(message, Migrate):
            self.send(Ack(rid))
            self.node.migrate(self, message.contacts)
        else:
            super().on_request(message)

    def connection_closed(self, reason: Failure | None) -> None:
        super().connection_closed(reason)
        self.node.link_lost(self)


class OverlayNode:
    log = Logger()
    #: UDP is blocked on our network (the daemon's NAT check): search through our supernode.
    udp_blocked: bool = False

    def __init__(
        self,
        reactor: Any,
        ca_public_key: bytes,
        hostcache: HostCache,
        udp: DatagramEndpoint,
        *,
        keepalive: float = 15.0,
        silence_timeout: float = 3.0,
        probe_count: int = 8,
        record_lifetime: int = RECORD_LIFETIME,
        rng: random.Random | None = None,
        endpoint_factory: Callable[[Any, str, int, float], Any] | None = None,
    ) -> None:
        self.reactor = reactor
        self.clock = reactor
        self.ca_public_key = ca_public_key
        self.hostcache = hostcache
        self.udp = udp
        self.keepalive = keepalive
        self.silence_timeout = silence_timeout
        self.probe_count = probe_count
        self.record_lifetime = record_lifetime
        self.rng = rng or random.Random()  # noqa: S311 - backoff jitter, not cryptography
        self.endpoint_factory = endpoint_factory or (
            lambda r, h, p, t: HostnameEndpoint(r, h, p, timeout=t)
        )
        self.searcher = Searcher(reactor, udp, ca_public_key)
        self.identity: IdentityKey | None = None
        self.certificate: SignedCertificate | None = None
        self.link: SupernodeLink | None = None
        self.link_rtt: float | None = None
        self.running = False
        self.attaching = False
        self.attachments = 0
        #: Replicas that accepted our latest presence record (0 until the first publish).
        self.replicas = 0
        self.last_error: str | None = None
        #: The latest envelopes delivered to us (bounded: consumers take them from on_message).
        self.inbox: deque[bytes] = deque(maxlen=INBOX_MEMORY)
        self.on_message: list[Callable[[bytes], None]] = []
        self._backoff = 0.0
        self._sequence = 0
        #: What STUN on our supernodes said of our network (``set_nat``); in every record.
        self.reflexive: tuple[str, int] | None = None
        self.nat_type = "unknown"
        #: How others see us (voipctl presence): online, away, busy or invisible.
        self.presence_status = Status.ONLINE
        self._avoid: set[bytes] = set()
        self._timers: dict[str, IDelayedCall] = {}

    # -- life cycle -----------------------------------------------------------------------------

    @property
    def username(self) -> str | None:
        return self.certificate.username if self.certificate is not None else None

    def start(
        self, identity: IdentityKey, certificate: SignedCertificate, bootstrap: tuple[Contact, ...]
    ) -> None:
        self.identity = identity
        self.certificate = certificate
        infos = [i for i in (contact_to_info(c) for c in bootstrap) if i is not None]
        self.hostcache.add(infos, "login")
        self.running = True
        self._attach_soon(0.0)

    def update_certificate(self, certificate: SignedCertificate) -> None:
        self.certificate = certificate
        if self.link is not None and self.link.session is not None:
            Deferred.fromCoroutine(self._publish()).addErrback(self._log_failure, "republish")

    def set_nat(self, reflexive: tuple[str, int] | None, nat_type: str) -> None:
        """Our reflexive address and NAT kind (from ``voipctl netcheck``'s probe); republish."""
        if (reflexive, nat_type) == (self.reflexive, self.nat_type):
            return
        self.reflexive, self.nat_type = reflexive, nat_type
        if self.running and self.link is not None and self.link.session is not None:
            Deferred.fromCoroutine(self._publish()).addErrback(self._log_failure, "republish")

    def learn(self, bootstrap: tuple[Contact, ...]) -> None:
        """Supernodes the login server named again (at renewal): attach now if we have none."""
        infos = [i for i in (contact_to_info(c) for c in bootstrap) if i is not None]
        if infos:
            self.hostcache.add(infos, "login")
            if self.link is None and not self.attaching:
                self._attach_soon(0.0)

    async def stop(self, publish_offline: bool = True) -> None:
        self.running = False
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        link = self.link
        if link is not None and publish_offline:
            try:
                await self._publish(Status.OFFLINE)
            except VoipError as exc:
                self.log.info("could not publish the offline record: {error}", error=exc)
        self.link = None
        if link is not None:
            link.close()
        try:
            self.hostcache.save()
        except VoipError as exc:
            self.log.info("{error}", error=exc)

    def _later(self, name: str, delay: float, call: Callable[[], Any]) -> None:
        old = self._timers.get(name)
        if old is not None and old.active():
            old.cancel()
        self._timers[name] = self.reactor.callLater(delay, call)

    # -- attaching ------------------------------------------------------------------------------

    def _attach_soon(self, delay: float) -> None:
        if self.running:
            self._later("attach", delay, self._attach)

    def _attach(self) -> None:
        if not self.running or self.attaching or (self.link is not None and self.link.session):
            return
        self.attaching = True
        d = Deferred.fromCoroutine(self._attach_best())
        d.addErrback(self._log_failure, "attach")

        def done(_: Any) -> None:
            self.attaching = False
            if self.running and self.link is None:
                self._backoff = min(10.0, max(0.5, self._backoff * 2))
                self._attach_soon(self._backoff * self.rng.uniform(0.8, 1.2))

        d.addBoth(done)

    def _fastest(self, candidates: list[SupernodeInfo]) -> Deferred[SupernodeInfo | None]:
        """Ping every candidate at once; the first to answer wins (None if none answers).

        Every answer and every silence still lands in the host cache.
        """
        winner: Deferred[SupernodeInfo | None] = Deferred()
        outstanding = len(candidates)

        def settle(sn: SupernodeInfo | None) -> None:
            nonlocal outstanding
            outstanding -= 1
            if not winner.called and (sn is not None or outstanding == 0):
                winner.callback(sn)

        for sn in candidates:
            start = self.clock.seconds()

            def answered(_: Message, sn: SupernodeInfo = sn, start: float = start) -> None:
                self.hostcache.record_rtt(sn.node_id, self.clock.seconds() - start)
                settle(sn)

            def silent(_: Failure, sn: SupernodeInfo = sn) -> None:
                self.hostcache.record_failure(sn.node_id)
                settle(None)

            self.udp.request(
                (sn.host, sn.udp_port), SnPing, timeout=self.silence_timeout, pad_to=PING_PAD
            ).addCallbacks(answered, silent)
        if not candidates:
            winner.callback(None)
        return winner

    async def _attach_best(self, exclude: tuple[bytes, ...] = ()) -> bool:
        excluded = set(exclude) | self._avoid
        self._avoid = set()
        for _ in range(3):
            candidates = self.hostcache.ranked(excluded)[: self.probe_count]
            if not candidates:
                self.last_error = "No supernode known yet."
                return False
            sn = None if self.udp_blocked else await self._fastest(candidates)
            if sn is None:
                # No UDP answer at all: UDP may be blocked here (only TCP gets out), so try
                # the best-ranked one over TCP anyway, as the UDP-blocked node we may be.
                sn = candidates[0]
                self.log.info(
                    "no supernode answered over UDP; attaching to {host} over TCP", host=sn.host
                )
            try:
                await self._connect(sn)
            except Exception as exc:  # noqa: BLE001 - network failures of many kinds
                self.hostcache.record_failure(sn.node_id)
                self.last_error = f"Could not attach to {sn.host}:{sn.tcp_port}: {exc}"
                excluded.add(sn.node_id)
                continue
            return True
        return False

    async def _connect(self, sn: SupernodeInfo) -> None:
        assert self.identity is not None and self.certificate is not None
        identity, certificate = self.identity, self.certificate
        factory = Factory.forProtocol(lambda: SupernodeLink(self, sn))
        endpoint = self.endpoint_factory(self.reactor, sn.host, sn.tcp_port, self.silence_timeout)
        connecting = endpoint.connect(factory)
        connecting.addTimeout(self.silence_timeout, self.reactor)
        link = await connecting
        assert isinstance(link, SupernodeLink)
        try:
            ready = link.ready
            ready.addTimeout(self.silence_timeout, self.reactor)
            await ready
            assert link.session is not None
            transcript = link.session.transcript
            proof = identity.sign(
                proof_message(transcript, certificate.username, identity.public_key)
            )
            port = self.udp.transport.getHost().port if self.udp.transport is not None else None
            reply = await self._request(
                link, lambda rid: Attach(rid, bytes(certificate), proof, port)
            )
            if not isinstance(reply, Attached):
                raise ProtocolError(f"attach answered with {reply.NAME}")
        except BaseException:
            link.close()
            raise
        old, self.link = self.link, link
        self.replicas = 0
        self.link_rtt = (self.hostcache.entry(sn.node_id) or _NoEntry).rtt
        self.hostcache.add(reply.contacts, "supernode")
        self.attachments += 1
        self._backoff = 0.0
        self.last_error = None
        self.log.info("attached to supernode {host}:{port}", host=sn.host, port=sn.tcp_port)
        self._later("keepalive", self.keepalive, self._keepalive)
        try:
            await self._publish()
        except Exception as exc:  # noqa: BLE001 - stay attached; publishing is retried
            self.last_error = f"Could not publish presence: {exc}"
            self._later("republish", PUBLISH_RETRY, self._republish)
        finally:
            # Let go of a supernode we move away from only now: until our record names the
            # new one, messages for us still come through the old.
            if old is not None:
                old.close()

    async def _request(
        self, link: SupernodeLink, build: Callable[[int], Message], limit: float | None = None
    ) -> Message:
        waiting = link.request(build)
        limit = limit if limit is not None else self.silence_timeout * 2
        waiting.addTimeout(limit, self.reactor)
        try:
            reply = await waiting
        except (TimeoutError, defer.TimeoutError):
            raise SupernodeSilent(
                f"The supernode {link.info.host}:{link.info.tcp_port} did not answer within "
                f"{limit:g} s."
            ) from None
        if isinstance(reply, Error):
            raise VoipError(reply.message)
        return reply

    def link_lost(self, link: SupernodeLink) -> None:
        if link is not self.link:
            return
        self.link = None
        self.link_rtt = None
        self.hostcache.record_failure(link.info.node_id)
        self._avoid.add(link.info.node_id)
        self.log.info("lost supernode {host}:{port}", host=link.info.host, port=link.info.tcp_port)
        self._attach_soon(0.0)

    def migrate(self, link: SupernodeLink, contacts: tuple[SupernodeInfo, ...]) -> None:
        """Our supernode is leaving: attach elsewhere first, then let it go."""
        self.hostcache.add(contacts, "supernode")
        self.hostcache.remove(link.info.node_id)

        async def move() -> None:
            if not await self._attach_best(exclude=(link.info.node_id,)):
                link.close()

        Deferred.fromCoroutine(move()).addErrback(self._log_failure, "migrate")

    def _keepalive(self) -> None:
        link = self.link
        if not self.running or link is None:
            return

        async def ping() -> None:
            start = self.clock.seconds()
            try:
                await self._request(link, Ping)
            except Exception:  # noqa: BLE001 - any failure means the supernode is gone for us
                self.log.info("supernode {host} went silent", host=link.info.host)
                link.close()
                return
            self.link_rtt = self.clock.seconds() - start
            self.hostcache.record_rtt(link.info.node_id, self.link_rtt)
            self._later("keepalive", self.keepalive, self._keepalive)

        Deferred.fromCoroutine(ping()).addErrback(self._log_failure, "keepalive")

    # -- presence -------------------------------------------------------------------------------

    def presence(self, status: Status = Status.ONLINE) -> SignedPresence:
        assert self.identity is not None and self.certificate is not None and self.link is not None
        now = self.clock.seconds()
        sn = self.link.info
        lifetime = OFFLINE_LIFETIME if status is Status.OFFLINE else self.record_lifetime
        # Milliseconds, but strictly increasing: two records made in one millisecond (a
        # republish and a logout) or after the clock stepped back must still supersede.
        self._sequence = max(int(now * 1000), self._sequence + 1)
        record = PresenceRecord(
            username=self.certificate.username,
            certificate=bytes(self.certificate),
            supernode=Attachment(sn.node_id, sn.host, sn.tcp_port, sn.udp_port),
            reflexive=Address(*self.reflexive) if self.reflexive is not None else None,
            nat_type=self.nat_type,
            status=status,
            sequence=self._sequence,
            issued_at=int(now),
            expires_at=int(now) + lifetime,
        )
        return sign(record, self.identity)

    async def set_status(self, status: Status) -> int:
        """Our presence as others see it (``voipctl presence``); republished now and kept."""
        if status is Status.OFFLINE:
            raise ValueError("offline is what logging out publishes")
        self.presence_status = status
        return await self._publish()

    async def _publish(self, status: Status | None = None) -> int:
        link = self.link
        if link is None:
            raise NoSupernode()
        status = self.presence_status if status is None else status
        record = bytes(self.presence(status))
        reply = await self._request(link, lambda rid: Publish(rid, record))
        if not isinstance(reply, Published):
            raise ProtocolError(f"publish answered with {reply.NAME}")
        self.replicas = reply.replicas
        if status is not Status.OFFLINE and self.running:
            self._later("republish", self.record_lifetime / 3, self._republish)
        return reply.replicas

    def _republish(self) -> None:
        if not self.running or self.link is None:
            return  # stopped, or detached: attaching publishes afresh

        def failed(failure: Failure) -> None:
            # Try again soon: a refused republish must not let the record lapse while the
            # link stays up (a dead link is noticed by the keep-alive, and re-attaching
            # publishes anyway).
            self._log_failure(failure, "republish")
            if self.running:
                self._later("republish", PUBLISH_RETRY, self._republish)

        Deferred.fromCoroutine(self._publish()).addErrback(failed)

    # -- search and messages --------------------------------------------------------------------

    async def search(self, username: str) -> SearchResult:
        """Search over UDP, or through our supernode when UDP is blocked or no supernode
        answered over UDP at all.  An error the supernode answers a ``find`` with (too many
        searches, say) or its silence is raised."""
        link = self.link
        if self.udp_blocked:
            if link is None:
                raise NoSupernode()
            return await self._find(link, username)
        ranked = self.hostcache.ranked()
        start = [link.info] if link is not None else ranked[:4]
        if not start:
            raise NoSupernode()
        result = await self.searcher.search(username, start, ranked)
        link = self.link
        if link is None or not _nobody_answered(result):
            return result
        self.log.info("no supernode answered over UDP; searching through the supernode")
        found = await self._find(link, username)
        found.asked += result.asked
        found.elapsed += result.elapsed
        found.timeouts += result.timeouts
        found.errors += result.errors
        found.path = result.path + found.path
        return found

    async def _find(self, link: SupernodeLink, username: str) -> SearchResult:
        """Have our supernode search (``find``), and verify the record it returns ourselves:
        a record that does not verify counts as bad, and the search as failed."""
        began = self.clock.seconds()
        reply = await self._request(link, lambda rid: Find(rid, username), FIND_TIMEOUT)
        if not isinstance(reply, FindResult):
            raise ProtocolError(f"find answered with {reply.NAME}")
        result = SearchResult(
            outcome="failed", rounds=reply.rounds, asked=1, path=[[link.info.node_id]]
        )
        result.elapsed = self.clock.seconds() - began
        if reply.outcome in ("not-found", "failed"):
            result.outcome = "not-found" if reply.outcome == "not-found" else "failed"
            return result
        try:
            if reply.record is None:
                raise ProtocolError(f"find answered {reply.outcome} without a record.")
            record = self.searcher.verify_record(username, reply.record)
        except ProtocolError as exc:
            result.bad_records += 1
            self.log.info(
                "supernode {host} answered find with a bad record: {error}",
                host=link.info.host,
                error=exc,
            )
            return result
        result.record = record
        result.outcome = "found" if self.searcher.classify(record) == "found" else "offline"
        return result

    async def send(self, to: str, envelope: bytes) -> None:
        link = self.link
        if link is None:
            raise NoSupernode()
        reply = await self._request(link, lambda rid: Send(rid, to, envelope))
        if not isinstance(reply, Sent):
            raise ProtocolError(f"send answered with {reply.NAME}")

    async def post(self, to: str, envelope: bytes) -> int:
        """Deliver a message now, or have it held for ``to`` (``overlay.mailbox``): 0 when
        delivered, else how many supernodes of ``to``'s slot hold it."""
        link = self.link
        if link is None:
            raise NoSupernode()
        reply = await self._request(link, lambda rid: Post(rid, to, envelope), POST_TIMEOUT)
        if not isinstance(reply, Posted):
            raise ProtocolError(f"post answered with {reply.NAME}")
        return reply.replicas if reply.queued else 0

    async def relay_offers(self) -> tuple[RelayOffer, ...]:
        """Our supernode's relay, with a credential for us (empty when it has no room)."""
        link = self.link
        if link is None:
            raise NoSupernode()
        reply = await self._request(link, RelayRequest)
        if not isinstance(reply, Relays):
            raise ProtocolError(f"relay-offer answered with {reply.NAME}")
        return reply.relays

    def received(self, envelope: bytes) -> None:
        self.inbox.append(envelope)
        for callback in list(self.on_message):
            callback(envelope)

    # -- status ---------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        link = self.link
        document: dict[str, Any] = {
            "attached": link is not None and link.session is not None,
            "presence": self.presence_status.value,
            "host_cache": len(self.hostcache),
            "attachments": self.attachments,
            "published_replicas": self.replicas,
            "last_error": self.last_error,
        }
        if link is not None:
            document["supernode"] = {
                "host": link.info.host,
                "port": link.info.tcp_port,
                "rtt": self.link_rtt,
            }
        return document

    def _log_failure(self, failure: Failure, doing: str) -> None:
        if isinstance(failure.value, VoipError):
            self.last_error = f"{doing}: {failure.value}"
            self.log.info("{doing} failed: {error}", doing=doing, error=failure.value)
        else:
            self.log.failure("{doing} failed", failure, doing=doing)


class _NoEntry:
    rtt = None


def _nobody_answered(result: SearchResult) -> bool:
    """Did a UDP search fail without a single answer (every ask timed out or failed)?"""
    return (
        result.outcome == "failed"
        and result.asked > 0
        and result.bad_records == 0
        and result.timeouts + result.errors >= result.asked
    )
