"""The supernode's presence index: newest record wins, last-seen reporting, moving ranges."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock

from overlay.certificate import issue
from overlay.identity import IdentityKey
from overlay.index import Digest, NotServed, PresenceIndex
from overlay.keyspace import KEY_SPACE, user_key
from overlay.presence import (
    RETENTION,
    Attachment,
    PresenceError,
    PresenceRecord,
    SignedPresence,
    Status,
    sign,
)

NOW = 1_700_000_000
HOUR = 3600

CA = IdentityKey.from_seed(bytes(range(32)))
OTHER_CA = IdentityKey.from_seed(bytes(range(1, 33)))
SN = Attachment(bytes(range(100, 132)), "203.0.113.7", 7000, 7001)
_KEYS: dict[str, IdentityKey] = {}


def key_of(username: str) -> IdentityKey:
    if username not in _KEYS:
        _KEYS[username] = IdentityKey.generate()
    return _KEYS[username]


def record_of(
    username: str = "alice",
    *,
    sequence: int = 1,
    issued_at: int = NOW,
    lifetime: int = HOUR,
    status: Status = Status.ONLINE,
    ca: IdentityKey = CA,
    signer: IdentityKey | None = None,
) -> SignedPresence:
    user = key_of(username)
    cert = issue(ca, username, user.public_key, serial=1, now=issued_at - 60, lifetime=24 * HOUR)
    record = PresenceRecord(
        username=username,
        certificate=bytes(cert),
        supernode=SN,
        reflexive=None,
        nat_type="unknown",
        status=status,
        sequence=sequence,
        issued_at=issued_at,
        expires_at=issued_at + lifetime,
    )
    return sign(record, signer or user)


def make_index(owns: Any = None, start: float = NOW) -> tuple[PresenceIndex, Clock]:
    clock = Clock()
    clock.advance(start)
    return PresenceIndex(clock, CA.public_key, owns or (lambda key: True)), clock


def in_range(start: int, end: int) -> Any:
    return lambda key: start <= key < end


# -- put: verification, newest wins, replays -----------------------------------------------


def test_newest_sequence_wins_and_older_ones_are_ignored() -> None:
    index, _ = make_index()
    assert index.put(record_of(sequence=1))
    assert index.put(record_of(sequence=3))
    assert not index.put(record_of(sequence=2))
    lookup = index.get("alice")
    assert lookup.state == "found"
    assert lookup.record is not None
    assert lookup.record.sequence == 3
    assert len(index) == 1
    assert (index.stats.accepted, index.stats.stale) == (2, 1)


def test_a_replayed_record_changes_nothing() -> None:
    index, _ = make_index()
    online = record_of(sequence=5)
    assert index.put(bytes(online))
    assert index.put(record_of(sequence=6, status=Status.OFFLINE))
    # Someone replays the old "online" record (as bytes, like off the wire): still offline.
    assert not index.put(bytes(online))
    assert index.get("alice").state == "offline"
    assert index.stats.stale == 1


def test_a_record_with_the_same_sequence_does_not_replace_the_held_one() -> None:
    index, _ = make_index()
    first = record_of(sequence=4, status=Status.ONLINE)
    assert index.put(first)
    assert not index.put(record_of(sequence=4, status=Status.BUSY))
    assert index.get("alice").signed == first


def test_a_record_for_a_key_this_supernode_does_not_serve_is_refused() -> None:
    key = user_key("alice")
    index, _ = make_index(owns=lambda k: k != key)
    with pytest.raises(NotServed) as caught:
        index.put(record_of())
    assert str(caught.value) == "This supernode does not serve the key of alice."
    assert isinstance(caught.value, PresenceError)
    assert caught.value.code == "not-served"
    assert len(index) == 0
    assert index.stats.foreign == 1
    assert index.get("alice").state == "unknown"


def test_a_forged_record_is_refused_and_does_not_displace_the_real_one() -> None:
    index, _ = make_index()
    index.put(record_of(sequence=1))
    forged = record_of(sequence=99, status=Status.OFFLINE, signer=key_of("mallory"))
    with pytest.raises(PresenceError) as caught:
        index.put(forged)
    assert str(caught.value) == "The presence record of alice is not signed by alice's key."
    with pytest.raises(PresenceError) as caught:
        index.put(b"\xff\xfe")
    assert str(caught.value) == "The presence record is not valid CBOR."
    assert index.stats.bad == 2
    lookup = index.get("alice")
    assert lookup.state == "found"
    assert lookup.record is not None
    assert lookup.record.sequence == 1


def test_a_record_already_past_retention_is_not_stored() -> None:
    index, _ = make_index()
    assert not index.put(record_of(issued_at=NOW - RETENTION))
    assert len(index) == 0
    assert index.stats.stale == 1
    assert index.put(record_of(issued_at=NOW - RETENTION + 1))


# -- get: found, offline with last seen, unknown -------------------------------------------


def test_online_then_expired_is_offline_with_last_seen_until_72_hours_then_unknown() -> None:
    index, clock = make_index()
    index.put(record_of(issued_at=NOW, lifetime=HOUR))
    assert index.get("alice").state == "found"

    clock.advance(HOUR - 1)
    assert index.get("Alice").state == "found"  # users may type capitals

    clock.advance(1)  # the record expired: alice did not refresh it
    lookup = index.get("alice")
    assert (lookup.state, lookup.last_seen) == ("offline", NOW)

    clock.advance(RETENTION - HOUR - 1)  # one second before 72 h after issue
    assert index.expire() == 0
    assert (index.get("alice").state, index.get("alice").last_seen) == ("offline", NOW)

    clock.advance(1)
    assert index.expire() == 1
    assert len(index) == 0
    lookup = index.get("alice")
    assert (lookup.state, lookup.record, lookup.last_seen) == ("unknown", None, None)
    assert index.stats.purged == 1


def test_a_refreshed_record_keeps_the_user_found_and_moves_last_seen() -> None:
    index, clock = make_index()
    index.put(record_of(sequence=1, issued_at=NOW))
    clock.advance(50 * 60)
    index.put(record_of(sequence=2, issued_at=NOW + 50 * 60))
    clock.advance(20 * 60)  # past the first record's expiry, within the second's
    assert index.get("alice").state == "found"
    clock.advance(HOUR)
    assert index.get("alice").last_seen == NOW + 50 * 60


def test_an_explicit_offline_record_reports_offline_while_current() -> None:
    index, _ = make_index()
    index.put(record_of(status=Status.OFFLINE))
    lookup = index.get("alice")
    assert lookup.state == "offline"
    assert lookup.last_seen == NOW


def test_away_busy_and_invisible_records_are_found() -> None:
    index, _ = make_index()
    for name, status in [("anna", Status.AWAY), ("bert", Status.BUSY), ("cleo", Status.INVISIBLE)]:
        index.put(record_of(name, status=status))
        lookup = index.get(name)
        assert lookup.state == "found"
        assert lookup.record is not None
        assert lookup.record.status is status


def test_get_forgets_a_record_past_retention_even_before_expire_runs() -> None:
    index, clock = make_index()
    index.put(record_of())
    clock.advance(RETENTION)
    assert index.get("alice").state == "unknown"
    assert len(index) == 0


def test_expire_drops_only_the_records_past_retention() -> None:
    index, clock = make_index()
    index.put(record_of("old-user", issued_at=NOW))
    clock.advance(10 * HOUR)
    index.put(record_of("new-user", issued_at=NOW + 10 * HOUR))
    clock.advance(RETENTION - 10 * HOUR)
    assert index.expire() == 1
    assert "old-user" not in index
    assert index.get("new-user").state == "offline"


def test_unknown_and_invalid_names_are_unknown() -> None:
    index, _ = make_index()
    assert index.get("nobody").state == "unknown"
    assert index.get("\u212a\u212a\u212a").state == "unknown"  # KELVIN SIGN lowers to "k"


# -- moving records between supernodes -----------------------------------------------------

NAMES = [f"user{i:02d}" for i in range(40)]
MIDDLE = KEY_SPACE // 2


def filled_index(owns: Any = None) -> PresenceIndex:
    index, _ = make_index(owns)
    for name in NAMES:
        index.put(record_of(name))
    return index


def test_export_and_import_move_exactly_the_records_of_a_range() -> None:
    source = filled_index()
    upper = sorted(n for n in NAMES if user_key(n) >= MIDDLE)
    assert 0 < len(upper) < len(NAMES)  # the test means something

    exported = source.export(MIDDLE, KEY_SPACE)
    assert sorted(SignedPresence.parse(d).record.username for d in exported) == upper
    keys = [user_key(SignedPresence.parse(d).record.username) for d in exported]
    assert keys == sorted(keys)

    target, _ = make_index(owns=in_range(MIDDLE, KEY_SPACE))
    assert target.import_records(exported) == len(upper)
    assert len(target) == len(upper)
    assert all(target.get(name).state == "found" for name in upper)
    assert target.digest() == source.digest(MIDDLE, KEY_SPACE)

    # The source hands the range over and forgets it.
    assert source.drop(MIDDLE, KEY_SPACE) == len(upper)
    assert len(source) == len(NAMES) - len(upper)
    assert source.export(MIDDLE, KEY_SPACE) == []


def test_export_range_includes_its_start_and_excludes_its_end() -> None:
    index, _ = make_index()
    index.put(record_of("alice"))
    key = user_key("alice")
    assert len(index.export(key, key + 1)) == 1
    assert index.export(0, key) == []
    assert index.export(key + 1, KEY_SPACE) == []
    assert index.digest(key, key + 1).count == 1
    assert index.digest(0, key).count == 0


def test_import_of_the_whole_index_keeps_only_the_served_range() -> None:
    source = filled_index()
    target, _ = make_index(owns=in_range(0, MIDDLE))
    lower = [n for n in NAMES if user_key(n) < MIDDLE]
    assert target.import_records(source.export(0, KEY_SPACE)) == len(lower)
    assert target.stats.foreign == len(NAMES) - len(lower)
    assert target.stats.bad == 0


def test_import_skips_forged_and_malformed_items_and_counts_them() -> None:
    good = record_of("alice")
    forged = record_of("bob", signer=key_of("mallory"))
    other_ca = record_of("carol", ca=OTHER_CA)
    items: list[Any] = [bytes(forged), b"\xa0", bytes(good), "not bytes", bytes(other_ca)]
    index, _ = make_index()
    assert index.import_records(items) == 1
    assert index.stats.bad == 4
    assert index.stats.accepted == 1
    assert index.get("alice").state == "found"
    assert index.get("bob").state == "unknown"
    assert index.get("carol").state == "unknown"


def test_import_keeps_the_newest_of_each_user() -> None:
    index, _ = make_index()
    index.put(record_of("alice", sequence=5))
    batch = [bytes(record_of("alice", sequence=s)) for s in (4, 7, 6)]
    assert index.import_records(batch) == 1
    record = index.get("alice").record
    assert record is not None
    assert record.sequence == 7


def test_bad_ranges_are_refused() -> None:
    index, _ = make_index()
    for start, end in [(-1, 5), (5, 4), (0, KEY_SPACE + 1)]:
        with pytest.raises(ValueError, match="bad key range"):
            index.export(start, end)


# -- digest ---------------------------------------------------------------------------------


def test_digest_is_order_independent_and_notices_divergence() -> None:
    a, _ = make_index()
    b, _ = make_index()
    records = [record_of(name) for name in NAMES[:10]]
    for item in records:
        a.put(item)
    for item in reversed(records):
        b.put(item)
    assert a.digest() == b.digest()
    assert a.digest().count == 10

    b.put(record_of(NAMES[3], sequence=2))  # a newer record that a missed
    assert a.digest().count == b.digest().count
    assert a.digest() != b.digest()
    a.put(record_of(NAMES[3], sequence=2))
    assert a.digest() == b.digest()

    empty, _ = make_index()
    assert empty.digest() == Digest(0, 0)


def test_digest_leaves_out_records_past_retention() -> None:
    # Whether a replica has purged a record past retention yet is no difference to repair.
    a, clock = make_index()
    b, _ = make_index()
    old = record_of(NAMES[0], lifetime=HOUR)
    a.put(old)
    clock.advance(RETENTION - 10)
    fresh = record_of(NAMES[1], issued_at=NOW + RETENTION - 10)
    a.put(fresh)
    assert a.digest().count == 2
    clock.advance(20)  # the first record is past retention now, still in the index
    assert NAMES[0] in a
    b.clock = clock
    b.put(fresh)
    assert a.digest() == b.digest()
    assert a.digest().count == 1


def test_the_fingerprint_travels_as_16_bytes() -> None:
    index, _ = make_index()
    assert index.digest().fingerprint_bytes == bytes(16)
    index.put(record_of(NAMES[0]))
    wire = index.digest().fingerprint_bytes
    assert len(wire) == 16
    assert int.from_bytes(wire, "big") == index.digest().fingerprint != 0
