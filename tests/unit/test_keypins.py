"""Key pinning (trust on first use) and safety numbers (client.keypins)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from client.keypins import KeyChanged, KeyPins, safety_number
from overlay.identity import IdentityKey

ALICE = IdentityKey.from_seed(bytes(31) + b"\x01").public_key
BOB = IdentityKey.from_seed(bytes(31) + b"\x02").public_key
MALLORY = IdentityKey.from_seed(bytes(31) + b"\x03").public_key


def test_the_first_key_is_pinned_and_a_different_one_is_refused_until_accepted(
    tmp_path: Path,
) -> None:
    pins = KeyPins(tmp_path / "pins.json", clock=lambda: 1000.0)
    pins.check("bob", BOB)
    pins.check("bob", BOB)  # the same key again: fine
    with pytest.raises(KeyChanged) as raised:
        pins.check("bob", MALLORY)
    assert "bob's key has CHANGED" in str(raised.value)
    assert "voipctl verify bob --accept" in str(raised.value)
    assert pins.pinned("bob") == BOB  # a refused key does not replace the pin
    pins.accept("bob", MALLORY)
    pins.check("bob", MALLORY)
    with pytest.raises(KeyChanged):
        pins.check("bob", BOB)
    assert pins.describe("bob") == {"key": MALLORY.hex(), "first_seen": 1000, "accepted": True}


def test_pins_survive_a_restart_in_a_private_file(tmp_path: Path) -> None:
    path = tmp_path / "pins.json"
    KeyPins(path).check("bob", BOB)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text())["bob"]["key"] == BOB.hex()
    again = KeyPins(path)
    with pytest.raises(KeyChanged):
        again.check("bob", MALLORY)


def test_a_damaged_pin_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "pins.json"
    path.write_text(json.dumps({"bob": {"key": "zz"}, "carol": {"key": BOB.hex()}, "dave": 1}))
    pins = KeyPins(path)  # entries that make no sense are dropped, not fatal later
    assert pins.pinned("bob") is None and pins.pinned("carol") == BOB
    pins.check("bob", BOB)
    path.write_text("{not json")
    with pytest.raises(Exception, match="Cannot read the key pins"):
        KeyPins(path)


def test_the_safety_number_is_the_same_on_both_sides_and_changes_with_either_key() -> None:
    mine = safety_number("alice", ALICE, "bob", BOB)
    theirs = safety_number("bob", BOB, "alice", ALICE)
    assert mine == theirs
    groups = mine.split(" ")
    assert len(groups) == 12 and all(len(g) == 5 and g.isdigit() for g in groups)
    assert safety_number("alice", ALICE, "bob", MALLORY) != mine
    assert safety_number("alice", MALLORY, "bob", BOB) != mine
    # A test vector: a number printed today must match the one a later version prints.
    assert mine == "04628 34939 45269 76773 68910 01687 62470 87528 69049 40184 82136 67535"
