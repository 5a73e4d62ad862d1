"""Presence records: where a user can be reached, signed by the user.

Supernodes store and serve these records but cannot forge them: a record carries the user's
CA-signed certificate and is signed with the key that certificate names.  Anyone holding the
CA's public key can check it.

Canonical encoding (one and only one byte string per record)::

    body   = CBOR array [version, username, certificate, supernode, reflexive, nat_type,
                         status, sequence, issued_at, expires_at]
    signed = CBOR array [body, signature]    signature = Ed25519(user, "voip-presence-v1" || body)

``supernode`` is a map {node_id, host, tcp_port, udp_port} or null, ``reflexive`` a map
{host, port} or null; times are whole Unix seconds.  ``parse`` checks the structure only and
refuses anything that is not byte-for-byte canonical; ``SignedPresence.verify`` checks the
signatures.  A record past ``expires_at`` still verifies: it proves when the user was last seen,
and it is the index's business to decide how long to keep it.
"""

from __future__ import annotations

import enum
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import cbor2

from overlay.certificate import (
    CLOCK_SKEW,
    MAX_CERT_SIZE,
    BadSignature,
    Expired,
    NotYetValid,
    Role,
    SignedCertificate,
    WrongRole,
)
from overlay.errors import CertificateError, ProtocolError
from overlay.identity import PUBLIC_KEY_SIZE, SIGNATURE_SIZE, IdentityKey, verify_signature
from overlay.messages import MessageError, Record, record
from overlay.usernames import USERNAME_MAX, is_valid_username

PRESENCE_VERSION = 1
SIGNATURE_CONTEXT = b"voip-presence-v1"
MAX_PRESENCE_SIZE = 2048
#: A record may claim to be current for at most this long (plus the clock skew).
MAX_LIFETIME = 72 * 3600
#: An index keeps a record this long after it was issued, to answer "last seen".
RETENTION = 72 * 3600
MAX_HOST = 253
MAX_NAT_TYPE = 32
_MAX_INT = 2**63 - 1
R = TypeVar("R", bound=Record)


class PresenceError(ProtocolError):
    """The presence record is not valid."""

    code = "bad-presence"


class Status(enum.Enum):
    ONLINE = "online"
    AWAY = "away"
    BUSY = "busy"
    INVISIBLE = "invisible"
    OFFLINE = "offline"


@record
class Attachment(Record):
    """The supernode the user is attached to (same fields as ``slotmap.SupernodeInfo``)."""

    node_id: bytes
    host: str
    tcp_port: int
    udp_port: int


@record
class Address(Record):
    """A transport address, e.g. the user's server-reflexive address seen by STUN."""

    host: str
    port: int


def _canonical(obj: Any) -> bytes:
    return bytes(cbor2.dumps(obj, canonical=True))


def _encode_optional(value: Record | None) -> Any:
    return None if value is None else value.to_map()


@dataclass(frozen=True)
class PresenceRecord:
    """The signed-over part of a presence record."""

    username: str
    certificate: bytes
    supernode: Attachment | None
    reflexive: Address | None
    nat_type: str
    status: Status
    sequence: int
    issued_at: int
    expires_at: int
    version: int = PRESENCE_VERSION

    def body(self) -> list[Any]:
        return [
            self.version,
            self.username,
            self.certificate,
            _encode_optional(self.supernode),
            _encode_optional(self.reflexive),
            self.nat_type,
            self.status.value,
            self.sequence,
            self.issued_at,
            self.expires_at,
        ]

    def body_bytes(self) -> bytes:
        return _canonical(self.body())


# Why the certificate does not vouch for a record issued at ``issued_at``, one row per failure.
_CERT_FAILURES: dict[type[CertificateError], str] = {
    BadSignature: "was not signed by our login server",
    NotYetValid: "was not yet valid when the record was issued",
    Expired: "had expired when the record was issued",
    WrongRole: "is not a user certificate",
}


