"""Bursty packet loss for the lab's NFQUEUE impairer: the Gilbert two-state model.

    python -m tools.netlab.burstloss --queue 7 --loss-pct 10 --burst 3 [--delay-ms D]
                                     [--jitter-ms J] [--seed N]

`tools.netlab.impair` drops each packet independently (like `tc netem loss P%`).  Real links
lose packets in runs; this one drops them in bursts: a good state that loses nothing and a bad
state that loses everything, like `netem loss gemodel p r` with 1-h = 1 and k = 0.  From the
good state the chain moves to the bad one with probability p per packet, and back with r, so a
burst lasts 1/r packets on average and the long-run loss is p / (p + r).  Given the loss L and
the mean burst B: r = 1/B and p = L r / (1 - L).  Delay and jitter are the same as the plain
impairer's.  Everything else (netlink, verdicts, "ready" on stdout, stopping) is
`tools.netlab.impair`'s: this module only replaces the decision per packet.

One process sees one queue; put each direction of a link on its own queue (and process) so
each direction has its own chain of bursts.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import sys

from tools.netlab.impair import Impairer, Settings


def gilbert(loss: float, burst: float) -> tuple[float, float]:
    """(p, r): good->bad and bad->good probabilities per packet for loss ``loss`` (0..1) in
    bursts of ``burst`` packets on average."""
    if not 0.0 <= loss < 1.0:
        raise ValueError(f"loss {loss:g} is not in [0, 1) (all lost never leaves the bad state)")
    if burst < 1.0:
        raise ValueError(f"a mean burst of {burst} packets is shorter than one packet")
    r = 1.0 / burst
    return loss * r / (1.0 - loss), r


class GilbertLoss:
    """The two-state chain: ``lost()`` once per packet says whether that packet is dropped."""

    def __init__(self, loss: float, burst: float, rng: random.Random) -> None:
        self.enter_bad, self.leave_bad = gilbert(loss, burst)
        self.rng = rng
        self.bad = False

    def lost(self) -> bool:
        if self.bad:
            self.bad = self.rng.random() >= self.leave_bad
        else:
            self.bad = self.rng.random() < self.enter_bad
        return self.bad


class BurstImpairer(Impairer):
    """`Impairer` whose losses follow a Gilbert chain instead of independent draws."""

    def __init__(self, settings: Settings, rng: random.Random, loss: float, burst: float) -> None:
        self.chain = GilbertLoss(loss, burst, rng)  # first: a bad loss/burst opens no socket
        super().__init__(settings, rng)

    def hold_for(self) -> float | None:
        if self.chain.lost():
            return None
        s = self.settings
        if s.jitter_s:
            return max(0.0, s.delay_s + self.rng.uniform(-s.jitter_s, s.jitter_s))
        return s.delay_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.netlab.burstloss", description=__doc__)
    parser.add_argument("--queue", type=int, required=True)
    parser.add_argument("--loss-pct", type=float, required=True, help="long-run loss, percent")
    parser.add_argument("--burst", type=float, default=3.0, help="mean burst length, packets")
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    settings = Settings(args.queue, args.delay_ms / 1000, args.jitter_ms / 1000, 0.0)
    try:
        impairer = BurstImpairer(
            settings, random.Random(args.seed), args.loss_pct / 100, args.burst
        )
    except ValueError as e:
        print(f"burstloss: {e}", file=sys.stderr)
        return 2
    try:
        impairer.bind()
    except OSError as e:
        print(f"burstloss: cannot bind NFQUEUE {args.queue}: {e}", file=sys.stderr)
        return 1
    print("ready", flush=True)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # the reader may go away once it has seen "ready"
    with contextlib.suppress(KeyboardInterrupt):
        impairer.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
