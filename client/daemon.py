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
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.threads import deferToThreadPool
from twisted.logger import FileLogObserver, formatEventAsClassicLogText, globalLogBeginner

from client.account import Account, Progress
from client.control import ControlFactory, Handler
from client.loginclient import LoginClient, parse_address
from client.paths import MAX_SOCKET_PATH, default_socket_path, default_state_dir
from client.state import StateDir, StateError
from overlay.errors import VoipError
from overlay.identity import DEFAULT_COST, KdfCost, read_trust_anchor
from overlay.listening import ListeningService
from overlay.terminal import run_command

PROGRAM = "voipd"
VERSION = "0.1.0"


@dataclass(frozen=True)
class DaemonConfig:
    state: Path
    login_server: str
    ca_key: bytes
    socket: Path
    key_cost: KdfCost = DEFAULT_COST


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
        handlers: dict[str, Handler] = {
            "status": self.cmd_status,
            "register": self.cmd_register,
            "login": self.cmd_login,
            "logout": self.cmd_logout,
            "ping": self.cmd_ping,
        }
        endpoint = UNIXServerEndpoint(reactor, str(config.socket), mode=0o600, wantPID=False)
        ListeningService(endpoint, ControlFactory(handlers)).attach(self)

    def startService(self) -> None:
        self.account.restore()
        old = os.umask(0o077)  # the socket exists with mode 0600 from its first instant
        try:
            super().startService()  # type: ignore[no-untyped-call]
        finally:
            os.umask(old)

    def stopService(self) -> Any:
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
        }

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
    return DaemonConfig(state_path, login_server, ca_key, sock), state


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
