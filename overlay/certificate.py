"""Certificates: a user's (or supernode's) public key signed by the login server's CA.

Canonical encoding (one and only one byte string per certificate)::

    tbs  = CBOR array [version, username, public_key, role, serial, not_before, not_after]
    cert = CBOR array [tbs, signature]     signature = Ed25519(CA, "voip-cert-v1" || tbs)

CBOR is encoded with cbor2's canonical (deterministic, RFC 8949 §4.2) mode; ``parse`` re-encodes
what it read and refuses anything that is not byte-for-byte the canonical form, so a certificate
has exactly one encoding.  Times are whole Unix seconds.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import cbor2

from overlay.errors import CertificateError
from overlay.identity import PUBLIC_KEY_SIZE, SIGNATURE_SIZE, IdentityKey, verify_signature
from overlay.usernames import USERNAME_MAX, is_valid_username

CERT_VERSION = 1
SIGNATURE_CONTEXT = b"voip-cert-v1"
MAX_CERT_SIZE = 512
DEFAULT_LIFETIME = 24 * 3600
#: Clocks disagree a little; a certificate is accepted this many seconds early or late.
CLOCK_SKEW = 60


class Role(enum.Enum):
    USER = "user"
    SUPERNODE = "supernode"


class CertificateFormatError(CertificateError):
    """The certificate is malformed."""


class BadSignature(CertificateError):
    """The certificate was not signed by our login server."""

    code = "bad-signature"


class Expired(CertificateError):
    """The certificate has expired."""

    code = "expired"


class NotYetValid(CertificateError):
    """The certificate is not valid yet."""

    code = "not-yet-valid"


class WrongRole(CertificateError):
    """The certificate is for another role."""

    code = "wrong-role"


class WrongUser(CertificateError):
    """The certificate belongs to someone else."""

    code = "wrong-user"


class UnknownVersion(CertificateError):
    """The certificate has a version this software does not know."""

    code = "unknown-version"


def _canonical(obj: Any) -> bytes:
    return bytes(cbor2.dumps(obj, canonical=True))


@dataclass(frozen=True)
class Certificate:
    """The signed-over part of a certificate."""

    username: str
    public_key: bytes
    role: Role
    serial: int
    not_before: int
    not_after: int
    version: int = CERT_VERSION

    def tbs(self) -> list[Any]:
        return [
            self.version,
            self.username,
            self.public_key,
            self.role.value,
            self.serial,
            self.not_before,
            self.not_after,
        ]

    def tbs_bytes(self) -> bytes:
        return _canonical(self.tbs())


@dataclass(frozen=True)
class SignedCertificate:
    cert: Certificate
    signature: bytes

    def __bytes__(self) -> bytes:
        return _canonical([self.cert.tbs(), self.signature])

    @property
    def username(self) -> str:
        return self.cert.username

    @property
    def public_key(self) -> bytes:
        return self.cert.public_key

    @property
    def not_after(self) -> int:
        return self.cert.not_after

    @classmethod
    def parse(cls, data: bytes) -> SignedCertificate:
        """Decode; raises only ``CertificateFormatError`` (or ``UnknownVersion``)."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise CertificateFormatError("The certificate is not a byte string.")
        data = bytes(data)
        if len(data) > MAX_CERT_SIZE:
            raise CertificateFormatError("The certificate is too large.")
        try:
            outer = cbor2.loads(data)
        except Exception:  # noqa: BLE001 - cbor2 raises many types on garbage
            raise CertificateFormatError("The certificate is not valid CBOR.") from None
        if not (isinstance(outer, list) and len(outer) == 2):
            raise CertificateFormatError("The certificate is not a [tbs, signature] pair.")
        tbs, signature = outer
        if not isinstance(signature, bytes) or len(signature) != SIGNATURE_SIZE:
            raise CertificateFormatError("The certificate signature is not 64 bytes.")
        if not isinstance(tbs, list) or not tbs:
            raise CertificateFormatError("The certificate body is not an array.")
        version = tbs[0]
        if version != CERT_VERSION or isinstance(version, bool):
            # Show only an integer: the repr of a hostile structure (CBOR shared references)
            # can be exponentially large.
            shown = repr(version) if isinstance(version, int) else type(version).__name__
            raise UnknownVersion(f"The certificate has unknown version {shown}.")
        if len(tbs) != 7:
            raise CertificateFormatError("The certificate body has the wrong number of fields.")
        _, username, public_key, role, serial, not_before, not_after = tbs
        if not (isinstance(username, str) and len(username) <= USERNAME_MAX):
            raise CertificateFormatError("The certificate username is not a string.")
        if not is_valid_username(username):
            raise CertificateFormatError("The certificate username is not valid.")
        if not isinstance(public_key, bytes) or len(public_key) != PUBLIC_KEY_SIZE:
            raise CertificateFormatError("The certificate public key is not 32 bytes.")
        try:
            parsed_role = Role(role)
        except ValueError:
            raise CertificateFormatError("The certificate role is unknown.") from None
        for value in (serial, not_before, not_after):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise CertificateFormatError("The certificate has a bad serial or time.")
        cert = Certificate(username, public_key, parsed_role, serial, not_before, not_after)
        signed = cls(cert, signature)
        if bytes(signed) != data:
            raise CertificateFormatError("The certificate is not canonically encoded.")
        return signed

    def verify(
        self,
        ca_public_key: bytes,
        now: float,
        role: Role | None = Role.USER,
        username: str | None = None,
    ) -> Certificate:
        """Check signature, validity window, role and (optionally) owner; return the body."""
        if not verify_signature(
            ca_public_key, SIGNATURE_CONTEXT + self.cert.tbs_bytes(), self.signature
        ):
            raise BadSignature()
        if now + CLOCK_SKEW < self.cert.not_before:
            raise NotYetValid()
        if now - CLOCK_SKEW > self.cert.not_after:
            raise Expired()
        if role is not None and self.cert.role is not role:
            raise WrongRole(f"The certificate is for a {self.cert.role.value}, not a {role.value}.")
        if username is not None and self.cert.username != username:
            raise WrongUser(f"The certificate belongs to {self.cert.username}, not {username}.")
        return self.cert


def issue(
    ca_key: IdentityKey,
    username: str,
    public_key: bytes,
    *,
    serial: int,
    now: float,
    lifetime: int = DEFAULT_LIFETIME,
    role: Role = Role.USER,
) -> SignedCertificate:
    """Sign a certificate valid from ``now`` for ``lifetime`` seconds."""
    start = int(now)
    cert = Certificate(username, public_key, role, serial, start, start + lifetime)
    return SignedCertificate(cert, ca_key.sign(SIGNATURE_CONTEXT + cert.tbs_bytes()))
