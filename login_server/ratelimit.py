"""Sliding-window limits on failed attempts (per account, per source address).

Time comes from an injected ``seconds()`` (the reactor's), so tests drive it with a Clock.
The table of keys is bounded: when full, the key with the oldest newest-failure is dropped.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable


class FailureLimiter:
    def __init__(
        self,
        seconds: Callable[[], float],
        limit: int,
        window: float,
        max_keys: int = 100_000,
    ) -> None:
        self._seconds = seconds
        self._limit = limit
        self._window = window
        self._max_keys = max_keys
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _pruned(self, key: str) -> deque[float] | None:
        times = self._failures.get(key)
        if times is None:
            return None
        horizon = self._seconds() - self._window
        while times and times[0] <= horizon:
            times.popleft()
        if not times:
            del self._failures[key]
            return None
        return times

    def retry_after(self, key: str) -> float | None:
        """Seconds until ``key`` may try again, or None when it may try now."""
        times = self._pruned(key)
        if times is None or len(times) < self._limit:
            return None
        return max(0.0, times[-self._limit] + self._window - self._seconds())

    def failed(self, key: str) -> None:
        times = self._pruned(key)
        if times is None:
            times = deque(maxlen=self._limit)
            self._failures[key] = times
            if len(self._failures) > self._max_keys:
                self._failures.popitem(last=False)
        times.append(self._seconds())
        self._failures.move_to_end(key)

    def succeeded(self, key: str) -> None:
        self._failures.pop(key, None)

    def __len__(self) -> int:
        return len(self._failures)
