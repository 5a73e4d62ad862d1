"""Fixtures every test shares.

``no_logged_errors`` (autouse) fails a test when Twisted logged an unhandled error or a
critical event while it ran: an error nobody looked at is a bug even if the test passed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import settings
from twisted.logger import LogLevel, globalLogPublisher

# In CI the property tests draw the same examples every run (a red CI is then reproducible,
# never a roll of the dice); locally they explore new ones each time.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


class LoggedErrors:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.allowed = 0

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_failure") is not None or event.get("log_level") in (
            LogLevel.error,
            LogLevel.critical,
        ):
            self.events.append(event)

    def expect(self, count: int = 1) -> None:
        """The test expects ``count`` logged errors (and asserts on them itself)."""
        self.allowed += count


@pytest.fixture(autouse=True)
def no_logged_errors() -> Iterator[LoggedErrors]:
    errors = LoggedErrors()
    globalLogPublisher.addObserver(errors)
    try:
        yield errors
    finally:
        globalLogPublisher.removeObserver(errors)
    if len(errors.events) > errors.allowed:
        from twisted.logger import formatEvent

        texts = []
        for event in errors.events:
            failure = event.get("log_failure")
            texts.append(formatEvent(event) + (f"\n{failure.getTraceback()}" if failure else ""))
        pytest.fail("Unhandled errors were logged:\n" + "\n".join(texts))
