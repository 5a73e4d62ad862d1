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
    SN -> SN            relay-mint {rid, user, certificate, sent_at, signature}
                                                          -> relay-minted {rid, relays}
                        (a peer's relay credential for one of our users: overlay.relayoffers)
    SN -> SN            digest {rid, start, end}          -> digest-reply {rid, count, fingerprint}
                        (anti-entropy: the peer's summary of its records of [start, end), or
                        error holds-none / holds-part when it does not hold all of that range)

    over TCP, sealed (overlay.channel; the SN proves its node key and supernode certificate)
    node -> SN          attach {rid, certificate, proof, udp_port} -> attached {rid, contacts}
    node -> SN          publish {rid, record}             -> published {rid, replicas}
    node -> SN          send {rid, to, envelope}          -> sent {rid}
    SN -> node          incoming {rid, envelope}          -> ack {rid}
    SN -> node          migrate {rid, contacts}           -> ack {rid}        (the SN is leaving)
    node -> SN          relay-offer {rid}                 -> relays {rid, relays}
                        (the SN's own TURN relay with a time-limited credential minted for
                        the node's user, when the relay has spare capacity; none otherwise)
    node -> SN          find {rid, username}              -> find-result {rid, outcome,
                                                             rounds, record}
                        (for a node whose UDP is blocked: the SN runs the iterative search on
                        its behalf; outcome "found" | "offline" | "not-found" | "failed", record
                        the signed presence record or None, which the node verifies itself;
                        per connection at most 10 running and 20 started in any 10 s, beyond
                        that error too-many-searches; overlay.supernode.FindBudget)
    either              ping {rid}                        -> pong             (keep-alive)
    node -> SN          post {rid, to, envelope}          -> posted {rid, queued, replicas}
                        (instant messages held for offline users, with SN -> SN deposit,
                        collect and drop over UDP: their table is in overlay.mailbox)

    over the login channel (sealed; one connection per request)
    SN -> login server  sn-apply {rid, node_key, proof, tcp_port, udp_port} -> sn-admitted | error
    SN -> login server  sn-heartbeat {rid, node_key, proof, attached, version}
                                                          -> sn-state {rid, version, view}
    SN -> login server  sn-leave {rid, node_key, proof}   -> sn-state {rid, version, view=None}
"""

from __future__ import annotations

from overlay.messages import Message, MessageError, Record, message, record
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


@record
class RelayOffer(Record):
    """A TURN relay a node may use, with a time-limited credential (``overlay.turn``)."""

    host: str
    udp_port: int
    tcp_port: int
    username: str
    password: str
    expires: int
    #: Allocations the relay can still take when it made the offer.
    spare: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not 0 < len(self.host) <= 253:
            raise MessageError("A relay host must be 1-253 characters.")
        for port in (self.udp_port, self.tcp_port):
            if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
                raise MessageError("A relay port must be in 0-65535.")
        if not 0 < len(self.username) <= 200 or not 0 < len(self.password) <= 100:
            raise MessageError("A relay credential is 1-200 and 1-100 characters.")

    @property
    def udp_address(self) -> tuple[str, int]:
        return (self.host, self.udp_port)

    @property
    def tcp_address(self) -> tuple[str, int]:
        return (self.host, self.tcp_port)

    @property
    def label(self) -> str:
        return f"{self.host}:{self.udp_port}"


@message(0x0059, "relay-offer")
class RelayRequest(Message):
    rid: int


@message(0x005A, "relays", reply=True)
class Relays(Message):
    rid: int
    relays: tuple[RelayOffer, ...] = ()


#: The outcomes a ``find-result`` may carry (those of ``overlay.search``).
FIND_OUTCOMES = ("found", "offline", "not-found", "failed")


@message(0x005B, "find")
class Find(Message):
    """Search ``username`` for me: a node that cannot search over UDP asks its supernode."""

    rid: int
    username: str


@message(0x005C, "find-result", reply=True)
class FindResult(Message):
    """How the supernode's search on the node's behalf ended; ``record``: the signed presence
    record it chose ("found" / "offline"), for the node to verify itself."""

    rid: int
    outcome: str
    rounds: int = 0
    record: bytes | None = None

    def __post_init__(self) -> None:
        if self.outcome not in FIND_OUTCOMES:
            raise MessageError(f"find-result outcome {self.outcome!r} is not known.")
        if not 0 <= self.rounds <= 1000:
            raise MessageError("find-result rounds must be in 0-1000.")


@message(0x005D, "relay-mint")
class RelayMint(Message):
    rid: int
    user: str
    certificate: bytes
    sent_at: int
    signature: bytes


@message(0x005E, "relay-minted", reply=True)
class RelayMinted(Message):
    rid: int
    relays: tuple[RelayOffer, ...] = ()


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
