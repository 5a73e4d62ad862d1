"""Candidates: priorities, the wire form and its validation (client.candidates)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from client.candidates import (
    MAX_CANDIDATES,
    Candidate,
    CandidateError,
    dedupe,
    format_address,
    from_wire,
    parse_address,
    priority,
    to_wire,
)
from client.signalling import CandidateInfo


def test_priorities_order_host_prflx_srflx_relay() -> None:
    ranked = sorted(("relay", "srflx", "host", "prflx"), key=priority, reverse=True)
    assert ranked == ["host", "prflx", "srflx", "relay"]
    assert priority("host") == (126 << 24) | (65535 << 8) | 255
    assert priority("srflx", 0) < priority("srflx", 1) < priority("prflx", 0)


def test_wire_round_trip_and_canonical_hosts() -> None:
    ipv6 = Candidate("srflx", "2001:DB8:0:0::1", 4000, 7)
    assert ipv6.host == "2001:db8::1"
    assert ipv6.family == 6 and str(ipv6) == "srflx [2001:db8::1]:4000"
    host = Candidate.make("host", ("198.18.11.10", 5000))
    assert host.to_wire() == ["host", "198.18.11.10", 5000, priority("host")]
    assert from_wire(to_wire([host, ipv6])) == [host, ipv6]
    assert Candidate.from_wire(("relay", "203.0.113.5", 3478, 0)).kind == "relay"


def test_signalled_candidates_convert() -> None:
    info = CandidateInfo("srflx", "203.0.113.5", 4000, priority("srflx"))
    assert Candidate.of(info) == Candidate("srflx", "203.0.113.5", 4000, priority("srflx"))


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        ("host 1.2.3.4", "not a list of kind"),
        (["host", "1.2.3.4", 5], "not a list of kind"),
        (["stun", "1.2.3.4", 5, 1], "unknown kind"),
        ([b"host", "1.2.3.4", 5, 1], "unknown kind"),
        (["host", "example.com", 5, 1], "not an IP address"),
        (["host", b"\x01\x02\x03\x04", 5, 1], "not an IP address"),
        (["host", "fe80::1%eth0", 5, 1], "zone id"),
        (["host", "0.0.0.0", 5, 1], "cannot be 0.0.0.0"),
        (["host", "::", 5, 1], "cannot be ::"),
        (["host", "224.0.0.1", 5, 1], "cannot be 224.0.0.1"),
        (["host", "255.255.255.255", 5, 1], "broadcast"),
        (["host", "1.2.3.4", 0, 1], "port is out of range"),
        (["host", "1.2.3.4", 65536, 1], "port is out of range"),
        (["host", "1.2.3.4", True, 1], "port is out of range"),
        (["host", "1.2.3.4", "5", 1], "port is out of range"),
        (["host", "1.2.3.4", 5, -1], "priority is out of range"),
        (["host", "1.2.3.4", 5, 2**32], "priority is out of range"),
    ],
)
def test_bad_candidates_are_refused_with_a_reason(wire: Any, message: str) -> None:
    with pytest.raises(CandidateError, match=message):
        Candidate.from_wire(wire)


def test_a_list_holds_at_most_sixteen_and_drops_duplicates() -> None:
    many = [["host", f"203.0.113.{i}", 5000, 1] for i in range(1, MAX_CANDIDATES + 2)]
    assert len(from_wire(many[:MAX_CANDIDATES])) == MAX_CANDIDATES
    with pytest.raises(CandidateError, match="More than 16"):
        from_wire(many)
    with pytest.raises(CandidateError, match="not a list"):
        from_wire({"host": 1})
    low = Candidate("prflx", "203.0.113.1", 5000, 1)
    high = Candidate("host", "203.0.113.1", 5000, 9)
    assert dedupe([low, high]) == [high]


def test_addresses_parse_and_format() -> None:
    assert parse_address("203.0.113.5:3478") == ("203.0.113.5", 3478)
    assert parse_address("[2001:db8::1]:80") == ("2001:db8::1", 80)
    assert format_address(("2001:db8::1", 80)) == "[2001:db8::1]:80"
    for bad in ("203.0.113.5", "203.0.113.5:x", "203.0.113.5:99999", "name:80", "1.2.3.4:٣"):
        with pytest.raises(CandidateError):
            parse_address(bad)


_atoms = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.text(max_size=50),
    st.binary(max_size=20),
    st.floats(allow_nan=True),
    st.sampled_from(["host", "srflx", "prflx", "relay", "1.2.3.4", "::1", "fe80::1%1"]),
)
_wire = st.recursive(_atoms, lambda inner: st.lists(inner, max_size=5), max_leaves=30)


@given(st.one_of(_wire, st.lists(st.lists(_atoms, min_size=4, max_size=4), max_size=20)))
def test_from_wire_raises_only_candidate_error(value: object) -> None:
    try:
        candidates = from_wire(value)
    except CandidateError:
        return
    assert len(candidates) <= MAX_CANDIDATES
    assert from_wire(to_wire(candidates)) == candidates


@given(
    st.sampled_from(["host", "srflx", "prflx", "relay"]),
    st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)),
    st.integers(1, 65535),
    st.integers(0, 2**32 - 1),
)
def test_valid_candidates_round_trip(kind: str, ip: Any, port: int, prio: int) -> None:
    assume(not (ip.is_unspecified or ip.is_multicast or str(ip) == "255.255.255.255"))
    candidate = Candidate(kind, str(ip), port, prio)
    assert Candidate.from_wire(candidate.to_wire()) == candidate
    assert parse_address(format_address(candidate.address)) == candidate.address
