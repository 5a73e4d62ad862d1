"""The UDP socket of one call, shared by three protocols told apart by their first byte.

    first byte   protocol                       handled by
    0x00-0x03    STUN (reflexive address)       ``overlay.stun.StunClient``
    0x56 'V'     connectivity checks            ``client.connectivity.ConnectivityChecker``
    0x80-0xBF    RTP / RTCP-like reports        ``client.media.engine.MediaSession``

(RFC 7983 demultiplexes STUN, DTLS and RTP on one port the same way.)  Each handler says whether
a datagram was its own; what nobody takes is counted and dropped.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

Address = tuple[str, int]
Handler = Callable[[bytes, Address], bool]


class CallSocket(DatagramProtocol):
    log = Logger()

    def __init__(self) -> None:
        self.handlers: list[Handler] = []
        self.unclaimed = 0
        self.send_errors = 0
        self.port: Any = None

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        address = (addr[0], addr[1])
        for handler in list(self.handlers):
            if handler(datagram, address):
                return
        self.unclaimed += 1

    def send(self, data: bytes, address: Address) -> None:
        if self.transport is None:
            return
        try:
            self.transport.write(data, address)
        except OSError as exc:  # unreachable network, no route: the checks or media retry
            self.send_errors += 1
            self.log.debug(
                "call socket send to {address} failed: {error}", address=address, error=exc
            )

    @property
    def local_port(self) -> int:
        assert self.port is not None
        return int(self.port.getHost().port)

    def close(self) -> None:
        self.handlers.clear()
        if self.port is not None:
            port, self.port = self.port, None
            port.stopListening()


def route_source(destination: Address) -> str | None:
    """The local address the kernel would send from to reach ``destination`` (no packet sent)."""
    family = socket.AF_INET6 if ":" in destination[0] else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_DGRAM)
    try:
        probe.connect(destination)
        return str(probe.getsockname()[0])
    except OSError:
        return None
    finally:
        probe.close()
