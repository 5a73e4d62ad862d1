"""A supernode leaves and its ordinary nodes move on, with no gap a caller would notice.

- With real ``voipd`` processes: two volunteers promote, alice attaches to one of them, that one
  is stopped (SIGTERM), and alice moves to the other while carol, on a third node, searches for
  her every 200 ms: no search fails, and her record soon names the supernode she moved to.
  Nodes run without ``--allow-supernode`` never promote, even when the overlay wants more.
- In one process (``tools.grid``, real sockets): a supernode demotes gracefully
  (``SupernodeRole.demote``: leave, hand the attached nodes over, close); meanwhile every search
  for its nodes succeeds and every message to them is delivered.  (``voipd`` demotes this way
  only when it loses its eligibility; a stopped ``voipd`` just goes away, as above.)
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from client.overlaynode import Searcher
from client.voipctl import call
from overlay.datagram import DatagramEndpoint
from overlay.errors import VoipError
from tests.integration.test_overlay_cli import log_in, node
from tools.grid import HOST, Grid, GridSupernode
from tools.processes import (
    VOIPCTL,
    DaemonProcess,
    Processes,
    run,
    start_login_server,
)

pytestmark = pytest.mark.integration

POLL = 0.2
#: Volunteering as soon as possible, and heartbeating often, so the test is quick; and
#: whatever the load of the machine that runs the tests (other tests may keep it busy).
QUICK = ("--min-uptime", "1", "--heartbeat", "1", "--max-load", "1000")
ADMITTED = re.compile(r"admitted supernode sn-\S+ at 127\.0\.0\.1:(\d+)")


def ctl(daemon: DaemonProcess, *args: str, input: str | None = None) -> tuple[int, str, str]:
    result = run(VOIPCTL, "--socket", daemon.socket, *args, input=input)
    assert "Traceback" not in result.stdout + result.stderr
    return result.returncode, result.stdout, result.stderr


def status(daemon: DaemonProcess) -> dict[str, Any]:
    code, out, err = ctl(daemon, "status", "--json")
    assert code == 0, err
    document: dict[str, Any] = json.loads(out)
    return document


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:g} s")
        time.sleep(POLL)


def sn_port(daemon: DaemonProcess) -> int:
    ports = status(daemon)["supernode"]["ports"]
    return int(ports["tcp"])


class Poller(threading.Thread):
    """Searches ``username`` from ``daemon`` every ``POLL`` seconds, as ``voipctl search``
    does (over the control socket), and keeps every answer (or the error instead)."""

    def __init__(self, daemon: DaemonProcess, username: str) -> None:
        super().__init__(daemon=True)
        self.daemon_process = daemon
        self.username = username
        self.answers: list[dict[str, Any]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            began = time.monotonic()
            try:
                answer = call(self.daemon_process.socket, "search", {"username": self.username})
            except Exception as exc:  # every failure is a failed search
                answer = {"outcome": "error", "error": repr(exc)}
            answer["at"] = time.monotonic()
            self.answers.append(answer)
            self.halt.wait(max(0.0, POLL - (time.monotonic() - began)))

    def found_at(self, supernode: str) -> bool:
        return any(a.get("supernode") == supernode for a in self.answers)

    def stop(self) -> list[dict[str, Any]]:
        self.halt.set()
        self.join(30.0)
        assert not self.is_alive(), "a search hung"
        return self.answers


def test_a_stopped_supernodes_nodes_move_on_and_searches_never_fail(
    processes: Processes, login_data: Path, short_dir: Callable[[], Path]
) -> None:
    server = start_login_server(processes, login_data, "--min-supernodes", "2")
    sn1 = node(processes, short_dir() / "sn1", server, "--allow-supernode", *QUICK)
    sn2 = node(processes, short_dir() / "sn2", server, "--allow-supernode", *QUICK)
    alice = node(processes, short_dir() / "alice", server)
    carol = node(processes, short_dir() / "carol", server)
    wait_for(
        lambda: status(sn1)["supernode"].get("active") and status(sn2)["supernode"].get("active"),
        "both volunteers becoming supernodes",
    )
    log_in(alice, "alice")
    log_in(carol, "carol")
    # Both supernodes serve the one slot, so both come to hold alice's and carol's records.
    wait_for(
        lambda: all(status(sn)["supernode"].get("records") == 2 for sn in (sn1, sn2)),
        "both supernodes holding both records",
    )
    ports = {sn_port(sn1): sn1, sn_port(sn2): sn2}
    leaving = ports[status(alice)["overlay"]["supernode"]["port"]]
    staying = sn2 if leaving is sn1 else sn1
    old, new = f"127.0.0.1:{sn_port(leaving)}", f"127.0.0.1:{sn_port(staying)}"

    poller = Poller(carol, "alice")
    poller.start()
    try:
        wait_for(lambda: poller.found_at(old), "carol finding alice at her supernode")
        leaving.process.stop()
        wait_for(lambda: poller.found_at(new), "alice's record naming her new supernode")
        moved_at = time.monotonic()
        wait_for(lambda: poller.answers[-1]["at"] > moved_at + 1.0, "a second more of searches")
    finally:
        answers = poller.stop()

    failed = [a for a in answers if a.get("outcome") != "found" or a.get("status") != "online"]
    assert not failed, failed
    assert status(alice)["overlay"]["supernode"]["port"] == sn_port(staying)
    assert status(alice)["overlay"]["attachments"] == 2
    # Once her record names the new supernode, it never names the old one again.
    first_new = next(i for i, a in enumerate(answers) if a.get("supernode") == new)
    assert all(a.get("supernode") == new for a in answers[first_new:])
    # It left gracefully: it told the login server, and alice moved without losing her link.
    assert re.search(r"supernode sn-\S+ left", server.process.stderr), server.process.stderr[-2000:]
    assert "lost supernode" not in (alice.state / "voipd.log").read_text()


def test_a_node_without_allow_supernode_never_promotes_though_supernodes_are_wanted(
    processes: Processes, login_data: Path, short_dir: Callable[[], Path]
) -> None:
    # The overlay wants 5 supernodes; the plain node would qualify at once (it volunteers
    # after 1 s up) if it were allowed, and starts before the volunteer does.
    server = start_login_server(processes, login_data, "--min-supernodes", "5")
    plain = node(processes, short_dir() / "plain", server, *QUICK)
    volunteer = node(processes, short_dir() / "volunteer", server, "--allow-supernode", *QUICK)
    wait_for(lambda: status(volunteer)["supernode"].get("active"), "the volunteer promoting")
    log_in(plain, "bob")
    wait_for(lambda: status(plain)["overlay"]["published_replicas"] == 1, "bob publishing")
    for _ in range(10):  # two seconds: several of the plain node's would-be checks
        assert status(plain)["supernode"] == {"allowed": False}
        time.sleep(POLL)
    assert "Role: ordinary node.\n" in ctl(plain, "status")[1]
    # The login server admitted the volunteer, and nobody else.
    admitted = ADMITTED.findall(server.process.stderr)
    assert admitted == [str(sn_port(volunteer))], server.process.stderr


# -- graceful demotion, in one process --------------------------------------------------------


@pytest_twisted.async_yield_fixture
async def grid(tmp_path: Path) -> AsyncIterator[Grid]:
    from twisted.internet import reactor

    g = Grid(reactor, tmp_path)
    await g.start_login_server()
    try:
        yield g
    finally:
        await g.stop()


@pytest_twisted.ensureDeferred
async def test_a_demoting_supernode_hands_its_nodes_over_without_a_gap(grid: Grid) -> None:
    from twisted.internet import reactor

    await grid.add_supernodes(3)
    await grid.add_users(6)
    assert grid.registry is not None
    alice = grid.users["user0"]
    assert alice.node.link is not None
    leaving: GridSupernode = next(s for s in grid.supernodes if s.info == alice.node.link.info)
    staying = next(s for s in grid.supernodes if s is not leaving)
    orphans = grid.attached_to(leaving)
    before = {u.name: u.node.attachments for u in orphans}
    # A third node, attached elsewhere: its searches start at the supernodes that stay, and
    # its messages go through the supernode it is attached to.
    udp = DatagramEndpoint(reactor)
    port = reactor.listenUDP(0, udp, interface=HOST)
    asker = Searcher(reactor, udp, grid.ca_public)
    others = [s.info for s in grid.supernodes if s is not leaving and s.info is not None]

    searches: list[tuple[str, str, bytes | None]] = []
    undelivered: list[tuple[str, str]] = []
    sent = 0
    done = False

    async def search_every_200_ms() -> None:
        while not done:
            for orphan in orphans:
                result = await asker.search(orphan.name, others[:1], others)
                record = result.record
                where = record.supernode.node_id if record and record.supernode else None
                searches.append((orphan.name, result.outcome, where))
            await deferLater(reactor, POLL, lambda: None)

    async def send_all_the_time() -> None:
        nonlocal sent
        while not done:
            for orphan in orphans:
                sent += 1
                try:
                    await staying.supernode.send("carol", orphan.name, b"message %d" % sent)
                except VoipError as exc:
                    undelivered.append((orphan.name, str(exc)))
            await deferLater(reactor, 0.0, lambda: None)

    searching = Deferred.fromCoroutine(search_every_200_ms())
    sending = Deferred.fromCoroutine(send_all_the_time())
    await deferLater(reactor, 0.5, lambda: None)
    await leaving.role.demote("the test asked it to")
    moved = {o.name for o in orphans}

    def records_name_new_supernodes() -> bool:
        last = {name: where for name, _, where in searches}
        return all(last.get(name) not in (None, leaving.key.public_key) for name in moved)

    await grid.wait_until(records_name_new_supernodes, 5.0, "records naming new supernodes")
    await deferLater(reactor, 0.3, lambda: None)
    done = True
    await searching
    await sending
    await port.stopListening()

    assert not leaving.role.active and leaving.ports == []  # it closed its ports
    assert leaving.key.public_key not in grid.registry.members  # it told the login server
    for orphan in orphans:
        assert orphan.node.link is not None
        assert orphan.node.link.info.node_id != leaving.key.public_key
        assert orphan.node.attachments == before[orphan.name] + 1  # moved once, directly
    assert leaving.supernode.attached == {}
    assert [s for s in searches if s[1] != "found"] == []
    print(f"\n{sent} messages sent, {len(undelivered)} undelivered")
    assert undelivered == []
