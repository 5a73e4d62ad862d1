"""The ordinary node's host cache: the supernodes it knows, best first.

An ordinary node learns supernodes at login, from its supernode and from probes; it measures
their round-trip time over UDP and attaches to the best.  The cache keeps, per supernode, how to
reach it, a smoothed RTT (EWMA), when it was last seen, how many probes in a row failed and where
it was learned.  Ranking: measured supernodes by RTT, then never-measured ones (most recently
seen first), then those that failed ``FAILURES_TO_DEMOTE`` times in a row.  An entry unseen for
``MAX_UNSEEN`` seconds is dropped; beyond ``max_entries`` the worst entries are evicted.

The cache is persisted as JSON, written atomically with mode 0600.  A damaged file never stops
the node: ``load()`` starts empty and says why in ``load_error``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from twisted.internet.interfaces import IReactorTime

from overlay.errors import KeyFileError, VoipError
from overlay.identity import write_private_file
from overlay.slotmap import SupernodeInfo

SOURCES = ("login", "supernode", "probe")
FAILURES_TO_DEMOTE = 3
MAX_UNSEEN = 7 * 24 * 3600.0
RTT_WEIGHT = 0.25  # weight of a new RTT sample in the moving average
FORMAT_VERSION = 1
_MAX_FILE = 1 << 20


class HostCacheError(VoipError):
    """The supernode host cache could not be written."""

    code = "host-cache"


@dataclass
class HostEntry:
    info: SupernodeInfo
    source: str
    last_seen: float
    rtt: float | None = None
    failures: int = 0
    order: int = 0  # insertion order, the last tie-break

    @property
    def demoted(self) -> bool:
        return self.failures >= FAILURES_TO_DEMOTE

    def rank_key(self) -> tuple[int, float, int, float, int]:
        """Measured (by RTT), then unmeasured, then demoted; then fewer failures, newer."""
        tier = 2 if self.demoted else 1 if self.rtt is None else 0
        rtt = self.rtt if self.rtt is not None and tier == 0 else 0.0
        return (tier, rtt, self.failures, -self.last_seen, self.order)


class HostCache:
    """Up to ``max_entries`` supernodes, ranked; persisted at ``path`` (None: memory only)."""

    def __init__(self, path: Path | None, clock: IReactorTime, max_entries: int = 200) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.path = path
        self.clock = clock
        self.max_entries = max_entries
        self.load_error: str | None = None
        self._entries: dict[bytes, HostEntry] = {}
        self._counter = 0

    # -- learning -----------------------------------------------------------------------

    def add(self, infos: Iterable[SupernodeInfo], source: str) -> None:
        """Learn (or refresh) supernodes.  A changed address forgets the old measurements."""
        if source not in SOURCES:
            raise ValueError(f"unknown host cache source {source!r}")
        now = self.clock.seconds()
        for info in infos:
            entry = self._entries.get(info.node_id)
            if entry is None:
                self._counter += 1
                self._entries[info.node_id] = HostEntry(info, source, now, order=self._counter)
                continue
            if entry.info != info:
                entry.info, entry.rtt, entry.failures = info, None, 0
            entry.source = source
            entry.last_seen = max(entry.last_seen, now)
        self._trim()

    def record_rtt(self, node_id: bytes, seconds: float) -> None:
        """A probe answered after ``seconds``: update the average, clear the failures."""
        entry = self._entries.get(node_id)
        if entry is None:
            return
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"bad round-trip time {seconds!r}")
        if entry.rtt is None:
            entry.rtt = seconds
        else:
            entry.rtt = (1 - RTT_WEIGHT) * entry.rtt + RTT_WEIGHT * seconds
        entry.failures = 0
        entry.last_seen = max(entry.last_seen, self.clock.seconds())

    def record_failure(self, node_id: bytes) -> None:
        """A probe or connection attempt failed; after three in a row the entry ranks last."""
        entry = self._entries.get(node_id)
        if entry is not None:
            entry.failures += 1

    def remove(self, node_id: bytes) -> None:
        self._entries.pop(node_id, None)

    # -- reading ------------------------------------------------------------------------

    def ranked(self, exclude: Iterable[bytes] = ()) -> list[SupernodeInfo]:
        """Supernodes best first, without those whose node id is in ``exclude``."""
        self._expire()
        skip = set(exclude)
        entries = sorted(self._entries.values(), key=HostEntry.rank_key)
        return [e.info for e in entries if e.info.node_id not in skip]

    def entry(self, node_id: bytes) -> HostEntry | None:
        """A copy of what the cache knows about one supernode."""
        self._expire()
        entry = self._entries.get(node_id)
        return replace(entry) if entry is not None else None

    def __len__(self) -> int:
        self._expire()
        return len(self._entries)

    def __contains__(self, node_id: object) -> bool:
        self._expire()
        return node_id in self._entries

    # -- bounds -------------------------------------------------------------------------

    def _expire(self) -> None:
        limit = self.clock.seconds() - MAX_UNSEEN
        for node_id in [k for k, e in self._entries.items() if e.last_seen < limit]:
            del self._entries[node_id]

    def _trim(self) -> None:
        self._expire()
        if len(self._entries) <= self.max_entries:
            return
        keep = sorted(self._entries.values(), key=HostEntry.rank_key)[: self.max_entries]
        self._entries = {e.info.node_id: e for e in sorted(keep, key=lambda e: e.order)}

    # -- persistence --------------------------------------------------------------------

    def save(self) -> None:
        """Write the cache atomically (temporary file, fsync, rename), mode 0600."""
        if self.path is None:
            return
        self._expire()
        document = {
            "version": FORMAT_VERSION,
            "entries": [_entry_to_json(e) for e in self._entries.values()],
        }
        data = json.dumps(document, indent=1, sort_keys=True).encode("utf-8")
        try:
            write_private_file(self.path, data)
        except KeyFileError as exc:
            raise HostCacheError(f"The supernode host cache was not saved: {exc}") from None

    def load(self) -> int:
        """Replace the entries with the saved ones; returns how many were loaded.

        Never raises on a bad file: the cache starts empty and ``load_error`` says why.
        A missing file is not an error (first start).
        """
        self._entries = {}
        self.load_error = None
        if self.path is None:
            return 0
        try:
            with self.path.open("rb") as handle:
                data = handle.read(_MAX_FILE + 1)
        except FileNotFoundError:
            return 0
        except OSError as exc:
            self.load_error = f"Cannot read the host cache {self.path}: {exc.strerror}."
            return 0
        try:
            if len(data) > _MAX_FILE:
                raise ValueError("the file is too large")
            entries = _parse(data)
        except ValueError as exc:
            self.load_error = f"The host cache {self.path} is damaged ({exc}); starting empty."
            return 0
        for entry in entries:
            self._counter += 1
            entry.order = self._counter
            self._entries[entry.info.node_id] = entry
        self._trim()
        return len(self._entries)


def _entry_to_json(entry: HostEntry) -> dict[str, Any]:
    info = entry.info
    return {
        "node_id": info.node_id.hex(),
        "host": info.host,
        "tcp_port": info.tcp_port,
        "udp_port": info.udp_port,
        "source": entry.source,
        "last_seen": entry.last_seen,
        "rtt": entry.rtt,
        "failures": entry.failures,
    }


def _parse(data: bytes) -> list[HostEntry]:
    """The entries of a saved cache; ``ValueError`` naming the first problem."""
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("not JSON") from None
    if not isinstance(document, dict) or document.get("version") != FORMAT_VERSION:
        raise ValueError("unknown format version")
    items = document.get("entries")
    if not isinstance(items, list):
        raise ValueError("no list of entries")
    entries: dict[bytes, HostEntry] = {}
    for index, item in enumerate(items):
        entry = _parse_entry(item, f"entry {index}")
        entries[entry.info.node_id] = entry
    return list(entries.values())


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


#: field -> (check, what is wrong when it fails); one row per saved field
_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "host": (lambda v: isinstance(v, str) and bool(v), "has no valid host"),
    "tcp_port": (lambda v: _count(v) and 0 < v <= 65535, "has an invalid port"),
    "udp_port": (lambda v: _count(v) and 0 < v <= 65535, "has an invalid port"),
    "source": (lambda v: v in SOURCES, "has an unknown source"),
    "last_seen": (_number, "has no valid last_seen"),
    "rtt": (lambda v: v is None or (_number(v) and v >= 0), "has an invalid rtt"),
    "failures": (_count, "has an invalid failure count"),
}


def _parse_entry(item: Any, where: str) -> HostEntry:
    if not isinstance(item, dict):
        raise ValueError(f"{where} is not an object")
    try:
        node_id = bytes.fromhex(item["node_id"])
    except (KeyError, TypeError, ValueError):
        node_id = b""
    if len(node_id) != 32:
        raise ValueError(f"{where} has no valid node_id")
    values: dict[str, Any] = {name: item.get(name) for name in _FIELDS}
    for name, (valid, wrong) in _FIELDS.items():
        if not valid(values[name]):
            raise ValueError(f"{where} {wrong}")
    try:
        info = SupernodeInfo(
            node_id=node_id,
            host=values["host"],
            tcp_port=values["tcp_port"],
            udp_port=values["udp_port"],
        )
    except ValueError as exc:  # SupernodeInfo may check its own fields
        raise ValueError(f"{where} is refused: {str(exc).rstrip('.')}") from None
    rtt = values["rtt"]
    return HostEntry(
        info,
        values["source"],
        float(values["last_seen"]),
        None if rtt is None else float(rtt),
        values["failures"],
    )
