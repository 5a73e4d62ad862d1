"""The probe's messages, addresses, and the RFC 4787 words for what it observes (stdlib only).

The probe (probe.py, clients; probe_server.py, the servers) runs inside lab namespaces.

Message table (JSON over UDP; requests carry an "id" that the answer repeats):

| from -> to     | request                 | answer                                               |
| -------------- | ----------------------- | ---------------------------------------------------- |
| client -> srv  | bind {id, delay?}       | mapped {id, mapped, via} from the socket it reached, |
|                |                         | `delay` seconds later (max 30)                       |
| client -> srv  | change {id, addr, port} | ack {id} from the socket it reached, then mapped {id}|
|                |                         | from the other port (port), or from the peer server  |
|                |                         | (addr: via "peer"; addr and port: via "peer-alt")    |
| srv -> peer    | relay {id, to, port}    | the peer sends mapped {id, mapped: to} to `to`       |
| client <-> peer| punch {session, side,   | punch-ack {session, side, seen} to the source        |
|                | seen}                   |                                                      |
| client -> srv  | TCP connect to port     | the server writes "ip:port" and a newline, and closes|

The servers only ever send to lab addresses (the public prefixes and 198.18.0.0/15).
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from tools.netlab.scenario import PRIVATE_PREFIX, PUBLIC_PREFIXES

PROBE_PORT = 9000
ALT_PORT = 9001
MAX_DATAGRAM = 2048
MAX_DELAY_S = 30.0

Addr = tuple[str, int]
Message = dict[str, Any]

EIM = "endpoint-independent"
ADM = "address-dependent"
APDM = "address-and-port-dependent"
NO_NAT = "none"


def fmt(addr: Addr) -> str:
    return f"{addr[0]}:{addr[1]}"


def parse_addr(text: str) -> Addr:
    host, sep, port = text.strip().rpartition(":")
    if not sep:
        raise ValueError(f"expected ip:port, got {text!r}")
    return str(ipaddress.IPv4Address(host)), int(port)


def in_lab(addr: Addr) -> bool:
    ip = ipaddress.IPv4Address(addr[0])
    return ip in PRIVATE_PREFIX or any(ip in p for p in PUBLIC_PREFIXES)


def encode(message: Message) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def decode(data: bytes) -> Message | None:
    try:
        message = json.loads(data)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


def emit(message: Message) -> None:
    print(json.dumps(message), flush=True)


def classify_mapping(local: Addr, primary: Addr, other_port: Addr, other_addr: Addr) -> str:
    """RFC 4787 mapping behaviour from the mapped addresses seen by three destinations:
    the primary server, the same server's other port, and the other server."""
    if primary == other_port == other_addr == local:
        return NO_NAT
    if primary == other_port == other_addr:
        return EIM
    if primary == other_port:
        return ADM
    return APDM


def classify_filtering(other_addr_got_in: bool, other_port_got_in: bool) -> str:
    """RFC 4787 filtering behaviour after the host sent to the primary server only."""
    if other_addr_got_in:
        return EIM
    if other_port_got_in:
        return ADM
    return APDM
