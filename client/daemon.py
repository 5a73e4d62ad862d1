"""``voipd``: the node daemon.  It owns all of a user's state; ``voipctl`` only talks to it.

``makeService(config, reactor)`` builds the daemon as a Twisted service: today the control
socket and the account (login, certificate renewal); the overlay and calls plug in beside them.
"""

from __future__ import annotations

import argparse
import ipaddress
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
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import FileLogObserver, Logger, formatEventAsClassicLogText, globalLogBeginner
from twisted.python.failure import Failure

from client.account import Account, NotLoggedIn, Progress
from client.buddies import BuddyList, buddy_line
from client.callmanager import CallManager
from client.callparts import call_environment, netcheck
from client.calls import AudioOptions
from client.callsocket import route_source
from client.candidates import parse_address as parse_candidate_address
from client.control import ControlFactory, Handler
from client.keypins import KeyPins, safety_number
from client.loginclient import LoginClient, parse_address
from client.messaging import Messenger
from client.overlaynode import OverlayNode, Searcher
from client.paths import MAX_SOCKET_PATH, default_socket_path, default_state_dir
from client.promotion import PromotionPolicy, SupernodeRole
from client.relayconfig import RelayConfigError, StaticRelay, static_relay
from client.state import StateDir, StateError
from overlay.certificate import SignedCertificate
from overlay.datagram import DatagramEndpoint
from overlay.errors import VoipError
from overlay.hostcache import HostCache
from overlay.identity import DEFAULT_COST, IdentityKey, KdfCost, key_fingerprint, read_trust_anchor
from overlay.listening import ListeningService
from overlay.overlay_protocol import RelayOffer
from overlay.presence import Status
from overlay.relayoffers import RelayEndpoint
from overlay.supernode import Supernode
from overlay.terminal import run_command
from overlay.usernames import canonical_username
from relay.config import IPNetwork

