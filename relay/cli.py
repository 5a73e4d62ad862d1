"""``voip-relay``: the TURN relay on its own (``serve``), and credentials for it (``credential``).

    voip-relay serve --listen HOST:PORT --relay-ip IP --secret-file FILE [--realm R]
                     [--max-allocations N] [--user-quota N] [--bandwidth B]
                     [--idle-timeout S] [--allow-peers CIDR|public ...] [--json]
    voip-relay credential USER --secret-file FILE [--ttl S] [--json]

``serve`` prints where it listens (one line, or one JSON object with ``--json``), logs one line
per allocation created or deleted, and runs until SIGTERM or SIGINT.  ``credential`` mints a
time-limited credential (coturn's ``use-auth-secret`` scheme, ``overlay.turn``) that any TURN
client can use, e.g. ``turnutils_uclient -u NAME -w PASSWORD``.  The secret file holds the
shared secret (surrounding whitespace ignored), the same as coturn's ``static-auth-secret``.

Errors are one line on standard error: bad arguments (a bad CIDR, a bad HOST:PORT) exit 2, an
unreadable secret file or a port in use exit 1.  See docs/relay.md.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
import time
from pathlib import Path

from twisted.internet.error import CannotListenError
from twisted.logger import globalLogBeginner, textFileLogObserver

from overlay.errors import VoipError
from overlay.terminal import print_json, run_command
from overlay.turn import mint_credential
from relay.server import IPNetwork, RelayConfig

PROGRAM = "voip-relay"


class RelayStartError(VoipError):
    """The relay could not start."""

    code = "relay-start"


class SecretFileError(VoipError):
    """The relay's secret file could not be read."""

    code = "secret-file"


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    try:
        if not sep or not host:
            raise ValueError(text)
        ipaddress.ip_address(host)
        number = int(port)
        if not 0 <= number <= 65535:
            raise ValueError(port)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not HOST:PORT with an IP address (e.g. 0.0.0.0:3478, [::]:3478)"
        ) from None
    return host, number


def parse_ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address") from None


def parse_peers(text: str) -> IPNetwork | str:
    if text == "public":
        return text
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a network like 192.0.2.0/24, or 'public'"
        ) from None


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROGRAM, description="The TURN relay (RFC 8656).")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="relay calls until SIGTERM/SIGINT")
    serve.add_argument(
        "--listen",
        type=parse_listen,
        default=("0.0.0.0", 3478),  # noqa: S104 - a relay serves the network
        help="UDP and TCP address (default 0.0.0.0:3478; port 0: ephemeral)",
    )
    serve.add_argument(
        "--relay-ip",
        type=parse_ip,
        help="address of the relayed sockets, the one peers see (default: the --listen host)",
    )
    serve.add_argument("--secret-file", type=Path, required=True, help="the shared secret")
    serve.add_argument("--realm", default="voip", help="the STUN realm (default voip)")
    serve.add_argument("--max-allocations", type=positive, default=1000, help="default 1000")
    serve.add_argument("--user-quota", type=positive, default=8, help="per user (default 8)")
    serve.add_argument(
        "--bandwidth",
        type=positive,
        default=64 * 1024,
        help="bytes/s per allocation and direction, 0 = unlimited (default 65536)",
    )
    serve.add_argument(
        "--idle-timeout",
        type=positive,
        default=120,
        help="delete an allocation that relayed nothing this many seconds (default 120; 0: never)",
    )
    serve.add_argument(
        "--allow-peers",
        type=parse_peers,
        nargs="+",
        action="extend",
        help="peer networks clients may reach (CIDR), or 'public' (default: public)",
    )
    serve.add_argument("--json", action="store_true", help="print the addresses as JSON")
    credential = sub.add_parser("credential", help="mint a time-limited credential")
    credential.add_argument("user")
    credential.add_argument("--secret-file", type=Path, required=True)
    credential.add_argument("--ttl", type=positive, default=86400, help="seconds (default 1 day)")
    credential.add_argument("--json", action="store_true")
    return parser


def read_secret(path: Path) -> bytes:
    try:
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise SecretFileError(f"Cannot read the secret file {path}: {exc.strerror}.") from None
    if not secret:
        raise SecretFileError(f"The secret file {path} is empty.")
    return secret


def cmd_credential(args: argparse.Namespace) -> int:
    secret = read_secret(args.secret_file)
    if ":" in args.user or not args.user:
        raise RelayStartError("A relay user name may not be empty or contain ':'.")
    credential = mint_credential(secret, args.user, time.time(), ttl=args.ttl)
    if args.json:
        print_json(credential.to_wire())
    else:
        print(f"username: {credential.username}")
        print(f"password: {credential.password}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from twisted.internet import reactor

    from relay.service import Relay

    secret = read_secret(args.secret_file)
    host, port = args.listen
    peers = args.allow_peers or ["public"]
    relay_ip = args.relay_ip or host
    if ipaddress.ip_address(relay_ip).is_unspecified:
        raise RelayStartError(f"Give --relay-ip: peers cannot reach {relay_ip}.")
    try:
        config = RelayConfig(
            secret=secret,
            realm=args.realm,
            listen_host=host,
            udp_port=port,
            tcp_port=port,
            relay_ip=relay_ip,
            allow_peers=tuple(p for p in peers if p != "public"),
            allow_public_peers="public" in peers,
            max_allocations=args.max_allocations,
            user_quota=args.user_quota,
            bandwidth=args.bandwidth,
            idle_timeout=float(args.idle_timeout),
        )
    except ValueError as exc:
        raise RelayStartError(f"Bad relay option: {exc}.") from None
    relay = Relay(reactor, config)
    try:
        relay.start()
    except CannotListenError as exc:
        reason = getattr(exc.socketError, "strerror", None) or exc.socketError
        raise RelayStartError(f"Cannot listen on {host}:{port}: {reason}.") from None
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    reactor.addSystemEventTrigger("before", "shutdown", relay.stop)
    udp, tcp = relay.udp_address, relay.tcp_address
    if args.json:
        print_json({"udp": f"{udp[0]}:{udp[1]}", "tcp": f"{tcp[0]}:{tcp[1]}", "realm": args.realm})
        sys.stdout.flush()
    print(
        f"{PROGRAM}: relaying on udp {udp[0]}:{udp[1]} and tcp {tcp[0]}:{tcp[1]} "
        f"(relayed sockets on {relay_ip}, realm {args.realm}); Ctrl-C stops.",
        file=sys.stderr,
        flush=True,
    )
    reactor.run()
    return 0


COMMANDS = {"serve": cmd_serve, "credential": cmd_credential}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(PROGRAM, lambda: COMMANDS[args.command](args), json_errors=False)


if __name__ == "__main__":
    sys.exit(main())
