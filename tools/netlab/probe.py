"""The lab's UDP/TCP probe clients (and the entry point that also starts the servers).

Stdlib only; runs inside a namespace: `ip netns exec vnl-X python -m tools.netlab.probe MODE ...`.
Every client prints JSON objects, one per line, on stdout. Every wait is bounded.
Modes: server (probe_server.py), nat-test, punch, rtt, burst, late. Messages: probe_wire.py.
"""

from __future__ import annotations

import argparse
import itertools
import select
import socket
import sys
import time
from collections.abc import Callable

from tools.netlab.probe_server import Server
from tools.netlab.probe_wire import (
    ALT_PORT,
    MAX_DATAGRAM,
    PROBE_PORT,
    Addr,
    Message,
    classify_filtering,
    classify_mapping,
    decode,
    emit,
    encode,
    fmt,
    in_lab,
    parse_addr,
)


class Client:
    """One UDP socket, and request/answer exchanges over it with bounded waits."""

    ids = itertools.count(1)

    def __init__(self, port: int = 0, wait: float = 0.5, tries: int = 3) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("0.0.0.0", port))
        self.wait = wait
        self.tries = tries

    def local(self, toward: Addr) -> Addr:
        """This socket's address as seen on the route toward `toward` (no packet is sent)."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(toward)
            return probe.getsockname()[0], self.sock.getsockname()[1]

    def receive(self, deadline: float) -> tuple[Message, Addr] | None:
        while (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([self.sock], [], [], left)
            if not readable:
                return None
            data, src = self.sock.recvfrom(MAX_DATAGRAM)
            message = decode(data)
            if message is not None:
                return message, (src[0], src[1])
        return None

    def request(
        self, dest: Addr, message: Message, accept: Callable[[Message, Addr], bool]
    ) -> tuple[Message, Addr] | None:
        for _ in range(self.tries):
            self.sock.sendto(encode(message), dest)
            deadline = time.monotonic() + self.wait
            while (got := self.receive(deadline)) is not None:
                if accept(*got):
                    return got
        return None

    def bind(self, server: Addr) -> Addr | None:
        ident = next(self.ids)
        got = self.request(server, {"op": "bind", "id": ident}, lambda m, _s: m.get("id") == ident)
        return parse_addr(got[0]["mapped"]) if got else None

    def changed(self, server: Addr, *, addr: bool, port: bool, settle: float = 0.5) -> bool | None:
        """Did the changed answer get in? None when the server never acknowledged the request."""
        for _ in range(self.tries):
            ident = next(self.ids)
            self.sock.sendto(
                encode({"op": "change", "id": ident, "addr": addr, "port": port}), server
            )
            acked = False
            deadline = time.monotonic() + self.wait
            while (got := self.receive(deadline)) is not None:
                message, src = got
                if message.get("id") != ident:
                    continue
                if message.get("op") == "ack" and src == server:
                    acked = True
                    deadline = time.monotonic() + settle
                elif message.get("op") == "mapped" and src != server:
                    return True
            if acked:
                return False
        return None


def tcp_mapped(server: Addr, timeout: float = 1.0) -> Addr | None:
    try:
        with socket.create_connection(server, timeout=timeout) as conn:
            conn.settimeout(timeout)
            line = conn.makefile("r").readline()
        return parse_addr(line)
    except (OSError, ValueError):
        return None


def nat_test(server: Addr, alt_port: int, server2: Addr, tcp: bool) -> Message:
    """Observe mapping and filtering behaviour (and whether UDP and TCP get out at all)."""
    result: Message = {"event": "nat-test"}
    if tcp:
        mapped_tcp = tcp_mapped(server)
        result["tcp"] = mapped_tcp is not None
        result["tcp_mapped"] = fmt(mapped_tcp) if mapped_tcp else None
    client = Client()
    first = client.bind(server)
    result["udp"] = first is not None
    if first is None:
        return result
    other_port = client.bind((server[0], alt_port))
    other_addr = client.bind(server2)
    local = client.local(server)
    result["local"] = fmt(local)
    result["mapped"] = [fmt(m) if m else None for m in (first, other_port, other_addr)]
    if other_port is None or other_addr is None:
        result["mapping"] = "unknown (no answer from the other port or server)"
        return result
    result["mapping"] = classify_mapping(local, first, other_port, other_addr)
    fresh = Client()  # a new mapping that has talked to the primary server only
    if fresh.bind(server) is None:
        result["filtering"] = "unknown (no answer on a fresh socket)"
        return result
    from_addr = fresh.changed(server, addr=True, port=True)
    from_port = False if from_addr else fresh.changed(server, addr=False, port=True)
    if from_addr is None or from_port is None:
        result["filtering"] = "unknown (the server did not acknowledge a change request)"
        return result
    result["filtering"] = classify_filtering(from_addr, from_port)
    return result


def punch(server: Addr, session: str, side: str, duration: float, stdin_wait: float) -> Message:
    """Hole punching: report the mapping, read the peer's address on stdin, punch toward it.

    Every packet says whether its sender has heard from the peer yet ("seen"). A side is done
    when it has heard from the peer and the peer has said it heard from this side.
    """
    client = Client()
    mapped = client.bind(server)
    emit({"event": "mapped", "mapped": fmt(mapped) if mapped else None})
    readable, _, _ = select.select([sys.stdin], [], [], stdin_wait)
    line = sys.stdin.readline() if readable else ""
    if not line.strip():
        return {"event": "result", "error": "no peer address on stdin"}
    peer = parse_addr(line)
    start = time.monotonic()
    end = start + duration
    seen: set[str] = set()
    confirmed = False
    next_send = start
    linger_until: float | None = None

    def say(op: str, to: Addr) -> None:
        if in_lab(to):
            message = {"op": op, "session": session, "side": side, "seen": bool(seen)}
            client.sock.sendto(encode(message), to)

    while (now := time.monotonic()) < end and (linger_until is None or now < linger_until):
        if now >= next_send:
            say("punch", peer)
            next_send = now + 0.1
        got = client.receive(min(next_send, end))
        if got is None:
            continue
        message, src = got
        if message.get("session") != session or message.get("side") == side:
            continue
        seen.add(fmt(src))
        confirmed = confirmed or bool(message.get("seen"))
        if message.get("op") == "punch":
            say("punch-ack", src)
        if confirmed and linger_until is None:
            linger_until = time.monotonic() + 0.3  # keep answering the peer's last punches
    return {
        "event": "result",
        "received": bool(seen),
        "confirmed": confirmed,
        "peer_seen": sorted(seen),
        "elapsed_s": round(time.monotonic() - start, 3),
    }


def rtt(server: Addr, count: int, interval: float) -> Message:
    client = Client(wait=1.0, tries=1)
    samples: list[float] = []
    for _ in range(count):
        start = time.monotonic()
        if client.bind(server) is not None:
            samples.append(round((time.monotonic() - start) * 1000, 3))
        time.sleep(interval)
    return {"event": "rtt", "sent": count, "received": len(samples), "rtt_ms": samples}


def burst(server: Addr, count: int, interval: float, wait: float) -> Message:
    """Send `count` requests `interval` s apart, then count answers for `wait` s (loss rate)."""
    client = Client()
    idents: set[int] = set()
    answered: set[int] = set()
    for _ in range(count):
        ident = next(Client.ids)
        idents.add(ident)
        client.sock.sendto(encode({"op": "bind", "id": ident}), server)
        time.sleep(interval)
    deadline = time.monotonic() + wait
    while len(answered) < count and (got := client.receive(deadline)) is not None:
        answer = got[0].get("id")
        if isinstance(answer, int) and answer in idents:
            answered.add(answer)
    return {"event": "burst", "sent": count, "received": len(answered)}


def late(server: Addr, delay: float) -> Message:
    """Ask for an answer `delay` s after one packet; does it still get through the NAT?"""
    client = Client()
    ident = next(Client.ids)
    client.sock.sendto(encode({"op": "bind", "id": ident, "delay": delay}), server)
    deadline = time.monotonic() + delay + 1.5
    while (got := client.receive(deadline)) is not None:
        if got[0].get("id") == ident:
            return {"event": "late", "received": True}
    return {"event": "late", "received": False}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.netlab.probe", description=__doc__)
    sub = parser.add_subparsers(dest="mode", required=True)
    srv = sub.add_parser("server")
    srv.add_argument("--address", required=True)
    srv.add_argument("--port", type=int, default=PROBE_PORT)
    srv.add_argument("--alt-port", type=int, default=ALT_PORT)
    srv.add_argument("--peer", type=parse_addr, default=None)
    test = sub.add_parser("nat-test")
    test.add_argument("--server", type=parse_addr, required=True)
    test.add_argument("--alt-port", type=int, default=ALT_PORT)
    test.add_argument("--server2", type=parse_addr, required=True)
    test.add_argument("--no-tcp", action="store_true")
    pun = sub.add_parser("punch")
    pun.add_argument("--server", type=parse_addr, required=True)
    pun.add_argument("--session", required=True)
    pun.add_argument("--side", required=True)
    pun.add_argument("--duration", type=float, default=3.0)
    pun.add_argument("--stdin-wait", type=float, default=10.0)
    rt = sub.add_parser("rtt")
    rt.add_argument("--server", type=parse_addr, required=True)
    rt.add_argument("--count", type=int, default=10)
    rt.add_argument("--interval", type=float, default=0.02)
    bu = sub.add_parser("burst")
    bu.add_argument("--server", type=parse_addr, required=True)
    bu.add_argument("--count", type=int, default=100)
    bu.add_argument("--interval", type=float, default=0.005)
    bu.add_argument("--wait", type=float, default=1.0)
    lt = sub.add_parser("late")
    lt.add_argument("--server", type=parse_addr, required=True)
    lt.add_argument("--delay", type=float, required=True)
    args = parser.parse_args(argv)
    try:
        if args.mode == "server":
            Server(args.address, args.port, args.alt_port, args.peer).serve_forever()
        elif args.mode == "nat-test":
            emit(nat_test(args.server, args.alt_port, args.server2, tcp=not args.no_tcp))
        elif args.mode == "punch":
            emit(punch(args.server, args.session, args.side, args.duration, args.stdin_wait))
        elif args.mode == "rtt":
            emit(rtt(args.server, args.count, args.interval))
        elif args.mode == "burst":
            emit(burst(args.server, args.count, args.interval, args.wait))
        elif args.mode == "late":
            emit(late(args.server, args.delay))
    except KeyboardInterrupt:
        return 130
    except OSError as e:
        print(f"probe {args.mode}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
