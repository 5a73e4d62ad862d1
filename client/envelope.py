"""Signed envelopes: user-to-user messages that ride on the overlay's delivery.

Supernodes carry an envelope from the sender's supernode to the recipient's, but cannot read
who wrote it into anything else: the envelope carries the sender's CA-signed certificate and is
signed with the key that certificate names, and it names its recipient, so it cannot be
re-addressed.  Call signalling (``client.signalling``) and, later, instant messages use it.

Canonical encoding (one byte string per envelope)::

    tbs       = CBOR array [version, kind, sender_certificate, recipient, sent_at_ms, body]
    envelope  = CBOR array [tbs..., signature]     signature = Ed25519(sender, CONTEXT || tbs)

``parse`` checks structure and size only (raises ``EnvelopeError``); ``open`` checks the
certificate chain to the CA, the signature, the recipient, the age, and that this exact
envelope was not seen before (``ReplayGuard``).  An envelope must fit in one overlay datagram:
supernodes forward it over UDP.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Any

import cbor2

from overlay.certificate import MAX_CERT_SIZE, Role, SignedCertificate
from overlay.errors import CertificateError, ProtocolError
from overlay.identity import SIGNATURE_SIZE, IdentityKey, verify_signature
from overlay.usernames import USERNAME_MAX, is_valid_username

ENVELOPE_VERSION = 1
SIGNATURE_CONTEXT = b"voip-envelope-v1"
#: Fits a ``forward`` datagram (1200 bytes of payload) with its own fields around it.
MAX_ENVELOPE = 1000
MAX_KIND = 16
#: An envelope older (or newer) than this is refused: a replay, or clocks far apart.
MAX_AGE = 120.0


class EnvelopeError(ProtocolError):
    """A message from another user was not valid."""

    code = "bad-envelope"


class ReplayedEnvelope(EnvelopeError):
    """A message from another user arrived twice (a replay); the copy was ignored."""

    code = "replayed"


def _canonical(obj: Any) -> bytes:
    return bytes(cbor2.dumps(obj, canonical=True))


@dataclass(frozen=True)
class Envelope:
    kind: str
    sender_certificate: bytes
    recipient: str
    sent_at_ms: int
    body: bytes
    signature: bytes = b""

    def tbs(self) -> list[Any]:
        return [
            ENVELOPE_VERSION,
            self.kind,
            self.sender_certificate,
            self.recipient,
            self.sent_at_ms,
            self.body,
        ]

    def __bytes__(self) -> bytes:
        return _canonical([*self.tbs(), self.signature])

    @property
    def digest(self) -> bytes:
        return hashlib.blake2b(bytes(self), digest_size=16).digest()

    @classmethod
    def parse(cls, data: bytes) -> Envelope:
        """Decode; raises only ``EnvelopeError``."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise EnvelopeError("The envelope is not a byte string.")
        data = bytes(data)
        if len(data) > MAX_ENVELOPE:
            raise EnvelopeError("The envelope is too large.")
        stream = io.BytesIO(data)
        try:
            outer = cbor2.CBORDecoder(stream).decode()
        except Exception:  # noqa: BLE001 - cbor2 raises many types on garbage
            raise EnvelopeError("The envelope is not valid CBOR.") from None
        if stream.tell() != len(data):
            raise EnvelopeError("The envelope has bytes after its CBOR array.")
        if not isinstance(outer, list) or len(outer) != 7:
            raise EnvelopeError("The envelope is not a 7-element array.")
        version, kind, certificate, recipient, sent_at, body, signature = outer
        if version != ENVELOPE_VERSION or isinstance(version, bool):
            raise EnvelopeError("The envelope has an unknown version.")
        if not (isinstance(kind, str) and 0 < len(kind) <= MAX_KIND and kind.isascii()):
            raise EnvelopeError("The envelope kind is not valid.")
        if not isinstance(certificate, bytes) or len(certificate) > MAX_CERT_SIZE:
            raise EnvelopeError("The envelope certificate is not a byte string.")
        if not (
            isinstance(recipient, str)
            and len(recipient) <= USERNAME_MAX
            and is_valid_username(recipient)
        ):
            raise EnvelopeError("The envelope recipient is not a valid username.")
        if not isinstance(sent_at, int) or isinstance(sent_at, bool) or not 0 <= sent_at < 2**63:
            raise EnvelopeError("The envelope time is not valid.")
        if not isinstance(body, bytes):
            raise EnvelopeError("The envelope body is not a byte string.")
        if not isinstance(signature, bytes) or len(signature) != SIGNATURE_SIZE:
            raise EnvelopeError("The envelope signature is not 64 bytes.")
        envelope = cls(kind, certificate, recipient, sent_at, body, signature)
        if bytes(envelope) != data:
            raise EnvelopeError("The envelope is not canonically encoded.")
        return envelope


