"""The adaptive jitter buffer: order, loss, duplicates, late packets, growth and shrinking."""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable

import pytest

from client.media.jitterbuffer import JitterBuffer, Missing, Play, Playout, Wait
from client.media.rtp import FRAME_TICKS

FRAME = 0.020


def payload(index: int) -> bytes:
    return index.to_bytes(4, "big")


def push(buffer: JitterBuffer, index: int, delay: float = 0.030) -> str:
    """Packet ``index`` sent at index * 20 ms arrives ``delay`` later."""
    return buffer.push(
        index, (index * FRAME_TICKS) & 0xFFFFFFFF, payload(index), index * FRAME + delay
    )


def played(items: list[Playout]) -> list[int]:
    return [item.index for item in items if isinstance(item, Play)]


def simulate(
    buffer: JitterBuffer,
    packets: int,
    delay: Callable[[int], float | None],
    *,
    check: Callable[[JitterBuffer], None] | None = None,
) -> list[Playout]:
    """Send ``packets`` frames every 20 ms, each arriving after ``delay(i)`` (None: lost), and
    pop every 20 ms (offset by 10 ms) until 0.5 s after the last send."""
    events: list[tuple[float, int, int]] = []
    for index in range(packets):
        late = delay(index)
        if late is not None:
            events.append((index * FRAME + late, 0, index))
    end = packets * FRAME + 0.5
    pops = int(end / FRAME)
    events.extend((n * FRAME + FRAME / 2, 1, n) for n in range(pops))
    heapq.heapify(events)
    out: list[Playout] = []
    while events:
        when, kind, index = heapq.heappop(events)
        if kind == 0:
            buffer.push(index, index * FRAME_TICKS, payload(index), when)
        else:
            out.append(buffer.pop())
        if check is not None:
            check(buffer)
    return out


def test_waits_until_its_initial_depth_then_plays_in_order() -> None:
    buffer = JitterBuffer(min_ms=40, initial_ms=60)
    assert buffer.pop() == Wait("buffering")
    push(buffer, 0)
    push(buffer, 1)
    assert buffer.pop() == Wait("buffering")
    push(buffer, 2)
    assert buffer.depth_ms == 60
    assert buffer.pop() == Play(0, 0, payload(0))
    assert buffer.started


def test_reordered_packets_play_in_order() -> None:
    buffer = JitterBuffer(initial_ms=80)
    for index in (2, 0, 3, 1):
        assert push(buffer, index) == "accepted"
    assert [buffer.pop() for _ in range(4)] == [
        Play(i, i * FRAME_TICKS, payload(i)) for i in range(4)
    ]


def test_a_lost_frame_is_missing_with_the_next_packet_for_fec() -> None:
    buffer = JitterBuffer(min_ms=40, initial_ms=40)
    push(buffer, 0)
    push(buffer, 1)
    assert played([buffer.pop()]) == [0]
    # Packet 2 is lost.
    assert played([buffer.pop()]) == [1]
    push(buffer, 3)
    assert buffer.pop() == Missing(2, payload(3))
    push(buffer, 4)
    assert buffer.pop() == Play(3, 3 * FRAME_TICKS, payload(3))
    assert buffer.counters["missing"] == 1


def test_two_lost_frames_hold_once_then_use_fec_for_the_second() -> None:
    buffer = JitterBuffer(min_ms=40, initial_ms=40)
    push(buffer, 0)
    push(buffer, 1)
    items = [buffer.pop()]  # 0
    push(buffer, 2)
    items.append(buffer.pop())  # 1
    # 3 and 4 are lost.
    items.append(buffer.pop())  # 2
    items.append(buffer.pop())  # nothing here: hold
    push(buffer, 5)
    items.append(buffer.pop())  # 3 is skipped, 4 rebuilt from 5's FEC
    push(buffer, 6)
    items.append(buffer.pop())
    assert items[3] == Wait("underrun")
    assert items[4] == Missing(4, payload(5))
    assert played(items) == [0, 1, 2, 5]
    assert buffer.counters["skipped"] == 1


def test_duplicates_and_late_packets_are_dropped_and_counted() -> None:
    buffer = JitterBuffer(min_ms=40, initial_ms=40)
    push(buffer, 0)
    assert push(buffer, 0) == "duplicate"
    push(buffer, 1)
    buffer.pop()  # plays 0
    assert push(buffer, 0) == "duplicate"
    push(buffer, 3)
    buffer.pop()  # plays 1
    assert buffer.pop() == Missing(2, payload(3))
    assert push(buffer, 2, delay=0.2) == "late"
    assert buffer.counters["duplicate"] == 2
    assert buffer.counters["late"] == 1
    assert played([buffer.pop()]) == [3]


