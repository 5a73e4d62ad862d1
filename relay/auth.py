"""Long-term credentials of the relay (RFC 8489 s.9.2) with coturn-style time-limited passwords.

Every TURN request (all but Binding) must carry USERNAME, REALM, NONCE and MESSAGE-INTEGRITY.
The username is ``"<expiry unix time>:<user>"`` and its password ``base64(HMAC-SHA1(secret,
username))`` (``overlay.turn.mint_credential``), so the relay checks a credential with nothing but
the shared secret.  The checks, in the order the RFC gives, and the answer to each:

    request                                         answer            counter
    no MESSAGE-INTEGRITY                            401 + REALM+NONCE challenged
    MESSAGE-INTEGRITY without USERNAME/REALM/NONCE  400               malformed
    NONCE not ours, or older than nonce_lifetime    438 + REALM+NONCE stale-nonce
    username without an expiry, or another REALM    401 + REALM+NONCE unauthenticated
    expiry in the past                              401 + REALM+NONCE expired-credential
    MESSAGE-INTEGRITY wrong under that password     401 + REALM+NONCE unauthenticated

Nonces are stateless and short on purpose (a 401 to a small Allocate must not be larger than the
Allocate, see ``relay.server``): 12 characters, the base64 of a 4-byte issue time and 5 bytes of
HMAC-SHA256 (under a random per-process key) over that time and the client's IP address.  A nonce
is thus valid for one client address and ``nonce_lifetime`` seconds, and a restarted relay
answers 438 to the old ones, which a client handles by retrying with the new nonce.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hmac
import secrets
import struct
from dataclasses import dataclass

from overlay.stun import MESSAGE_INTEGRITY, NONCE, REALM, USERNAME, StunMessage, long_term_key
from overlay.turn import credential_expiry, credential_user, turn_password

NONCE_MAC_SIZE = 5


class Verdict(enum.Enum):
    OK = "ok"
    CHALLENGE = "challenged"  # no credentials at all: the normal first request
    MALFORMED = "malformed"
    STALE = "stale-nonce"
    UNAUTHENTICATED = "unauthenticated"
    EXPIRED = "expired-credential"


@dataclass(frozen=True)
class Outcome:
    verdict: Verdict
    username: str = ""
    user: str = ""
    key: bytes = b""


class Authenticator:
    def __init__(
        self,
        secret: bytes,
        realm: str,
        nonce_lifetime: float = 600.0,
        nonce_key: bytes | None = None,
    ) -> None:
        self.secret = secret
        self.realm = realm
        self.nonce_lifetime = nonce_lifetime
        self._nonce_key = nonce_key if nonce_key is not None else secrets.token_bytes(32)

    # -- nonces ------------------------------------------------------------------------------

    def _mac(self, stamp: bytes, host: str) -> bytes:
        digest = hmac.digest(self._nonce_key, stamp + host.encode(), "sha256")
        return digest[:NONCE_MAC_SIZE]

    def nonce(self, now: float, host: str) -> str:
        stamp = struct.pack("!I", int(now) & 0xFFFFFFFF)
        return base64.urlsafe_b64encode(stamp + self._mac(stamp, host)).decode()

    def nonce_fresh(self, nonce: str, now: float, host: str) -> bool:
        try:
            raw = base64.urlsafe_b64decode(nonce.encode("ascii"))
        except (binascii.Error, ValueError, UnicodeEncodeError):
            return False
        if len(raw) != 4 + NONCE_MAC_SIZE:
            return False
        stamp, mac = raw[:4], raw[4:]
        if not hmac.compare_digest(mac, self._mac(stamp, host)):
            return False
        issued = int.from_bytes(stamp, "big")
        return 0 <= int(now) - issued < self.nonce_lifetime

    # -- requests ----------------------------------------------------------------------------

    def check(self, request: StunMessage, now: float, host: str) -> Outcome:
        if not request.has(MESSAGE_INTEGRITY):
            return Outcome(Verdict.CHALLENGE)
        username = request.get(USERNAME)
        realm = request.get(REALM)
        nonce = request.get(NONCE)
        if username is None or realm is None or nonce is None:
            return Outcome(Verdict.MALFORMED)
        if not self.nonce_fresh(nonce, now, host):
            return Outcome(Verdict.STALE)
        expiry = credential_expiry(username)
        if expiry is None or realm != self.realm:
            return Outcome(Verdict.UNAUTHENTICATED)
        if expiry < now:
            return Outcome(Verdict.EXPIRED)
        key = long_term_key(username, self.realm, turn_password(self.secret, username))
        if not request.check_integrity(key):
            return Outcome(Verdict.UNAUTHENTICATED)
        return Outcome(Verdict.OK, username, credential_user(username), key)
