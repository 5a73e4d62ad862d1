"""A userspace link impairer (delay, jitter, loss) over NFQUEUE, for kernels without `sch_netem`.

Run inside a namespace: `python -m tools.netlab.impair --queue 7 --delay-ms 20 --jitter-ms 5
--loss-pct 1`. iptables rules (see build.py) queue the link's packets, in both directions, to
this process. It speaks nfnetlink_queue over a raw netlink socket (stdlib only), asks for packet
metadata only, and for each packet either drops it now (loss) or accepts it after
delay +- jitter (uniform, like netem's default; jitter can reorder packets, as netem does).
It prints "ready" on stdout once bound, then never writes stdout again.

If this process dies, queued packets are dropped by the kernel (no `--queue-bypass`), so a broken
impairer shows up as a dead link rather than as a silently unimpaired one.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import os
import random
import select
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 0x2
NLA_TYPE_MASK = 0x3FFF
NF_DROP = 0
NF_ACCEPT = 1
_NLMSGHDR = struct.Struct("=IHHII")
_NLATTR = struct.Struct("=HH")
QUEUE_MAXLEN = 4096
RCVBUF = 4 * 1024 * 1024


class NetlinkError(OSError):
    """The kernel refused a netlink request."""


# -- message codec (pure functions, unit-tested) -------------------------------------------------


def _attr(kind: int, payload: bytes) -> bytes:
    raw = _NLATTR.pack(_NLATTR.size + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def _message(msg_type: int, flags: int, seq: int, queue: int, attrs: bytes) -> bytes:
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + attrs
    full_type = (NFNL_SUBSYS_QUEUE << 8) | msg_type
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), full_type, flags, seq, 0) + body


def bind_request(queue: int, seq: int) -> bytes:
    """Bind `queue` to this socket."""
    cmd = struct.pack("!BBH", NFQNL_CFG_CMD_BIND, 0, 0)
    return _message(
        NFQNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, seq, queue, _attr(NFQA_CFG_CMD, cmd)
    )


def params_request(queue: int, seq: int) -> bytes:
    """Ask for metadata only (no payload copy), and a longer queue."""
    attrs = _attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META))
    attrs += _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", QUEUE_MAXLEN))
    return _message(NFQNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, seq, queue, attrs)


def verdict(queue: int, packet_id: int, accept: bool) -> bytes:
    hdr = struct.pack("!II", NF_ACCEPT if accept else NF_DROP, packet_id)
    return _message(NFQNL_MSG_VERDICT, NLM_F_REQUEST, 0, queue, _attr(NFQA_VERDICT_HDR, hdr))


def parse(data: bytes) -> tuple[list[int], list[int]]:
    """Split a netlink datagram into (queued packet ids, netlink error codes)."""
    ids: list[int] = []
    errors: list[int] = []
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, msg_type, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            break
        body = data[offset + _NLMSGHDR.size : offset + length]
        if msg_type == NLMSG_ERROR:
            errors.append(-struct.unpack_from("=i", body)[0])
        elif msg_type == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
            packet_id = _packet_id(body[4:])
            if packet_id is not None:
                ids.append(packet_id)
        offset += (length + 3) & ~3
    return ids, errors


def _packet_id(attrs: bytes) -> int | None:
    offset = 0
    while offset + _NLATTR.size <= len(attrs):
        length, kind = _NLATTR.unpack_from(attrs, offset)
        if length < _NLATTR.size:
            return None
        if kind & NLA_TYPE_MASK == NFQA_PACKET_HDR:
            return int(struct.unpack_from("!I", attrs, offset + _NLATTR.size)[0])
        offset += (length + 3) & ~3
    return None


# -- the impairer ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    queue: int
    delay_s: float
    jitter_s: float
    loss: float  # probability 0..1


class Impairer:
    def __init__(self, settings: Settings, rng: random.Random) -> None:
        self.settings = settings
        self.rng = rng
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.setsockopt(socket.SOL_SOCKET, 33, RCVBUF)  # SO_RCVBUFFORCE (root)
        self.sock.bind((0, 0))
        self.pending: list[tuple[float, int, int]] = []  # (release time, sequence, packet id)
        self.sequence = 0

    def bind(self) -> None:
        for seq, request in enumerate(
            (bind_request(self.settings.queue, 1), params_request(self.settings.queue, 2)), 1
        ):
            self.sock.send(request)
            _ids, errors = parse(self.sock.recv(65536))
            if not errors or errors[0] != 0:
                code = errors[0] if errors else -1
                raise NetlinkError(code, f"nfqueue config step {seq}: {os.strerror(code)}")
        self.sock.setblocking(False)

    def hold_for(self) -> float | None:
        """Seconds to hold the next packet; None to drop it."""
        s = self.settings
        if s.loss and self.rng.random() < s.loss:
            return None
        if s.jitter_s:
            return max(0.0, s.delay_s + self.rng.uniform(-s.jitter_s, s.jitter_s))
        return s.delay_s

    def run(self) -> None:
        queue = self.settings.queue
        while True:
            now = time.monotonic()
            out = []
            while self.pending and self.pending[0][0] <= now:
                _when, _seq, packet_id = heapq.heappop(self.pending)
                out.append(verdict(queue, packet_id, accept=True))
            for message in out:
                self.sock.send(message)
            timeout = max(0.0, self.pending[0][0] - now) if self.pending else None
            readable, _, _ = select.select([self.sock], [], [], timeout)
            if readable:
                self._receive(time.monotonic())

    def _receive(self, now: float) -> None:
        queue = self.settings.queue
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            except OSError as e:  # ENOBUFS: the kernel dropped packets we were too slow for
                print(f"impair: {e}", file=sys.stderr)
                continue
            ids, _errors = parse(data)
            for packet_id in ids:
                hold = self.hold_for()
                if hold is None:
                    self.sock.send(verdict(queue, packet_id, accept=False))
                elif hold == 0.0:
                    self.sock.send(verdict(queue, packet_id, accept=True))
                else:
                    self.sequence += 1
                    heapq.heappush(self.pending, (now + hold, self.sequence, packet_id))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.netlab.impair", description=__doc__)
    parser.add_argument("--queue", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--loss-pct", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    settings = Settings(
        args.queue, args.delay_ms / 1000, args.jitter_ms / 1000, args.loss_pct / 100
    )
    try:
        impairer = Impairer(settings, random.Random(args.seed))
        impairer.bind()
    except OSError as e:
        print(f"impair: cannot bind NFQUEUE {args.queue}: {e}", file=sys.stderr)
        return 1
    print("ready", flush=True)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # the reader may go away once it has seen "ready"
    with contextlib.suppress(KeyboardInterrupt):
        impairer.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
