"""RFC 3550 statistics: interarrival jitter, loss, RTT from LSR/DLSR, bit rate, the snapshot."""

from __future__ import annotations

import pytest

from client.media.rtp import FRAME_TICKS, ReportBlock, ntp_middle, ntp_timestamp
from client.media.stats import (
    BitrateMeter,
    MediaStats,
    ReceiveStatistics,
    RoundTrip,
    compact_delay,
)


def test_constant_transit_has_no_jitter() -> None:
    stats = ReceiveStatistics()
    for index in range(50):
        stats.on_packet(index, index * FRAME_TICKS, 10.0 + index * 0.020 + 0.035, 100)
    assert stats.jitter == pytest.approx(0.0, abs=1e-6)
    assert stats.jitter_ms == pytest.approx(0.0, abs=1e-6)


def test_jitter_follows_the_rfc_3550_estimator() -> None:
    stats = ReceiveStatistics()
    transits = [0.030, 0.040, 0.030, 0.050, 0.030]
    for index, transit in enumerate(transits):
        stats.on_packet(index, index * FRAME_TICKS, index * 0.020 + transit, 100)
    # |D| in 48 kHz ticks: 480, 480, 960, 960; J += (|D| - J) / 16 from 0:
    # 30, 58.125, 114.492..., 167.336...
    assert stats.jitter == pytest.approx(167.3364, abs=1e-3)
    assert stats.jitter_ms == pytest.approx(167.3364 / 48, abs=1e-4)


def test_jitter_handles_timestamp_wrap() -> None:
    stats = ReceiveStatistics()
    for index in range(20):
        timestamp = (0xFFFFFFFF - 5 * FRAME_TICKS + index * FRAME_TICKS) & 0xFFFFFFFF
        stats.on_packet(index, timestamp, index * 0.020, 100)
    assert stats.jitter == pytest.approx(0.0, abs=1e-6)


def test_loss_cumulative_and_per_interval() -> None:
    stats = ReceiveStatistics()
    for index in [i for i in range(1000, 1010) if i not in (1003, 1007)]:
        stats.on_packet(index, 0, 0.0, 10)
    assert (stats.expected, stats.received, stats.lost) == (10, 8, 2)
    assert stats.loss_percent == pytest.approx(20.0)
    block = stats.report_block(0xABC, 0x1234, 0x20)
    assert block == ReportBlock(0xABC, (2 << 8) // 10, 2, 1009, 0, 0x1234, 0x20)
    for index in range(1010, 1020):
        stats.on_packet(index, 0, 0.0, 10)
    block = stats.report_block(0xABC, 0, 0)
    assert block.fraction_lost == 0
    assert block.cumulative_lost == 2
    assert block.highest_sequence == 1019
    assert stats.last_fraction_lost == 0.0


def test_round_trip_from_lsr_and_dlsr() -> None:
    rtt = RoundTrip()
    sent_at = 1000.0
    lsr = ntp_middle(ntp_timestamp(sent_at))
    # The peer held our SR for 250 ms; its report arrives 330 ms after we sent the SR.
    block = ReportBlock(1, 0, 0, 0, 0, lsr, compact_delay(0.250))
    assert rtt.on_report_block(block, sent_at + 0.330) == pytest.approx(0.080, abs=1e-4)
    assert rtt.smoothed == pytest.approx(0.080, abs=1e-4)
    block = ReportBlock(1, 0, 0, 0, 0, lsr, compact_delay(0.250))
    rtt.on_report_block(block, sent_at + 0.410)  # 160 ms
    assert rtt.last == pytest.approx(0.160, abs=1e-4)
    assert rtt.smoothed == pytest.approx(0.090, abs=1e-4)
    assert rtt.samples == 2


def test_round_trip_ignores_blocks_without_an_echo_and_implausible_ones() -> None:
    rtt = RoundTrip()
    assert rtt.on_report_block(ReportBlock(1, 0, 0, 0, 0, 0, 0), 5.0) is None
    lsr = ntp_middle(ntp_timestamp(100.0))
    # A DLSR longer than the time since our SR: the result would be negative (wraps).
    assert rtt.on_report_block(ReportBlock(1, 0, 0, 0, 0, lsr, compact_delay(2.0)), 101.0) is None
    assert rtt.rejected == 1
    assert rtt.smoothed is None


def test_bitrate_over_a_sliding_window() -> None:
    meter = BitrateMeter(window=2.0)
    assert meter.rate(0.0) == 0.0
    for n in range(150):  # 100 bytes every 20 ms for 3 s = 40 kbit/s
        meter.add(n * 0.020, 100)
    assert meter.rate(3.0) == pytest.approx(40_000, rel=0.02)
    assert meter.rate(10.0) == 0.0
    early = BitrateMeter(window=2.0)
    for n in range(25):  # half a second at the same rate
        early.add(n * 0.020, 100)
    assert early.rate(0.5) == pytest.approx(40_000, rel=0.05)


def snapshot(**changes: object) -> MediaStats:
    values: dict[str, object] = dict(
        duration_s=83.4,
        codec="opus 16 kHz",
        packets_sent=4170,
        packets_received=4100,
        bytes_sent=83.4 * 40_000 / 8,
        bytes_received=400_000,
        packets_lost=70,
        loss_percent=1.68,
        remote_loss_percent=0.5,
        jitter_ms=3.14159,
        rtt_ms=45.2,
        send_kbps=40.0,
        receive_kbps=38.5,
        jitter_buffer_ms=60,
        jitter_buffer_target_ms=60,
        late=3,
        duplicates=1,
        forged=0,
        malformed=2,
        fec_recovered=50,
        concealed=20,
    )
    values.update(changes)
    return MediaStats(**values)  # type: ignore[arg-type]


def test_snapshot_json_is_stable_and_rounded() -> None:
    document = snapshot().to_json()
    assert document["schema_version"] == 1
    assert document["jitter_ms"] == 3.142
    assert document["rtt_ms"] == 45.2
    assert list(document) == [
        "schema_version",
        "duration_s",
        "codec",
        "packets_sent",
        "packets_received",
        "bytes_sent",
        "bytes_received",
        "packets_lost",
        "loss_percent",
        "remote_loss_percent",
        "jitter_ms",
        "rtt_ms",
        "send_kbps",
        "receive_kbps",
        "jitter_buffer_ms",
        "jitter_buffer_target_ms",
        "late",
        "duplicates",
        "forged",
        "malformed",
        "fec_recovered",
        "concealed",
    ]


def test_summary_lines_for_the_end_of_a_call() -> None:
    lines = snapshot().summary()
    assert lines[0] == "Duration 1:23, codec opus 16 kHz."
    assert lines[1] == "Round trip 45 ms, loss 1.7 %, jitter 3.1 ms, jitter buffer 60 ms."
    assert lines[2].startswith("Sent 4170 packets (40.0 kbit/s), received 4100")
    assert "forged 0" in lines[3]
    assert "Round trip unknown" in snapshot(rtt_ms=None).summary()[1]
    assert snapshot(duration_s=0.0).average_send_kbps == 0.0
