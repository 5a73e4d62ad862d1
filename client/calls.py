"""Calls: place, ring, answer and hang up; wires signalling, NAT traversal and media together.

One ``Call`` per call, driven by its state machine (``client.callmachine``), which decides; the
call does the work the machine asks for:

    place: search the callee -> open a call socket -> learn our reflexive address (STUN on our
           supernode) -> INVITE (fresh call key, candidates) over the overlay -> machine "calling"
    incoming INVITE: verify (envelope) -> BUSY if in a call -> socket + STUN -> RINGING
    INVITE and ACCEPT also carry each side's NAT kind and the relays its supernode offered
    answer / accepted: derive the keys -> direct checks and relay set-up at once
           (``client.mediapath``, ``client.relaypath``)
    connected: media (Opus over sealed RTP) on the path chosen -> "active"; the path may change
           mid-call (a direct path opening, a relay dying)
    the end: BYE (or CANCEL / DECLINE) -> stop media, close the socket, forget the call key,
             report the summary to whoever placed or answered the call

The ``CallManager`` holds at most one call at a time (a second INVITE is answered BUSY) and
exposes what the daemon's commands need: ``place``, ``answer``, ``hangup``, ``status``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from client.callkeys import CallKeys, EphemeralKey
from client.callmachine import CallCore, CallInputs, new_call_machine
from client.callsocket import Address, CallSocket, route_source
from client.mediapath import WATCH_EVERY, MediaPaths
from client.relaypath import Probe, probe
from client.signalling import CallSignal, CandidateInfo, signal
from overlay.errors import VoipError
from overlay.overlay_protocol import RelayOffer

#: No media from the peer for this long ends an active call.
MEDIA_TIMEOUT = 10.0
MEDIA_WATCH = 1.0
STUN_TIMEOUT = 3.0
HOST_PRIORITY = 126 << 24
SRFLX_PRIORITY = 100 << 24

log = Logger()


class CallError(VoipError):
    """The call failed."""

    code = "call-failed"


class AlreadyInCall(CallError):
    """You are already in a call; hang up first."""

    code = "in-call"


class NoCall(CallError):
    """There is no call."""

    code = "no-call"


class CalleeUnavailable(CallError):
    """The person you called cannot take calls now."""

    code = "unavailable"


class CallEnded(CallError):
    """The call ended without being answered."""

    def __init__(self, outcome: str, reason: str) -> None:
        super().__init__(reason)
        self.code = outcome


@dataclass(frozen=True)
class AudioOptions:
    """Where a call's audio comes from and goes to: WAV files, or the default devices."""

    play: str | None = None
    record: str | None = None
    duration: float | None = None


async def _no_offers() -> Sequence[RelayOffer]:
    return ()


@dataclass
class Environment:
    """The collaborators a call needs, injected (tests give fakes, voipd the real parts)."""

    reactor: Any
    #: Open a UDP port for ``protocol``; returns the listening port.
    listen_udp: Callable[[CallSocket], Any]
    #: Our supernode's UDP address (for STUN), or None when not attached.
    stun_server: Callable[[], Address | None]
    stun_client: Callable[[Any, Callable[[bytes, Address], None]], Any]
    checker: Callable[..., Any]
    media: Callable[..., Any]
    open_audio: Callable[[AudioOptions], tuple[Any, Any]]
    trace: Callable[[bytes, str, str, str], None] | None = None
    #: The relays our supernode (and our configuration) offer, with credentials for us.
    relay_offers: Callable[[], Awaitable[Sequence[RelayOffer]]] = _no_offers
    #: Our NAT kind as ``voipctl netcheck`` found it ("cone-nat", "symmetric-nat", ...).
    nat_kind: Callable[[], str | None] = lambda: None
    #: ``(reactor, server, (username, password), send)`` -> a TURN client on the call socket.
    turn_udp: Callable[..., Any] | None = None
    #: ``(reactor, server, (username, password))`` -> (awaitable) a TURN client over TCP.
    turn_tcp: Callable[..., Awaitable[Any]] | None = None
    #: ``(address, timeout)`` -> seconds a TCP connect took (a relay probe when UDP fails).
    tcp_probe: Callable[[Address, float], Deferred[float]] | None = None
    #: Never a direct path (``--relay-only``): our addresses are not even sent to the peer.
    relay_only: bool = False


