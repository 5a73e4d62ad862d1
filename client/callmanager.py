"""The daemon's calls: at most one at a time; signals in, commands from ``voipctl``.

``place`` (``voipctl call``), ``answer`` (``voipctl answer``) and ``hangup`` return when the call
is over, with its summary; ``received`` takes every envelope the overlay delivers and passes the
verified call signals to their call.  A second INVITE while a call is up is answered BUSY; a
signal for a call we do not have, or from someone who is not its peer, is counted and ignored.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.task import deferLater
from twisted.logger import Logger

from client.calls import (
    AlreadyInCall,
    AudioOptions,
    Call,
    CalleeUnavailable,
    CallEnded,
    CallError,
    Environment,
    NoCall,
)
from client.envelope import Envelope, EnvelopeError, ReplayGuard, open_envelope, seal
from client.signalling import ENVELOPE_KIND, CallSignal, SignalError, signal
from overlay.certificate import SignedCertificate
from overlay.errors import VoipError
from overlay.usernames import canonical_username

#: ``voipctl ping --until-direct`` gives up after this many checks.
MAX_PINGS = 60

log = Logger()
Credentials = Callable[[], Any]  # -> (IdentityKey, SignedCertificate) | None


class NotLoggedInForCalls(CallError):
    """Log in first: voipctl login NAME."""

    code = "not-logged-in"


def _ago(seconds: float) -> str:
    if seconds < 60:
        return "just now"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return "just now"  # pragma: no cover - unreachable


class CallManager:
    def __init__(
        self,
        env: Environment,
        ca_public_key: bytes,
        credentials: Credentials,
        overlay_send: Callable[[str, bytes], Awaitable[None]],
        search: Callable[[str], Awaitable[Any]],
    ) -> None:
        self.env = env
        self.reactor = env.reactor
        self.ca_public_key = ca_public_key
        self.credentials = credentials
        self.overlay_send = overlay_send
        self.search = search
        self.guard = ReplayGuard()
        self.call: Call | None = None
        self.rejected = 0
        self.ignored = 0
        self.history: list[dict[str, Any]] = []
        self._ringing_waiters: list[Deferred[Call]] = []
        #: ``(username, public_key)``: raises (e.g. ``KeyChanged``) when the key is not the one
        #: pinned for that user (``client.keypins``); calls with a changed key are refused.
        self.key_check: Callable[[str, bytes], None] | None = None
        #: The last call refused because of the caller's key (for ``voipctl status``).
        self.refused_key: str | None = None

    # -- identity --------------------------------------------------------------------------------

    def _me(self) -> tuple[Any, Any]:
        credentials = self.credentials()
        if credentials is None:
            raise NotLoggedInForCalls()
        identity, certificate = credentials
        return identity, certificate

    def send(self, peer: str, body: bytes) -> Deferred[None]:
        """Seal a signal body to ``peer`` and hand it to the overlay."""
        try:
            identity, certificate = self._me()
            envelope = seal(
                identity, certificate, peer, ENVELOPE_KIND, body, self.reactor.seconds()
            )
        except VoipError as exc:
            return fail(exc)
        return Deferred.fromCoroutine(_await(self.overlay_send(peer, envelope)))

    def _new_call(self, side: str, peer: str, call_id: bytes) -> Call:
        call = Call(self.env, self.send, side, peer, call_id)
        call.me = self._me()[1].username
        self.call = call
        call.done.addCallback(self._ended, call)
        return call

    def _ended(self, summary: dict[str, Any], call: Call) -> dict[str, Any]:
        if self.call is call:
            self.call = None
        self.history = [*self.history[-19:], summary]
        return summary

    # -- commands --------------------------------------------------------------------------------

    async def place(
        self, peer: str, options: AudioOptions, progress: Callable[[str], None]
    ) -> dict[str, Any]:
        _, certificate = self._me()
        peer = canonical_username(peer)
        if self.call is not None:
            raise AlreadyInCall()
        if peer == certificate.username:
            raise CallError("You cannot call yourself.")
        progress(f"Searching for {peer}...")
        result = await self.search(peer)
        if result.outcome == "offline":
            seen = _ago(self.reactor.seconds() - result.record.issued_at)
            raise CalleeUnavailable(f"{peer} is offline (last seen {seen}).")
        if result.outcome == "not-found":
            raise CalleeUnavailable(
                f"No such user, or {peer} has not been online in the last 72 h."
            )
        if result.outcome != "found":
            raise CallError(f"Could not find {peer}: no supernode answered the search.")
        self._check_key(peer, getattr(result.record, "certificate", None))
        if self.call is not None:
            raise AlreadyInCall()
        audio = self.env.open_audio(options)
        call = self._new_call("caller", peer, os.urandom(16))
        call.audio, call.options = audio, options
        call.progress.append(progress)
        try:
            await call.open()
        except BaseException:
            self.call = None
            for part in audio:
                part.close()
            call.socket.close()
            raise
        call.start()
        progress(f"Calling {peer}...")
        call.send_signal("invite")
        return self._result(await call.done, call)

    async def ping(
        self,
        peer: str,
        progress: Callable[[str], None],
        *,
        count: int = 4,
        interval: float = 1.0,
        until_direct: bool = False,
        timeout: float = 2.0,
    ) -> dict[str, Any]:
        """Open a session with no audio to ``peer`` (direct or relayed, like a call) and send
        ``count`` checks over its path, one line per reply; ``until_direct``: go on (up to
        ``MAX_PINGS``) until the path is direct."""
        _, certificate = self._me()
        peer = canonical_username(peer)
        if self.call is not None:
            raise AlreadyInCall()
        if peer == certificate.username:
            raise CallError("You cannot ping yourself.")
        progress(f"Searching for {peer}...")
        result = await self.search(peer)
        if result.outcome != "found":
            raise CalleeUnavailable(
                f"{peer} is not online." if result.outcome != "failed" else "No supernode answered."
            )
        call = self._new_call("caller", peer, os.urandom(16))
        call.purpose = "ping"
        try:
            await call.open()
        except BaseException:
            self.call = None
            call.socket.close()
            raise
        call.start()
        call.send_signal("invite")
        progress(f"Opening a path to {peer}...")
        try:
            await call.connected
        except CancelledError:
            raise CallEnded(call.outcome or "failed", call.reason) from None
        rtts: list[float] = []
        sent = 0
        limit = MAX_PINGS if until_direct else count
        try:
            while sent < limit and call.outcome is None:
                sent += 1
                started = self.reactor.seconds()
                assert call.paths is not None
                kind = call.paths.describe_route()
                try:
                    rtt = await call.paths.probe(timeout)
                except (VoipError, TimeoutError, defer.TimeoutError):
                    progress(f"No reply from {peer} over {kind} within {timeout:g} s.")
                else:
                    rtts.append(rtt)
                    progress(f"Reply from {peer} over {kind}: time={rtt * 1000:.1f} ms")
                    if until_direct and kind.startswith("direct"):
                        break
                wait = interval - (self.reactor.seconds() - started)
                if sent < limit and wait > 0:
                    await deferLater(self.reactor, wait)
        finally:
            summary_path = call.paths.describe() if call.paths is not None else None
            if call.machine is not None and call.outcome is None:
                call.machine.hangup()
        return {
            "peer": peer,
            "sent": sent,
            "received": len(rtts),
            "loss_percent": round(100.0 * (sent - len(rtts)) / sent, 1) if sent else 0.0,
            "rtt_ms": {
                "min": round(min(rtts) * 1000, 2) if rtts else None,
                "avg": round(sum(rtts) / len(rtts) * 1000, 2) if rtts else None,
                "max": round(max(rtts) * 1000, 2) if rtts else None,
            },
            "path": summary_path,
        }

    async def answer(
        self, options: AudioOptions, wait: float, progress: Callable[[str], None]
    ) -> dict[str, Any]:
        self._me()
        call = self.call
        if call is None or call.side != "callee" or call.state != "incoming" or not call.machine:
            if call is not None and call.state != "incoming":
                raise AlreadyInCall("You are already in a call.")
            if wait <= 0:
                raise NoCall("No call is ringing.")
            progress(f"Waiting up to {wait:.0f} s for a call...")
            call = await self._wait_for_call(wait)
        progress(f"Answering {call.peer}...")
        call.audio = self.env.open_audio(options)
        call.options = options
        call.progress.append(progress)
        assert call.machine is not None
        call.machine.answer()
        return self._result(await call.done, call)

    def hangup(self) -> dict[str, Any]:
        call = self.call
        if call is None or call.machine is None:
            raise NoCall("There is no call to hang up.")
        call.machine.hangup()
        assert call.summary is not None
        return call.summary

    def status(self) -> dict[str, Any] | None:
        return self.call.describe() if self.call is not None else None

    def stop(self) -> None:
        """The daemon stops or the user logs out: end the call properly."""
        if self.call is not None and self.call.machine is not None:
            self.call.machine.hangup()
        for waiter in self._ringing_waiters:
            waiter.cancel()

    def _result(self, summary: dict[str, Any], call: Call) -> dict[str, Any]:
        if call.answered_at is None and call.outcome != "completed":
            raise CallEnded(call.outcome or "failed", call.reason)
        return summary

    def _wait_for_call(self, wait: float) -> Deferred[Call]:
        waiter: Deferred[Call] = Deferred()
        self._ringing_waiters.append(waiter)

        def expire() -> None:
            if not waiter.called:
                self._ringing_waiters.remove(waiter)
                waiter.errback(NoCall(f"No call came in {wait:.0f} s."))

        timer = self.reactor.callLater(wait, expire)

        def settled(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        return waiter.addBoth(settled)

    # -- signals in ------------------------------------------------------------------------------

    def received(self, data: bytes) -> None:
        """An envelope from the overlay: verify it, and pass a call signal to its call."""
        credentials = self.credentials()
        if credentials is None:
            return
        me = credentials[1].username
        try:
            if Envelope.parse(data).kind != ENVELOPE_KIND:
                return  # a message or receipt: client.messaging's (held ones may be old)
            opened = open_envelope(data, self.ca_public_key, me, self.reactor.seconds(), self.guard)
        except EnvelopeError as exc:
            self.rejected += 1
            log.info("refused a message: {error}", error=exc)
            return
        if opened.kind != ENVELOPE_KIND:
            return
        try:
            message = CallSignal.parse(opened.body)
        except SignalError as exc:
            self.rejected += 1
            log.info(
                "refused a call signal from {sender}: {error}", sender=opened.sender, error=exc
            )
            return
        if self.key_check is not None:
            try:
                self.key_check(opened.sender, opened.sender_key)
            except VoipError as exc:
                self.rejected += 1
                self.refused_key = str(exc)
                log.warn("refused a call signal: {error}", error=exc)
                call = self.call
                if call is not None and call.peer == opened.sender and call.machine is not None:
                    call.machine.failed(str(exc))
                return
        self._dispatch(opened.sender, message)

    def _dispatch(self, sender: str, message: CallSignal) -> None:
        call = self.call
        if message.kind == "invite":
            if call is not None and call.call_id == message.call_id:
                return  # the same INVITE again (a retransmission through another path)
            if call is not None:
                self.send(sender, bytes(signal("busy", message.call_id))).addErrback(
                    lambda f: log.info("busy not delivered: {e}", e=f.getErrorMessage())
                )
                return
            self._incoming(sender, message)
            return
        if call is None or call.call_id != message.call_id or call.peer != sender:
            self.ignored += 1
            return
        machine = call.machine
        if machine is None:
            self.ignored += 1
            return
        if message.kind == "ringing":
            if call.state == "ringing":
                call.say(f"Ringing {sender}...")
            machine.ringing()
        elif message.kind == "accept":
            if call.peer_public is None:
                call.peer_public = message.ephemeral
                call.take_offer(message)
            machine.accepted(message)
        elif message.kind == "relay":
            call.relay_signal(message)
        elif message.kind in ("decline", "busy"):
            machine.refused(message.kind, message.reason or "")
        elif message.kind == "cancel":
            machine.cancelled(message.reason or "")
        elif message.kind == "bye":
            machine.bye(message.reason or "")

    def _check_key(self, peer: str, certificate: bytes | None) -> None:
        """Before calling: is the key in ``peer``'s record the one we pinned?"""
        if self.key_check is None or certificate is None:
            return
        try:
            key = SignedCertificate.parse(certificate).public_key
        except VoipError:
            return  # the search verified the record; an unreadable one cannot get here
        self.key_check(peer, key)

    def _incoming(self, sender: str, invite: CallSignal) -> None:
        call = self._new_call("callee", sender, invite.call_id)
        call.peer_public = invite.ephemeral
        call.take_offer(invite)
        if invite.codec == "ping":
            call.purpose = "ping"

        async def ring() -> None:
            try:
                await call.open()
            except BaseException:
                call.socket.close()
                if self.call is call:
                    self.call = None
                raise
            call.start()
            if call.purpose == "ping":  # answered at once, unrung, with no audio
                log.info("ping session from {sender}", sender=sender)
                assert call.machine is not None
                call.machine.answer()
                return
            call.send_signal("ringing")
            log.info("incoming call from {sender}", sender=sender)
            waiters, self._ringing_waiters = self._ringing_waiters, []
            for waiter in waiters:
                waiter.callback(call)

        Deferred.fromCoroutine(ring()).addErrback(
            lambda f: log.failure("could not take the call from {s}", f, s=sender)
        )


async def _await(work: Awaitable[None]) -> None:
    await work
