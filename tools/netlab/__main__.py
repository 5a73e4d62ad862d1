"""`python -m tools.netlab`: build, inspect, use and tear down the NAT lab; run its self-check.

python -m tools.netlab list
python -m tools.netlab up two-cones
python -m tools.netlab exec a -- ip route
python -m tools.netlab status [--json]
python -m tools.netlab down
python -m tools.netlab selfcheck [--kind symmetric ...] [--json]
python -m tools.netlab plan two-cones      # print the commands `up` would run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from tools.netlab import build, selfcheck
from tools.netlab.build import ImpairBackend
from tools.netlab.command import Command, LabError, run
from tools.netlab.lab import (
    Lab,
    lab_namespaces,
    namespace_pids,
    preflight,
    read_state,
    remove_stale,
    signals_interrupt,
)
from tools.netlab.scenario import NS_PREFIX, ScenarioError
from tools.netlab.scenarios import BUILTIN, builtin

PROG = "python -m tools.netlab"


class UsageError(Exception):
    """The command line asks for something that cannot be done."""


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _require_lab_tools() -> None:
    problems = preflight()
    if problems:
        raise UsageError("; ".join(problems))


def cmd_list(_args: argparse.Namespace) -> int:
    for name, scenario in sorted(BUILTIN.items()):
        print(f"{name:<20} {scenario.description}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    scenario = builtin(args.scenario)
    for command in build.plan_up(scenario, ImpairBackend(args.impair_backend)):
        print(command)
    for spec in build.impairers(scenario) if args.impair_backend == "nfqueue" else []:
        imp = spec.impairment
        print(
            f"ip netns exec {spec.namespace} python -m tools.netlab.impair --queue "
            f"{build.IMPAIR_QUEUE} --delay-ms {imp.delay_ms:g} --jitter-ms {imp.jitter_ms:g} "
            f"--loss-pct {imp.loss_pct:g} &"
        )
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    scenario = builtin(args.scenario)
    _require_lab_tools()
    backend = None if args.impair_backend == "auto" else ImpairBackend(args.impair_backend)
    lab = Lab(scenario, backend)
    _say(f"Building scenario {scenario.name!r} ({len(scenario.namespaces)} namespaces)...")
    lab.up()
    lab.detach()  # leave it running; `down` finds everything by namespace
    for line in build.describe(scenario):
        print(line)
    if lab.impair_backend is not None:
        print(f"link impairments: {lab.impair_backend} backend")
    first = scenario.hosts[-1].name
    _say(f"Lab is up. Try: {PROG} exec {first} -- ip route; then: {PROG} down")
    return 0


def cmd_down(_args: argparse.Namespace) -> int:
    _require_lab_tools()
    removed = remove_stale()
    print(f"removed {len(removed)} namespaces" + (f": {' '.join(removed)}" if removed else ""))
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    ns = NS_PREFIX + args.node
    if ns not in lab_namespaces():
        raise UsageError(f"no namespace {ns}; is the lab up? (see `{PROG} status`)")
    argv = list(args.command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise UsageError("give a command after --, e.g. `exec a -- ip addr`")
    os.execvp("ip", ["ip", "netns", "exec", ns, *argv])
    return 127  # not reached


def status() -> dict[str, Any]:
    state = read_state() or {}
    spaces = []
    for ns in lab_namespaces():
        out = run(Command(("ip", "-n", ns, "-4", "-o", "addr", "show")), check=False)
        addresses = [
            f"{p[1]} {p[3]}" for p in (line.split() for line in out.splitlines()) if len(p) > 3
        ]
        spaces.append({"name": ns, "addresses": addresses, "pids": namespace_pids(ns)})
    return {
        "schema_version": 1,
        "up": bool(spaces),
        "scenario": state.get("scenario") if spaces else None,
        "impair_backend": state.get("impair_backend") if spaces else None,
        "namespaces": spaces,
    }


def cmd_status(args: argparse.Namespace) -> int:
    _require_lab_tools()
    report = status()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    if not report["up"]:
        print("no lab is up")
        return 0
    print(f"scenario: {report['scenario'] or '(unknown)'}")
    for space in report["namespaces"]:
        addrs = ", ".join(a for a in space["addresses"] if not a.startswith("lo "))
        procs = f"  {len(space['pids'])} processes" if space["pids"] else ""
        print(f"{space['name']:<16} {addrs}{procs}")
    return 0


def cmd_selfcheck(args: argparse.Namespace) -> int:
    _require_lab_tools()
    start = time.monotonic()
    results, lab = selfcheck.run(
        args.kind or selfcheck.KINDS,
        impairment=not args.no_impairment,
        progress=None if args.json else _say,
    )
    ok = all(r.ok for r in results)
    elapsed = time.monotonic() - start
    if args.json:
        report = {
            "schema_version": 1,
            "ok": ok,
            "scenario": lab.scenario.name,
            "impair_backend": str(lab.impair_backend) if lab.impair_backend else None,
            "elapsed_s": round(elapsed, 2),
            "checks": [r.as_json() for r in results],
        }
        print(json.dumps(report, indent=2))
    else:
        for result in results:
            print(result.line())
        verdict = (
            "all NAT kinds behave as claimed" if ok else "some NAT kinds do NOT behave as claimed"
        )
        print(f"selfcheck: {verdict} ({elapsed:.1f} s, lab torn down)")
    return 0 if ok else 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="The NAT lab (docs/netlab.md).")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the built-in scenarios").set_defaults(func=cmd_list)
    backends = ["auto", *(b.value for b in ImpairBackend)]
    up = sub.add_parser("up", help="build a built-in scenario and leave it running")
    up.add_argument("scenario")
    up.add_argument("--impair-backend", choices=backends, default="auto")
    up.set_defaults(func=cmd_up)
    plan = sub.add_parser("plan", help="print the commands `up` would run")
    plan.add_argument("scenario")
    plan.add_argument("--impair-backend", choices=backends[1:], default="nfqueue")
    plan.set_defaults(func=cmd_plan)
    down = sub.add_parser("down", help="tear down every vnl- namespace and its processes")
    down.set_defaults(func=cmd_down)
    ex = sub.add_parser("exec", help="run a command in a node's namespace: exec NODE -- CMD...")
    ex.add_argument("node")
    ex.add_argument("command", nargs=argparse.REMAINDER)
    ex.set_defaults(func=cmd_exec)
    st = sub.add_parser("status", help="what exists now")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)
    sc = sub.add_parser("selfcheck", help="prove every NAT kind behaves as claimed")
    sc.add_argument("--kind", action="append", choices=selfcheck.KINDS)
    sc.add_argument("--no-impairment", action="store_true", help="skip the delayed-link check")
    sc.add_argument("--json", action="store_true")
    sc.set_defaults(func=cmd_selfcheck)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        with signals_interrupt():
            return int(args.func(args))
    except (UsageError, ScenarioError, LabError) as e:
        print(f"netlab: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("netlab: interrupted; everything this run made is torn down", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