def seal(  # noqa: PLR0917 - who, to whom, what, when
    identity: IdentityKey,
    certificate: SignedCertificate,
    recipient: str,
    kind: str,
    body: bytes,
    now: float,
) -> bytes:
    """An envelope from the holder of ``identity`` to ``recipient``, ready for the overlay."""
    unsigned = Envelope(kind, bytes(certificate), recipient, int(now * 1000), body)
    signature = identity.sign(SIGNATURE_CONTEXT + _canonical(unsigned.tbs()))
    sealed = bytes(Envelope(kind, bytes(certificate), recipient, int(now * 1000), body, signature))
    if len(sealed) > MAX_ENVELOPE:
        raise EnvelopeError(f"The message to {recipient} is too large to send.")
    return sealed


@dataclass(frozen=True)
class Opened:
    """A verified envelope: who sent it, what kind, and its body."""

    sender: str
    sender_key: bytes
    kind: str
    body: bytes
    sent_at: float


class ReplayGuard:
    """Remembers the envelopes seen within ``MAX_AGE`` either side of now."""

    def __init__(self, limit: int = 10_000) -> None:
        self.limit = limit
        self._seen: dict[bytes, float] = {}

    def check(self, digest: bytes, now: float) -> None:
        if digest in self._seen:
            raise ReplayedEnvelope()
        if len(self._seen) >= self.limit:
            self._forget(now)
        if len(self._seen) >= self.limit:  # still full: forget the oldest
            oldest = min(self._seen, key=self._seen.__getitem__)
            del self._seen[oldest]
        self._seen[digest] = now

    def _forget(self, now: float) -> None:
        for digest, seen in list(self._seen.items()):
            if seen < now - 2 * MAX_AGE:
                del self._seen[digest]


def verify_sender(envelope: Envelope, ca_public_key: bytes, at: float) -> SignedCertificate:
    """The sender's certificate, checked to the CA as of ``at``, and the envelope's signature
    by its key; raises ``EnvelopeError``.  (Supernodes holding messages check this much.)"""
    try:
        certificate = SignedCertificate.parse(envelope.sender_certificate)
        certificate.verify(ca_public_key, at, role=Role.USER)
    except CertificateError as exc:
        raise EnvelopeError(f"A message carried a bad certificate: {exc}") from None
    sender = certificate.username
    if not verify_signature(
        certificate.public_key, SIGNATURE_CONTEXT + _canonical(envelope.tbs()), envelope.signature
    ):
        raise EnvelopeError(f"A message claiming to be from {sender} is not signed by {sender}.")
    return certificate


def open_envelope(  # noqa: PLR0917 - max_age is for held messages only
    data: bytes,
    ca_public_key: bytes,
    recipient: str,
    now: float,
    guard: ReplayGuard,
    max_age: float = MAX_AGE,
) -> Opened:
    """Verify an envelope addressed to ``recipient``; raises ``EnvelopeError`` (and subclasses).

    ``max_age`` beyond ``MAX_AGE`` is for messages held for an offline user (``client.messaging``,
    which dedupes them by message id itself): the sender's certificate is then checked as of the
    time the envelope was sealed, since it may have expired while the message waited.
    """
    envelope = Envelope.parse(data)
    sent_at = envelope.sent_at_ms / 1000
    late = max_age > MAX_AGE and abs(sent_at - now) <= max_age
    certificate = verify_sender(envelope, ca_public_key, sent_at if late else now)
    sender = certificate.username
    if envelope.recipient != recipient:
        raise EnvelopeError(f"A message from {sender} is addressed to {envelope.recipient}.")
    if abs(sent_at - now) > max_age:
        raise EnvelopeError(f"A message from {sender} is too old (or its clock is far off).")
    guard.check(envelope.digest, now)
    return Opened(sender, certificate.public_key, envelope.kind, envelope.body, sent_at)