PROGRAM = "voipd"
#: Logged in with no supernode known: ask the login server again after this, doubling to the max.
STARVED_FIRST = 5.0
STARVED_MAX = 300.0
#: At shutdown, how long a supernode may take to hand its nodes over and say goodbye.
LEAVE_GRACE = 4.0
#: How often the NAT kind in our presence record is checked again.
NAT_RECHECK = 600.0
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
    #: Machines whose transitions are logged (``--debug-state call``).
    debug_state: frozenset[str] = frozenset()
    #: Relays of our own to offer to calls (``--relay``), beside our supernode's.
    relays: tuple[StaticRelay, ...] = ()
    #: Run a TURN relay while a supernode (``--no-relay`` turns it off), on this port (0: any).
    relay: bool = True
    relay_port: int = 0
    relay_max_allocations: int = 200
    #: Calls never go direct (``--relay-only``): the peer never learns our addresses.
    relay_only: bool = False
    #: Seconds between two refreshes of one buddy's presence (``--buddy-refresh``).
    buddy_refresh: float = 30.0
    #: Peers the relay may send to (``--relay-allow-peers``); always every public address.
    relay_allow_peers: tuple[IPNetwork, ...] = ()


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
        self.calls = CallManager(
            call_environment(
                reactor,
                config.interface,
                self._stun_server,
                trace=self._trace_call if "call" in config.debug_state else None,
                relay_offers=self._relay_offers,
                nat_kind=lambda: self.nat_kind,
                relay_only=config.relay_only,
            ),
            config.ca_key,
            self._credentials,
            self.node.send,
            self.node.search,
        )
        self.node.on_message.append(self.calls.received)
        #: The keys first seen for each user (client.keypins): calls check them.
        self.pins = KeyPins(config.state / "pins.json")
        self.calls.key_check = self.pins.check
        self.buddies = BuddyList(
            reactor,
            config.state / "buddies.json",
            self.node.search,
            self.pins.check,
            refresh=config.buddy_refresh,
        )
        #: Instant messages (client.messaging): inbox and outbox per user in the state dir.
        self.messages = Messenger(
            reactor,
            config.ca_key,
            self._credentials,
            config.state,
            self.node.search,
            self.node.post,
        )
        self.messages.key_check = self.pins.check
        self.node.on_message.append(self.messages.received)
        self._starved_timer: Any = None
        self._nat_checking = False
        #: Our NAT kind as the last NAT check found it (None: not checked yet).
        self.nat_kind: str | None = None
        self._nat_checked_at: float | None = None
        self._starved_every = STARVED_FIRST
        self.account.on_change.append(self._account_changed)
        self.supernode: Supernode | None = None
        self.relay: Any = None
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
            "ping-user": self.cmd_ping_user,
            "verify": self.cmd_verify,
            "presence": self.cmd_presence,
            "buddies": self.cmd_buddies,
            "call": self.cmd_call,
            "answer": self.cmd_answer,
            "hangup": self.cmd_hangup,
            "netcheck": self.cmd_netcheck,
            "msg": self.messages.cmd_msg,
            "inbox": self.messages.cmd_inbox,
        }
        endpoint = UNIXServerEndpoint(reactor, str(config.socket), mode=0o600, wantPID=False)
        ListeningService(endpoint, ControlFactory(handlers, frozenset({"buddies"}))).attach(self)

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
            if config.relay:
                try:
                    self._start_relay(supernode)
                except (CannotListenError, OSError) as exc:
                    log.warn("supernode without a relay: cannot listen: {error}", error=exc)
            return tcp.getHost().port, udp.getHost().port

        def unlisten() -> Deferred[None]:
            closing = [defer.maybeDeferred(p.stopListening) for p in ports]
            ports.clear()
            supernode.relay = None
            if self.relay is not None:
                relay, self.relay = self.relay, None
                closing.append(relay.stop())
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

    def _start_relay(self, supernode: Supernode) -> None:
        """The TURN relay beside our supernode (``relay.service``), with a fresh secret."""
        from relay.config import RelayConfig
        from relay.service import Relay

        config = self.config
        login_host = parse_address(config.login_server)[0]
        relay_ip = config.interface or route_source((login_host, 9)) or "127.0.0.1"
        relay_config = RelayConfig(
            secret=os.urandom(32),
            listen_host=config.interface or relay_ip,
            udp_port=config.relay_port,
            tcp_port=config.relay_port,
            relay_ip=relay_ip,
            allow_peers=config.relay_allow_peers,
            allow_public_peers=True,
            max_allocations=config.relay_max_allocations,
        )
        relay = Relay(self.reactor, relay_config)
        relay.start()
        self.relay = relay
        host, udp_port = relay.udp_address
        supernode.relay = RelayEndpoint(
            host, udp_port, relay.tcp_address[1], relay_config.secret, relay.spare
        )
        log.info("relay serving on {host}:{port} (UDP and TCP)", host=host, port=udp_port)

    def _account_changed(self) -> None:
        account = self.account
        if account.identity is not None and account.certificate is not None:
            if not self.node.running:
                self.node.start(account.identity, account.certificate, account.bootstrap)
                self.buddies.start()
            else:
                self.node.update_certificate(account.certificate)
                self.node.learn(account.bootstrap)
        elif self.node.running:
            self.buddies.stop()
            self.calls.stop()
            Deferred.fromCoroutine(self.node.stop()).addErrback(self._leave_failed)

    def _check_starved(self) -> None:
        """Logged in but no supernode known (we logged in before any existed): ask again."""
        self._starved_timer = None
        starved = (
            self.account.certificate is not None
            and self.node.running
            and self.node.link is None
            and len(self.hostcache) == 0
        )
        if starved:
            log.info("no supernode known; asking the login server for some")
            self.account.refresh()
            self._starved_every = min(STARVED_MAX, self._starved_every * 2)
        else:
            self._starved_every = STARVED_FIRST
        if self.node.link is not None and not self._nat_checking:
            last = self._nat_checked_at
            if last is None or self.reactor.seconds() - last > NAT_RECHECK:
                self._nat_checking = True
                Deferred.fromCoroutine(self._check_nat()).addErrback(self._nat_failed)
        self._starved_timer = self.reactor.callLater(self._starved_every, self._check_starved)

    async def _check_nat(self) -> None:
        """What kind of NAT are we behind? It goes into our presence record."""
        try:
            report = await self.cmd_netcheck({}, lambda _: None)
        finally:
            self._nat_checking = False
            self._nat_checked_at = self.reactor.seconds()
        reflexive = parse_candidate_address(report["reflexive"]) if report["reflexive"] else None
        kind = str(report["kind"]).lower().replace(" ", "-").replace("(", "").replace(")", "")
        self.nat_kind = kind[:32]
        self.node.udp_blocked = self.nat_kind == "udp-blocked"
        self.node.set_nat(reflexive, kind[:32])

    def _nat_failed(self, failure: Failure) -> None:
        if isinstance(failure.value, VoipError):
            log.info("NAT check failed: {error}", error=failure.value)
        else:
            log.failure("NAT check failed", failure)

    def _credentials(self) -> tuple[IdentityKey, SignedCertificate] | None:
        account = self.account
        if account.identity is None or account.certificate is None:
            return None
        return account.identity, account.certificate

    async def _relay_offers(self) -> list[RelayOffer]:
        """Relays for a call: our own (``--relay``) first, then our supernode's."""
        user = self.account.username or "anonymous"
        now = self.reactor.seconds()
        offers = [relay.offer(user, now) for relay in self.config.relays]
        if self.node.link is not None:
            try:
                offers += await self.node.relay_offers()
            except VoipError as exc:
                log.info("our supernode offered no relay: {error}", error=exc)
        return offers

    def _stun_server(self) -> tuple[str, int] | None:
        link = self.node.link
        if link is None:
            return None
        return link.info.host, link.info.udp_port

    def _trace_call(self, call_id: bytes, old: str, event: str, new: str) -> None:
        log.info(
            "call {call}: {old} --{event}--> {new}",
            call=call_id.hex()[:8],
            old=old,
            event=event,
            new=new,
        )

    def _leave_failed(self, failure: Failure) -> None:
        log.failure("leaving the overlay failed", failure)

    def startService(self) -> None:
        self._starved_timer = self.reactor.callLater(STARVED_FIRST, self._check_starved)
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
        if self._starved_timer is not None and self._starved_timer.active():
            self._starved_timer.cancel()
        self.buddies.stop()
        self.calls.stop()
        leaving: Deferred[None] = defer.succeed(None)
        if self.role is not None:
            # A supernode hands its nodes over and tells the login server before it goes; a
            # slow login server must not hold the shutdown up for long.
            leaving = Deferred.fromCoroutine(self.role.leave("voipd is stopping"))
            leaving.addTimeout(LEAVE_GRACE, self.reactor)
            leaving.addErrback(self._leave_failed)
        if self.node.running:
            Deferred.fromCoroutine(self.node.stop(publish_offline=False)).addErrback(
                self._leave_failed
            )
        if self.udp_port is not None:
            self.udp_port.stopListening()

        def stop_the_rest(_: None) -> Any:
            return super(Daemon, self).stopService()  # type: ignore[no-untyped-call]

        result = leaving.addCallback(stop_the_rest)

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
            "supernode": self._supernode_status(),
            "call": self.calls.status(),
        }

    def _supernode_status(self) -> dict[str, Any]:
        if self.role is None:
            return {"allowed": False}
        document = self.role.status()
        document["relay"] = self.relay.describe() if self.relay is not None else None
        return document

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
            invisible = record.status is Status.INVISIBLE
            document["status"] = "offline" if invisible else record.status.value
            if not invisible:  # a fresh record would give an invisible user away
                document["last_seen"] = record.issued_at
            document["nat_type"] = record.nat_type
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

    async def cmd_buddies(self, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        """List, add or remove buddies; ``watch_for``: stream their changes that long."""
        action = args.get("action", "list")
        if self.account.username is None:
            raise NotLoggedIn()
        if action == "add":
            name = canonical_username(_text(args, "username"))
            if name == self.account.username:
                raise VoipError("You cannot add yourself as a buddy.")
            self.buddies.add(name)
        elif action == "remove":
            self.buddies.remove(_text(args, "username"))
        elif action != "list":
            raise VoipError(f"Unknown buddies action {action!r}.")
        watch = args.get("watch_for")
        if isinstance(watch, int | float) and watch > 0:
            progress(f"Watching {len(self.buddies.buddies)} buddies (Ctrl-C stops)...")

            def changed(buddy: Any) -> None:
                progress(buddy_line(buddy.to_json(), self.reactor.seconds()))

            self.buddies.listeners.append(changed)
            try:
                await deferLater(self.reactor, min(float(watch), 86_400.0))
            finally:
                self.buddies.listeners.remove(changed)
        return {"buddies": [b.to_json() for b in self.buddies.listing()]}

    async def cmd_presence(self, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        """How others see us: online, away, busy or invisible (shown to them as offline)."""
        text = _text(args, "status")
        choices = {s.value: s for s in (Status.ONLINE, Status.AWAY, Status.BUSY, Status.INVISIBLE)}
        if text not in choices:
            raise VoipError(f"Unknown presence {text!r}: say online, away, busy or invisible.")
        if self.account.username is None:
            raise NotLoggedIn()
        if self.node.link is None:
            self.node.presence_status = choices[text]  # published when we attach
            return {"status": text, "replicas": 0}
        replicas = await self.node.set_status(choices[text])
        return {"status": text, "replicas": replicas}

    async def cmd_verify(self, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        """The safety number with a user, and whether their key is the one pinned."""
        name = canonical_username(_text(args, "username"))
        certificate = self.account.certificate
        if self.account.username is None or certificate is None:
            raise NotLoggedIn()
        progress(f"Looking up {name}'s key...")
        result = await self.node.search(name)
        if result.record is None:
            raise VoipError(f"No key known for {name}: no such user, or not seen in 72 h.")
        key = SignedCertificate.parse(result.record.certificate).public_key
        pinned = self.pins.pinned(name)
        if args.get("accept"):
            self.pins.accept(name, key)
            state = "accepted"
        elif pinned is None:
            self.pins.check(name, key)
            state = "pinned now (first seen)"
        else:
            state = "the same as first seen" if pinned == key else "CHANGED"
        me = certificate.username
        return {
            "username": name,
            "safety_number": safety_number(me, certificate.public_key, name, key),
            "key": key_fingerprint(key),
            "state": state,
        }

    async def cmd_ping_user(self, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        name = canonical_username(_text(args, "username"))
        if self.account.username is None:
            raise NotLoggedIn()
        count, interval = args.get("count", 4), args.get("interval", 1.0)
        if not isinstance(count, int) or not 1 <= count <= 100:
            raise VoipError("The count must be 1-100.")
        if not isinstance(interval, int | float) or not 0.2 <= interval <= 60:
            raise VoipError("The interval must be 0.2-60 s.")
        return await self.calls.ping(
            name,
            progress,
            count=count,
            interval=float(interval),
            until_direct=bool(args.get("until_direct")),
        )

    async def cmd_call(self, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        name = canonical_username(_text(args, "username"))
        if self.account.username is None:
            raise NotLoggedIn()
        return await self.calls.place(name, _audio_options(args), progress)

    async def cmd_answer(self, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        if self.account.username is None:
            raise NotLoggedIn()
        wait = args.get("wait", 0)
        if not isinstance(wait, int | float) or isinstance(wait, bool) or not 0 <= wait <= 86400:
            raise BadRequest("--wait must be a number of seconds between 0 and 86400.")
        return await self.calls.answer(_audio_options(args), float(wait), progress)

    async def cmd_hangup(self, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        return self.calls.hangup()

    async def cmd_netcheck(self, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        servers = [(sn.host, sn.udp_port) for sn in self.hostcache.ranked()[:3]]
        if self.node.link is not None:
            own = (self.node.link.info.host, self.node.link.info.udp_port)
            servers = [own, *[s for s in servers if s != own]][:3]
        if not servers:
            raise NoSupernodeKnown()
        progress(f"Asking {len(servers)} supernode(s) how they see us...")
        return await netcheck(self.reactor, self.config.interface, servers)


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


class NoSupernodeKnown(VoipError):
    """No supernode is known yet to check the network with; log in first."""

    code = "no-supernode"


def _audio_options(args: dict[str, Any]) -> AudioOptions:
    paths: dict[str, str | None] = {}
    for name in ("play", "record"):
        value = args.get(name)
        if value is not None and not (isinstance(value, str) and os.path.isabs(value)):
            raise BadRequest(f"--{name} must be an absolute path.")
        paths[name] = value
    duration = args.get("duration")
    if duration is not None and (
        not isinstance(duration, int | float) or isinstance(duration, bool) or duration <= 0
    ):
        raise BadRequest("--duration must be a positive number of seconds.")
    return AudioOptions(paths["play"], paths["record"], duration)


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
    sn.add_argument(
        "--no-relay", action="store_true", help="as a supernode, do not relay others' calls"
    )
    sn.add_argument(
        "--relay-port", type=int, default=0, help="the relay's UDP and TCP port (default: any)"
    )
    sn.add_argument(
        "--relay-allow-peers",
        action="append",
        type=_network,
        default=[],
        metavar="CIDR",
        help="also relay to these networks (every public address always); for labs and tests",
    )
    sn.add_argument(
        "--relay-max-allocations",
        type=int,
        default=200,
        help="calls the relay carries at most, two allocations each (200)",
    )
    calls = parser.add_argument_group("calls")
    calls.add_argument(
        "--relay",
        metavar="turn:HOST:PORT",
        help="a TURN relay of your own to offer to calls, beside the supernodes' relays",
    )
    calls.add_argument(
        "--relay-only",
        action="store_true",
        help="never call directly: always through a relay, so peers never learn your address",
    )
    calls.add_argument(
        "--buddy-refresh",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds between refreshes of each buddy's presence (30; lower for labs and tests)",
    )
    calls.add_argument("--relay-user", help="the username for --relay")
    calls.add_argument("--relay-password", help="the password for --relay")
    calls.add_argument(
        "--relay-secret-file",
        type=Path,
        help="the relay's shared secret (coturn use-auth-secret): credentials are minted from it",
    )
    parser.add_argument(
        "--debug-state",
        action="append",
        choices=["call"],
        default=[],
        help="log every transition of these state machines",
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
        debug_state=frozenset(args.debug_state),
        relays=_static_relays(args),
        relay=not args.no_relay,
        relay_port=args.relay_port,
        relay_max_allocations=args.relay_max_allocations,
        relay_allow_peers=tuple(args.relay_allow_peers),
        relay_only=args.relay_only,
        buddy_refresh=args.buddy_refresh,
    )
    return config, state


def _network(text: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a network like 203.0.113.0/24") from None


def _static_relays(args: argparse.Namespace) -> tuple[StaticRelay, ...]:
    if args.relay is None:
        if args.relay_user or args.relay_password or args.relay_secret_file:
            raise StateError("--relay-user, --relay-password and --relay-secret-file need --relay.")
        return ()
    try:
        return (
            static_relay(args.relay, args.relay_user, args.relay_password, args.relay_secret_file),
        )
    except RelayConfigError as exc:
        raise StateError(str(exc)) from None


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
