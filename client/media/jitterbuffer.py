"""The adaptive jitter buffer: packets in, in any order, one 20 ms frame out per playout tick.

Packets are keyed by their extended RTP sequence number (one Opus frame per packet, so one index
is one frame); their RTP timestamps and arrival times measure the network's delay variation.
``push`` files a packet; ``pop`` (once per 20 ms tick of the playout clock) says what to play:

- ``Play``: the frame is here, decode it.
- ``Missing``: the frame is lost (a later one is here and the buffer is at its target depth).
  ``next_payload`` is the following packet when it is already here, so the engine can rebuild
  the lost frame from that packet's in-band FEC; otherwise it conceals (PLC).
- ``Wait``: nothing to play yet ("buffering" before playout starts, "underrun" when the frame
  is not here and the buffer is below its target).  Playout holds: the engine conceals this one
  tick and the same frame is asked for again next tick, so the buffer's delay grows by a frame.

Policy (bounded, because an unbounded buffer turns jitter into conversation-killing delay):

- Target depth = 2 frames + the delay spread: the 98th percentile minus the minimum of the
  relative delay (arrival time - RTP timestamp) over the last ``WINDOW`` packets, in frames,
  clamped to [``min_ms``, ``max_ms``] (40 and 200 ms by default).  One frame of the two is the
  look-ahead that lets FEC recover a lost frame from the next packet.
- The target grows at once when the spread grows (late packets count too) and shrinks by at most
  one frame per ``calm_frames`` ticks (one second) when it falls.
- The buffer grows towards its target through holds (``Wait``) and shrinks by skipping: a missing
  frame at the front is skipped silently while the buffer holds more than its target, and when
  the buffer stayed above its target for a whole calm period, one frame is dropped.
- Hard bound: a packet that would make the buffer span more than ``max_ms`` pulls playout
  forward to the target depth at once, discarding what was older ("overflow").
- A packet for a frame already played or skipped is dropped: "duplicate" if it was played,
  else "late".  Every such event is counted in ``counters``.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass

from client.media.rtp import RTP_CLOCK_RATE

FRAME_MS = 20
WINDOW = 150
PERCENTILE = 0.98
CALM_FRAMES = 50
_TS_WRAP = 1 << 32


@dataclass(frozen=True)
class Play:
    index: int
    timestamp: int
    payload: bytes


@dataclass(frozen=True)
class Missing:
    index: int
    next_payload: bytes | None


@dataclass(frozen=True)
class Wait:
    reason: str


Playout = Play | Missing | Wait


class JitterBuffer:
    def __init__(
        self,
        *,
        min_ms: int = 40,
        max_ms: int = 200,
        initial_ms: int = 60,
        frame_ms: int = FRAME_MS,
        clock_rate: int = RTP_CLOCK_RATE,
        window: int = WINDOW,
        calm_frames: int = CALM_FRAMES,
    ) -> None:
        if not frame_ms <= min_ms <= initial_ms <= max_ms:
            raise ValueError("jitter buffer bounds must satisfy frame <= min <= initial <= max")
        self.frame_ms = frame_ms
        self.min_frames = min_ms // frame_ms
        self.max_frames = max_ms // frame_ms
        self.target_frames = initial_ms // frame_ms
        self._clock_rate = clock_rate
        self._calm_frames = calm_frames
        self._packets: dict[int, tuple[int, bytes]] = {}
        self._highest: int | None = None
        self._next: int | None = None
        self._played: deque[int] = deque(maxlen=4 * self.max_frames)
        self._played_set: set[int] = set()
        self._delays: deque[float] = deque(maxlen=window)
        self._ts_last: int | None = None
        self._ts_extended = 0
        self._since_decrease = 0
        self._calm_pops = 0
        self._calm_min: int | None = None
        self.spread_ms = 0.0
        #: accepted, duplicate, late, overflow, played, missing, skipped, compressed, underrun
        self.counters: Counter[str] = Counter()

    # -- what the engine and the status show ---------------------------------------------------

    @property
    def depth_ms(self) -> int:
        """Audio time the buffer holds now: from the next frame to play to the newest one."""
        return self._span() * self.frame_ms

    @property
    def target_ms(self) -> int:
        return self.target_frames * self.frame_ms

    @property
    def started(self) -> bool:
        return self._next is not None

    def _span(self) -> int:
        if self._highest is None or not self._packets:
            return 0
        first = self._next if self._next is not None else min(self._packets)
        return max(0, self._highest - first + 1)

    # -- packets in ----------------------------------------------------------------------------

    def push(self, index: int, timestamp: int, payload: bytes, arrival: float) -> str:
        """File a packet; returns "accepted", "duplicate" or "late" (the last two dropped)."""
        self._measure(timestamp, arrival)
        if index in self._packets or index in self._played_set:
            outcome = "duplicate"
        elif self._next is not None and index < self._next:
            outcome = "late"
        else:
            outcome = "accepted"
            self._packets[index] = (timestamp, payload)
            if self._highest is None or index > self._highest:
                self._highest = index
            self._bound()
        self.counters[outcome] += 1
        return outcome

    def _measure(self, timestamp: int, arrival: float) -> None:
        if self._ts_last is None:
            self._ts_extended = timestamp
        else:
            delta = (timestamp - self._ts_last + _TS_WRAP // 2) % _TS_WRAP - _TS_WRAP // 2
            self._ts_extended += delta
        self._ts_last = timestamp
        self._delays.append(arrival - self._ts_extended / self._clock_rate)
        ordered = sorted(self._delays)
        spread = ordered[min(len(ordered) - 1, int(PERCENTILE * len(ordered)))] - ordered[0]
        self.spread_ms = spread * 1000.0
        wanted = 2 + math.ceil(self.spread_ms / self.frame_ms - 1e-6)
        wanted = max(self.min_frames, min(self.max_frames, wanted))
        if wanted > self.target_frames:
            self.target_frames = wanted
            self._since_decrease = 0
        elif wanted < self.target_frames and self._since_decrease >= self._calm_frames:
            self.target_frames -= 1
            self._since_decrease = 0

    def _bound(self) -> None:
        assert self._highest is not None
        first = self._next if self._next is not None else min(self._packets)
        if self._highest - first + 1 <= self.max_frames:
            return
        keep_from = self._highest - self.target_frames + 1
        for index in [i for i in self._packets if i < keep_from]:
            del self._packets[index]
            self.counters["overflow"] += 1
        if self._next is not None:
            self._next = keep_from

    # -- frames out ----------------------------------------------------------------------------

    def pop(self) -> Playout:
        """What to play for this 20 ms tick."""
        self._since_decrease += 1
        if self._next is None:
            if not self._packets or self._span() < self.target_frames:
                return Wait("buffering")
            self._next = min(self._packets)
        span = self._span()
        if self._calm_period_over(span) and span > self.target_frames:
            self._drop_front("compressed")
            span -= 1
        while self._next not in self._packets and span > self.target_frames:
            self._drop_front("skipped")
            span -= 1
        index = self._next
        entry = self._packets.pop(index, None)
        if entry is not None:
            self._next = index + 1
            self._remember_played(index)
            self.counters["played"] += 1
            return Play(index, entry[0], entry[1])
        if span < self.target_frames:
            self.counters["underrun"] += 1
            return Wait("underrun")
        self._next = index + 1
        self.counters["missing"] += 1
        following = self._packets.get(index + 1)
        return Missing(index, following[1] if following is not None else None)

    def _calm_period_over(self, span: int) -> bool:
        """True once per ``calm_frames`` ticks if the buffer stayed above its target throughout."""
        self._calm_min = span if self._calm_min is None else min(self._calm_min, span)
        self._calm_pops += 1
        if self._calm_pops < self._calm_frames:
            return False
        above = self._calm_min > self.target_frames
        self._calm_pops = 0
        self._calm_min = None
        return above

    def _drop_front(self, why: str) -> None:
        assert self._next is not None
        if self._packets.pop(self._next, None) is not None:
            self._remember_played(self._next)
        self._next += 1
        self.counters[why] += 1

    def _remember_played(self, index: int) -> None:
        if len(self._played) == self._played.maxlen:
            self._played_set.discard(self._played[0])
        self._played.append(index)
        self._played_set.add(index)
