"""Can the world reach a node that volunteers as a supernode?  Asked by the login server.

The login server connects back to the applicant's observed address: a TCP connection on which
the applicant must complete a handshake signed by its node key, and a UDP reachability check
whose answer must carry the node key's signature of a fresh nonce.  Either failing means the
node is behind a NAT or a firewall that keeps it from serving others.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.protocol import Factory

from overlay.channel import ServerNotTrusted
from overlay.connection import ClientConnection
from overlay.datagram import DatagramEndpoint
from overlay.errors import VoipError
from overlay.overlay_protocol import ReachCheck, ReachOk
from overlay.supernode import reach_ok

PROBE_TIMEOUT = 3.0
REACH_PAD = 160


class NetworkProber:
    """``await prober(host, tcp_port, udp_port, node_key)`` -> None, or why not reachable."""

    def __init__(self, reactor: Any, udp: DatagramEndpoint, timeout: float = PROBE_TIMEOUT):
        self.reactor = reactor
        self.udp = udp
        self.timeout = timeout

    async def __call__(
        self, host: str, tcp_port: int, udp_port: int, node_key: bytes
    ) -> str | None:
        reason = await self._tcp(host, tcp_port, node_key)
        if reason is not None:
            return reason
        return await self._udp(host, udp_port, node_key)

    async def _tcp(self, host: str, port: int, node_key: bytes) -> str | None:
        connection: ClientConnection | None = None

        async def handshake() -> None:
            nonlocal connection
            factory = Factory.forProtocol(
                lambda: ClientConnection(self.reactor, node_key, self.timeout, "the applicant")
            )
            endpoint = HostnameEndpoint(self.reactor, host, port, timeout=self.timeout)
            connected = await endpoint.connect(factory)
            assert isinstance(connected, ClientConnection)
            connection = connected
            await connection.ready

        work = Deferred.fromCoroutine(handshake())
        work.addTimeout(self.timeout, self.reactor)
        try:
            await work
        except Exception as exc:  # noqa: BLE001 - every failure is a reason to refuse
            return f"TCP port {port}: {_reason(exc)}"
        finally:
            if connection is not None:
                connection.close()
        return None

    async def _udp(self, host: str, port: int, node_key: bytes) -> str | None:
        nonce = os.urandom(16)
        try:
            reply = await self.udp.request(
                (host, port),
                lambda rid: ReachCheck(rid, nonce),
                timeout=self.timeout,
                pad_to=REACH_PAD,
            )
        except VoipError:
            return f"UDP port {port}: no answer within {self.timeout:g} s"
        if not (
            isinstance(reply, ReachOk)
            and reply.nonce == nonce
            and reach_ok(node_key, nonce, reply.signature)
        ):
            return f"UDP port {port}: the answer was not signed by the node's key"
        return None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ServerNotTrusted):  # its own text speaks of the CA key, not the node's
        return "the handshake was not signed by the node's key"
    if isinstance(exc, ConnectingCancelledError):  # our timeout cancelled the connect
        return "no answer"
    text = str(exc).strip() or type(exc).__name__
    if "Connection was refused" in text or "refused" in text.lower():
        return "connection refused"
    if "timed out" in text.lower() or type(exc).__name__ in ("TimeoutError", "CancelledError"):
        return "no answer"
    return text.splitlines()[0].rstrip(".")
