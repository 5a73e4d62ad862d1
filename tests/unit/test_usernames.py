"""Usernames: which names a user may pick, and the canonical (lower-case) form."""

from __future__ import annotations

import pytest

from overlay.usernames import (
    USERNAME_MAX,
    USERNAME_MIN,
    InvalidUsername,
    canonical_username,
    is_valid_username,
)

HINT = "use 3-32 characters of a-z, 0-9, '.', '_' and '-'."


@pytest.mark.parametrize(
    "name",
    [
        "bob",
        "a" * USERNAME_MIN,
        "a" * USERNAME_MAX,
        "alice.smith",
        "alice_smith",
        "alice-smith",
        "007",
        "...",
        "-_-",
    ],
)
def test_valid_names_are_their_own_canonical_form(name: str) -> None:
    assert is_valid_username(name)
    assert canonical_username(name) == name


@pytest.mark.parametrize(
    ("typed", "canonical"),
    [("Alice", "alice"), ("BOB.Smith", "bob.smith"), ("X" * USERNAME_MAX, "x" * USERNAME_MAX)],
)
def test_capitals_are_canonicalised_to_lower_case(typed: str, canonical: str) -> None:
    assert canonical_username(typed) == canonical
    # The canonical form is what is stored; the typed form itself is not a valid stored name.
    assert not is_valid_username(typed)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "ab",
        "a" * (USERNAME_MAX + 1),
        "ålice",
        "alicé",
        "\u212aate",  # KELVIN SIGN: lowers to an ASCII "k" but is not ASCII
        "İstanbul",
        "ali ce",
        "alice@home",
        "alice+bob",
        "alice/..",
        "alice\n",
        "\nalice",
        "alice\x00",
        "\uff41\uff4c\uff49\uff43\uff45",  # full-width 'alice'
    ],
)
def test_invalid_names_are_refused_with_the_rule(name: str) -> None:
    assert not is_valid_username(name)
    with pytest.raises(InvalidUsername) as caught:
        canonical_username(name)
    assert str(caught.value) == f"{name!r} is not a valid username: {HINT}"
    assert caught.value.code == "invalid-username"


def test_length_boundaries() -> None:
    assert not is_valid_username("ab")
    assert is_valid_username("abc")
    assert is_valid_username("a" * 32)
    assert not is_valid_username("a" * 33)


def test_invalid_username_default_text_states_the_rule() -> None:
    assert str(InvalidUsername()) == f"That username is not valid: {HINT}"
