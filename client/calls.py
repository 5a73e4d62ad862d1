"""Calls: place, ring, answer and hang up; wires signalling, NAT traversal and media together.

One ``Call`` per call, driven by its state machine (``client.callmachine``), which decides; the
call does the work the machine asks for:

    place: search the callee -> open a call socket -> learn our reflexive address (STUN on our
           supernode) -> INVITE (fresh call key, candidates) over the overlay -> machine "calling"
    incoming INVITE: verify (envelope) -> BUSY if in a call -> socket + STUN -> RINGING
    answer / accepted: derive the keys -> connectivity checks on every candidate pair at once
    connected: media (Opus over sealed RTP) on the pair that worked -> "active"
    the end: BYE (or CANCEL / DECLINE) -> stop media, close the socket, forget the call key,
             report the summary to whoever placed or answered the call

The ``CallManager`` holds at most one call at a time (a second INVITE is answered BUSY) and
exposes what the daemon's commands need: ``place``, ``answer``, ``hangup``, ``status``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from client.callkeys import CallKeys, EphemeralKey
from client.callmachine import CallCore, CallInputs, new_call_machine
from client.callsocket import Address, CallSocket, route_source
from client.signalling import CandidateInfo, signal
from overlay.errors import VoipError

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
        if server is None:
            return
        self.stun = env.stun_client(env.reactor, self.socket.send)
        self.socket.handlers.append(self.stun.datagram_received)
        try:
            reflexive = await self.stun.binding(server)
        except VoipError as exc:
            log.info("no reflexive address for the call: {error}", error=exc)
            return
        if (reflexive[0], reflexive[1]) != (self.local_candidates[0].host, port):
            self.local_candidates.append(
                CandidateInfo("srflx", reflexive[0], reflexive[1], SRFLX_PRIORITY)
            )

    def start(self) -> None:
        self.machine = new_call_machine(self.core, self.side)

    # -- CallActions ---------------------------------------------------------------------------

    def send_signal(self, kind: str, reason: str | None = None) -> None:
        fields: dict[str, Any] = {}
        if kind in ("invite", "accept"):
            fields = {"ephemeral": self.own_public, "candidates": tuple(self.local_candidates)}
            if kind == "invite":
                fields["codec"] = "opus"
        if reason is not None and kind in ("bye", "cancel", "decline"):
            fields["reason"] = reason
        body = bytes(signal(kind, self.call_id, **fields))
        sent = self._send(self.peer, body)
        sent.addErrback(self._signal_failed, kind)

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
        self.checker = self.env.checker(
            self.env.reactor,
            self.socket.send,
            self.keys.check,
            self.call_id[:8],
            caller,
            self.local_candidates,
            list(self.remote_candidates),
            self.peer,
        )
        self.socket.handlers.append(self.checker.datagram_received)
        started: Deferred[Any] = self.checker.start()
        started.addCallbacks(self._connected, self._no_path)

    def _connected(self, pair: Any) -> None:
        if self.machine is not None:
            self.machine.connected(pair)

    def _no_path(self, failure: Failure) -> None:
        if self.machine is None or isinstance(failure.value, CancelledError):
            return  # stopped because the call ended
        if isinstance(failure.value, VoipError):
            self.machine.failed(failure.getErrorMessage())
        else:
            log.failure("connectivity checks failed", failure)
            self.machine.failed(f"No media path to {self.peer} could be opened.")

    def start_media(self, pair: Any) -> None:
        assert self.keys is not None and self.audio is not None
        remote = (pair.remote[0], pair.remote[1])
        remote_kind = getattr(getattr(pair, "remote_candidate", None), "kind", "prflx")
        direct_host = pair.local.kind == "host" and remote_kind == "host"
        kind = "direct host" if direct_host else "direct reflexive"
        self.path = {
            "kind": kind,
            "local": f"{pair.local.host}:{pair.local.port}",
            "remote": f"{remote[0]}:{remote[1]}",
            "rtt_ms": round(pair.rtt * 1000, 1) if getattr(pair, "rtt", None) else None,
        }
        source, sink = self.audio
        self.media = self.env.media(
            self.env.reactor, lambda data: self.socket.send(data, remote), self.keys, source, sink
        )
        self.socket.handlers.append(self._media_datagram)
        self.media.start()
        self.answered_at = self.env.reactor.seconds()
        self.say(f"Connected to {self.peer} ({kind}, {self.path['remote']}).")
        self._watch()
        if self.options.duration is not None:
            self._timers.append(self.env.reactor.callLater(self.options.duration, self._time_up))

    def _media_datagram(self, data: bytes, address: Address) -> bool:
        if self.media is None or not data or not 0x80 <= data[0] <= 0xBF:
            return False
        self.media.datagram_received(data)
        return True

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
        self._timers.append(self.env.reactor.callLater(MEDIA_WATCH, self._watch))

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
            "path": self.path,
            "media": _plain(stats),
        }
        return document


def _plain(stats: Any) -> Any:
    if stats is None:
        return None
    if is_dataclass(stats) and not isinstance(stats, type):
        return asdict(stats)
    if isinstance(stats, dict):
        return stats
    return str(stats)
