"""Media encryption: sealing, nonce construction, tamper detection, the replay window."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.bindings import crypto_aead_chacha20poly1305_ietf_encrypt

from client.media.mediacrypto import (
    KIND_RTCP,
    KIND_RTP,
    REPLAY_WINDOW,
    TAG_BYTES,
    MediaCryptoError,
    MediaKeys,
    MediaOpener,
    MediaSealer,
    OpenedReport,
    OpenedRtp,
    ReplayWindow,
    estimate_index,
    nonce,
)
from client.media.rtp import (
    OPUS_PAYLOAD_TYPE,
    ReportBlock,
    RtcpReport,
    RtpHeader,
    RtpPacket,
    SenderInfo,
    is_rtcp,
)

SETTINGS = settings(max_examples=200, deadline=None)
KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
SSRC = 0x01020304


def pair(first_sequence: int = 0) -> tuple[MediaSealer, MediaOpener]:
    return MediaSealer(KEY, SSRC, first_sequence=first_sequence), MediaOpener(KEY)


def opened_rtp(opener: MediaOpener, datagram: bytes) -> OpenedRtp:
    result = opener.open(datagram)
    assert isinstance(result, OpenedRtp)
    return result


def test_nonce_is_kind_ssrc_and_48_bit_index() -> None:
    assert nonce(KIND_RTP, 0x01020304, 0x0000_0001_0002) == bytes.fromhex(
        "00000102030400000001" + "0002"
    )
    assert nonce(KIND_RTCP, 0xFFFFFFFF, (1 << 48) - 1) == bytes.fromhex("0100ffffffffffffffffffff")
    assert len({nonce(k, s, i) for k in (0, 1) for s in (1, 2) for i in (0, 1, 0x10000)}) == 12


def test_sealed_rtp_is_clear_header_then_aead_of_the_payload() -> None:
    sealer = MediaSealer(KEY, SSRC, first_sequence=7)
    datagram = sealer.seal_rtp(OPUS_PAYLOAD_TYPE, 960, b"opus frame", marker=True)
    header = bytes(RtpHeader(OPUS_PAYLOAD_TYPE, 7, 960, SSRC, marker=True))
    expected = crypto_aead_chacha20poly1305_ietf_encrypt(
        b"opus frame", header, nonce(KIND_RTP, SSRC, 7), KEY
    )
    assert datagram == header + expected
    assert len(datagram) == 12 + len(b"opus frame") + TAG_BYTES
    assert sealer.next_index == 8


def test_sealed_report_keeps_its_rtcp_header_and_appends_the_index() -> None:
    sealer = MediaSealer(KEY, SSRC)
    report = RtcpReport(SSRC, SenderInfo(1 << 40, 960, 1, 10))
    datagram = sealer.seal_report(report)
    plain = bytes(report)
    assert datagram[:8] == plain[:8]
    assert is_rtcp(datagram)
    assert datagram[-4:] == bytes.fromhex("80000000")
    expected = crypto_aead_chacha20poly1305_ietf_encrypt(
        plain[8:], plain[:8] + datagram[-4:], nonce(KIND_RTCP, SSRC, 0), KEY
    )
    assert datagram[8:-4] == expected
    assert sealer.seal_report(report)[-4:] == bytes.fromhex("80000001")


def test_round_trip_of_media_and_reports() -> None:
    sealer, opener = pair(first_sequence=100)
    for n in range(5):
        result = opened_rtp(opener, sealer.seal_rtp(OPUS_PAYLOAD_TYPE, 960 * n, bytes([n]) * 9))
        assert result.index == 100 + n
        assert result.packet.payload == bytes([n]) * 9
        assert result.packet.header.sequence_number == 100 + n
        assert result.packet.header.timestamp == 960 * n
    block = ReportBlock(9, 3, 4, 5, 6, 7, 8)
    report = RtcpReport(SSRC, SenderInfo(1, 2, 3, 4), (block,))
    opened = opener.open(sealer.seal_report(report))
    assert opened == OpenedReport(report, 0)
    assert opener.counters["opened-rtp"] == 5 and opener.counters["opened-rtcp"] == 1


def test_a_padded_packet_is_padded_inside_the_encryption() -> None:
    header = RtpHeader(OPUS_PAYLOAD_TYPE, 3, 0, SSRC, padding=True)
    plain = b"abc\x00\x00\x03"  # payload "abc", then 3 bytes of padding
    aead = crypto_aead_chacha20poly1305_ietf_encrypt(
        plain, bytes(header), nonce(KIND_RTP, SSRC, 3), KEY
    )
    sealed = bytes(header) + aead
    result = opened_rtp(MediaOpener(KEY), sealed)
    assert result.packet == RtpPacket(header, b"abc", 3)


def test_keys_are_checked_and_never_printed() -> None:
    keys = MediaKeys(send=KEY, receive=OTHER_KEY)
    assert repr(keys) == "MediaKeys(<hidden>)"
    assert keys.reversed() == MediaKeys(send=OTHER_KEY, receive=KEY)
    with pytest.raises(ValueError):
        MediaKeys(send=KEY, receive=KEY)
    with pytest.raises(ValueError):
        MediaKeys(send=KEY[:16], receive=OTHER_KEY)
    with pytest.raises(ValueError):
        MediaSealer(KEY, SSRC, first_sequence=0x8000)


def test_wrong_key_altered_header_or_payload_is_forged_and_dropped() -> None:
    sealer = MediaSealer(KEY, SSRC)
    datagram = sealer.seal_rtp(OPUS_PAYLOAD_TYPE, 0, b"payload")
    wrong = MediaOpener(OTHER_KEY)
    assert wrong.open(datagram) is None
    assert wrong.counters["forged"] == 1
    opener = MediaOpener(KEY)
    for position in (1, 5, 9, 12, len(datagram) - 1):  # PT, timestamp, SSRC, payload, tag
        altered = bytearray(datagram)
        altered[position] ^= 0x01
        assert opener.open(bytes(altered)) is None
    assert opener.counters["forged"] == 5
    # The genuine packet still opens: failed forgeries did not move the window.
    assert opened_rtp(opener, datagram).packet.payload == b"payload"


def test_altered_report_is_forged() -> None:
    sealer, opener = pair()
    datagram = bytearray(sealer.seal_report(RtcpReport(SSRC, SenderInfo(1, 2, 3, 4))))
    datagram[-1] ^= 1  # the index trailer is authenticated too
    assert opener.open(bytes(datagram)) is None
    datagram[-1] ^= 1
    datagram[10] ^= 1
    assert opener.open(bytes(datagram)) is None
    assert opener.counters["forged"] == 2


def test_unencrypted_or_short_datagrams_are_malformed() -> None:
    opener = MediaOpener(KEY)
    plain_report = bytes(RtcpReport(SSRC, SenderInfo(1, 2, 3, 4)))
    header = bytes(RtpHeader(OPUS_PAYLOAD_TYPE, 1, 0, SSRC))
    for datagram in (b"", b"\x00\x01", plain_report[:8], header + bytes(TAG_BYTES - 1), b"\x80"):
        assert opener.open(datagram) is None
    not_flagged = plain_report[:8] + bytes(TAG_BYTES) + bytes(4)  # E bit clear
    assert opener.open(not_flagged) is None
    assert opener.counters["malformed"] == 6
    assert opener.counters["forged"] == 0


def test_duplicates_and_too_old_packets_are_refused() -> None:
    sealer, opener = pair()
    sent = [
        sealer.seal_rtp(OPUS_PAYLOAD_TYPE, 0, bytes([n % 256])) for n in range(REPLAY_WINDOW + 10)
    ]
    opened_rtp(opener, sent[5])
    assert opener.open(sent[5]) is None
    assert opener.counters["duplicate"] == 1
    for datagram in sent[REPLAY_WINDOW:]:
        opened_rtp(opener, datagram)
    # Index 10 is within the window of the highest (137): late but new, so accepted once.
    assert opened_rtp(opener, sent[10]).index == 10
    assert opener.open(sent[10]) is None
    # Index 9 is 128 behind the highest: too old to tell, refused.
    assert opener.open(sent[9]) is None
    assert opener.counters["too-old"] == 1
    assert opener.counters["duplicate"] == 2


def test_reports_have_their_own_replay_window() -> None:
    sealer, opener = pair()
    reports = [sealer.seal_report(RtcpReport(SSRC, SenderInfo(n, 0, 0, 0))) for n in range(3)]
    opened_rtp(opener, sealer.seal_rtp(OPUS_PAYLOAD_TYPE, 0, b"x"))
    assert opener.open(reports[2]) is not None
    assert opener.open(reports[0]) is not None
    assert opener.open(reports[2]) is None
    assert opener.counters["duplicate"] == 1


def test_sequence_rollover_and_reordering_across_it() -> None:
    sealer, opener = pair()
    sealer.next_index = 0xFFF0
    sent = [sealer.seal_rtp(OPUS_PAYLOAD_TYPE, 0, n.to_bytes(4, "big")) for n in range(40)]
    # Deliver with the packets around the wrap swapped.
    order = list(range(40))
    order[14], order[17] = order[17], order[14]  # indices 0xFFFE and 0x10001
    indices = [opened_rtp(opener, sent[i]).index for i in order]
    assert sorted(indices) == list(range(0xFFF0, 0xFFF0 + 40))
    assert indices[14] == 0x10001 and indices[17] == 0xFFFE
    assert opener.counters["opened-rtp"] == 40


def test_far_ahead_packets_move_the_window() -> None:
    sealer, opener = pair()
    first = sealer.seal_rtp(OPUS_PAYLOAD_TYPE, 0, b"a")
    sealer.next_index = 30000  # a long outage: 30000 packets lost
    ahead = sealer.seal_rtp(OPUS_PAYLOAD_TYPE, 0, b"b")
    assert opened_rtp(opener, first).index == 0
    assert opened_rtp(opener, ahead).index == 30000
    assert opener.open(first) is None
    assert opener.counters["too-old"] == 1


def test_estimate_index_follows_rfc_3711() -> None:
    assert estimate_index(None, 5) == 5
    assert estimate_index(0x1FFFE, 0x0001) == 0x20001  # wrapped forwards
    assert estimate_index(0x20002, 0xFFFE) == 0x1FFFE  # a late one from before the wrap
    assert estimate_index(0x00005, 0xFFFE) < 0  # before the start: refused by the opener
    assert estimate_index(0x18000, 0x7000) == 0x17000


def test_sealer_refuses_to_reuse_a_nonce() -> None:
    sealer = MediaSealer(KEY, SSRC)
    sealer.next_index = (1 << 48) - 1
    sealer.seal_rtp(OPUS_PAYLOAD_TYPE, 0, b"last")
    with pytest.raises(MediaCryptoError):
        sealer.seal_rtp(OPUS_PAYLOAD_TYPE, 0, b"one too many")
    sealer.next_report_index = 1 << 31
    with pytest.raises(MediaCryptoError):
        sealer.seal_report(RtcpReport(SSRC))


def test_replay_window_bitmap() -> None:
    window = ReplayWindow(8)
    assert window.check(100) is None
    window.accept(100)
    assert window.check(100) == "duplicate"
    window.accept(103)
    assert [window.check(i) for i in (95, 96, 100, 101, 103, 104)] == [
        "too-old",
        None,
        "duplicate",
        None,
        "duplicate",
        None,
    ]
    window.accept(1000)
    assert window.check(999) is None and window.check(992) == "too-old"


def test_many_sources_are_bounded() -> None:
    opener = MediaOpener(KEY, max_sources=2)
    sealers = [MediaSealer(KEY, ssrc) for ssrc in (1, 2, 3)]
    first = [s.seal_rtp(OPUS_PAYLOAD_TYPE, 0, b"x") for s in sealers]
    for datagram in first:
        opened_rtp(opener, datagram)
    assert opener.open(first[2]) is None  # still remembered
    assert opener.counters["duplicate"] == 1


@SETTINGS
@given(st.binary(max_size=200))
def test_open_never_raises_on_random_bytes(data: bytes) -> None:
    opener = MediaOpener(KEY)
    assert opener.open(data) is None
    assert sum(opener.counters.values()) == 1


@SETTINGS
@given(st.binary(max_size=100), st.booleans(), st.data())
def test_any_change_to_a_sealed_packet_is_detected(
    payload: bytes, report: bool, data: st.DataObject
) -> None:
    sealer = MediaSealer(KEY, SSRC)
    if report:
        datagram = sealer.seal_report(RtcpReport(SSRC, SenderInfo(1, 2, 3, len(payload))))
    else:
        datagram = sealer.seal_rtp(OPUS_PAYLOAD_TYPE, 0, payload)
    altered = bytearray(datagram)
    position = data.draw(st.integers(0, len(altered) - 1))
    altered[position] ^= data.draw(st.integers(1, 255))
    cut = data.draw(st.integers(0, len(altered)))
    opener = MediaOpener(KEY)
    assert opener.open(bytes(altered)) is None
    assert opener.open(bytes(altered[:cut])) is None
    assert opener.open(datagram) is not None
