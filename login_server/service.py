"""The login server as a Twisted service: ``makeService(config, reactor)``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet.endpoints import serverFromString
from twisted.internet.threads import deferToThreadPool

from login_server.datadir import DataDir
from login_server.logic import LoginServer, SlowRunner
from login_server.protocol import LoginServerFactory
from login_server.reachability import NetworkProber
from login_server.registry import SupernodeRegistry
from overlay import certificate
from overlay.datagram import DatagramEndpoint
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
    #: Address of the UDP socket for supernode reachability checks ("" = all interfaces).
    udp_interface: str = ""
    min_supernodes: int = 10
    max_ons_per_supernode: int = 400
    supernode_timeout: float = 90.0


class UDPService(Service):
    """Owns a UDP port (port 0: any free port) for a datagram protocol."""

    def __init__(self, reactor: Any, protocol: DatagramEndpoint, interface: str) -> None:
        self.reactor = reactor
        self.protocol = protocol
        self.interface = interface
        self.port: Any = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.port = self.reactor.listenUDP(0, self.protocol, interface=self.interface)

    def stopService(self) -> Any:
        super().stopService()  # type: ignore[no-untyped-call]
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None


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
    top_udp = DatagramEndpoint(reactor)
    registry = SupernodeRegistry(
        reactor,
        ca_key,
        NetworkProber(reactor, top_udp),
        record_certificate=store.record_certificate,
        min_supernodes=config.min_supernodes,
        max_ons_per_supernode=config.max_ons_per_supernode,
        evict_after=config.supernode_timeout,
    )
    server = LoginServer(
        reactor,
        store,
        ca_key,
        run_slow=runner,
        open_registration=config.open_registration,
        cert_lifetime=config.cert_lifetime,
        hash_cost=config.hash_cost,
        registry=registry,
    )
    top = LoginServerService(server)
    UDPService(reactor, top_udp, config.udp_interface).setServiceParent(top)  # type: ignore[no-untyped-call]
    TimerService(config.supernode_timeout / 3, registry.evict_silent).setServiceParent(top)
    endpoint = serverFromString(reactor, config.listen)
    top.listener = ListeningService(endpoint, LoginServerFactory(server, reactor)).attach(top)
    return top
