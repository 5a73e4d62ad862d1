"""An in-process overlay: a login server, N supernodes and M users, on real sockets of 127.0.0.1.

Everything is the product's own code (login server logic and registry with its network
reachability prober, ``Supernode``, ``SupernodeRole``, ``OverlayNode``, ``LoginClient``); only the
processes are folded into one reactor so a test can run a hundred supernodes and hundreds of
users in seconds.  Used by the integration tests and the benchmarks.

    grid = Grid(reactor, workdir)
    await grid.start_login_server()
    await grid.add_supernodes(100)
    await grid.add_users(500)
    result = await grid.users["u0"].search("u1")
    await grid.kill_supernodes(grid.supernodes[:30])
    await grid.stop()
"""

from __future__ import annotations

import random
import resource
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults
from twisted.internet.task import LoopingCall, deferLater

from client.loginclient import LoginClient
from client.overlaynode import OverlayNode, Searcher
from client.promotion import PromotionPolicy, SupernodeRole
from login_server.accounts import hash_password
from login_server.datadir import DataDir
from login_server.logic import LoginServer
from login_server.protocol import LoginServerFactory
from login_server.reachability import NetworkProber
from login_server.registry import SupernodeRegistry
from overlay.datagram import DatagramEndpoint
from overlay.hostcache import HostCache
from overlay.identity import MIN_COST, IdentityKey
from overlay.keyspace import user_key
from overlay.slotmap import SupernodeInfo
from overlay.supernode import Supernode

HOST = "127.0.0.1"
PASSWORD = "grid-password"