def test_a_jump_far_ahead_pulls_playout_forward_within_the_bound() -> None:
    buffer = JitterBuffer(min_ms=40, initial_ms=40, max_ms=200)
    for index in range(3):
        push(buffer, index)
    buffer.pop()
    push(buffer, 500)
    assert buffer.depth_ms <= 200
    assert buffer.counters["overflow"] == 2
    item = buffer.pop()
    assert isinstance(item, Missing | Play)
    assert item.index >= 500 - buffer.target_frames
    assert 500 in played([buffer.pop() for _ in range(buffer.target_frames + 1)])


def test_timestamps_wrapping_do_not_look_like_jitter() -> None:
    buffer = JitterBuffer()
    start = 0xFFFFFFFF - 20 * FRAME_TICKS
    for index in range(60):
        buffer.push(index, (start + index * FRAME_TICKS) & 0xFFFFFFFF, b"x", index * FRAME)
    assert buffer.spread_ms == pytest.approx(0.0, abs=1e-6)


def test_steady_network_plays_everything_at_the_minimum_depth() -> None:
    buffer = JitterBuffer()
    depths: list[int] = []
    items = simulate(buffer, 500, lambda i: 0.040, check=lambda b: depths.append(b.depth_ms))
    # It started at 60 ms, found no jitter and dropped one frame to come down to 40 ms.
    assert buffer.counters["compressed"] == 1
    assert played(items) == [i for i in range(500) if i != 49]
    assert buffer.target_ms == 40
    assert max(depths[200:]) == 40
    assert buffer.counters["late"] == buffer.counters["missing"] == 0


def test_the_buffer_grows_under_jitter_and_shrinks_back_when_calm() -> None:
    rng = random.Random(5)
    buffer = JitterBuffer(min_ms=40, max_ms=300)
    depths: list[int] = []
    jittery, calm = 500, 1500  # 10 s of up to 100 ms jitter, then 30 s of none

    def delay(index: int) -> float:
        return 0.030 + (rng.uniform(0.0, 0.100) if index < jittery else 0.0)

    def record(b: JitterBuffer) -> None:
        depths.append(b.target_ms)

    items = simulate(buffer, jittery + calm, delay, check=record)
    assert max(depths) >= 120  # grew to cover the ~100 ms spread
    # Late packets are a small share once it has grown (most of them while it was growing).
    assert buffer.counters["late"] < 0.05 * jittery
    # Calm again: target and depth back at the minimum.
    assert buffer.target_ms == 40
    tail = [i for i in items[-100:] if isinstance(i, Play)]
    assert len(tail) > 50
    last_played = played(items)
    assert last_played == sorted(last_played)
    assert buffer.counters["compressed"] > 0


def test_depth_never_exceeds_its_hard_bound() -> None:
    rng = random.Random(7)
    buffer = JitterBuffer(min_ms=40, max_ms=200)
    worst = 0

    def check(b: JitterBuffer) -> None:
        nonlocal worst
        worst = max(worst, b.depth_ms)

    items = simulate(buffer, 500, lambda i: rng.uniform(0.0, 1.0), check=check)
    assert worst <= 200
    assert buffer.target_ms == 200
    assert buffer.counters["late"] > 0  # jitter beyond the bound shows up as late packets
    assert played(items) == sorted(played(items))


def test_random_loss_gives_missing_frames_with_fec_where_possible() -> None:
    rng = random.Random(3)
    lost = {i for i in range(1000) if rng.random() < 0.1}
    buffer = JitterBuffer()
    items = simulate(buffer, 1000, lambda i: None if i in lost else 0.030)
    assert set(played(items)) == set(range(1000)) - lost
    missing = [i for i in items if isinstance(i, Missing)]
    with_fec = [m for m in missing if m.next_payload is not None]
    assert all(m.next_payload == payload(m.index + 1) for m in with_fec)
    assert len(with_fec) > 0.6 * len(lost)  # isolated losses are rebuilt from FEC
    assert buffer.counters["late"] == 0


def test_bounds_are_validated() -> None:
    with pytest.raises(ValueError):
        JitterBuffer(min_ms=100, initial_ms=60)
    with pytest.raises(ValueError):
        JitterBuffer(min_ms=10)
