"""The buddy list (client.buddies): persistence, refresh at a bounded rate, change events.

The search is a stand-in returning results of the real shape; the real overlay search serves
the list end to end in tests/integration/test_presence_cli.py.
"""

from __future__ import annotations

import json
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from client.buddies import MAX_RATE, BuddyError, BuddyList, buddy_line
from client.keypins import KeyPins
from overlay.certificate import issue
from overlay.errors import VoipError
from overlay.identity import IdentityKey
from overlay.presence import Status

CA = IdentityKey.from_seed(bytes(32))
BOB_KEY = IdentityKey.from_seed(bytes(31) + b"\x02")
MALLORY_KEY = IdentityKey.from_seed(bytes(31) + b"\x03")


@dataclass
class Record:
    status: Status
    nat_type: str
    issued_at: int
    certificate: bytes = b""


@dataclass
class Result:
    outcome: str
    record: Record | None


class World:
    def __init__(self, tmp: Path, refresh: float = 30.0) -> None:
        self.clock = Clock()
        self.people: dict[str, Result] = {}
        self.asked: list[tuple[float, str]] = []
        self.pins = KeyPins(tmp / "pins.json", clock=self.clock.seconds)
        self.buddies = BuddyList(
            self.clock, tmp / "buddies.json", self.search, self.pins.check, refresh=refresh
        )
        self.buddies.start()
        self.changes: list[tuple[str, str]] = []
        self.buddies.listeners.append(lambda b: self.changes.append((b.name, b.status)))

    def search(self, name: str) -> Any:
        self.asked.append((self.clock.seconds(), name))
        return succeed(self.people.get(name, Result("not-found", None)))

    def online(
        self,
        name: str,
        status: Status = Status.ONLINE,
        nat: str = "cone-nat",
        key: IdentityKey = BOB_KEY,
    ) -> None:
        outcome = "offline" if status is Status.INVISIBLE else "found"
        cert = bytes(issue(CA, name, key.public_key, serial=1, now=0, lifetime=10**9))
        record = Record(status, nat, int(self.clock.seconds()), cert)
        self.people[name] = Result(outcome, record)


