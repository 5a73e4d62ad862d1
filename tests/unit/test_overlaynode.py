"""The ordinary node's checks of its supernode, and a supernode's TCP port under garbage."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from client.overlaynode import OverlayNode, SupernodeLink
from overlay.certificate import Role, issue
from overlay.channel import HelloReply
from overlay.datagram import DatagramEndpoint
from overlay.errors import ProtocolError
from overlay.framing import Frame
from overlay.hostcache import HostCache
from overlay.identity import IdentityKey
from overlay.login_protocol import supernode_name
from overlay.messages import Error, decode
from overlay.slotmap import SupernodeInfo
from overlay.supernode import Supernode

CA = IdentityKey.from_seed(bytes(range(32)))
NOW = 1_700_000_000.0


def link_to(sn_key: IdentityKey) -> SupernodeLink:
    clock = Clock()
    clock.advance(NOW)
    node = OverlayNode(clock, CA.public_key, HostCache(None, clock), DatagramEndpoint(clock))
    info = SupernodeInfo(sn_key.public_key, "127.0.0.1", 7100, 7101)
    return SupernodeLink(node, info)


def hello_reply(certificate: bytes | None) -> HelloReply:
    return HelloReply(b"\x00" * 32, b"\x00" * 64, NOW, certificate)


def test_a_supernode_without_a_supernode_certificate_is_refused() -> None:
    key = IdentityKey.generate()
    link = link_to(key)
    with pytest.raises(ProtocolError, match="showed no supernode certificate"):
        link.check_hello(hello_reply(None))
    user_cert = issue(CA, "mallory", key.public_key, serial=1, now=NOW)
    with pytest.raises(ProtocolError, match="is for a user, not a supernode"):
        link.check_hello(hello_reply(bytes(user_cert)))
    other_ca = IdentityKey.generate()
    forged = issue(
        other_ca,
        supernode_name(key.public_key),
        key.public_key,
        serial=1,
        now=NOW,
        role=Role.SUPERNODE,
    )
    with pytest.raises(ProtocolError, match="not signed by our login server"):
        link.check_hello(hello_reply(bytes(forged)))
    someone_else = IdentityKey.generate().public_key
    theirs = issue(
        CA, supernode_name(someone_else), someone_else, serial=1, now=NOW, role=Role.SUPERNODE
    )
    with pytest.raises(ProtocolError, match="certificate is for another key"):
        link.check_hello(hello_reply(bytes(theirs)))
    good = issue(
        CA, supernode_name(key.public_key), key.public_key, serial=1, now=NOW, role=Role.SUPERNODE
    )
    link.check_hello(hello_reply(bytes(good)))  # accepted


def test_garbage_on_a_supernodes_tcp_port_is_answered_and_that_connection_closed() -> None:
    clock = Clock()
    clock.advance(NOW)
    supernode = Supernode(clock, IdentityKey.generate(), CA.public_key)
    factory = supernode.factory()
    bad, good = factory.buildProtocol(None), factory.buildProtocol(None)
    bad_wire, good_wire = StringTransport(), StringTransport()
    bad.makeConnection(bad_wire)
    good.makeConnection(good_wire)
    bad.dataReceived(b"\x07garbage that is not a frame at all")
    reply = decode(Frame.parse(bad_wire.value(), 4096))
    assert isinstance(reply, Error) and reply.request == "frame"
    assert bad_wire.disconnecting
    assert supernode.counters["bad-frames"] == 1
    assert not good_wire.disconnecting  # the other connection goes on
    # A silent connection is closed after the handshake timeout, on the clock.
    clock.advance(11)
    assert good_wire.disconnecting
