"""The probe servers: one per public probe host, each with a primary and an alternate UDP port
and a TCP port, and a peer server to send "from another address" on a client's behalf.
The message table is in probe_wire.py. Runs as `python -m tools.netlab.probe server ...`.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import select
import socket
import sys
import time

from tools.netlab.probe_wire import (
    MAX_DATAGRAM,
    MAX_DELAY_S,
    Addr,
    Message,
    decode,
    emit,
    encode,
    fmt,
    in_lab,
    parse_addr,
)


class Server:
    """Answers probe requests until killed. Prints {"event": "ready"} once its ports are open."""

    def __init__(self, address: str, port: int, alt_port: int, peer: Addr | None) -> None:
        self.address = address
        self.peer = peer
        self.primary = self._udp(address, port)
        self.alt = self._udp(address, alt_port)
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind((address, port))
        self.tcp.listen(64)
        self.timers: list[tuple[float, int, socket.socket, bytes, Addr]] = []
        self.order = itertools.count()

    @staticmethod
    def _udp(address: str, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((address, port))
        return sock

    def send(self, sock: socket.socket, message: Message, to: Addr, delay: float = 0.0) -> None:
        if not in_lab(to):
            return
        if delay > 0:
            when = time.monotonic() + min(delay, MAX_DELAY_S)
            heapq.heappush(self.timers, (when, next(self.order), sock, encode(message), to))
            return
        self._sendto(sock, encode(message), to)

    @staticmethod
    def _sendto(sock: socket.socket, data: bytes, to: Addr) -> None:
        try:
            sock.sendto(data, to)
        except OSError as e:
            print(f"probe server: send to {fmt(to)}: {e}", file=sys.stderr)

    def serve_forever(self) -> None:
        emit({"event": "ready", "address": self.address})
        while True:
            now = time.monotonic()
            while self.timers and self.timers[0][0] <= now:
                _, _, sock, data, to = heapq.heappop(self.timers)
                self._sendto(sock, data, to)
            timeout = max(0.0, self.timers[0][0] - now) if self.timers else None
            readable, _, _ = select.select([self.primary, self.alt, self.tcp], [], [], timeout)
            for sock in readable:
                if sock is self.tcp:
                    self._accept()
                else:
                    data, src = sock.recvfrom(MAX_DATAGRAM)
                    message = decode(data)
                    if message is None:
                        continue
                    try:
                        self.handle(sock, message, (src[0], src[1]))
                    except (ValueError, TypeError) as e:  # a malformed request: ignored
                        print(f"probe server: bad request from {src}: {e}", file=sys.stderr)

    def _accept(self) -> None:
        conn, src = self.tcp.accept()
        with conn:
            conn.settimeout(1.0)
            with contextlib.suppress(OSError):
                conn.sendall(f"{src[0]}:{src[1]}\n".encode())

    def handle(self, sock: socket.socket, message: Message, src: Addr) -> None:
        op = message.get("op")
        ident = message.get("id")
        via = "primary" if sock is self.primary else "alt"
        if op == "bind":
            delay = float(message.get("delay", 0.0))
            self.send(
                sock, {"op": "mapped", "id": ident, "mapped": fmt(src), "via": via}, src, delay
            )
        elif op == "change":
            self.send(sock, {"op": "ack", "id": ident}, src)
            other_port = bool(message.get("port"))
            if message.get("addr") and self.peer is not None:
                relay = {"op": "relay", "id": ident, "to": fmt(src), "port": other_port}
                self.send(self.primary, relay, self.peer)
            else:
                out = self.alt if other_port else self.primary
                reply = {"op": "mapped", "id": ident, "mapped": fmt(src), "via": "changed-port"}
                self.send(out, reply, src)
        elif op == "relay" and self.peer is not None and src[0] == self.peer[0]:
            to = parse_addr(str(message.get("to")))
            out = self.alt if message.get("port") else self.primary
            via = "peer-alt" if message.get("port") else "peer"
            self.send(out, {"op": "mapped", "id": ident, "mapped": fmt(to), "via": via}, to)