@dataclass(frozen=True)
class SignedPresence:
    record: PresenceRecord
    signature: bytes

    def __bytes__(self) -> bytes:
        return _canonical([self.record.body(), self.signature])

    @classmethod
    def parse(cls, data: bytes) -> SignedPresence:
        """Decode; raises only ``PresenceError``."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise PresenceError("The presence record is not a byte string.")
        data = bytes(data)
        if len(data) > MAX_PRESENCE_SIZE:
            raise PresenceError("The presence record is too large.")
        stream = io.BytesIO(data)
        try:
            outer = cbor2.CBORDecoder(stream).decode()
        except Exception:  # noqa: BLE001 - cbor2 raises many types on garbage
            raise PresenceError("The presence record is not valid CBOR.") from None
        if stream.tell() != len(data):
            raise PresenceError("The presence record has bytes after its CBOR array.")
        if not (isinstance(outer, list) and len(outer) == 2):
            raise PresenceError("The presence record is not a [body, signature] pair.")
        body, signature = outer
        if not isinstance(signature, bytes) or len(signature) != SIGNATURE_SIZE:
            raise PresenceError("The presence record signature is not 64 bytes.")
        if not isinstance(body, list) or not body:
            raise PresenceError("The presence record body is not an array.")
        version = body[0]
        if version != PRESENCE_VERSION or isinstance(version, bool):
            shown = repr(version) if isinstance(version, int) else type(version).__name__
            raise PresenceError(f"The presence record has unknown version {shown}.")
        if len(body) != 10:
            raise PresenceError("The presence record body has the wrong number of fields.")
        _, username, certificate, supernode, reflexive, nat_type, status, *numbers = body
        if not (
            isinstance(username, str)
            and len(username) <= USERNAME_MAX
            and is_valid_username(username)
        ):
            raise PresenceError("The presence record username is not valid.")
        if not isinstance(certificate, bytes) or len(certificate) > MAX_CERT_SIZE:
            raise PresenceError("The presence record certificate is not a byte string.")
        if not (isinstance(nat_type, str) and _is_token(nat_type, MAX_NAT_TYPE)):
            raise PresenceError("The presence record NAT type is not valid.")
        try:
            parsed_status = Status(status)
        except (ValueError, TypeError):
            raise PresenceError("The presence record status is unknown.") from None
        for value in numbers:
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _MAX_INT:
                raise PresenceError("The presence record has a bad sequence or time.")
        sequence, issued_at, expires_at = numbers
        presence = PresenceRecord(
            username,
            certificate,
            _parse_nested(Attachment, supernode, "supernode", _good_attachment),
            _parse_nested(Address, reflexive, "address", _good_address),
            nat_type,
            parsed_status,
            sequence,
            issued_at,
            expires_at,
        )
        signed = cls(presence, signature)
        if bytes(signed) != data:
            raise PresenceError("The presence record is not canonically encoded.")
        return signed

    def verify(
        self, ca_public_key: bytes, now: float, username: str | None = None
    ) -> PresenceRecord:
        """Check the certificate chain, the user's signature and the times; return the record.

        An expired record passes (it says when the user was last seen); see ``is_current``.
        """
        rec = self.record
        u = rec.username
        if username is not None and u != (username.lower() if username.isascii() else username):
            raise PresenceError(f"The presence record is for {u}, not {username}.")
        try:
            cert = SignedCertificate.parse(rec.certificate)
        except CertificateError as exc:
            raise PresenceError(
                f"The presence record of {u} carries a bad certificate: {exc}"
            ) from None
        if cert.username != u:
            raise PresenceError(
                f"The presence record of {u} carries the certificate of {cert.username}."
            )
        try:
            cert.verify(ca_public_key, rec.issued_at, role=Role.USER)
        except CertificateError as exc:
            why = _CERT_FAILURES.get(type(exc), "is not valid")
            raise PresenceError(f"The certificate in the presence record of {u} {why}.") from None
        if not verify_signature(
            cert.public_key, SIGNATURE_CONTEXT + rec.body_bytes(), self.signature
        ):
            raise PresenceError(f"The presence record of {u} is not signed by {u}'s key.")
        if rec.issued_at > now + CLOCK_SKEW:
            raise PresenceError(f"The presence record of {u} was issued in the future.")
        if rec.expires_at <= rec.issued_at:
            raise PresenceError(f"The presence record of {u} expires before it was issued.")
        if rec.expires_at - rec.issued_at > MAX_LIFETIME + CLOCK_SKEW:
            raise PresenceError(
                f"The presence record of {u} claims to be valid for more than 72 h."
            )
        return rec


def _is_token(text: str, limit: int) -> bool:
    """Non-empty printable ASCII without spaces, at most ``limit`` characters."""
    return 0 < len(text) <= limit and text.isascii() and text.isprintable() and " " not in text


def _valid_port(port: int) -> bool:
    return 0 < port < 65536


def _parse_nested(kind: type[R], value: Any, what: str, check: Callable[[R], bool]) -> R | None:
    if value is None:
        return None
    try:
        parsed = kind.from_map(value)
    except MessageError:
        raise PresenceError(f"The presence record {what} is malformed.") from None
    if not check(parsed):
        raise PresenceError(f"The presence record {what} is malformed.")
    return parsed


def _good_attachment(sn: Attachment) -> bool:
    ports_ok = _valid_port(sn.tcp_port) and _valid_port(sn.udp_port)
    return len(sn.node_id) == PUBLIC_KEY_SIZE and _is_token(sn.host, MAX_HOST) and ports_ok


def _good_address(address: Address) -> bool:
    return _is_token(address.host, MAX_HOST) and _valid_port(address.port)


def sign(presence: PresenceRecord, identity_key: IdentityKey) -> SignedPresence:
    """Sign ``presence`` with the user's identity key.

    Raises ``PresenceError`` when the record could not be parsed back (a field out of bounds),
    so nothing is published that every peer would refuse.
    """
    signature = identity_key.sign(SIGNATURE_CONTEXT + presence.body_bytes())
    signed = SignedPresence(presence, signature)
    return SignedPresence.parse(bytes(signed))


def is_current(presence: PresenceRecord, now: float) -> bool:
    """Does the record still claim to be in force (it may say "offline")?"""
    return now < presence.expires_at


def last_seen(presence: PresenceRecord) -> int:
    """When the user was last known to be alive: the issue time of their newest record.

    For an online-like record that is the last refresh; for an "offline" record, the time the
    user logged out.  (A record only proves the user existed when it was signed.)
    """
    return presence.issued_at
