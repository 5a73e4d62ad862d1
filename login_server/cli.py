"""``voip-login-server``: init, run, adduser, deluser, users."""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from twisted.internet.error import CannotListenError
from twisted.logger import globalLogBeginner, textFileLogObserver

from login_server.accounts import hash_password
from login_server.datadir import DataDir
from login_server.service import LoginServerConfig, makeService
from overlay.errors import VoipError
from overlay.identity import DEFAULT_COST, MIN_COST, key_fingerprint
from overlay.login_protocol import WeakPassword
from overlay.terminal import print_json, read_password, run_command

PROGRAM = "voip-login-server"
COSTS = {"interactive": DEFAULT_COST, "min": MIN_COST}
_DURATION = re.compile(r"(\d+)([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class UsageError(VoipError):
    """The command line is not valid."""

    code = "usage"


def parse_duration(text: str) -> int:
    match = _DURATION.fullmatch(text.strip())
    if match is None or int(match.group(1)) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 30m, 24h or 2d")
    return int(match.group(1)) * _UNITS[match.group(2)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROGRAM, description="The PKI login server.")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_data(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--data", type=Path, required=True, help="the data directory")
        return p

    with_data(sub.add_parser("init", help="make the CA key and the account database"))
    run = with_data(sub.add_parser("run", help="serve logins"))
    run.add_argument("--port", type=int, default=7000, help="TCP port (default 7000)")
    run.add_argument(
        "--interface", default="", help="address to listen on (default: all interfaces)"
    )
    run.add_argument("--listen", help="a Twisted endpoint string; overrides --port/--interface")
    run.add_argument(
        "--min-supernodes",
        type=int,
        default=10,
        help="admit volunteers until the overlay has this many supernodes (default 10)",
    )
    run.add_argument(
        "--max-nodes-per-supernode",
        type=int,
        default=400,
        help="beyond this many attached nodes per supernode (on average), admit more (default 400)",
    )
    run.add_argument(
        "--supernode-timeout",
        type=parse_duration,
        default=90,
        help="evict a supernode silent this long (default 90s)",
    )
    run.add_argument(
        "--open-registration", action="store_true", help="let anyone create an account"
    )
    run.add_argument(
        "--cert-lifetime",
        type=parse_duration,
        default=24 * 3600,
        help="certificate lifetime (default 24h)",
    )
    run.add_argument(
        "--hash-cost",
        choices=sorted(COSTS),
        default="interactive",
        help="argon2id cost for new passwords ('min' is for tests only)",
    )
    add = with_data(sub.add_parser("adduser", help="create an account"))
    add.add_argument("username")
    add.add_argument("--password-stdin", action="store_true")
    add.add_argument("--hash-cost", choices=sorted(COSTS), default="interactive")
    delete = with_data(sub.add_parser("deluser", help="delete an account"))
    delete.add_argument("username")
    users = with_data(sub.add_parser("users", help="list accounts"))
    users.add_argument("--json", action="store_true")
    return parser


def cmd_init(args: argparse.Namespace) -> int:
    key = DataDir(args.data).init()
    print(f"Initialised {args.data}: CA key fingerprint {key_fingerprint(key.public_key)}.")
    print(f"Give {args.data / 'ca.pub'} to your users; keep {args.data / 'ca.key'} secret.")
    return 0


def cmd_adduser(args: argparse.Namespace) -> int:
    store = DataDir(args.data).open_store()
    try:
        password = read_password(
            f"Password for {args.username}: ", confirm=True, from_stdin=args.password_stdin
        )
        if len(password) < 8:
            raise WeakPassword("Passwords need at least 8 characters.")
        name = store.add(args.username, hash_password(password, COSTS[args.hash_cost]), _now())
    finally:
        store.close()
    print(f"Added {name}.")
    return 0


def cmd_deluser(args: argparse.Namespace) -> int:
    store = DataDir(args.data).open_store()
    try:
        store.delete(args.username)
    finally:
        store.close()
    print(f"Deleted {args.username.lower()}.")
    return 0


def cmd_users(args: argparse.Namespace) -> int:
    store = DataDir(args.data).open_store()
    try:
        names = store.usernames()
    finally:
        store.close()
    if args.json:
        print_json({"users": names})
    else:
        for name in names:
            print(name)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from twisted.internet import reactor

    if args.listen:
        listen = args.listen
    else:
        interface = f":interface={args.interface}" if args.interface else ""
        listen = f"tcp:{args.port}{interface}"
    config = LoginServerConfig(
        data=args.data,
        listen=listen,
        open_registration=args.open_registration,
        cert_lifetime=args.cert_lifetime,
        hash_cost=COSTS[args.hash_cost],
        udp_interface=args.interface,
        min_supernodes=args.min_supernodes,
        max_ons_per_supernode=args.max_nodes_per_supernode,
        supernode_timeout=float(args.supernode_timeout),
    )
    service = makeService(config, reactor)
    try:
        service.startService()  # type: ignore[no-untyped-call]
    except CannotListenError as exc:
        reason = getattr(exc.socketError, "strerror", None) or exc.socketError
        raise UsageError(f"Cannot listen on {listen}: {reason}.") from None
    _log_to_stderr()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    registration = "open" if args.open_registration else "closed"
    address = service.listener.address if service.listener is not None else None
    where = f"{address.host}:{address.port}" if address is not None else listen
    print(
        f"{PROGRAM}: serving on {where} (registration {registration}); Ctrl-C stops.",
        file=sys.stderr,
        flush=True,
    )
    reactor.run()
    return 0


def _log_to_stderr() -> None:
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)


def _now() -> float:
    return time.time()


COMMANDS = {
    "init": cmd_init,
    "run": cmd_run,
    "adduser": cmd_adduser,
    "deluser": cmd_deluser,
    "users": cmd_users,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(PROGRAM, lambda: COMMANDS[args.command](args))


if __name__ == "__main__":
    sys.exit(main())
