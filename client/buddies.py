"""The buddy list: people you keep, and how they are, kept fresh through the overlay.

``BuddyList`` is kept by the daemon in ``STATE/buddies.json`` (mode 0600, written atomically).
Each buddy's presence is refreshed by an ordinary overlay search (``OverlayNode.search``: the
record is verified like any other) every ``refresh`` seconds, one buddy at a time, the stalest
first, and never more than ``MAX_RATE`` searches a second whatever the list's size or however
fast buddies are added (the bound is kept at the one place a search starts); a new buddy is
looked up as soon as the bound allows.  The searches run only while logged in (``start`` /
``stop``); logging in again looks everyone up afresh.  A change of status, reach or key is
passed to the listeners (``voipctl buddies --watch``).  Each record's key goes through the key
pins (``client.keypins``): a changed key is shown as "KEY CHANGED" until accepted.

    status      what the last search said: online, away, busy, offline (also invisible users),
                not-found (no record in 72 h), unknown (not looked up yet, or no answer)
    last_seen   when the buddy's record was issued (unix time); an invisible buddy's record
                does not move it (nor the NAT kind), or "last seen now" would give them away
    reach       "direct-capable" (public or cone NAT: a direct call is likely), "may need a
                relay" (symmetric NAT, UDP blocked, or unknown), "" when not online
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from overlay.certificate import SignedCertificate
from overlay.errors import VoipError
from overlay.identity import write_private_file
from overlay.presence import Status
from overlay.usernames import canonical_username, is_valid_username

log = Logger()

REFRESH = 30.0
MAX_RATE = 2.0
MAX_BUDDIES = 500
DIRECT_CAPABLE = frozenset({"public", "cone-nat"})


class BuddyError(VoipError):
    """A buddy list operation was refused."""


@dataclass
class Buddy:
    name: str
    status: str = "unknown"
    nat_type: str = ""
    last_seen: int | None = None
    checked_at: float | None = None
    key_changed: bool = False

    @property
    def reach(self) -> str:
        if self.status not in ("online", "away", "busy"):
            return ""
        return "direct-capable" if self.nat_type in DIRECT_CAPABLE else "may need a relay"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "reach": self.reach}

    def signature(self) -> tuple[str, str, bool]:
        return (self.status, self.reach, self.key_changed)


Listener = Callable[[Buddy], None]


class BuddyList:
    def __init__(
        self,
        reactor: Any,
        path: Path,
        search: Callable[[str], Awaitable[Any]],
        key_check: Callable[[str, bytes], None] | None = None,
        *,
        refresh: float = REFRESH,
    ) -> None:
        self.reactor = reactor
        self.path = path
        self.search = search
        self.key_check = key_check
        self.refresh = refresh
        self.listeners: list[Listener] = []
        self.buddies: dict[str, Buddy] = {}
        self.searches = 0
        self._timer: Any = None
        self._busy = False
        self._running = False
        self._last_search: float | None = None
        try:
            names = json.loads(path.read_text())
        except FileNotFoundError:
            names = []
        except (OSError, ValueError) as exc:
            raise BuddyError(f"Cannot read the buddy list {path}: {exc}.") from None
        for name in names if isinstance(names, list) else []:
            # A hand-edited file: only valid names, only as many as the list holds.
            if (
                isinstance(name, str)
                and is_valid_username(name)
                and len(self.buddies) < MAX_BUDDIES
            ):
                self.buddies[name] = Buddy(name)

    # -- the list --------------------------------------------------------------------------

    def add(self, name: str) -> Buddy:
        name = canonical_username(name)
        if name in self.buddies:
            return self.buddies[name]
        if len(self.buddies) >= MAX_BUDDIES:
            raise BuddyError(f"The buddy list is full ({MAX_BUDDIES}); remove someone first.")
        buddy = Buddy(name)
        self.buddies[name] = buddy
        self._save()
        self._kick(0.0)
        return buddy

    def remove(self, name: str) -> None:
        name = canonical_username(name)
        if self.buddies.pop(name, None) is None:
            raise BuddyError(f"{name} is not on your buddy list.")
        self._save()

    def listing(self) -> list[Buddy]:
        return sorted(self.buddies.values(), key=lambda b: b.name)

    # -- refreshing ------------------------------------------------------------------------

    def start(self) -> None:
        """Logged in: refresh from now on, everyone soon (what we knew before may be stale)."""
        self._running = True
        for buddy in self.buddies.values():
            buddy.checked_at = None
        self._kick(0.0)

    def stop(self) -> None:
        """Logged out or shutting down: no more searches (one under way is let finish)."""
        self._running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    @property
    def spacing(self) -> float:
        """Seconds between two searches: the list once per ``refresh``, at most ``MAX_RATE``/s."""
        return max(1.0 / MAX_RATE, self.refresh / max(1, len(self.buddies)))

    def _kick(self, delay: float) -> None:
        if not self._running:
            return
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= self.reactor.seconds() + delay:
                return
            self._timer.cancel()
        self._timer = self.reactor.callLater(delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        if not self._running or not self.buddies or self._busy:
            return  # a search under way reschedules when it ends
        now = self.reactor.seconds()
        stalest = min(self.buddies.values(), key=lambda b: b.checked_at or float("-inf"))
        due = (stalest.checked_at or float("-inf")) + self.refresh
        if self._last_search is not None:  # the rate bound holds whoever kicked us
            due = max(due, self._last_search + 1.0 / MAX_RATE)
        if due > now:
            self._timer = self.reactor.callLater(due - now, self._tick)
            return
        self._busy = True
        self._last_search = now
        checking = Deferred.fromCoroutine(self._check(stalest))
        checking.addErrback(lambda f: log.failure("buddy refresh failed", f))
        checking.addBoth(self._checked)

    def _checked(self, _: object) -> None:
        self._busy = False
        if not self._running:
            return
        unchecked = any(b.checked_at is None for b in self.buddies.values())
        delay = 1.0 / MAX_RATE if unchecked else self.spacing  # new buddies first, soon
        self._timer = self.reactor.callLater(delay, self._tick)

    async def _check(self, buddy: Buddy) -> None:
        self.searches += 1
        before = buddy.signature()
        try:
            result = await self.search(buddy.name)
        except VoipError as exc:
            log.info("buddy {name}: no answer: {error}", name=buddy.name, error=exc)
            return
        finally:  # whatever happened, the others get their turn before this one again
            buddy.checked_at = self.reactor.seconds()
        record = getattr(result, "record", None)
        if result.outcome == "not-found":
            buddy.status = "not-found"
        elif result.outcome == "failed" or record is None:
            buddy.status = "unknown"
        else:
            buddy.status = "offline" if result.outcome == "offline" else record.status.value
            if record.status is not Status.INVISIBLE:
                # An invisible buddy's record is fresh: showing its time or NAT kind would
                # tell that they are connected.  They stay "last seen" when last visible.
                buddy.nat_type = record.nat_type
                buddy.last_seen = int(record.issued_at)
            self._check_key(buddy, record.certificate)
        if buddy.name in self.buddies and buddy.signature() != before:
            for listener in list(self.listeners):
                listener(buddy)

    def _check_key(self, buddy: Buddy, certificate: bytes) -> None:
        if self.key_check is None:
            return
        try:
            self.key_check(buddy.name, SignedCertificate.parse(certificate).public_key)
        except VoipError:
            buddy.key_changed = True
        else:
            buddy.key_changed = False

    def _save(self) -> None:
        write_private_file(self.path, json.dumps(sorted(self.buddies)).encode())


def _ago(seconds: float) -> str:
    if seconds < 90:
        return "now"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} days ago"


def buddy_line(buddy: dict[str, Any], now: float) -> str:
    """One line of ``voipctl buddies``: name, status, reach, last seen, a changed key."""
    seen = buddy.get("last_seen")
    when = f"last seen {_ago(now - seen)}" if isinstance(seen, int | float) else ""
    if buddy.get("status") in ("online", "away", "busy"):
        when = ""
    reach = f"({buddy['reach']})" if buddy.get("reach") else ""
    warning = (
        "  KEY CHANGED: voipctl verify " + str(buddy.get("name"))
        if buddy.get("key_changed")
        else ""
    )
    name, status = str(buddy.get("name", "?")), str(buddy.get("status", "?"))
    return f"{name:<16} {status:<10} {reach:<22} {when}{warning}".rstrip()
