"""Call quality measured the RFC 3550 way, and the snapshot ``voipctl status`` and hang-up show.

- ``ReceiveStatistics``: for the stream we receive, loss (expected from the extended sequence
  numbers minus received, cumulative and per report interval, appendix A.3) and interarrival
  jitter (J += (|D| - J) / 16 in RTP timestamp units, appendix A.8).
- ``RoundTrip``: RTT from a report block that echoes our last sender report:
  RTT = arrival - LSR - DLSR, all in 1/65536 s (section 6.4.1); neither side needs synchronised
  clocks because each only compares its own times.
- ``BitrateMeter``: bits per second over a sliding window.
- ``MediaStats``: one frozen snapshot of all of it, with ``to_json()`` (stable keys) and
  ``summary()`` (the human end-of-call lines).
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass

from client.media.rtp import RTP_CLOCK_RATE, ReportBlock, ntp_middle, ntp_timestamp

_U32 = 0xFFFFFFFF
_TS_WRAP = 1 << 32
#: A computed round trip above this is an echo of something stale and is ignored.
MAX_PLAUSIBLE_RTT = 60.0


class ReceiveStatistics:
    """Loss and jitter of one incoming stream (duplicates already removed by the replay window)."""

    def __init__(self, clock_rate: int = RTP_CLOCK_RATE) -> None:
        self.clock_rate = clock_rate
        self.first_index: int | None = None
        self.highest_index: int | None = None
        self.received = 0
        self.bytes = 0
        #: Interarrival jitter in RTP timestamp units (RFC 3550 A.8).
        self.jitter = 0.0
        self._previous: tuple[float, int] | None = None
        self._expected_prior = 0
        self._received_prior = 0
        self.last_fraction_lost = 0.0

    def on_packet(self, index: int, timestamp: int, arrival: float, size: int) -> None:
        """One packet with extended sequence ``index`` arrived at ``arrival`` (seconds)."""
        if self.first_index is None or index < self.first_index:
            self.first_index = index
        if self.highest_index is None or index > self.highest_index:
            self.highest_index = index
        self.received += 1
        self.bytes += size
        if self._previous is not None:
            last_arrival, last_timestamp = self._previous
            sent = (timestamp - last_timestamp + _TS_WRAP // 2) % _TS_WRAP - _TS_WRAP // 2
            difference = (arrival - last_arrival) * self.clock_rate - sent
            self.jitter += (abs(difference) - self.jitter) / 16.0
        self._previous = (arrival, timestamp)

    @property
    def expected(self) -> int:
        if self.first_index is None or self.highest_index is None:
            return 0
        return self.highest_index - self.first_index + 1

    @property
    def lost(self) -> int:
        """Cumulative packets lost (expected minus received)."""
        return self.expected - self.received

    @property
    def loss_percent(self) -> float:
        expected = self.expected
        return 100.0 * max(0, self.lost) / expected if expected else 0.0

    @property
    def jitter_ms(self) -> float:
        return 1000.0 * self.jitter / self.clock_rate

    def report_block(self, ssrc: int, last_sr: int, delay_since_last_sr: int) -> ReportBlock:
        """The report block for this stream; starts a new loss interval."""
        expected, received = self.expected, self.received
        expected_interval = expected - self._expected_prior
        lost_interval = expected_interval - (received - self._received_prior)
        self._expected_prior, self._received_prior = expected, received
        fraction = 0
        if expected_interval > 0 and lost_interval > 0:
            fraction = min(255, (lost_interval << 8) // expected_interval)
        self.last_fraction_lost = fraction / 256.0
        lost = max(-(1 << 23), min((1 << 23) - 1, self.lost))
        return ReportBlock(
            ssrc=ssrc,
            fraction_lost=fraction,
            cumulative_lost=lost,
            highest_sequence=(self.highest_index or 0) & _U32,
            jitter=min(_U32, int(self.jitter)),
            last_sr=last_sr,
            delay_since_last_sr=delay_since_last_sr,
        )


def compact_delay(seconds: float) -> int:
    """``seconds`` in the DLSR unit (1/65536 s), saturated to 32 bits."""
    return max(0, min(_U32, int(seconds * 65536)))


class RoundTrip:
    """Round-trip time from the LSR/DLSR echoes in the peer's report blocks."""

    def __init__(self) -> None:
        self.last: float | None = None
        self.smoothed: float | None = None
        self.samples = 0
        self.rejected = 0

    def on_report_block(self, block: ReportBlock, arrival: float) -> float | None:
        """The RTT in seconds this block gives (None without an echo or if implausible)."""
        if block.last_sr == 0:
            return None
        now = ntp_middle(ntp_timestamp(arrival))
        units = (now - block.last_sr - block.delay_since_last_sr) & _U32
        rtt = units / 65536.0
        if rtt > MAX_PLAUSIBLE_RTT:
            self.rejected += 1
            return None
        self.last = rtt
        self.smoothed = rtt if self.smoothed is None else self.smoothed + (rtt - self.smoothed) / 8
        self.samples += 1
        return rtt


