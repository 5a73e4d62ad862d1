"""Sliding-window failure limits, driven by a Clock."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from login_server.ratelimit import FailureLimiter


def _limiter(
    limit: int = 3, window: float = 60.0, max_keys: int = 100
) -> tuple[Clock, FailureLimiter]:
    clock = Clock()
    clock.advance(1_000_000)
    return clock, FailureLimiter(clock.seconds, limit, window, max_keys)


def test_below_the_limit_there_is_no_wait() -> None:
    clock, limiter = _limiter()
    assert limiter.retry_after("alice") is None
    limiter.failed("alice")
    clock.advance(10)
    limiter.failed("alice")
    assert limiter.retry_after("alice") is None


def test_reaching_the_limit_gives_the_exact_wait() -> None:
    clock, limiter = _limiter(limit=3, window=60.0)
    for _ in range(3):
        limiter.failed("alice")
        clock.advance(10)
    # Failures at 0, 10 and 20 s; now is 30 s: the first one leaves the window at 60 s.
    assert limiter.retry_after("alice") == 30.0
    clock.advance(29.5)
    assert limiter.retry_after("alice") == 0.5
    # Other keys are not affected.
    assert limiter.retry_after("bob") is None


def test_the_window_slides() -> None:
    clock, limiter = _limiter(limit=3, window=60.0)
    for _ in range(3):
        limiter.failed("alice")
        clock.advance(10)
    clock.advance(30)  # now 60 s after the first failure: it has left the window
    assert limiter.retry_after("alice") is None
    limiter.failed("alice")  # failures at 10, 20 and 60 s
    assert limiter.retry_after("alice") == 10.0
    clock.advance(10)
    assert limiter.retry_after("alice") is None
    clock.advance(60)  # every failure has left the window: the key is forgotten
    assert limiter.retry_after("alice") is None
    assert len(limiter) == 0


def test_more_failures_extend_the_wait_to_the_newest_relevant_one() -> None:
    clock, limiter = _limiter(limit=2, window=100.0)
    for _ in range(5):
        limiter.failed("alice")
        clock.advance(1)
    # Failures at 0..4 s, now 5 s: two may be in the window, so the one at 3 s decides.
    assert limiter.retry_after("alice") == 98.0


def test_success_clears_the_failures() -> None:
    _clock, limiter = _limiter(limit=2)
    limiter.failed("alice")
    limiter.failed("alice")
    assert limiter.retry_after("alice") is not None
    limiter.succeeded("alice")
    assert limiter.retry_after("alice") is None
    assert len(limiter) == 0
    limiter.succeeded("never-failed")  # harmless
    limiter.failed("alice")
    assert limiter.retry_after("alice") is None


def test_the_table_of_keys_is_bounded() -> None:
    _clock, limiter = _limiter(limit=1, window=60.0, max_keys=2)
    limiter.failed("a")
    limiter.failed("b")
    limiter.failed("a")  # a failed again: b now has the oldest newest-failure
    limiter.failed("c")
    assert len(limiter) == 2
    assert limiter.retry_after("b") is None
    assert limiter.retry_after("a") == 60.0
    assert limiter.retry_after("c") == 60.0


def test_a_flood_of_keys_stays_bounded() -> None:
    _clock, limiter = _limiter(limit=1, max_keys=50)
    for i in range(1000):
        limiter.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(limiter) == 50
    assert limiter.retry_after("10.0.3.231") is not None  # the newest is kept
    assert limiter.retry_after("10.0.0.0") is None  # the oldest was dropped


@settings(max_examples=300, deadline=None)
@given(
    limit=st.integers(1, 5),
    window=st.integers(1, 50),
    steps=st.lists(
        st.tuples(st.sampled_from(["fail", "ok", "wait"]), st.integers(0, 30)), max_size=40
    ),
)
def test_agrees_with_a_simple_model(limit: int, window: int, steps: list[tuple[str, int]]) -> None:
    clock = Clock()
    limiter = FailureLimiter(clock.seconds, limit, float(window))
    failures: list[float] = []  # every failure since the last success
    for action, amount in steps:
        if action == "fail":
            limiter.failed("k")
            failures.append(clock.seconds())
        elif action == "ok":
            limiter.succeeded("k")
            failures.clear()
        else:
            clock.advance(amount)
        now = clock.seconds()
        recent = [t for t in failures if t > now - window]
        expected = recent[-limit] + window - now if len(recent) >= limit else None
        assert limiter.retry_after("k") == expected
