"""The demo through the NAT lab: both users behind NATs, the call relayed (``tools/demo`` as root).

The lab (``tools/netlab``, network namespaces) is a small internet: a login server and three
volunteer supernodes on "public" addresses (203.0.113.0/24, 198.51.100.0/24), alice behind a
home router (a port-restricted cone NAT, 198.18.1.0/24) and bob behind a carrier's symmetric NAT
(198.18.2.0/24).  No hole can be punched between those two, so the call goes through a relay
that one of the supernodes runs; the demo shows each step as a user would type it, then the
call's path and why, its figures, and the PESQ score of the audio each side received.  Every
process is stopped by its PID and every namespace deleted, also on failure or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from tools.netlab.calls import CallLab, username
from tools.netlab.lab import Lab, preflight
from tools.netlab.scenario import WAN, Host, Link, NatKind, Router, Scenario
from tools.processes import Processes

SCENARIO = Scenario(
    "demo",
    "login server and three supernodes on the wan; alice behind a port-restricted cone NAT, "
    "bob behind a symmetric NAT",
    routers=(
        Router("home", Link(WAN, "203.0.113.50"), "198.18.1.0/24", NatKind.PORT_RESTRICTED),
        Router("carrier", Link(WAN, "198.51.100.50"), "198.18.2.0/24", NatKind.SYMMETRIC),
    ),
    hosts=(
        Host("login", Link(WAN, "203.0.113.10")),
        Host("sn1", Link(WAN, "203.0.113.11")),
        Host("sn2", Link(WAN, "198.51.100.11")),
        Host("sn3", Link(WAN, "203.0.113.13")),
        Host("alice", Link("home", "198.18.1.10")),
        Host("bob", Link("carrier", "198.18.2.10")),
    ),
)
CALL_SECONDS = 6.0


def lab_available() -> list[str]:
    """Why the NAT lab cannot run here (empty: it can)."""
    return preflight()


def nat_demo(work: Path, say: Any, fail: type[Exception]) -> dict[str, Any]:
    from tools.audio import quality, speech

    say("== The NAT lab: a small internet in network namespaces")
    say("  login server 203.0.113.10; supernodes 203.0.113.11, 198.51.100.11, 203.0.113.13")
    say("  alice 198.18.1.10 behind a home router (port-restricted cone NAT, 203.0.113.50)")
    say("  bob 198.18.2.10 behind a carrier's symmetric NAT (198.51.100.50)")
    with contextlib.ExitStack() as stack:
        lab = stack.enter_context(Lab(SCENARIO))
        processes = Processes(work / "logs")
        stack.callback(processes.stop_all)
        overlay = CallLab(lab, processes, work)
        overlay.start_login_server("login", "--min-supernodes", "3")
        say("\n== Three volunteers become supernodes (each answers STUN and runs a relay)")
        overlay.start_supernodes(("sn1", "sn2", "sn3"))
        say("\n== alice and bob register and log in, each with their own voipd")
        overlay.start_users(("alice", "bob"))
        alice, bob = overlay.daemons["alice"], overlay.daemons["bob"]

        def show(daemon: Any, *args: str) -> str:
            result = daemon.ctl(*args)
            say(f"\n{daemon.host}$ voipctl " + " ".join(a for a in args if "/" not in a))
            text = (result.stderr + result.stdout).rstrip()
            if text:
                say("  " + text.replace("\n", "\n  "))
            if result.returncode != 0:
                raise fail(f"voipctl {args[0]} on {daemon.host} failed")
            return str(result.stdout)

        overlay.wait_findable([("alice", "bob"), ("bob", "alice")])
        show(alice, "status")
        show(alice, "netcheck")
        show(bob, "netcheck")
        show(alice, "search", "user-bob")
        show(alice, "ping", "user-bob", "-c", "2", "-i", "0.5")

        say("\n== alice calls bob; both send speech and record what they hear")
        alice_says, bob_says = speech.caller_speech(16000), speech.callee_speech(16000)
        record = overlay.call(
            "alice",
            "bob",
            seconds=CALL_SECONDS,
            caller_wav=alice_says,
            callee_wav=bob_says,
            label="demo",
        )
        for side, summary in (("alice", record.caller_summary), ("bob", record.callee_summary)):
            path, media = summary.get("path") or {}, summary.get("media") or {}
            say(f"\n{side}: call with {summary['peer']} ended: {summary['reason']}")
            say(f"  path: {path.get('kind')} ({path.get('local')} <-> {path.get('remote')})")
            say(f"  why: {path.get('why')}")
            rtt = media.get("rtt_ms")
            say(
                f"  {media.get('codec')} {media.get('send_kbps')} kbit/s, RTT "
                f"{rtt if rtt is None else round(rtt, 1)} ms, "
                f"loss {media.get('loss_percent')} %, packets sent {media.get('packets_sent')}, "
                f"received {media.get('packets_received')}"
            )
        to_bob = quality.pesq_wb(alice_says, record.callee_heard)
        to_alice = quality.pesq_wb(bob_says, record.caller_heard)
        say(
            f"\n== Audio quality (PESQ-WB, 1 = bad .. 4.6 = transparent): alice -> bob "
            f"{to_bob:.2f}, bob -> alice {to_alice:.2f}"
        )
        path = record.caller_summary["path"]
        return {
            "ok": True,
            "mode": "lab",
            "call": {
                "path": path["kind"],
                "why": path.get("why"),
                "relay": path.get("relay_server"),
                "duration": record.caller_summary["duration"],
                "pesq_wb": {"alice->bob": round(to_bob, 2), "bob->alice": round(to_alice, 2)},
                "peer": username("bob"),
            },
        }


def main() -> None:  # pragma: no cover - for trying the scenario by hand
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="voip-demo-", dir="/tmp"))
    print(json.dumps(nat_demo(work, print, RuntimeError)))


if __name__ == "__main__":  # pragma: no cover
    main()
