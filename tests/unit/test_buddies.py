"""The buddy list (client.buddies): persistence, refresh at a bounded rate, change events.

The search is a stand-in returning results of the real shape; the real overlay search serves
the list end to end in tests/integration/test_presence_cli.py.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import succeed
from twisted.internet.task import Clock

from client.buddies import MAX_RATE, BuddyError, BuddyList, buddy_line
from overlay.presence import Status


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
        self.buddies = BuddyList(self.clock, tmp / "buddies.json", self.search, refresh=refresh)
        self.changes: list[tuple[str, str]] = []
        self.buddies.listeners.append(lambda b: self.changes.append((b.name, b.status)))

    def search(self, name: str) -> Any:
        self.asked.append((self.clock.seconds(), name))
        return succeed(self.people.get(name, Result("not-found", None)))

    def online(self, name: str, status: Status = Status.ONLINE, nat: str = "cone-nat") -> None:
        self.people[name] = Result("found", Record(status, nat, int(self.clock.seconds())))


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
