"""Usernames: 3-32 characters of a-z 0-9 . _ -, unique case-insensitively.

Users may type capitals; the canonical form is lower case and is what certificates, records
and the account database hold.
"""

from __future__ import annotations

import re

from overlay.errors import VoipError

USERNAME_MIN = 3
USERNAME_MAX = 32
_PATTERN = re.compile(r"[a-z0-9._-]{3,32}")


class InvalidUsername(VoipError):
    """That username is not valid: use 3-32 characters of a-z, 0-9, '.', '_' and '-'."""

    code = "invalid-username"


def is_valid_username(name: str) -> bool:
    return _PATTERN.fullmatch(name) is not None


def canonical_username(name: str) -> str:
    """The canonical (lower-case) form, or ``InvalidUsername``."""
    # ASCII is checked before lowering: "\u212a" (KELVIN SIGN) lowers to an ASCII "k".
    lowered = name.lower()
    if not name.isascii() or not is_valid_username(lowered):
        raise InvalidUsername(
            f"{name!r} is not a valid username: use 3-32 characters of a-z, 0-9, '.', '_' and '-'."
        )
    return lowered