class Call:
    """One call (either side): implements the machine's ``CallActions``."""

    def __init__(
        self,
        env: Environment,
        send: Callable[[str, bytes], Deferred[None]],
        side: str,
        peer: str,
        call_id: bytes,
    ) -> None:
        self.env = env
        self._send = send
        self.side = side
        self.peer = peer
        self.call_id = call_id
        self.me: str = ""
        self.ephemeral = EphemeralKey()
        self.own_public = self.ephemeral.public
        self.peer_public: bytes | None = None
        self.remote_candidates: tuple[CandidateInfo, ...] = ()
        self.nat_kind: str | None = None
        self.peer_nat: str | None = None
        self.my_offers: tuple[RelayOffer, ...] = ()
        self.peer_offers: tuple[RelayOffer, ...] = ()
        self.peer_rtts: tuple[int, ...] = ()
        self.probes: dict[str, Probe] = {}
        self.paths: MediaPaths | None = None
        #: "call", or "ping": a session with no audio (``voipctl ping``), answered unrung.
        self.purpose = "call"
        #: Fires when a path is chosen (the call is "active").
        self.connected: Deferred[None] = Deferred()
        self.local_candidates: list[CandidateInfo] = []
        self.socket = CallSocket()
        self.stun: Any = None
        self.checker: Any = None
        self.media: Any = None
        self.audio: tuple[Any, Any] | None = None
        self.options = AudioOptions()
        self.keys: CallKeys | None = None
        self.path: dict[str, Any] | None = None
        self.created = env.reactor.seconds()
        self.answered_at: float | None = None
        self.ended_at: float | None = None
        self.outcome: str | None = None
        self.reason = ""
        self.summary: dict[str, Any] | None = None
        self.done: Deferred[dict[str, Any]] = Deferred()
        self.progress: list[Callable[[str], None]] = []
        self._timers: list[Any] = []
        trace = env.trace
        core = CallCore(
            env.reactor,
            self,
            peer,
            trace=(lambda old, i, new: trace(call_id, old, i, new)) if trace else None,
        )
        self.core = core
        self.machine: CallInputs | None = None

    # -- set-up ----------------------------------------------------------------------------------

    @property
    def state(self) -> str:
        if self.outcome is not None:
            return "ended"
        if self.media is not None:
            return "active"
        if self.checker is not None:
            return "connecting"
        return {"caller": "ringing", "callee": "incoming"}[self.side]

    def say(self, text: str) -> None:
        for listener in list(self.progress):
            listener(text)

    async def open(self) -> None:
        """Open the call socket and gather our candidates (host, and reflexive by STUN)."""
        env = self.env
        self.socket.port = env.listen_udp(self.socket)
        port = self.socket.local_port
        server = env.stun_server()
        host = route_source(server) if server is not None else None
        self.local_candidates = [CandidateInfo("host", host or "127.0.0.1", port, HOST_PRIORITY)]
        if env.relay_only:
            self.local_candidates = []
        self.nat_kind = env.nat_kind()
        udp_works = self.nat_kind != "udp-blocked"
        if server is not None and udp_works:
            try:
                reflexive = await self._stun().binding(server)
            except VoipError as exc:
                log.info("no reflexive address for the call: {error}", error=exc)
            else:
                if (reflexive[0], reflexive[1]) != (
                    host or "127.0.0.1",
                    port,
                ) and not env.relay_only:
                    self.local_candidates.append(
                        CandidateInfo("srflx", reflexive[0], reflexive[1], SRFLX_PRIORITY)
                    )
        try:
            self.my_offers = tuple(await env.relay_offers())[:2]
        except VoipError as exc:
            log.info("no relay offered: {error}", error=exc)
        for offer in self.all_offers():
            await self.probe_relay(offer)

    def _stun(self) -> Any:
        if self.stun is None:
            self.stun = self.env.stun_client(self.env.reactor, self.socket.send)
            self.socket.handlers.append(self.stun.datagram_received)
        return self.stun

    def all_offers(self) -> list[RelayOffer]:
        """Every relay offered for this call: the caller's, then the callee's."""
        if self.side == "caller":
            return [*self.my_offers, *self.peer_offers]
        return [*self.peer_offers, *self.my_offers]

    async def probe_relay(self, offer: RelayOffer) -> Probe:
        known = self.probes.get(offer.label)
        if known is None:
            udp = self.nat_kind != "udp-blocked"
            known = await probe(self.env.reactor, self._stun(), offer, self.env.tcp_probe, udp)
            self.probes[offer.label] = known
            log.info(
                "relay {relay}: {rtt} ms over {transport}",
                relay=offer.label,
                rtt=known.rtt_ms,
                transport=known.transport,
            )
        return known

    async def turn_client(self, offer: RelayOffer, transport: str) -> Any:
        """A TURN client for ``offer``: on the call socket (UDP), or its own TCP connection."""
        env = self.env
        credential = (offer.username, offer.password)
        if transport == "tcp":
            if env.turn_tcp is None:
                raise VoipError("TURN over TCP is not available")
            return await env.turn_tcp(env.reactor, offer.tcp_address, credential)
        if env.turn_udp is None:
            raise VoipError("TURN is not available")
        turn = env.turn_udp(env.reactor, offer.udp_address, credential, self.socket.send)
        self.socket.handlers.insert(0, turn.datagram_received)
        return turn

    def start(self) -> None:
        self.machine = new_call_machine(self.core, self.side)

    # -- CallActions ---------------------------------------------------------------------------

    def send_signal(self, kind: str, reason: str | None = None) -> None:
        fields: dict[str, Any] = {}
        if kind in ("invite", "accept"):
            fields = {
                "ephemeral": self.own_public,
                "candidates": tuple(self.local_candidates),
                "nat": self.nat_kind,
                "relays": self.my_offers,
            }
            if kind == "invite":
                fields["codec"] = "ping" if self.purpose == "ping" else "opus"
            else:
                fields["rtts"] = tuple(
                    self.probes[o.label].rtt_ms if o.label in self.probes else -1
                    for o in self.all_offers()
                )
        if reason is not None and kind in ("bye", "cancel", "decline"):
            fields["reason"] = reason
        self.send_body(bytes(signal(kind, self.call_id, **fields)), kind)

    def send_body(self, body: bytes, kind: str) -> None:
        sent = self._send(self.peer, body)
        sent.addErrback(self._signal_failed, kind)

    def take_offer(self, message: CallSignal) -> None:
        """The peer's INVITE or ACCEPT: its candidates, NAT kind and relays."""
        self.remote_candidates = message.candidates
        self.peer_nat = message.nat
        self.peer_offers = message.relays[:2]
        self.peer_rtts = message.rtts

    def _signal_failed(self, failure: Failure, kind: str) -> None:
        if not isinstance(failure.value, VoipError):
            log.failure("sending {kind} failed", failure, kind=kind)
        reason = f"Could not reach {self.peer}: {failure.getErrorMessage()}"
        if kind in ("invite", "ringing", "accept") and self.machine is not None:
            self.machine.failed(reason)
        else:
            log.info(
                "{kind} to {peer} not delivered: {reason}", kind=kind, peer=self.peer, reason=reason
            )

    def start_checks(self) -> None:
        assert self.peer_public is not None
        caller = self.side == "caller"
        caller_name, callee_name = (self.me, self.peer) if caller else (self.peer, self.me)
        caller_pub, callee_pub = (
            (self.own_public, self.peer_public) if caller else (self.peer_public, self.own_public)
        )
        self.keys = self.ephemeral.derive(
            self.peer_public,
            self.call_id,
            caller_name,
            callee_name,
            caller_pub,
            callee_pub,
            i_am_caller=caller,
        )
        self.say("Connecting...")
        self.paths = MediaPaths(self)
        self.checker = self.paths
        self.paths.start()

    def path_ready(self, pair: Any) -> None:
        """The first path that works (``client.mediapath``)."""
        if self.machine is not None:
            self.machine.connected(pair)

    def no_path(self, reason: str) -> None:
        if self.machine is not None and self.outcome is None:
            self.machine.failed(reason)

    def relay_signal(self, message: CallSignal) -> None:
        if self.paths is not None:
            self.paths.relay_signal(message)

    def start_media(self, pair: Any) -> None:
        assert self.keys is not None and self.paths is not None
        paths = self.paths
        self.path = paths.describe()
        kind = self.path["kind"]
        self.answered_at = self.env.reactor.seconds()
        if self.purpose == "ping":  # no audio: the pings are checks on the path
            self.media = NoMedia()
            self._later(PING_SESSION_MAX, self._time_up)
        else:
            assert self.audio is not None
            source, sink = self.audio
            self.media = self.env.media(self.env.reactor, paths.send, self.keys, source, sink)
            self.socket.handlers.append(self._media_datagram)
            self.media.start()
            self.say(f"Connected to {self.peer} ({kind}, {self.path['remote']}).")
            self._watch()
            self._watch_path()
        if not self.connected.called:
            self.connected.callback(None)
        if self.options.duration is not None:
            self._timers.append(self.env.reactor.callLater(self.options.duration, self._time_up))

    def _media_datagram(self, data: bytes, address: Address) -> bool:
        if self.media is None or not data or not 0x80 <= data[0] <= 0xBF:
            return False
        if self.paths is not None:
            self.paths.direct_media(data, address)
        return True

    def _later(self, delay: float, work: Callable[[], None]) -> None:
        self._timers = [t for t in self._timers if t.active()]
        self._timers.append(self.env.reactor.callLater(delay, work))

    def media_in(self, data: bytes) -> None:
        if self.media is not None and self.outcome is None:
            self.media.datagram_received(data)

    def _watch_path(self) -> None:
        if self.media is None or self.outcome is not None or self.paths is None:
            return
        self.paths.watch()
        self._later(WATCH_EVERY, self._watch_path)

    def _time_up(self) -> None:
        if self.machine is not None:
            self.machine.hangup()

    def _watch(self) -> None:
        if self.media is None or self.outcome is not None:
            return
        now = self.env.reactor.seconds()
        last = getattr(self.media, "last_received", None)
        since = now - (last if last is not None else self.answered_at or now)
        if since > MEDIA_TIMEOUT and self.machine is not None:
            self.machine.failed(
                f"Lost the connection to {self.peer} (no audio for {MEDIA_TIMEOUT:.0f} s)."
            )
            return
        self._later(MEDIA_WATCH, self._watch)

    def finish(self, outcome: str, reason: str) -> None:
        self.outcome, self.reason = outcome, reason
        self.ended_at = self.env.reactor.seconds()
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        self._timers.clear()
        stats: Any = None
        if self.checker is not None:
            self.checker.stop()
        if self.media is not None:
            stats = self.media.stop()
        elif self.audio is not None:
            for part in self.audio:
                part.close()
        self.socket.close()
        self.summary = self.describe(stats)
        if not self.connected.called:
            self.connected.cancel()
            self.connected.addErrback(lambda _: None)
        self.done.callback(self.summary)

    # -- reports -------------------------------------------------------------------------------

    def describe(self, stats: Any = None) -> dict[str, Any]:
        now = self.ended_at if self.ended_at is not None else self.env.reactor.seconds()
        if stats is None and self.media is not None and self.outcome is None:
            stats = self.media.stats()
        document: dict[str, Any] = {
            "call_id": self.call_id.hex(),
            "peer": self.peer,
            "direction": "outgoing" if self.side == "caller" else "incoming",
            "state": self.state,
            "outcome": self.outcome,
            "reason": self.reason or None,
            "duration": round(now - self.answered_at, 2) if self.answered_at else 0.0,
            "path": self.paths.describe() if self.paths and self.paths.route else self.path,
            "media": _plain(stats),
        }
        return document


#: A ping session ends by itself after this long (its caller normally ends it first).
PING_SESSION_MAX = 300.0


class NoMedia:
    """The media of a ping session: none (``voipctl ping`` probes the path itself)."""

    last_received: float | None = None

    def start(self) -> None:
        pass

    def datagram_received(self, data: bytes) -> None:
        pass

    def stats(self) -> None:
        return None

    def stop(self) -> None:
        return None


def _plain(stats: Any) -> Any:
    if stats is None:
        return None
    if is_dataclass(stats) and not isinstance(stats, type):
        return asdict(stats)
    if isinstance(stats, dict):
        return stats
    return str(stats)
