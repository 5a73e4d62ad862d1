"""Run the connectivity checks (``client.connectivity``) between real processes: NAT lab tests.

Two modes, each printing JSON objects, one per line, on stdout:

    python -m tools.checkpeer reflect --listen 203.0.113.200:3478
        A tiny public "what is my address" server: answers each reflect request with the source
        address it saw (the server-reflexive address a call side learns from STUN in the product).
        Prints {"event": "ready", ...} and serves until stopped.

    python -m tools.checkpeer peer --role controlling --key HEX --call-id HEX \\
            --reflector 203.0.113.200:3478 [--remote FILE] [--timeout 8] [--linger 2]
        One call side: opens one UDP socket, learns its reflexive address from the reflector over
        that socket, prints {"event": "candidates", "candidates": [[kind, host, port, prio]...]},
        reads the peer's candidates (a JSON list in wire form) from --remote FILE or one line
        on stdin, runs ConnectivityChecker and prints {"event": "selected", ...} (exit 0) or
        {"event": "failed", "error": ...} (exit 1).  It keeps answering checks for --linger
        seconds after the result, so the other side can finish too.

Reflector messages (first byte 'R', outside STUN, RTP and check packets on the call socket):

    request  client -> reflector  b"R?" + 8-byte nonce, zero-padded to 64 bytes
    reply    reflector -> client  b"R=" + nonce + "host:port" (ASCII), never longer than the
                                  request (so the reflector cannot amplify)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import DatagramProtocol

from client.candidates import (
    Address,
    Candidate,
    CandidateError,
    dedupe,
    format_address,
    from_wire,
    parse_address,
)
from client.connectivity import ConnectivityChecker, NoDirectPath, SelectedPair

REQUEST_SIZE = 64
NONCE_SIZE = 8
REFLECT_TRIES = 3
REFLECT_WAIT = 0.5


def reflect_request(nonce: bytes) -> bytes:
    return (b"R?" + nonce).ljust(REQUEST_SIZE, b"\x00")


def reflect_reply(request: bytes, source: Address) -> bytes | None:
    """The reflector's answer to ``request`` from ``source`` (None: not a request, no answer)."""
    if len(request) != REQUEST_SIZE or not request.startswith(b"R?"):
        return None
    reply = b"R=" + request[2 : 2 + NONCE_SIZE] + format_address(source).encode()
    return reply if len(reply) <= len(request) else None


def parse_reflect_reply(data: bytes, nonce: bytes) -> Address | None:
    """The address in a reply to our request with ``nonce`` (None for anything else)."""
    if not data.startswith(b"R=" + nonce):
        return None
    try:
        return parse_address(data[2 + NONCE_SIZE :].decode("ascii"))
    except (UnicodeDecodeError, CandidateError):
        return None


class Reflector(DatagramProtocol):
    """Answers reflect requests with the source address; ignores everything else."""

    def __init__(self) -> None:
        self.answered = 0
        self.ignored = 0

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        reply = reflect_reply(datagram, (addr[0], addr[1]))
        if reply is None or self.transport is None:
            self.ignored += 1
            return
        self.answered += 1
        self.transport.write(reply, addr)


class PeerSocket(DatagramProtocol):
    """The call socket of one side: check packets go to the checker, reflect replies here."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.checker: ConnectivityChecker | None = None
        self.reflexive: Deferred[Address | None] | None = None
        self.nonce = b""
        self.send_errors = 0

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        if self.checker is not None and self.checker.datagram_received(
            datagram, (addr[0], addr[1])
        ):
            return
        if self.reflexive is not None and not self.reflexive.called:
            found = parse_reflect_reply(datagram, self.nonce)
            if found is not None:
                self.reflexive.callback(found)

    def send(self, data: bytes, address: Address) -> None:
        if self.transport is None:
            return
        try:
            self.transport.write(data, address)
        except OSError:  # no route (a private address of another LAN): the checks go on
            self.send_errors += 1

    async def learn_reflexive(self, reflector: Address) -> Address | None:
        """Our address as the reflector sees it, over this socket (None if it never answers)."""
        for _ in range(REFLECT_TRIES):
            self.nonce = os.urandom(NONCE_SIZE)
            waiting: Deferred[Address | None] = Deferred()
            self.reflexive = waiting
            timer = self.clock.callLater(REFLECT_WAIT, waiting.callback, None)
            self.send(reflect_request(self.nonce), reflector)
            found = await waiting
            if timer.active():
                timer.cancel()
            if found is not None:
                return found
        return None


def route_source(toward: Address) -> str:
    """The local address the kernel sends from toward ``toward`` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(toward)
        return str(probe.getsockname()[0])


