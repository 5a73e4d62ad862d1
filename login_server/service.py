"""The login server as a Twisted service: ``makeService(config, reactor)``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString
from twisted.internet.threads import deferToThreadPool

from login_server.datadir import DataDir
from login_server.logic import LoginServer, SlowRunner
from login_server.protocol import LoginServerFactory
from overlay import certificate
from overlay.identity import DEFAULT_COST, KdfCost
from overlay.listening import ListeningService


@dataclass(frozen=True)
class LoginServerConfig:
    data: Path
    listen: str = "tcp:7000"
    open_registration: bool = False
    cert_lifetime: int = certificate.DEFAULT_LIFETIME
    hash_cost: KdfCost = DEFAULT_COST
    #: Threads for password hashing (argon2id releases the GIL); default: 2 per core.
    hash_threads: int = 0


class LoginServerService(MultiService):
    """The listening port and the state behind it; stopping closes the account database."""

    def __init__(self, server: LoginServer) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.login_server = server
        self.listener: ListeningService | None = None

    def stopService(self) -> Any:
        result = super().stopService()  # type: ignore[no-untyped-call]
        self.login_server.store.close()
        return result


def makeService(config: LoginServerConfig, reactor: Any) -> LoginServerService:
    """Build the login server; listening starts when the service starts."""
    data = DataDir(config.data)
    ca_key = data.load_ca_key()
    store = data.open_store()
    threads = config.hash_threads or 2 * (os.cpu_count() or 1)
    reactor.suggestThreadPoolSize(threads)
    pool = reactor.getThreadPool()

    def run_slow(work: Any) -> Any:
        return deferToThreadPool(reactor, pool, work)

    runner: SlowRunner = run_slow
    server = LoginServer(
        reactor,
        store,
        ca_key,
        run_slow=runner,
        open_registration=config.open_registration,
        cert_lifetime=config.cert_lifetime,
        hash_cost=config.hash_cost,
    )
    top = LoginServerService(server)
    endpoint = serverFromString(reactor, config.listen)
    top.listener = ListeningService(endpoint, LoginServerFactory(server, reactor)).attach(top)
    return top
