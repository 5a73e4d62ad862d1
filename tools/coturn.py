"""coturn's ``turnserver`` on 127.0.0.1, for tests and benchmarks of our TURN client.

``CoturnServer`` starts the real server with time-limited credentials (``--use-auth-secret``,
the scheme ``overlay.turn.mint_credential`` follows), on free ports of 127.0.0.1 only:

    listening   UDP and TCP on one port P of 127.0.0.1 (P+1, coturn's RFC 5780 alternate port,
                is kept free too, although ``--no-rfc5780`` should leave it unused)
    relaying    127.0.0.1 only (``--relay-ip``), loopback peers allowed
    off         TLS, DTLS, the telnet CLI, the config file (``-n``); the web admin is off by default
    files       a temp dir: log (``--log-file stdout`` goes to a file there), pid file, sqlite db

It is ready once it answers a STUN Binding on P.  It is stopped by its PID (SIGTERM, then
SIGKILL; ``tools.processes.Process``) and its temp dir removed, also when the start fails.

    with CoturnServer() as coturn:
        client = TurnClient(reactor, coturn.udp_address, coturn.credential("alice"), send=...)

``python -m tools.coturn`` runs one until Ctrl-C and prints where it listens and its secret.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from overlay.stun import StunError, StunMessage
from overlay.turn import TurnCredential, mint_credential
from tools.processes import Process, ProcessFailure

HOST = "127.0.0.1"
TURNSERVER = shutil.which("turnserver") or "/usr/bin/turnserver"
READY_TIMEOUT = 15.0

Address = tuple[str, int]


def turnserver_installed() -> bool:
    return os.access(TURNSERVER, os.X_OK)


def free_port_pair(host: str = HOST) -> int:
    """A port P such that P and P+1 are free for both UDP and TCP on ``host``."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind((host, 0))
            base = int(probe.getsockname()[1])
        if base >= 65535:
            continue
        try:
            with contextlib.ExitStack() as stack:
                for port in (base, base + 1):
                    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                        held = stack.enter_context(socket.socket(socket.AF_INET, kind))
                        held.bind((host, port))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no free pair of ports on {host}")


def answers_binding(address: Address, timeout: float = 0.2) -> bool:
    """Whether a STUN server answers one Binding request at ``address``."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.settimeout(timeout)
        request = StunMessage.request()
        try:
            probe.sendto(bytes(request), address)
            data, _ = probe.recvfrom(2048)
            return StunMessage.parse(data).transaction_id == request.transaction_id
        except (OSError, StunError):
            return False


class CoturnServer:
    """One ``turnserver`` process on 127.0.0.1; a context manager (``start``/``stop``)."""

    def __init__(
        self,
        *,
        secret: str = "coturn-test-secret",
        realm: str = "voip.test",
        extra: Sequence[str] = (),
        binary: str = TURNSERVER,
    ) -> None:
        self.secret = secret
        self.realm = realm
        #: More turnserver options, e.g. ``("--user-quota=1",)``.
        self.extra = tuple(extra)
        self.binary = binary
        self.port = 0
        self.directory: Path | None = None
        self.process: Process | None = None

    @property
    def udp_address(self) -> Address:
        return (HOST, self.port)

    @property
    def tcp_address(self) -> Address:
        return (HOST, self.port)

    @property
    def log(self) -> str:
        """What turnserver logged so far (for failure messages)."""
        return self.process.stdout if self.process is not None else ""

    def credential(self, user: str = "alice", ttl: int = 3600) -> TurnCredential:
        """A time-limited credential this server accepts (``--use-auth-secret``)."""
        return mint_credential(self.secret.encode(), user, time.time(), ttl)

    def argv(self) -> list[str]:
        assert self.directory is not None
        return [
            self.binary,
            "-n",
            f"--listening-ip={HOST}",
            f"--relay-ip={HOST}",
            f"--listening-port={self.port}",
            f"--alt-listening-port={self.port + 1}",
            "--no-rfc5780",
            "--use-auth-secret",
            f"--static-auth-secret={self.secret}",
            f"--realm={self.realm}",
            "--allow-loopback-peers",
            "--no-cli",
            "--no-tls",
            "--no-dtls",
            "--simple-log",
            "--log-file=stdout",
            f"--pidfile={self.directory / 'turnserver.pid'}",
            f"--db={self.directory / 'turndb.sqlite'}",
            *self.extra,
        ]

    def start(self, timeout: float = READY_TIMEOUT) -> CoturnServer:
        if self.process is not None:
            raise RuntimeError("this turnserver is already started")
        if not turnserver_installed():
            raise FileNotFoundError(f"{self.binary} is not installed (tools/setup-env installs it)")
        self.directory = Path(tempfile.mkdtemp(prefix="coturn-"))
        try:
            self.port = free_port_pair()
            self.process = Process("turnserver", self.argv(), dict(os.environ), self.directory)
            deadline = time.monotonic() + timeout
            while not answers_binding(self.udp_address):
                if self.process.popen.poll() is not None or time.monotonic() > deadline:
                    raise ProcessFailure(
                        f"turnserver did not answer STUN on {HOST}:{self.port} "
                        f"within {timeout:g} s.\n{self.process.describe()}"
                    )
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the process by its PID and remove its files; safe to call twice."""
        process, self.process = self.process, None
        try:
            if process is not None:
                process.stop()
        finally:
            directory, self.directory = self.directory, None
            if directory is not None:
                shutil.rmtree(directory, ignore_errors=True)

    def __enter__(self) -> CoturnServer:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def main() -> None:
    with CoturnServer() as coturn:
        host, port = coturn.udp_address
        print(f"turnserver on {host}:{port} (UDP and TCP), realm {coturn.realm}")
        print(f"secret {coturn.secret}; a credential: {coturn.credential()}")
        print("Ctrl-C stops it.", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while coturn.process is not None and coturn.process.popen.poll() is None:
                time.sleep(0.5)


if __name__ == "__main__":
    main()
