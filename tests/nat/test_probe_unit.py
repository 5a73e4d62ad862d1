"""The probe's classification and the impairer's netlink codec (no root needed)."""

from __future__ import annotations

import struct

import pytest

from tools.netlab import impair
from tools.netlab.probe_wire import (
    ADM,
    APDM,
    EIM,
    NO_NAT,
    classify_filtering,
    classify_mapping,
    decode,
    encode,
    in_lab,
    parse_addr,
)
from tools.netlab.selfcheck import CLAIMS, Result

LOCAL = ("198.18.1.10", 5000)
M1 = ("203.0.113.2", 5000)
M2 = ("203.0.113.2", 6000)
M3 = ("203.0.113.2", 7000)


def test_mapping_behaviour_in_rfc_4787_words() -> None:
    assert classify_mapping(LOCAL, LOCAL, LOCAL, LOCAL) == NO_NAT
    assert classify_mapping(LOCAL, M1, M1, M1) == EIM
    assert classify_mapping(LOCAL, M1, M1, M2) == ADM
    assert classify_mapping(LOCAL, M1, M2, M3) == APDM
    assert classify_mapping(LOCAL, M1, M2, M1) == APDM


def test_filtering_behaviour_in_rfc_4787_words() -> None:
    assert classify_filtering(True, True) == "endpoint-independent"
    assert classify_filtering(False, True) == "address-dependent"
    assert classify_filtering(False, False) == "address-and-port-dependent"


def test_messages_and_addresses() -> None:
    assert decode(encode({"op": "bind", "id": 3})) == {"op": "bind", "id": 3}
    assert decode(b"\xff") is None
    assert decode(b"[1]") is None
    assert parse_addr("203.0.113.5:9000") == ("203.0.113.5", 9000)
    with pytest.raises(ValueError):
        parse_addr("example.com:80")
    assert in_lab(("198.19.0.2", 1)) and in_lab(("198.51.100.9", 1))
    assert not in_lab(("8.8.8.8", 53)) and not in_lab(("127.0.0.1", 1))


def test_netlink_bind_and_verdict_messages() -> None:
    bind = impair.bind_request(7, seq=1)
    length, msg_type, flags, seq, _pid = struct.unpack_from("=IHHII", bind)
    assert length == len(bind) == 16 + 4 + 8
    assert msg_type == (3 << 8) | 2  # NFNL_SUBSYS_QUEUE, NFQNL_MSG_CONFIG
    assert flags == impair.NLM_F_REQUEST | impair.NLM_F_ACK and seq == 1
    assert bind[16:20] == bytes([0, 0, 0, 7])  # AF_UNSPEC, version 0, queue 7 big-endian
    verdict = impair.verdict(7, packet_id=0x01020304, accept=True)
    assert verdict[-8:] == struct.pack("!II", 1, 0x01020304)


def test_netlink_parse_finds_packet_ids_and_errors() -> None:
    attr = struct.pack("=HH", 4 + 7, impair.NFQA_PACKET_HDR) + struct.pack("!IHB", 42, 0x800, 1)
    attr += b"\0"  # padded to 4 bytes
    body = struct.pack("=BBH", 2, 0, 0) + attr
    packet = struct.pack("=IHHII", 16 + len(body), 3 << 8, 0, 0, 0) + body
    error = struct.pack("=IHHII", 16 + 4, impair.NLMSG_ERROR, 0, 1, 0) + struct.pack("=i", -1)
    assert impair.parse(packet + error) == ([42], [1])
    assert impair.parse(b"\x00" * 5) == ([], [])


def test_a_result_fails_when_anything_claimed_differs() -> None:
    claim = next(c for c in CLAIMS if c.kind == "symmetric")
    good = Result(claim.kind, claim.expect, dict(claim.expect))
    assert good.ok and good.line().startswith("ok   symmetric")
    bad = Result(claim.kind, claim.expect, {**claim.expect, "mapping": EIM})
    assert not bad.ok
    assert "FAIL" in bad.line() and "(claimed mapping=address-and-port-dependent" in bad.line()
    assert not Result(claim.kind, claim.expect, dict(claim.expect), error="no answer").ok
