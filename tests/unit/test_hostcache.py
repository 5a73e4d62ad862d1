"""The ordinary node's host cache: ranking, RTT average, demotion, bounds, persistence."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from overlay.hostcache import HostCache, HostCacheError
from overlay.slotmap import SupernodeInfo

DAY = 24 * 3600.0


def sn(n: int) -> SupernodeInfo:
    return SupernodeInfo(
        node_id=n.to_bytes(32, "big"),
        host=f"198.51.100.{n % 250 + 1}",
        tcp_port=7000 + n,
        udp_port=9000,
    )


def ids(infos: list[SupernodeInfo]) -> list[int]:
    return [int.from_bytes(i.node_id, "big") for i in infos]


def make(tmp_path: Path | None = None, **kwargs: int) -> tuple[HostCache, Clock]:
    clock = Clock()
    clock.advance(1_700_000_000)
    path = tmp_path / "hostcache.json" if tmp_path is not None else None
    return HostCache(path, clock, **kwargs), clock


def test_measured_first_by_rtt_then_unprobed_then_failed() -> None:
    cache, _ = make()
    cache.add([sn(1), sn(2), sn(3), sn(4), sn(5)], "login")
    cache.record_rtt(sn(3).node_id, 0.080)
    cache.record_rtt(sn(5).node_id, 0.020)
    cache.record_rtt(sn(1).node_id, 0.050)
    for _ in range(3):
        cache.record_failure(sn(1).node_id)
    assert ids(cache.ranked()) == [5, 3, 2, 4, 1]
    assert ids(cache.ranked(exclude=[sn(5).node_id, sn(2).node_id])) == [3, 4, 1]


def test_unprobed_entries_most_recently_seen_first() -> None:
    cache, clock = make()
    cache.add([sn(1), sn(2)], "login")
    clock.advance(60)
    cache.add([sn(3)], "supernode")
    assert ids(cache.ranked()) == [3, 1, 2]


def test_rtt_is_a_moving_average() -> None:
    cache, _ = make()
    cache.add([sn(1), sn(2)], "login")
    cache.record_rtt(sn(1).node_id, 0.100)
    cache.record_rtt(sn(1).node_id, 0.200)
    entry = cache.entry(sn(1).node_id)
    assert entry is not None
    assert entry.rtt == pytest.approx(0.125)
    # One slow probe does not push a usually fast supernode behind a steady 0.140 one.
    cache.record_rtt(sn(2).node_id, 0.140)
    cache.record_rtt(sn(1).node_id, 0.300)
    assert entry.rtt is not None
    assert ids(cache.ranked()) == [2, 1]  # 0.125 * 0.75 + 0.3 * 0.25 = 0.169
    cache.record_rtt(sn(1).node_id, 0.050)
    assert ids(cache.ranked()) == [1, 2]  # 0.139
    with pytest.raises(ValueError, match="bad round-trip time -1"):
        cache.record_rtt(sn(1).node_id, -1)


def test_three_failures_in_a_row_demote_and_a_success_restores() -> None:
    cache, _ = make()
    cache.add([sn(1), sn(2), sn(3)], "login")
    cache.record_rtt(sn(1).node_id, 0.010)
    cache.record_rtt(sn(2).node_id, 0.090)
    cache.record_failure(sn(1).node_id)
    cache.record_failure(sn(1).node_id)
    assert ids(cache.ranked()) == [1, 2, 3]  # two failures: still the best
    cache.record_failure(sn(1).node_id)
    assert ids(cache.ranked()) == [2, 3, 1]  # third in a row: last, even behind unprobed
    cache.record_rtt(sn(1).node_id, 0.010)
    assert ids(cache.ranked()) == [1, 2, 3]
    entry = cache.entry(sn(1).node_id)
    assert entry is not None
    assert entry.failures == 0


def test_learning_again_keeps_failures_but_a_new_address_forgets_them() -> None:
    cache, _ = make()
    cache.add([sn(1), sn(2)], "login")
    for _ in range(3):
        cache.record_failure(sn(1).node_id)
    cache.add([sn(1)], "supernode")  # another SN still lists it: it stays demoted
    assert ids(cache.ranked()) == [2, 1]
    moved = SupernodeInfo(node_id=sn(1).node_id, host="203.0.113.9", tcp_port=7000, udp_port=9000)
    cache.add([moved], "supernode")
    entry = cache.entry(sn(1).node_id)
    assert entry is not None
    assert (entry.info, entry.failures, entry.rtt, entry.source) == (moved, 0, None, "supernode")
    assert ids(cache.ranked()) == [1, 2]


def test_unknown_node_ids_and_sources() -> None:
    cache, _ = make()
    cache.record_rtt(b"\x07" * 32, 0.1)  # a probe answering after its entry was removed
    cache.record_failure(b"\x07" * 32)
    cache.remove(b"\x07" * 32)
    assert len(cache) == 0
    with pytest.raises(ValueError, match="unknown host cache source 'gossip'"):
        cache.add([sn(1)], "gossip")


def test_bounded_to_max_entries_evicting_the_worst() -> None:
    cache, _ = make()
    cache.add([sn(n) for n in range(1, 201)], "login")
    for n in range(1, 201):
        cache.record_rtt(sn(n).node_id, n / 1000)
    for _ in range(3):
        cache.record_failure(sn(7).node_id)
    assert len(cache) == 200
    cache.add([sn(201)], "supernode")
    assert len(cache) == 200
    assert sn(7).node_id not in cache  # the demoted one went
    assert sn(201).node_id in cache
    # Measured supernodes are kept over an unmeasured newcomer; between two unmeasured
    # ones seen at the same time, the one learned first stays.
    cache.add([sn(202)], "supernode")
    assert len(cache) == 200
    assert sn(202).node_id not in cache
    assert ids(cache.ranked()) == list(range(1, 7)) + list(range(8, 202))


def test_eviction_respects_a_small_bound() -> None:
    cache, _ = make(max_entries=3)
    cache.add([sn(1), sn(2), sn(3), sn(4), sn(5)], "login")
    assert ids(cache.ranked()) == [1, 2, 3]


def test_unseen_for_seven_days_is_dropped() -> None:
    cache, clock = make()
    cache.add([sn(1), sn(2), sn(3)], "login")
    clock.advance(3 * DAY)
    cache.record_rtt(sn(2).node_id, 0.05)  # answering a probe counts as seen
    cache.add([sn(3)], "supernode")  # so does being listed again
    clock.advance(4 * DAY - 1)
    assert len(cache) == 3
    clock.advance(2)
    assert len(cache) == 2
    assert ids(cache.ranked()) == [2, 3]
    assert cache.entry(sn(1).node_id) is None
    clock.advance(3 * DAY)
    assert ids(cache.ranked()) == []


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    cache, clock = make(tmp_path)
    cache.add([sn(1), sn(2)], "login")
    cache.add([sn(3)], "supernode")
    cache.add([sn(4)], "probe")
    cache.record_rtt(sn(3).node_id, 0.030)
    cache.record_rtt(sn(2).node_id, 0.060)
    cache.record_failure(sn(2).node_id)
    for _ in range(3):
        cache.record_failure(sn(1).node_id)
    cache.save()

    again = HostCache(cache.path, clock)
    assert again.load() == 4
    assert again.load_error is None
    assert again.ranked() == cache.ranked()
    assert ids(again.ranked()) == [3, 2, 4, 1]
    for n in range(1, 5):
        before, after = cache.entry(sn(n).node_id), again.entry(sn(n).node_id)
        assert before is not None
        assert after is not None
        assert (after.info, after.source, after.last_seen, after.rtt, after.failures) == (
            before.info,
            before.source,
            before.last_seen,
            before.rtt,
            before.failures,
        )
    assert [again.entry(sn(n).node_id).source for n in (1, 3, 4)] == [
        "login",
        "supernode",
        "probe",
    ]


def test_saved_file_is_private_and_replaced_atomically(tmp_path: Path) -> None:
    cache, _ = make(tmp_path)
    assert cache.path is not None
    cache.path.write_text("old")
    cache.path.chmod(0o644)
    cache.add([sn(1)], "login")
    cache.save()
    assert stat.S_IMODE(os.stat(cache.path).st_mode) == 0o600
    assert os.listdir(tmp_path) == ["hostcache.json"]  # no temporary file left behind
    assert json.loads(cache.path.read_text())["entries"][0]["host"] == sn(1).host


def test_entries_expired_while_stopped_are_not_loaded(tmp_path: Path) -> None:
    cache, clock = make(tmp_path)
    cache.add([sn(1)], "login")
    clock.advance(5 * DAY)
    cache.add([sn(2)], "login")
    cache.save()
    clock.advance(3 * DAY)
    again = HostCache(cache.path, clock)
    assert again.load() == 1
    assert ids(again.ranked()) == [2]


def test_load_keeps_the_best_when_the_bound_shrank(tmp_path: Path) -> None:
    cache, clock = make(tmp_path)
    cache.add([sn(1), sn(2), sn(3)], "login")
    cache.record_rtt(sn(3).node_id, 0.01)
    cache.save()
    small = HostCache(cache.path, clock, max_entries=2)
    assert small.load() == 2
    assert ids(small.ranked()) == [3, 1]


def test_missing_file_is_a_first_start(tmp_path: Path) -> None:
    cache, _ = make(tmp_path)
    assert cache.load() == 0
    assert cache.load_error is None
    memory, _ = make()
    memory.add([sn(1)], "login")
    memory.save()  # no path: nothing to write, no error
    assert memory.load() == 0
    assert memory.load_error is None


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"\x00\xff garbage", "not JSON"),
        (b'{"version": 1, "entries": [', "not JSON"),
        (b"[]", "unknown format version"),
        (b'{"version": 99, "entries": []}', "unknown format version"),
        (b'{"version": 1}', "no list of entries"),
        (b'{"version": 1, "entries": [7]}', "entry 0 is not an object"),
        (b'{"version": 1, "entries": [{"node_id": "abcd"}]}', "entry 0 has no valid node_id"),
        (b'{"version": 1, "entries": [{"node_id": "zz"}]}', "entry 0 has no valid node_id"),
    ],
)
def test_damaged_file_starts_empty_and_says_why(tmp_path: Path, content: bytes, why: str) -> None:
    cache, _ = make(tmp_path)
    assert cache.path is not None
    cache.add([sn(1)], "login")
    cache.path.write_bytes(content)
    assert cache.load() == 0
    assert len(cache) == 0
    assert cache.load_error == (f"The host cache {cache.path} is damaged ({why}); starting empty.")
    # The next save repairs the file.
    cache.add([sn(2)], "login")
    cache.save()
    assert cache.load() == 1
    assert cache.load_error is None


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        ("host", "", "has no valid host"),
        ("host", "h" * 254, "is refused: A supernode host must be 1-253 characters"),
        ("tcp_port", 70000, "has an invalid port"),
        ("tcp_port", 0, "has an invalid port"),
        ("udp_port", True, "has an invalid port"),
        ("source", "rumour", "has an unknown source"),
        ("last_seen", "yesterday", "has no valid last_seen"),
        ("rtt", -0.5, "has an invalid rtt"),
        ("failures", -1, "has an invalid failure count"),
    ],
)
def test_one_bad_entry_is_reported(tmp_path: Path, field: str, value: object, why: str) -> None:
    cache, clock = make(tmp_path)
    assert cache.path is not None
    cache.add([sn(1), sn(2)], "login")
    cache.save()
    document = json.loads(cache.path.read_text())
    document["entries"][1][field] = value
    cache.path.write_text(json.dumps(document))
    again = HostCache(cache.path, clock)
    assert again.load() == 0
    assert (
        again.load_error
        == f"The host cache {cache.path} is damaged (entry 1 {why}); starting empty."
    )


def test_unreadable_file_is_reported(tmp_path: Path) -> None:
    cache, _ = make(tmp_path)
    assert cache.path is not None
    cache.path.mkdir()
    assert cache.load() == 0
    assert cache.load_error == f"Cannot read the host cache {cache.path}: Is a directory."


def test_save_failure_names_the_host_cache(tmp_path: Path) -> None:
    clock = Clock()
    cache = HostCache(tmp_path / "missing" / "hostcache.json", clock)
    cache.add([sn(1)], "login")
    with pytest.raises(HostCacheError) as caught:
        cache.save()
    assert str(caught.value) == (
        f"The supernode host cache was not saved: Cannot write {cache.path}: "
        "No such file or directory."
    )
