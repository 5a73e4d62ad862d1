"""Key pinning and safety numbers: knowing you talk to the same person as last time.

The login server vouches for who is who, but a login server (or whoever holds its CA key) could
certify another key for "bob".  So each node remembers the first key it saw for each user
(trust on first use, ``KeyPins``): a later certificate with another key is refused loudly
(``KeyChanged``) until the user compares safety numbers with bob out of band and accepts the new
key (``voipctl verify bob --accept``).  Calls check the pin on every signal from the peer
(``client.callmanager``): a changed key refuses the call on either side.

**Safety number** (in the manner of Signal's): for each side, a 30-digit half is made from
SHA-512 iterated 5,200 times over ``version || public key || username`` (each round hashes the
last digest with the key again); the first 30 bytes give six 5-digit groups (each 5-byte chunk
as an integer modulo 100,000).  The two halves are ordered by username, so both users see the
same 60 digits, printed as 12 groups of 5.  Equal numbers on both phones mean each side holds
the other's real key.

Pins are kept in ``STATE/pins.json`` (mode 0600, written atomically): ``{username: {"key": hex,
"first_seen": unix time, "accepted": bool}}``.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from overlay.errors import VoipError
from overlay.identity import write_private_file

SAFETY_VERSION = b"\x00\x00"
SAFETY_ITERATIONS = 5200
MAX_PINS = 10_000


class KeyChanged(VoipError):
    """A user's key is not the one pinned for them."""

    code = "key-changed"


def _half(username: str, public_key: bytes) -> str:
    digest = SAFETY_VERSION + public_key + username.encode()
    for _ in range(SAFETY_ITERATIONS):
        digest = hashlib.sha512(digest + public_key).digest()
    return "".join(
        f"{int.from_bytes(digest[i : i + 5], 'big') % 100_000:05d}" for i in range(0, 30, 5)
    )


def safety_number(my_name: str, my_key: bytes, their_name: str, their_key: bytes) -> str:
    """60 digits in 12 groups of 5, the same whichever side computes it."""
    halves = sorted([(my_name, _half(my_name, my_key)), (their_name, _half(their_name, their_key))])
    digits = halves[0][1] + halves[1][1]
    return " ".join(digits[i : i + 5] for i in range(0, 60, 5))


def _is_key_hex(value: object) -> bool:
    try:
        return isinstance(value, str) and len(bytes.fromhex(value)) == 32
    except ValueError:
        return False


class KeyPins:
    def __init__(self, path: Path, clock: Any = time.time) -> None:
        self.path = path
        self.clock = clock
        self._pins: dict[str, dict[str, Any]] = {}
        try:
            document = json.loads(path.read_text())
        except FileNotFoundError:
            document = {}
        except (OSError, ValueError) as exc:
            raise VoipError(f"Cannot read the key pins {path}: {exc}.") from None
        if isinstance(document, dict):  # a hand-edited file: entries that make sense only
            for name, entry in document.items():
                if isinstance(entry, dict) and _is_key_hex(entry.get("key")):
                    self._pins[str(name)] = entry

    def pinned(self, username: str) -> bytes | None:
        entry = self._pins.get(username)
        return bytes.fromhex(entry["key"]) if entry is not None else None

    def describe(self, username: str) -> dict[str, Any] | None:
        entry = self._pins.get(username)
        return dict(entry) if entry is not None else None

    def check(self, username: str, public_key: bytes) -> None:
        """Pin ``public_key`` for ``username`` on first sight; ``KeyChanged`` if it differs."""
        pinned = self.pinned(username)
        if pinned is None:
            if len(self._pins) >= MAX_PINS:
                return  # a full table pins no more; nothing is refused for it
            self._pins[username] = {
                "key": public_key.hex(),
                "first_seen": int(self.clock()),
                "accepted": False,
            }
            self._save()
            return
        if pinned != public_key:
            raise KeyChanged(
                f"{username}'s key has CHANGED since you last talked: it may be someone else. "
                f"Compare safety numbers with {username} (voipctl verify {username}), then: "
                f"voipctl verify {username} --accept"
            )

    def accept(self, username: str, public_key: bytes) -> None:
        """Trust ``public_key`` for ``username`` from now on (after comparing numbers)."""
        self._pins[username] = {
            "key": public_key.hex(),
            "first_seen": int(self.clock()),
            "accepted": True,
        }
        self._save()

    def _save(self) -> None:
        data = json.dumps(self._pins, indent=1, sort_keys=True).encode()
        write_private_file(self.path, data)
