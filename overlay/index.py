"""The presence records of the slot a supernode serves.

Every supernode of a slot holds every record whose user key falls in the slot's range.  The
index verifies each record before keeping it (a supernode cannot forge records, and must not
spread forged ones), keeps only the newest (highest ``sequence``) record of each user, so a
replayed old record changes nothing, and answers lookups:

- ``found``: the newest record is in force and not "offline";
- ``offline``: the newest record has expired or says "offline"; it still tells when the user
  was last seen, for ``RETENTION`` (72 h) after it was issued;
- ``unknown``: no record, or only one older than that.

``expire()`` drops records past retention; the owner runs it periodically (a ``TimerService``).
``export``/``import_records`` move records between supernodes when slots split or merge and when
a new supernode pulls its slot; ``digest()`` lets slot peers notice that they disagree.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from twisted.internet.interfaces import IReactorTime

from overlay.keyspace import KEY_SPACE, user_key
from overlay.presence import (
    RETENTION,
    PresenceError,
    PresenceRecord,
    SignedPresence,
    Status,
    is_current,
    last_seen,
)

State = Literal["found", "offline", "unknown"]


class NotServed(PresenceError):
    """This supernode does not serve that user's key."""

    code = "not-served"


@dataclass(frozen=True)
class Lookup:
    """What the index knows about a user."""

    state: State
    signed: SignedPresence | None = None

    @property
    def record(self) -> PresenceRecord | None:
        return None if self.signed is None else self.signed.record

    @property
    def last_seen(self) -> int | None:
        return None if self.signed is None else last_seen(self.signed.record)


@dataclass
class IndexStats:
    """Counters, for ``voipctl status`` on a supernode and for the benchmarks."""

    accepted: int = 0
    #: not newer than the record held (replays, duplicates from slot peers) or past retention
    stale: int = 0
    #: malformed, forged or otherwise failing verification
    bad: int = 0
    #: for a key this supernode does not serve
    foreign: int = 0
    #: dropped by ``expire`` (or found past retention by ``get``)
    purged: int = 0


#: Bytes of a record's hash, and so of a digest's fingerprint.
FINGERPRINT_SIZE = 16


@dataclass(frozen=True)
class Digest:
    """A small summary of a range of the index: equal digests mean (almost surely) equal data."""

    count: int
    fingerprint: int

    @property
    def fingerprint_bytes(self) -> bytes:
        """The fingerprint as it travels (``digest-reply``): 16 bytes, big-endian."""
        return self.fingerprint.to_bytes(FINGERPRINT_SIZE, "big")


def _hash(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=FINGERPRINT_SIZE).digest())


@dataclass(frozen=True)
class _Entry:
    key: int
    signed: SignedPresence
    data: bytes
    hash: int


class PresenceIndex:
    def __init__(
        self, clock: IReactorTime, ca_public_key: bytes, owns: Callable[[int], bool]
    ) -> None:
        self.clock = clock
        self.ca_public_key = ca_public_key
        self.owns = owns
        self.stats = IndexStats()
        self._entries: dict[str, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, username: object) -> bool:
        return username in self._entries

    def put(self, signed: SignedPresence | bytes) -> bool:
        """Store a record; True when it is now the user's newest.

        False (and nothing changes) when the index already holds a record with the same or a
        higher sequence, or the record is past retention.  ``PresenceError`` when the record is
        bad, ``NotServed`` (a ``PresenceError``) when its key is not served here.
        """
        # Parsed again even when given a SignedPresence: what we serve must parse for others.
        data = bytes(signed) if isinstance(signed, SignedPresence) else signed
        try:
            signed = SignedPresence.parse(data)
        except PresenceError:
            self.stats.bad += 1
            raise
        username = signed.record.username
        key = user_key(username)
        if not self.owns(key):
            self.stats.foreign += 1
            raise NotServed(f"This supernode does not serve the key of {username}.")
        held = self._entries.get(username)
        if held is not None and held.data == data:
            self.stats.stale += 1  # the very record we hold (a pull, push or store again):
            return False  # verified when it came first
        try:
            presence = signed.verify(self.ca_public_key, self.clock.seconds())
        except PresenceError:
            self.stats.bad += 1
            raise
        if (held is not None and presence.sequence <= held.signed.record.sequence) or (
            self._past_retention(presence)
        ):
            self.stats.stale += 1
            return False
        data = bytes(signed)
        self._entries[username] = _Entry(key, signed, data, _hash(data))
        self.stats.accepted += 1
        return True

    def get(self, username: str) -> Lookup:
        """What to answer a search for ``username`` (canonical or not)."""
        name = username.lower() if username.isascii() else username
        entry = self._entries.get(name)
        if entry is None:
            return Lookup("unknown")
        presence = entry.signed.record
        if self._past_retention(presence):
            del self._entries[name]
            self.stats.purged += 1
            return Lookup("unknown")
        if presence.status is Status.OFFLINE or not is_current(presence, self.clock.seconds()):
            return Lookup("offline", entry.signed)
        return Lookup("found", entry.signed)

    def expire(self) -> int:
        """Drop the records past retention; how many were dropped."""
        old = [name for name, e in self._entries.items() if self._past_retention(e.signed.record)]
        for name in old:
            del self._entries[name]
        self.stats.purged += len(old)
        return len(old)

    def export(self, prefix_start: int, prefix_end: int) -> list[bytes]:
        """The records whose key is in [prefix_start, prefix_end), ordered by key."""
        _check_range(prefix_start, prefix_end)
        chosen = [e for e in self._entries.values() if prefix_start <= e.key < prefix_end]
        chosen.sort(key=lambda e: (e.key, e.signed.record.username))
        return [e.data for e in chosen]

    def import_records(self, items: Iterable[bytes | SignedPresence]) -> int:
        """Store each valid record we serve (newest wins); never raises for a bad item.

        Bad and foreign items are counted in ``stats``; returns how many were accepted.
        """
        accepted = 0
        for item in items:
            try:
                accepted += self.put(item)
            except PresenceError:
                continue
        return accepted

    def drop(self, prefix_start: int, prefix_end: int) -> int:
        """Forget the records of [prefix_start, prefix_end) (a range no longer served here)."""
        _check_range(prefix_start, prefix_end)
        gone = [n for n, e in self._entries.items() if prefix_start <= e.key < prefix_end]
        for name in gone:
            del self._entries[name]
        return len(gone)

    def digest(self, prefix_start: int = 0, prefix_end: int = KEY_SPACE) -> Digest:
        """Count and XOR of the records' hashes over a key range (order-independent).

        Records past retention are left out: whether a replica has purged one yet is no
        difference worth repairing.
        """
        _check_range(prefix_start, prefix_end)
        count = fingerprint = 0
        for entry in self._entries.values():
            if prefix_start <= entry.key < prefix_end and not self._past_retention(
                entry.signed.record
            ):
                count += 1
                fingerprint ^= entry.hash
        return Digest(count, fingerprint)

    def _past_retention(self, presence: PresenceRecord) -> bool:
        return self.clock.seconds() >= presence.issued_at + RETENTION


def _check_range(start: int, end: int) -> None:
    if not 0 <= start <= end <= KEY_SPACE:
        raise ValueError(f"bad key range [{start}, {end})")
