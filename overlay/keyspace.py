"""The overlay's key space: 64-bit user keys and the binary prefixes that carve it into slots.

A user's key is a hash of the canonical username.  A ``Prefix(value, length)`` owns the keys
whose top ``length`` bits equal ``value``: the range ``[start, end)``.  Slots are the leaves of
the binary trie these prefixes form (see ``overlay.slotmap``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from overlay.usernames import canonical_username

KEY_BITS = 64
KEY_SPACE = 1 << KEY_BITS
USER_KEY_CONTEXT = b"voip-user-key-v1"


def user_key(username: str) -> int:
    """The 64-bit overlay key of a username (any case; ``InvalidUsername`` if not valid)."""
    name = canonical_username(username).encode("ascii")
    digest = hashlib.blake2b(USER_KEY_CONTEXT + name, digest_size=8).digest()
    return int.from_bytes(digest, "big")


def check_key(key: int) -> int:
    if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key < KEY_SPACE:
        raise ValueError(f"a key must be an int in [0, 2**{KEY_BITS})")
    return key


@dataclass(frozen=True, order=True)
class Prefix:
    """The keys whose top ``length`` bits are ``value``; ``Prefix(0, 0)`` is the whole space."""

    value: int
    length: int

    def __post_init__(self) -> None:
        for number in (self.value, self.length):
            if isinstance(number, bool) or not isinstance(number, int):
                raise ValueError("a prefix is made of two ints")
        if not 0 <= self.length <= KEY_BITS:
            raise ValueError(f"a prefix length must be in [0, {KEY_BITS}]")
        if not 0 <= self.value < (1 << self.length):
            raise ValueError("a prefix value must fit in its length")

    @classmethod
    def root(cls) -> Prefix:
        return cls(0, 0)

    @property
    def start(self) -> int:
        return self.value << (KEY_BITS - self.length)

    @property
    def end(self) -> int:
        """The first key after the prefix's range (exclusive; ``KEY_SPACE`` for the last)."""
        return (self.value + 1) << (KEY_BITS - self.length)

    def contains(self, key: int) -> bool:
        return self.start <= check_key(key) < self.end

    def covers(self, other: Prefix) -> bool:
        """True when every key of ``other`` is also in this prefix."""
        return other.length >= self.length and other.value >> (other.length - self.length) == (
            self.value
        )

    def children(self) -> tuple[Prefix, Prefix]:
        if self.length == KEY_BITS:
            raise ValueError("a full-length prefix has no children")
        return Prefix(self.value << 1, self.length + 1), Prefix(
            (self.value << 1) | 1, self.length + 1
        )

    def parent(self) -> Prefix:
        if self.length == 0:
            raise ValueError("the root prefix has no parent")
        return Prefix(self.value >> 1, self.length - 1)

    def sibling(self) -> Prefix:
        if self.length == 0:
            raise ValueError("the root prefix has no sibling")
        return Prefix(self.value ^ 1, self.length)

    def __str__(self) -> str:
        return format(self.value, f"0{self.length}b") + "*" if self.length else "*"
