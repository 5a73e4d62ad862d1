"""``voipd``: the node daemon.  It owns all of a user's state; ``voipctl`` only talks to it.

``makeService(config, reactor)`` builds the daemon as a Twisted service: today the control
socket and the account (login, certificate renewal); the overlay and calls plug in beside them.
"""

from __future__ import annotations

import argparse
import os
import socket
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.threads import deferToThreadPool
from twisted.logger import FileLogObserver, Logger, formatEventAsClassicLogText, globalLogBeginner
from twisted.python.failure import Failure

from client.account import Account, NotLoggedIn, Progress
from client.control import ControlFactory, Handler
from client.loginclient import LoginClient, parse_address
from client.overlaynode import OverlayNode, Searcher
from client.paths import MAX_SOCKET_PATH, default_socket_path, default_state_dir
from client.promotion import PromotionPolicy, SupernodeRole
from client.state import StateDir, StateError
from overlay.datagram import DatagramEndpoint
from overlay.errors import VoipError
from overlay.hostcache import HostCache
from overlay.identity import DEFAULT_COST, IdentityKey, KdfCost, read_trust_anchor
from overlay.listening import ListeningService
from overlay.supernode import Supernode
from overlay.terminal import run_command
from overlay.usernames import canonical_username

PROGRAM = "voipd"
VERSION = "0.1.0"


@dataclass(frozen=True)
class DaemonConfig:
    state: Path
    login_server: str
    ca_key: bytes
    socket: Path
    key_cost: KdfCost = DEFAULT_COST
    #: Volunteer as a supernode when eligible (``--allow-supernode``).
    allow_supernode: bool = False
    #: Address and ports a supernode serves on (0: any free port).
    interface: str = ""
    tcp_port: int = 0
    udp_port: int = 0
    policy: PromotionPolicy = PromotionPolicy()  # noqa: RUF009 - frozen, shared safely


log = Logger()


