"""A drift-free periodic clock for media: tick ``n`` is due at start + n * interval.

Each call is scheduled from ``reactor.seconds()`` towards the next due instant, so lateness of
one call never accumulates (a chain of ``callLater(interval)`` would drift by every delay).  When
the reactor was held up and several ticks fell due at once, ``tick(count)`` gets their number,
like ``LoopingCall.withCount``; the media engine sends and plays that many frames to catch up.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

#: Tolerance for floating-point sums of intervals: a tick this close to due counts as due.
EPSILON = 1e-6


class FrameClock:
    def __init__(self, reactor: IReactorTime, interval: float, tick: Callable[[int], None]):
        if interval <= 0:
            raise ValueError("a frame clock needs a positive interval")
        self.reactor = reactor
        self.interval = interval
        self._tick = tick
        self._start = 0.0
        #: Ticks delivered since start().
        self.ticks = 0
        self._call: IDelayedCall | None = None
        self.running = False

    def start(self) -> None:
        """Start ticking; the first tick comes at once."""
        if self.running:
            return
        self.running = True
        self._start = self.reactor.seconds()
        self.ticks = 0
        self._fire()

    def stop(self) -> None:
        self.running = False
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _fire(self) -> None:
        self._call = None
        now = self.reactor.seconds()
        due = int((now - self._start) / self.interval + EPSILON) + 1
        count = due - self.ticks
        self.ticks = max(self.ticks, due)
        if count > 0:
            try:
                self._tick(count)
            except BaseException:
                self.stop()
                raise
        if self.running:
            delay = self._start + self.ticks * self.interval - self.reactor.seconds()
            self._call = self.reactor.callLater(max(0.0, delay), self._fire)
