"""The overlay's messages: node <-> supernode, supernode <-> supernode, supernode <-> login server.

Message table::

    over UDP (overlay.datagram; anyone may ask, replies never larger than requests)
    asker -> SN         sn-ping {rid}                     -> pong
    node -> SN          search {rid, username}            -> search-found | -referral | -none
                        (-none {rid, replicas}: the SN serves the key, holds that part of its
                        slot in full and no record; replicas are its slot peers, whom a
                        careful asker asks too; an SN still pulling that part refers to its
                        peers instead, with search-referral level "not-ready")
    SN -> SN            store {rid, record}               -> stored {rid, accepted}
    SN -> SN            pull {rid, start, end, cursor, retired}
                                                          -> records {rid, records, cursor}
                        (or error holds-none / holds-part; ranges the SN left count only
                        with retired: their copies are as of when it left)
    login server -> SN  reach-check {rid, nonce}          -> reach-ok {rid, nonce, signature}
    SN -> SN            forward {rid, to, envelope}       -> forwarded {rid, delivered}
    SN -> SN            locate {rid, key}                 -> search-referral (level slot: final)
    SN -> SN            digest {rid, start, end}          -> digest-reply {rid, count, fingerprint}
                        (anti-entropy: the peer's summary of its records of [start, end), or
                        error holds-none / holds-part when it does not hold all of that range)

    over TCP, sealed (overlay.channel; the SN proves its node key and supernode certificate)
    node -> SN          attach {rid, certificate, proof, udp_port} -> attached {rid, contacts}
    node -> SN          publish {rid, record}             -> published {rid, replicas}
    node -> SN          send {rid, to, envelope}          -> sent {rid}
    SN -> node          incoming {rid, envelope}          -> ack {rid}
    SN -> node          migrate {rid, contacts}           -> ack {rid}        (the SN is leaving)
    either              ping {rid}                        -> pong             (keep-alive)

    over the login channel (sealed; one connection per request)
    SN -> login server  sn-apply {rid, node_key, proof, tcp_port, udp_port} -> sn-admitted | error
    SN -> login server  sn-heartbeat {rid, node_key, proof, attached, version}
                                                          -> sn-state {rid, version, view}
    SN -> login server  sn-leave {rid, node_key, proof}   -> sn-state {rid, version, view=None}
"""

from __future__ import annotations

from overlay.messages import Message, message
from overlay.slotmap import SupernodeInfo

#: Search requests are padded to this many bytes so a found record always fits in the reply.
SEARCH_PAD = 1100
PING_PAD = 64
#: Digest requests are padded so a digest reply, or an error naming the request, fits.
DIGEST_PAD = 200


@message(0x0040, "sn-ping")
class SnPing(Message):
    rid: int


@message(0x0041, "search")
class Search(Message):
    rid: int
    username: str


@message(0x0042, "search-found", reply=True)
class SearchFound(Message):
    rid: int
    record: bytes


@message(0x0043, "search-referral", reply=True)
class SearchReferral(Message):
    rid: int
    contacts: tuple[SupernodeInfo, ...]
    level: str


@message(0x0044, "search-none", reply=True)
class SearchNone(Message):
    """The SN serves the key, has its whole slot and no record; ``replicas``: its slot peers."""

    rid: int
    replicas: tuple[SupernodeInfo, ...] = ()


@message(0x0045, "store")
class Store(Message):
    rid: int
    record: bytes


@message(0x0046, "stored", reply=True)
class Stored(Message):
    rid: int
    accepted: bool


@message(0x0047, "pull")
class Pull(Message):
    """The records of keys in [start, end), from ``cursor`` on; ``retired``: ranges you left
    count too (last resort: they are as of when you left them)."""

    rid: int
    start: int
    end: int
    cursor: int = 0
    retired: bool = False


@message(0x0048, "records", reply=True)
class Records(Message):
    rid: int
    records: tuple[bytes, ...]
    cursor: int | None = None


@message(0x0049, "reach-check")
class ReachCheck(Message):
    rid: int
    nonce: bytes


@message(0x004A, "reach-ok", reply=True)
class ReachOk(Message):
    rid: int
    nonce: bytes
    signature: bytes


@message(0x004B, "forward")
class Forward(Message):
    rid: int
    to: str
    envelope: bytes


@message(0x004C, "forwarded", reply=True)
class Forwarded(Message):
    rid: int
    delivered: bool


@message(0x004D, "locate")
class Locate(Message):
    """Who holds this key's records? Answered with ``search-referral`` (level "slot" = final)."""

    rid: int
    key: int


@message(0x004E, "digest")
class DigestRequest(Message):
    """Summarise your records of keys in [start, end): anti-entropy between slot peers."""

    rid: int
    start: int
    end: int


@message(0x004F, "digest-reply", reply=True)
class DigestReply(Message):
    """How many records, and the XOR of their 16-byte BLAKE2b hashes (``PresenceIndex``)."""

    rid: int
    count: int
    fingerprint: bytes


@message(0x0050, "attach")
class Attach(Message):
    rid: int
    certificate: bytes
    proof: bytes
    udp_port: int | None = None


@message(0x0051, "attached", reply=True)
class Attached(Message):
    rid: int
    contacts: tuple[SupernodeInfo, ...] = ()


@message(0x0052, "publish")
class Publish(Message):
    rid: int
    record: bytes


@message(0x0053, "published", reply=True)
class Published(Message):
    rid: int
    replicas: int


@message(0x0054, "send")
class Send(Message):
    rid: int
    to: str
    envelope: bytes


@message(0x0055, "sent", reply=True)
class Sent(Message):
    rid: int


@message(0x0056, "incoming")
class Incoming(Message):
    rid: int
    envelope: bytes


@message(0x0057, "migrate")
class Migrate(Message):
    rid: int
    contacts: tuple[SupernodeInfo, ...]


@message(0x0058, "ack", reply=True)
class Ack(Message):
    rid: int


@message(0x0060, "sn-apply")
class SnApply(Message):
    rid: int
    node_key: bytes
    proof: bytes
    tcp_port: int
    udp_port: int


@message(0x0061, "sn-admitted", reply=True)
class SnAdmitted(Message):
    rid: int
    certificate: bytes
    view: bytes
    host: str


@message(0x0062, "sn-heartbeat")
class SnHeartbeat(Message):
    rid: int
    node_key: bytes
    proof: bytes
    attached: int
    version: int


@message(0x0063, "sn-state", reply=True)
class SnState(Message):
    rid: int
    version: int
    view: bytes | None = None


@message(0x0064, "sn-leave")
class SnLeave(Message):
    rid: int
    node_key: bytes
    proof: bytes