def test_a_new_buddy_is_looked_up_at_once_and_changes_are_reported(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.online("bob")
    world.buddies.add("bob")
    world.clock.advance(0)
    bob = world.buddies.buddies["bob"]
    assert (bob.status, bob.reach) == ("online", "direct-capable")
    assert world.changes == [("bob", "online")]
    world.online("bob", Status.AWAY, nat="symmetric-nat")
    world.clock.advance(29)
    assert world.changes == [("bob", "online")]  # not refreshed yet
    world.clock.advance(1.5)
    assert world.changes[-1] == ("bob", "away") and bob.reach == "may need a relay"
    world.clock.advance(30)
    assert len(world.changes) == 2  # nothing changed: nothing reported
    assert "bob" in buddy_line(bob.to_json(), world.clock.seconds())


def test_refreshes_never_exceed_the_rate_bound_whatever_the_list_size(tmp_path: Path) -> None:
    world = World(tmp_path, refresh=10.0)
    for i in range(100):
        world.buddies.add(f"user{i}")
    world.clock.pump([0.05] * 2000)  # 100 s
    times = [t for t, _ in world.asked]
    per_second = max(sum(1 for t in times if s <= t < s + 1) for s in range(100))
    assert per_second <= MAX_RATE
    assert len({name for _, name in world.asked}) == 100  # everyone gets a turn


def test_the_list_survives_a_restart_and_bounds_are_clear(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.buddies.add("Bob")  # names are canonical
    world.buddies.add("carol")
    path = tmp_path / "buddies.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = World(tmp_path)
    assert sorted(again.buddies.buddies) == ["bob", "carol"]
    again.buddies.remove("carol")
    with pytest.raises(BuddyError, match="carol is not on your buddy list"):
        again.buddies.remove("carol")


def test_offline_and_unknown_buddies(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.people["dave"] = Result("offline", Record(Status.OFFLINE, "public", -7200))
    world.buddies.add("dave")
    world.buddies.add("erin")
    world.clock.pump([0.5] * 4)
    dave, erin = world.buddies.buddies["dave"], world.buddies.buddies["erin"]
    assert (dave.status, dave.reach, dave.last_seen) == ("offline", "", -7200)
    assert erin.status == "not-found"
    assert "last seen 2 h ago" in buddy_line(dave.to_json(), 0)


def _max_per_second(times: list[float]) -> int:
    return max(sum(1 for t in times if s <= t < s + 1) for s in range(int(max(times)) + 1))


def test_adding_buddies_one_by_one_cannot_push_the_rate_past_the_bound(tmp_path: Path) -> None:
    world = World(tmp_path, refresh=10.0)
    for i in range(100):  # one add every 0.1 s, each wanting its buddy looked up at once
        world.buddies.add(f"user{i}")
        world.clock.advance(0.1)
    world.clock.pump([0.05] * 400)
    assert _max_per_second([t for t, _ in world.asked]) <= MAX_RATE


def test_logging_out_stops_the_searches_even_with_one_under_way(tmp_path: Path) -> None:
    world = World(tmp_path, refresh=1.0)
    pending: list[Deferred[Result]] = []

    def slow(name: str) -> Deferred[Result]:
        world.asked.append((world.clock.seconds(), name))
        pending.append(Deferred())
        return pending[-1]

    world.buddies.search = slow
    world.buddies.add("bob")
    world.clock.advance(0)
    assert len(world.asked) == 1
    world.buddies.stop()  # logged out while the search runs
    pending[0].callback(Result("not-found", None))
    world.clock.pump([1.0] * 10)
    assert len(world.asked) == 1
    world.buddies.start()  # logged in again: looked up at once
    world.clock.advance(0)
    assert len(world.asked) == 2


def test_a_failing_search_does_not_starve_the_others(tmp_path: Path) -> None:
    world = World(tmp_path, refresh=2.0)

    def broken(name: str) -> Any:
        world.asked.append((world.clock.seconds(), name))
        if name == "bob":
            raise VoipError("No supernode answered.")
        return succeed(Result("not-found", None))

    world.buddies.search = broken
    world.buddies.add("bob")
    world.buddies.add("carol")
    world.clock.pump([0.25] * 40)  # 10 s: each about every 2 s
    asked = [name for _, name in world.asked]
    assert 4 <= asked.count("carol") <= 6 and 4 <= asked.count("bob") <= 6
    assert world.buddies.buddies["bob"].status == "unknown"


def test_an_invisible_buddy_looks_offline_and_keeps_the_last_time_seen(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.online("bob", nat="public")
    world.buddies.add("bob")
    world.clock.advance(0)
    bob = world.buddies.buddies["bob"]
    world.clock.advance(600)
    world.online("bob", Status.INVISIBLE)  # a fresh record, but invisible
    world.clock.advance(31)
    assert (bob.status, bob.reach, bob.last_seen) == ("offline", "", 0)
    assert "last seen 11 min ago" in buddy_line(bob.to_json(), world.clock.seconds())


def test_a_changed_key_is_marked_and_cleared_once_accepted(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.online("bob")
    world.buddies.add("bob")
    world.clock.advance(0)
    bob = world.buddies.buddies["bob"]
    assert not bob.key_changed and world.pins.pinned("bob") == BOB_KEY.public_key
    world.online("bob", key=MALLORY_KEY)  # someone else certified as bob
    world.clock.advance(30.5)
    assert bob.key_changed and world.changes[-1] == ("bob", "online")
    assert "KEY CHANGED: voipctl verify bob" in buddy_line(bob.to_json(), world.clock.seconds())
    world.pins.accept("bob", MALLORY_KEY.public_key)
    world.clock.advance(30.5)
    assert not bob.key_changed


def test_a_hand_edited_list_keeps_only_valid_names_and_a_damaged_one_is_a_clear_error(
    tmp_path: Path,
) -> None:
    path = tmp_path / "buddies.json"
    path.write_text(json.dumps(["bob", "Not Valid", 7, "carol"]))
    assert sorted(World(tmp_path).buddies.buddies) == ["bob", "carol"]
    path.write_text("[not json")
    with pytest.raises(BuddyError, match="Cannot read the buddy list"):
        World(tmp_path)