def emit(event: dict[str, Any]) -> None:
    print(json.dumps(event), flush=True)


def _read_remote(path: str | None) -> list[Candidate]:
    text = sys.stdin.readline() if path in (None, "-") else open(path).read()  # noqa: SIM115
    return from_wire(json.loads(text))


async def run_peer(reactor: Any, args: argparse.Namespace) -> int:
    from twisted.internet.threads import deferToThread

    reflector = parse_address(args.reflector)
    side = PeerSocket(reactor)
    port = reactor.listenUDP(args.port, side, interface="0.0.0.0")
    try:
        host = Candidate.make("host", (route_source(reflector), port.getHost().port))
        local = [host]
        mapped = await side.learn_reflexive(reflector)
        if mapped is not None:
            local = dedupe([host, Candidate.make("srflx", mapped)])
        emit({"event": "candidates", "candidates": [c.to_wire() for c in local]})
        remote = await deferToThread(_read_remote, args.remote)
        checker = ConnectivityChecker(
            reactor,
            side.send,
            bytes.fromhex(args.key),
            bytes.fromhex(args.call_id)[:8],
            args.role == "controlling",
            local,
            remote,
            timeout=args.timeout,
            peer=args.name,
        )
        side.checker = checker
        code = 0
        try:
            pair: SelectedPair = await checker.start()
            emit(
                {
                    "event": "selected",
                    "local": pair.local.to_wire(),
                    "remote": format_address(pair.remote),
                    "remote_kind": pair.remote_candidate.kind,
                    "rtt_ms": round(pair.rtt * 1000, 2),
                    "counters": dict(checker.counters),
                }
            )
        except NoDirectPath as exc:
            emit({"event": "failed", "error": str(exc), "counters": dict(checker.counters)})
            code = 1
        linger: Deferred[None] = Deferred()
        reactor.callLater(args.linger, linger.callback, None)
        await linger
        checker.stop()
        return code
    finally:
        await port.stopListening()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.checkpeer", description=__doc__)
    modes = parser.add_subparsers(dest="mode", required=True)
    reflect = modes.add_parser("reflect", help="answer reflect requests with the source address")
    reflect.add_argument("--listen", required=True, help="HOST:PORT")
    peer = modes.add_parser("peer", help="one call side running the connectivity checks")
    peer.add_argument("--role", choices=("controlling", "controlled"), required=True)
    peer.add_argument("--key", required=True, help="the 32-byte check key, hex")
    peer.add_argument("--call-id", required=True, help="the 16-byte call id, hex")
    peer.add_argument("--reflector", required=True, help="HOST:PORT of a reflector")
    peer.add_argument("--remote", help="file with the peer's candidates (default: one stdin line)")
    peer.add_argument("--port", type=int, default=0)
    peer.add_argument("--timeout", type=float, default=8.0)
    peer.add_argument("--linger", type=float, default=2.0)
    peer.add_argument("--name", default="the peer", help="the peer's name, for messages")
    args = parser.parse_args(argv)
    try:
        if args.mode == "peer" and (
            len(bytes.fromhex(args.key)) != 32 or len(bytes.fromhex(args.call_id)) < 8
        ):
            parser.error("--key takes 32 bytes and --call-id at least 8, in hex")
        parse_address(args.listen if args.mode == "reflect" else args.reflector)
    except (ValueError, CandidateError) as exc:
        parser.error(str(exc))

    from twisted.internet import reactor, task

    if args.mode == "reflect":
        host, port = parse_address(args.listen)
        listening = reactor.listenUDP(port, Reflector(), interface=host)  # type: ignore[attr-defined]
        emit({"event": "ready", "listen": format_address((host, listening.getHost().port))})
        reactor.run()
        return

    async def peer_main(r: Any) -> None:
        code = await run_peer(r, args)
        if code:
            raise SystemExit(code)

    task.react(lambda r: Deferred.fromCoroutine(peer_main(r)))


if __name__ == "__main__":
    main()