class Daemon(MultiService):
    """The control socket and everything it commands."""

    def __init__(self, config: DaemonConfig, reactor: Any) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.config = config
        self.reactor = reactor
        self.state_dir = StateDir(config.state)
        self.started_at = reactor.seconds()
        pool = reactor.getThreadPool()
        self.account = Account(
            reactor,
            self.state_dir,
            LoginClient(reactor, config.login_server, config.ca_key),
            run_slow=lambda work: deferToThreadPool(reactor, pool, work),
            key_cost=config.key_cost,
        )
        self.node_key = _node_key(self.state_dir)
        self.hostcache = HostCache(config.state / "hostcache.json", reactor)
        self.udp = DatagramEndpoint(reactor)
        self.udp_port: Any = None
        self.node = OverlayNode(reactor, config.ca_key, self.hostcache, self.udp)
        self.account.on_change.append(self._account_changed)
        self.supernode: Supernode | None = None
        self.role: SupernodeRole | None = None
        if config.allow_supernode:
            self._make_supernode()
        handlers: dict[str, Handler] = {
            "search": self.cmd_search,
            "status": self.cmd_status,
            "register": self.cmd_register,
            "login": self.cmd_login,
            "logout": self.cmd_logout,
            "ping": self.cmd_ping,
        }
        endpoint = UNIXServerEndpoint(reactor, str(config.socket), mode=0o600, wantPID=False)
        ListeningService(endpoint, ControlFactory(handlers)).attach(self)

    def _make_supernode(self) -> None:
        config, reactor = self.config, self.reactor
        supernode = Supernode(reactor, self.node_key, config.ca_key)
        searcher = Searcher(reactor, supernode.udp, config.ca_key)
        ports: list[Any] = []

        def listen() -> tuple[int, int]:
            tcp = reactor.listenTCP(
                config.tcp_port, supernode.factory(), interface=config.interface
            )
            udp = reactor.listenUDP(config.udp_port, supernode.udp, interface=config.interface)
            ports[:] = [tcp, udp]
            return tcp.getHost().port, udp.getHost().port

        def unlisten() -> Deferred[None]:
            closing = [defer.maybeDeferred(p.stopListening) for p in ports]
            ports.clear()
            return defer.gatherResults(closing).addCallback(lambda _: None)

        searcher.serve_lookups_for(supernode)
        client = LoginClient(reactor, config.login_server, config.ca_key)
        self.supernode = supernode
        self.role = SupernodeRole(
            reactor,
            client,
            self.node_key,
            supernode,
            listen=listen,
            unlisten=unlisten,
            policy=config.policy,
        )

    def _account_changed(self) -> None:
        account = self.account
        if account.identity is not None and account.certificate is not None:
            if not self.node.running:
                self.node.start(account.identity, account.certificate, account.bootstrap)
            else:
                self.node.update_certificate(account.certificate)
        elif self.node.running:
            Deferred.fromCoroutine(self.node.stop()).addErrback(self._leave_failed)

    def _leave_failed(self, failure: Failure) -> None:
        log.failure("leaving the overlay failed", failure)

    def startService(self) -> None:
        self.hostcache.load()
        self.udp_port = self.reactor.listenUDP(0, self.udp, interface=self.config.interface)
        if self.role is not None:
            self.role.start()
        self.account.restore()
        old = os.umask(0o077)  # the socket exists with mode 0600 from its first instant
        try:
            super().startService()  # type: ignore[no-untyped-call]
        finally:
            os.umask(old)

    def stopService(self) -> Any:
        if self.role is not None:
            self.role.stop()
        if self.node.running:
            Deferred.fromCoroutine(self.node.stop(publish_offline=False)).addErrback(
                self._leave_failed
            )
        if self.udp_port is not None:
            self.udp_port.stopListening()
        result = super().stopService()  # type: ignore[no-untyped-call]

        def remove_socket(passthrough: Any) -> Any:
            # Only once the port has closed: it unlinks its socket itself, and fails (leaving
            # its socket open) if the file is gone already.
            self.config.socket.unlink(missing_ok=True)
            return passthrough

        return result.addBoth(remove_socket)

    # -- control commands ----------------------------------------------------------------------

    async def cmd_status(self, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        return {
            "daemon": {
                "pid": os.getpid(),
                "version": VERSION,
                "state_dir": str(self.config.state),
                "uptime": self.reactor.seconds() - self.started_at,
            },
            "account": self.account.status(),
            "overlay": self.node.status(),
            "supernode": self.role.status() if self.role is not None else {"allowed": False},
        }

    async def cmd_search(self, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        name = canonical_username(_text(args, "username"))
        if self.account.username is None:
            raise NotLoggedIn()
        progress(f"Searching for {name}...")
        result = await self.node.search(name)
        document: dict[str, Any] = {
            "username": name,
            "outcome": result.outcome,
            "rounds": result.rounds,
            "asked": result.asked,
            "elapsed": result.elapsed,
            "bad_records": result.bad_records,
            "timeouts": result.timeouts,
        }
        record = result.record
        if record is not None:
            document["status"] = record.status.value
            document["last_seen"] = record.issued_at
            if record.supernode is not None:
                document["supernode"] = f"{record.supernode.host}:{record.supernode.tcp_port}"
        return document

    async def cmd_register(self, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        name = await self.account.register(
            _text(args, "username"), _text(args, "password"), progress
        )
        return {"username": name}

    async def cmd_login(self, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        stay = bool(args.get("stay_logged_in", False))
        return await self.account.login(
            _text(args, "username"), _text(args, "password"), stay, progress
        )

    async def cmd_logout(self, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        return self.account.logout()

    async def cmd_ping(self, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        return {"pong": True, "pid": os.getpid()}


def _node_key(state: StateDir) -> IdentityKey:
    """This daemon's node key (its identity as a supernode), made on first use."""
    path = state.path / "node.key"
    if path.exists():
        return IdentityKey.load_plain(path)
    key = IdentityKey.generate()
    key.save_plain(path)
    return key


class BadRequest(VoipError):
    """voipctl sent a request voipd cannot use."""

    code = "bad-request"


def _text(args: dict[str, Any], name: str) -> str:
    value = args.get(name)
    if not isinstance(value, str):
        raise BadRequest(f"The request lacks '{name}'.")
    return value


def makeService(config: DaemonConfig, reactor: Any) -> Daemon:
    return Daemon(config, reactor)


# -- command line ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROGRAM, description="The node daemon of the overlay.")
    parser.add_argument("--state", type=Path, help="state directory (default ~/.local/state/voip)")
    parser.add_argument("--login-server", help="HOST:PORT of the login server (saved for later)")
    parser.add_argument("--ca", type=Path, help="the login server's ca.pub (saved for later)")
    parser.add_argument("--socket", type=Path, help="control socket (default STATE/voipd.sock)")
    parser.add_argument(
        "--log-file", help="log file, or - for standard error (default STATE/voipd.log)"
    )
    sn = parser.add_argument_group("supernode")
    sn.add_argument(
        "--allow-supernode",
        action="store_true",
        help="volunteer as a supernode when eligible and needed (serves others)",
    )
    sn.add_argument("--interface", default="", help="address to serve on (default: all)")
    sn.add_argument("--port", type=int, default=0, help="supernode TCP port (default: any free)")
    sn.add_argument("--udp-port", type=int, default=0, help="supernode UDP port (default: any)")
    sn.add_argument(
        "--min-uptime", type=float, default=60.0, help="seconds up before volunteering (60)"
    )
    sn.add_argument(
        "--max-load", type=float, default=0.7, help="1-minute load per core above which not (0.7)"
    )
    sn.add_argument(
        "--bandwidth-kbps",
        type=int,
        default=10_000,
        help="the upstream bandwidth you offer, kbit/s (10000; at least 1000 to volunteer)",
    )
    sn.add_argument("--heartbeat", type=float, default=20.0, help="seconds between heartbeats (20)")
    parser.add_argument("--version", action="version", version=f"{PROGRAM} {VERSION}")
    return parser


def _prepare_socket(path: Path) -> None:
    if len(str(path).encode()) > MAX_SOCKET_PATH:
        raise StateError(
            f"The socket path {path} is longer than {MAX_SOCKET_PATH} bytes; "
            "use a shorter --state or --socket."
        )
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.lstat()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StateError(f"Cannot make the socket {path}: {exc.strerror}.") from None
    if not stat.S_ISSOCK(info.st_mode):
        # Never unlink what is not a socket: --socket may name a user's file by mistake.
        raise StateError(f"{path} exists and is not a socket; not replacing it.")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # a stale socket from a daemon that died
        return
    finally:
        probe.close()
    raise StateError(f"Another voipd is already serving {path}.")


def config_from_args(args: argparse.Namespace) -> tuple[DaemonConfig, StateDir]:
    state_path: Path = args.state or default_state_dir()
    state = StateDir(state_path)
    state.prepare()
    state.lock()
    saved = state.load_config()
    login_server = args.login_server or saved.get("login_server")
    if login_server is not None and not isinstance(login_server, str):
        raise StateError(f"{state.path / 'config.json'} is damaged; run voipd with --login-server.")
    if not login_server:
        raise StateError("voipd needs --login-server HOST:PORT the first time it runs.")
    parse_address(login_server)
    ca_key = read_trust_anchor(args.ca) if args.ca else state.config_ca_key(saved)
    if ca_key is None:
        raise StateError(
            "voipd needs --ca PATH/TO/ca.pub (the login server's key) the first time it runs."
        )
    state.save_config(login_server, ca_key)
    if args.socket:
        sock = args.socket
    elif args.state:
        sock = state.socket_path
    else:
        sock = default_socket_path()
    policy = PromotionPolicy(
        min_uptime=args.min_uptime,
        max_load=args.max_load,
        bandwidth_kbps=args.bandwidth_kbps,
        heartbeat_every=args.heartbeat,
        check_every=min(60.0, max(1.0, args.min_uptime)),
    )
    config = DaemonConfig(
        state_path,
        login_server,
        ca_key,
        sock,
        allow_supernode=args.allow_supernode,
        interface=args.interface,
        tcp_port=args.port,
        udp_port=args.udp_port,
        policy=policy,
    )
    return config, state


def run(args: argparse.Namespace) -> int:
    from twisted.internet import reactor

    config, state = config_from_args(args)
    _prepare_socket(config.socket)
    log_target = args.log_file or str(state.log_path)
    _start_logging(log_target)
    daemon = makeService(config, reactor)
    try:
        daemon.startService()
    except CannotListenError as exc:
        reason = getattr(exc.socketError, "strerror", None) or exc.socketError
        raise StateError(f"Cannot listen on {config.socket}: {reason}.") from None
    reactor.addSystemEventTrigger("before", "shutdown", daemon.stopService)
    reactor.addSystemEventTrigger("after", "shutdown", state.unlock)
    print(
        f"{PROGRAM}: ready on {config.socket} "
        f"(state {config.state}, log {log_target}, pid {os.getpid()})",
        file=sys.stderr,
        flush=True,
    )
    reactor.run()
    return 0


def _start_logging(target: str) -> None:
    try:
        stream = sys.stderr if target == "-" else open(target, "a", encoding="utf-8")  # noqa: SIM115
    except OSError as exc:
        raise StateError(f"Cannot write the log file {target}: {exc.strerror}.") from None
    observer = FileLogObserver(stream, lambda event: formatEventAsClassicLogText(event) or "")
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(PROGRAM, lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