class BitrateMeter:
    """Bits per second over the last ``window`` seconds (less at the start of a call)."""

    def __init__(self, window: float = 2.0) -> None:
        self.window = window
        self._events: deque[tuple[float, int]] = deque()
        self._bytes = 0
        self._start: float | None = None

    def add(self, now: float, size: int) -> None:
        if self._start is None:
            self._start = now
        self._events.append((now, size))
        self._bytes += size
        self._expire(now)

    def _expire(self, now: float) -> None:
        while self._events and self._events[0][0] <= now - self.window:
            self._bytes -= self._events.popleft()[1]

    def rate(self, now: float) -> float:
        if self._start is None:
            return 0.0
        self._expire(now)
        span = min(self.window, now - self._start)
        return 8.0 * self._bytes / span if span > 0 else 0.0


@dataclass(frozen=True)
class MediaStats:
    """One look at a call's media; ``to_json`` keys are stable (``schema_version`` 1)."""

    duration_s: float
    codec: str
    packets_sent: int
    packets_received: int
    bytes_sent: int
    bytes_received: int
    #: Packets the peer sent that never arrived (cumulative) and as a percentage.
    packets_lost: int
    loss_percent: float
    #: The loss the peer last reported for what we send (None before its first report).
    remote_loss_percent: float | None
    jitter_ms: float
    rtt_ms: float | None
    #: Recent rates (last 2 s) of the UDP payloads: RTP header, Opus and tag, plus reports.
    send_kbps: float
    receive_kbps: float
    jitter_buffer_ms: int
    jitter_buffer_target_ms: int
    late: int
    duplicates: int
    forged: int
    malformed: int
    fec_recovered: int
    concealed: int

    @property
    def average_send_kbps(self) -> float:
        return 8.0 * self.bytes_sent / self.duration_s / 1000.0 if self.duration_s > 0 else 0.0

    @property
    def average_receive_kbps(self) -> float:
        if self.duration_s <= 0:
            return 0.0
        return 8.0 * self.bytes_received / self.duration_s / 1000.0

    def to_json(self) -> dict[str, object]:
        document: dict[str, object] = {"schema_version": 1}
        for key, value in asdict(self).items():
            document[key] = round(value, 3) if isinstance(value, float) else value
        return document

    def summary(self) -> list[str]:
        """The lines printed when a call ends."""
        minutes, seconds = divmod(round(self.duration_s), 60)
        rtt = f"{self.rtt_ms:.0f} ms" if self.rtt_ms is not None else "unknown"
        return [
            f"Duration {minutes}:{seconds:02d}, codec {self.codec}.",
            f"Round trip {rtt}, loss {self.loss_percent:.1f} %, jitter {self.jitter_ms:.1f} ms, "
            f"jitter buffer {self.jitter_buffer_ms} ms.",
            f"Sent {self.packets_sent} packets ({self.average_send_kbps:.1f} kbit/s), "
            f"received {self.packets_received} ({self.average_receive_kbps:.1f} kbit/s).",
            f"Recovered {self.fec_recovered} frames by FEC, concealed {self.concealed}; "
            f"late {self.late}, duplicate {self.duplicates}, forged {self.forged}.",
        ]