def raise_file_limit() -> int:
    """Let this process hold the sockets of a large grid (soft limit up to the hard one)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@dataclass
class GridSupernode:
    name: str
    key: IdentityKey
    supernode: Supernode
    role: SupernodeRole
    ports: list[Any] = field(default_factory=list)
    alive: bool = True

    @property
    def info(self) -> SupernodeInfo | None:
        return self.supernode.info


@dataclass
class GridUser:
    name: str
    identity: IdentityKey
    node: OverlayNode
    udp_port: Any


class Grid:
    def __init__(
        self,
        reactor: Any,
        workdir: Path,
        *,
        heartbeat_every: float = 2.0,
        keepalive: float = 15.0,
        silence_timeout: float = 2.0,
        evict_after: float | None = None,
        anti_entropy_every: float = 10.0,
        seed: int = 1,
    ) -> None:
        self.reactor = reactor
        self.workdir = workdir
        self.heartbeat_every = heartbeat_every
        self.keepalive = keepalive
        self.silence_timeout = silence_timeout
        self.evict_after = evict_after if evict_after is not None else heartbeat_every * 5
        self.anti_entropy_every = anti_entropy_every
        self.rng = random.Random(seed)
        self.supernodes: list[GridSupernode] = []
        self.users: dict[str, GridUser] = {}
        self._ports: list[Any] = []
        self.login: LoginServer | None = None
        self._evictor: LoopingCall | None = None
        self.registry: SupernodeRegistry | None = None
        self.address = ""
        self.ca_public = b""
        raise_file_limit()

    # -- login server ---------------------------------------------------------------------------

    async def start_login_server(self, min_supernodes: int = 10_000) -> None:
        data = DataDir(self.workdir / "ls")
        ca_key = data.init()
        store = data.open_store()
        prober_udp = DatagramEndpoint(self.reactor)
        self._ports.append(self.reactor.listenUDP(0, prober_udp, interface=HOST))
        self.registry = SupernodeRegistry(
            self.reactor,
            ca_key,
            NetworkProber(self.reactor, prober_udp),
            record_certificate=store.record_certificate,
            min_supernodes=min_supernodes,
            evict_after=self.evict_after,
        )
        self.login = LoginServer(
            self.reactor, store, ca_key, hash_cost=MIN_COST, registry=self.registry
        )
        self._evictor = LoopingCall(self.registry.evict_silent)
        self._evictor.clock = self.reactor
        self._evictor.start(self.heartbeat_every, now=False)
        port = self.reactor.listenTCP(
            0, LoginServerFactory(self.login, self.reactor), interface=HOST
        )
        self._ports.append(port)
        self.address = f"{HOST}:{port.getHost().port}"
        self.ca_public = ca_key.public_key

    def client(self) -> LoginClient:
        return LoginClient(self.reactor, self.address, self.ca_public, timeout=10.0)

    # -- supernodes -----------------------------------------------------------------------------

    def _new_supernode(self, name: str) -> GridSupernode:
        key = IdentityKey.generate()
        supernode = Supernode(
            self.reactor,
            key,
            self.ca_public,
            rng=random.Random(self.rng.random()),
            anti_entropy_every=self.anti_entropy_every,
        )
        searcher = Searcher(self.reactor, supernode.udp, self.ca_public)
        entry: GridSupernode

        def listen() -> tuple[int, int]:
            tcp = self.reactor.listenTCP(0, supernode.factory(), interface=HOST)
            udp = self.reactor.listenUDP(0, supernode.udp, interface=HOST)
            entry.ports = [tcp, udp]
            return tcp.getHost().port, udp.getHost().port

        def unlisten() -> Deferred[None]:
            ports, entry.ports = entry.ports, []
            return gatherResults([Deferred.fromCoroutine(_stop(p)) for p in ports]).addCallback(
                lambda _: None
            )

        searcher.serve_lookups_for(supernode)
        policy = PromotionPolicy(
            min_uptime=0.0, heartbeat_every=self.heartbeat_every, check_every=self.heartbeat_every
        )
        role = SupernodeRole(
            self.reactor,
            self.client(),
            key,
            supernode,
            listen=listen,
            unlisten=unlisten,
            policy=policy,
            load=lambda: 0.0,
            rng=random.Random(self.rng.random()),
        )
        entry = GridSupernode(name, key, supernode, role)
        return entry

    async def add_supernodes(self, count: int) -> None:
        """Promote ``count`` new supernodes through the login server, then converge views."""
        for _ in range(count):
            entry = self._new_supernode(f"sn{len(self.supernodes)}")
            await entry.role._try_promote()
            if not entry.role.active:
                raise RuntimeError(f"{entry.name} was not admitted: {entry.role.last_refusal}")
            self.supernodes.append(entry)
        await self.converge()
        for entry in self.supernodes:
            entry.role.start()

    async def converge(self, timeout: float = 30.0) -> None:
        """Heartbeat every live supernode once, then wait until each has pulled its slot."""
        semaphore = DeferredSemaphore(20)
        live = [s for s in self.supernodes if s.alive and s.role.active]
        await gatherResults([semaphore.run(s.role._heartbeat) for s in live])
        await self.wait_until(
            lambda: all(s.supernode.synced for s in live),
            timeout,
            "slot sync",
        )

    async def kill_supernodes(self, victims: Sequence[GridSupernode]) -> None:
        """Crash these supernodes at once: ports closed, attached nodes cut off, no goodbye."""
        for victim in victims:
            victim.alive = False
            victim.role.stop()
            victim.supernode.stop()
            for connection in list(victim.supernode.attached.values()):
                if connection.transport is not None:
                    connection.transport.abortConnection()  # type: ignore[attr-defined]
        await gatherResults([Deferred.fromCoroutine(_stop(p)) for v in victims for p in v.ports])
        for victim in victims:
            victim.ports = []

    # -- users ----------------------------------------------------------------------------------

    async def add_users(self, count: int, concurrency: int = 20) -> list[str]:
        assert self.login is not None
        names = [f"user{len(self.users) + i}" for i in range(count)]
        password_hash = hash_password(PASSWORD, MIN_COST)
        for name in names:
            self.login.store.add(name, password_hash, self.reactor.seconds())
        semaphore = DeferredSemaphore(concurrency)
        await gatherResults([semaphore.run(self._login, n) for n in names])
        await self.wait_until(
            lambda: all(self.users[n].node.replicas > 0 for n in names), 60.0, "attach and publish"
        )
        return names

    async def _login(self, name: str) -> None:
        identity = IdentityKey.generate()
        result = await self.client().login(name, PASSWORD, identity)
        udp = DatagramEndpoint(self.reactor)
        port = self.reactor.listenUDP(0, udp, interface=HOST)
        node = OverlayNode(
            self.reactor,
            self.ca_public,
            HostCache(None, self.reactor),
            udp,
            keepalive=self.keepalive,
            silence_timeout=self.silence_timeout,
            rng=random.Random(self.rng.random()),
        )
        node.start(identity, result.certificate, result.bootstrap)
        self.users[name] = GridUser(name, identity, node, port)

    def where_is(self, username: str, path: Sequence[Sequence[bytes]] = ()) -> dict[str, Any]:
        """For failure messages: which live supernodes serve ``username``'s key (their held
        range, whether in sync, their map version, whether they hold its record), which hold
        its record, and who was asked on a search's ``path``, round by round."""
        key = user_key(username)

        def state(s: GridSupernode) -> str:
            sn = s.supernode
            prefix = sn.view.prefix if sn.view is not None else None
            return (
                f"{'' if s.alive else 'dead '}v{s.role.version} slot {prefix} held {sn.held} "
                f"{'synced' if sn.synced else 'syncing'}"
                f"{' has it' if username in sn.index else ''}"
            )

        by_id = {s.key.public_key: s for s in self.supernodes}
        serving = [
            s
            for s in self.supernodes
            if s.alive and s.supernode.view and s.supernode.view.prefix.contains(key)
        ]
        return {
            "serving": {s.name: state(s) for s in serving},
            "holding": [
                s.name for s in self.supernodes if s.alive and username in s.supernode.index
            ],
            "path": [
                [f"{by_id[i].name}: {state(by_id[i])}" if i in by_id else "?" for i in ids]
                for ids in path
            ],
        }

    def attached_to(self, entry: GridSupernode) -> list[GridUser]:
        return [u for u in self.users.values() if u.name in entry.supernode.attached]

    # -- helpers --------------------------------------------------------------------------------

    async def wait_until(self, condition: Any, timeout: float, what: str) -> float:
        """Poll ``condition`` every 50 ms; returns the seconds it took; raises on timeout."""
        start = self.reactor.seconds()
        while not condition():
            if self.reactor.seconds() - start > timeout:
                raise TimeoutError(f"{what} did not happen within {timeout:g} s")
            await deferLater(self.reactor, 0.05, lambda: None)
        return float(self.reactor.seconds() - start)

    async def stop(self) -> None:
        for user in self.users.values():
            await user.node.stop(publish_offline=False)
            await _stop(user.udp_port)
        for entry in self.supernodes:
            entry.role.stop()
            entry.supernode.stop()
            for connection in list(entry.supernode.attached.values()):
                connection.close()
            for port in entry.ports:
                await _stop(port)
            entry.ports = []
        if self._evictor is not None and self._evictor.running:
            self._evictor.stop()
        for port in self._ports:
            await _stop(port)
        if self.login is not None:
            self.login.store.close()
        await deferLater(self.reactor, 0.1, lambda: None)  # let closed connections settle


async def _stop(port: Any) -> None:
    result = port.stopListening()
    if isinstance(result, Deferred):
        await result
