"""Call signalling: the messages two nodes exchange to set up and end a call.

Each signal is a CBOR map inside a signed envelope of kind ``call`` (``client.envelope``), so
it is signed by the sender's identity key, names its recipient, and is bound to one call id;
a replayed envelope is refused by the envelope layer, and a signal for the wrong call or in
the wrong state is ignored by the call's state machine.

    signal     sender -> recipient   fields                      meaning
    invite     caller -> callee      ephemeral, candidates,      "I want to talk": the caller's
                                     codec                        fresh X25519 key and addresses
    ringing    callee -> caller      -                           the callee's node is ringing
    accept     callee -> caller      ephemeral, candidates       answered: the callee's fresh key
    decline    callee -> caller      reason?                     the callee refused the call
    busy       callee -> caller      -                           the callee is in another call
    cancel     caller -> callee      reason?                     the caller gave up before answer
    bye        either -> other       reason?                     hang up an answered call
    relay      either -> other       legs, candidates            the relays chosen (indexes into
                                                                  invite.relays + accept.relays,
                                                                  primary first) and the sender's
                                                                  relayed address on each

INVITE and ACCEPT also carry the sender's NAT kind (``nat``, from ``voipctl netcheck``) and the
relays its supernode offered (``relays``, each with a time-limited TURN credential); ACCEPT adds
the callee's round-trip time to every relay of both lists (``rtts``, ms; -1: unreachable).  The
caller picks the relay with the lowest combined RTT (``client.relaypath``) and says so with a
``relay`` signal; the callee allocates there too and answers with its own ``relay`` signal.

The caller's INVITE and the callee's ACCEPT carry the only key material: each side's fresh
X25519 public key, signed (inside the envelope) by its identity key.  Both sides derive the
media and check keys from the two (``client.callkeys``); supernodes see only public values.
"""

from __future__ import annotations

import io
import ipaddress
from typing import Any

import cbor2

from overlay.errors import ProtocolError
from overlay.messages import MessageError, Record, record
from overlay.overlay_protocol import RelayOffer

ENVELOPE_KIND = "call"
CALL_ID_SIZE = 16
EPHEMERAL_SIZE = 32
MAX_CANDIDATES = 16
MAX_REASON = 200
MAX_SIGNAL = 900
MAX_RELAYS = 2
MAX_NAT_TEXT = 32
CANDIDATE_KINDS = frozenset({"host", "srflx", "prflx", "relay"})
#: "ping": a session with no audio at all, for ``voipctl ping`` (answered without ringing).
CODECS = frozenset({"opus", "ping"})


class SignalError(ProtocolError):
    """A call signal was not valid."""

    code = "bad-signal"


@record
class CandidateInfo(Record):
    """One address the sender may be reached at for media (an ICE-like candidate)."""

    kind: str
    host: str
    port: int
    priority: int


@record
class CallSignal(Record):
    call_id: bytes
    kind: str
    ephemeral: bytes | None = None
    candidates: tuple[CandidateInfo, ...] = ()
    codec: str | None = None
    reason: str | None = None
    nat: str | None = None
    relays: tuple[RelayOffer, ...] = ()
    rtts: tuple[int, ...] = ()
    legs: tuple[int, ...] = ()

    def __bytes__(self) -> bytes:
        document = {k: v for k, v in self.to_map().items() if v is not None and v != []}
        return bytes(cbor2.dumps(document, canonical=True))

    @classmethod
    def parse(cls, data: bytes) -> CallSignal:
        """Decode and check a signal; raises only ``SignalError``."""
        if len(data) > MAX_SIGNAL:
            raise SignalError("The call signal is too large.")
        stream = io.BytesIO(data)
        try:
            document = cbor2.CBORDecoder(stream).decode()
        except Exception:  # noqa: BLE001 - cbor2 raises many types on garbage
            raise SignalError("The call signal is not valid CBOR.") from None
        if stream.tell() != len(data):
            raise SignalError("The call signal has bytes after its CBOR map.")
        try:
            signal = cls.from_map(document)
        except MessageError as exc:
            raise SignalError(f"The call signal is malformed: {exc}") from None
        except (TypeError, ValueError):
            raise SignalError("The call signal is malformed.") from None
        signal.check()
        return signal

    def check(self) -> None:
        if len(self.call_id) != CALL_ID_SIZE:
            raise SignalError("The call id is not 16 bytes.")
        rule = RULES.get(self.kind)
        if rule is None:
            raise SignalError(f"Unknown call signal {self.kind[:20]!r}.")
        needs_key, needs_candidates = rule
        if needs_key and (self.ephemeral is None or len(self.ephemeral) != EPHEMERAL_SIZE):
            raise SignalError(f"The {self.kind} lacks a 32-byte call key.")
        if not needs_key and self.ephemeral is not None:
            raise SignalError(f"A {self.kind} carries no call key.")
        if needs_candidates and not self.candidates and not self.relays:
            raise SignalError(f"The {self.kind} lists no address.")
        if len(self.candidates) > MAX_CANDIDATES:
            raise SignalError(f"The {self.kind} lists too many addresses.")
        for candidate in self.candidates:
            _check_candidate(candidate)
        if self.kind == "invite" and self.codec not in CODECS:
            raise SignalError("The invite offers no codec this node speaks.")
        if self.nat is not None and (len(self.nat) > MAX_NAT_TEXT or not self.nat.isprintable()):
            raise SignalError("The NAT kind in a call signal is not short printable text.")
        if len(self.relays) > MAX_RELAYS or len(self.rtts) > 2 * MAX_RELAYS:
            raise SignalError(f"The {self.kind} lists too many relays.")
        if any(not isinstance(r, int) or not -1 <= r <= 60_000 for r in self.rtts):
            raise SignalError("A relay round-trip time is out of range.")
        if self.kind == "relay":
            if not 0 < len(self.legs) <= 2 or len(self.legs) != len(self.candidates):
                raise SignalError("A relay signal names one or two relays, each with an address.")
            if any(not 0 <= leg < 2 * MAX_RELAYS for leg in self.legs):
                raise SignalError("A relay signal names a relay out of range.")
        if self.reason is not None and (
            len(self.reason) > MAX_REASON or not self.reason.isprintable()
        ):
            raise SignalError("The reason in a call signal is not printable text.")


#: kind -> (carries a call key, lists candidates)
RULES: dict[str, tuple[bool, bool]] = {
    "invite": (True, True),
    "ringing": (False, False),
    "accept": (True, True),
    "decline": (False, False),
    "busy": (False, False),
    "cancel": (False, False),
    "bye": (False, False),
    "relay": (False, True),
}


def _check_candidate(candidate: CandidateInfo) -> None:
    if candidate.kind not in CANDIDATE_KINDS:
        raise SignalError("A candidate has an unknown kind.")
    try:
        ipaddress.ip_address(candidate.host)
    except ValueError:
        raise SignalError("A candidate address is not an IP address.") from None
    if not 0 < candidate.port < 65536:
        raise SignalError("A candidate port is out of range.")
    if not 0 <= candidate.priority < 2**32:
        raise SignalError("A candidate priority is out of range.")


def signal(kind: str, call_id: bytes, **fields: Any) -> CallSignal:
    """Build and check a signal (a bug here is ours: it raises ``SignalError`` too)."""
    built = CallSignal(call_id, kind, **fields)
    built.check()
    return built
