"""Ed25519 identity keys, their encrypted files, and the CA trust-anchor file.

A user's identity key is made on the user's machine and never leaves it.  At rest it is sealed
with PyNaCl's SecretBox under a key derived from the password with argon2id; the file is
written with mode 0600.  The derived key can itself be kept (again 0600) when the user chose to
stay logged in, so a restarted daemon can unlock the identity without asking again.

Key file (CBOR map, version 1)::

    {"v": 1, "kdf": "argon2id", "salt": 16 B, "ops": int, "mem": int,
     "public_key": 32 B, "box": SecretBox(nonce || ciphertext of the 32-byte seed)}

Trust anchor (``ca.pub``), one text line: ``voip-ca-ed25519 <base64 of the 32-byte key>``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import cbor2
import nacl.encoding
import nacl.exceptions
import nacl.hash
import nacl.pwhash
import nacl.secret
import nacl.signing
import nacl.utils

from overlay.errors import KeyFileError, TrustAnchorError, WrongPassphrase

PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64
SEED_SIZE = 32
KEY_FILE_VERSION = 1
TRUST_ANCHOR_TAG = "voip-ca-ed25519"


@dataclass(frozen=True)
class KdfCost:
    """argon2id cost; INTERACTIVE by default (about 0.1 s and 64 MiB here)."""

    ops: int = nacl.pwhash.argon2id.OPSLIMIT_INTERACTIVE
    mem: int = nacl.pwhash.argon2id.MEMLIMIT_INTERACTIVE


#: The cheapest cost libsodium allows; for tests and benchmarks only.
MIN_COST = KdfCost(nacl.pwhash.argon2id.OPSLIMIT_MIN, nacl.pwhash.argon2id.MEMLIMIT_MIN)
DEFAULT_COST = KdfCost()
#: A key file asking for more than this was not written by us (and would stall unlocking).
MAX_COST = KdfCost(nacl.pwhash.argon2id.OPSLIMIT_SENSITIVE, nacl.pwhash.argon2id.MEMLIMIT_SENSITIVE)


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """True when ``signature`` is a valid Ed25519 signature of ``message`` by ``public_key``."""
    if len(public_key) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        return False
    try:
        nacl.signing.VerifyKey(public_key).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError):
        return False
    return True


def derive_file_key(password: str, salt: bytes, cost: KdfCost) -> bytes:
    """The SecretBox key for a key file, from the password (argon2id)."""
    return nacl.pwhash.argon2id.kdf(
        nacl.secret.SecretBox.KEY_SIZE,
        password.encode("utf-8"),
        salt,
        opslimit=cost.ops,
        memlimit=cost.mem,
    )


class IdentityKey:
    """An Ed25519 signing key: a user's identity, or the login server's CA key."""

    def __init__(self, signing_key: nacl.signing.SigningKey) -> None:
        self._signing_key = signing_key

    @classmethod
    def generate(cls) -> IdentityKey:
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> IdentityKey:
        if len(seed) != SEED_SIZE:
            raise KeyFileError("An identity key seed must be 32 bytes.")
        return cls(nacl.signing.SigningKey(seed))

    @property
    def public_key(self) -> bytes:
        return bytes(self._signing_key.verify_key)

    @property
    def seed(self) -> bytes:
        return bytes(self._signing_key)

    def sign(self, message: bytes) -> bytes:
        """A detached 64-byte signature of ``message``."""
        return self._signing_key.sign(message).signature

    # -- encrypted key files ---------------------------------------------------------------

    def encrypt(self, password: str, cost: KdfCost = DEFAULT_COST) -> tuple[bytes, bytes]:
        """The key-file bytes sealed under ``password``, and the derived file key."""
        salt = nacl.utils.random(nacl.pwhash.argon2id.SALTBYTES)
        file_key = derive_file_key(password, salt, cost)
        return self._encrypt_with(file_key, salt, cost), file_key

    def _encrypt_with(self, file_key: bytes, salt: bytes, cost: KdfCost) -> bytes:
        box = nacl.secret.SecretBox(file_key)
        sealed = bytes(box.encrypt(self.seed))
        document = {
            "v": KEY_FILE_VERSION,
            "kdf": "argon2id",
            "salt": salt,
            "ops": cost.ops,
            "mem": cost.mem,
            "public_key": self.public_key,
            "box": sealed,
        }
        return bytes(cbor2.dumps(document, canonical=True))

    def save(self, path: Path, password: str, cost: KdfCost = DEFAULT_COST) -> bytes:
        """Write the encrypted key file (mode 0600); returns the derived file key."""
        data, file_key = self.encrypt(password, cost)
        write_private_file(path, data)
        return file_key

    def save_plain(self, path: Path) -> None:
        """Write the raw seed (mode 0600): for the login server's CA key only."""
        write_private_file(path, self.seed)

    @classmethod
    def load_plain(cls, path: Path) -> IdentityKey:
        try:
            seed = path.read_bytes()
        except OSError as exc:
            raise KeyFileError(f"Cannot read the key file {path}: {exc.strerror}.") from None
        if len(seed) != SEED_SIZE:
            raise KeyFileError(f"The key file {path} is damaged (wrong size).")
        return cls.from_seed(seed)


@dataclass(frozen=True)
class KeyFile:
    """The parsed, still-encrypted contents of a key file."""

    salt: bytes
    cost: KdfCost
    public_key: bytes
    sealed: bytes

    @classmethod
    def parse(cls, data: bytes, where: str = "key file") -> KeyFile:
        try:
            document = cbor2.loads(data)
        except Exception:  # noqa: BLE001 - cbor2 raises many types on garbage
            raise KeyFileError(f"The {where} is damaged (not a key file).") from None
        if not isinstance(document, dict) or document.get("v") != KEY_FILE_VERSION:
            raise KeyFileError(f"The {where} has an unknown format version.")
        try:
            salt, ops, mem = document["salt"], document["ops"], document["mem"]
            public_key, sealed = document["public_key"], document["box"]
        except KeyError as exc:
            raise KeyFileError(f"The {where} is damaged (no {exc.args[0]}).") from None
        if document.get("kdf") != "argon2id" or not (
            isinstance(salt, bytes)
            and len(salt) == nacl.pwhash.argon2id.SALTBYTES
            and type(ops) is int
            and type(mem) is int
            and isinstance(public_key, bytes)
            and len(public_key) == PUBLIC_KEY_SIZE
            and isinstance(sealed, bytes)
        ):
            raise KeyFileError(f"The {where} is damaged (bad fields).")
        if not (MIN_COST.ops <= ops <= MAX_COST.ops and MIN_COST.mem <= mem <= MAX_COST.mem):
            raise KeyFileError(f"The {where} asks for an unsupported argon2id cost.")
        return cls(salt, KdfCost(ops, mem), public_key, sealed)

    @classmethod
    def read(cls, path: Path) -> KeyFile:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise KeyFileError(f"Cannot read the key file {path}: {exc.strerror}.") from None
        return cls.parse(data, where=f"key file {path}")

    def file_key(self, password: str) -> bytes:
        try:
            return derive_file_key(password, self.salt, self.cost)
        except (nacl.exceptions.ValueError, nacl.exceptions.RuntimeError):
            raise KeyFileError("The key file asks for an unsupported argon2id cost.") from None

    def unlock(self, file_key: bytes) -> IdentityKey:
        """Decrypt with the derived key; ``WrongPassphrase`` when it does not fit."""
        try:
            seed = nacl.secret.SecretBox(file_key).decrypt(self.sealed)
        except (nacl.exceptions.CryptoError, nacl.exceptions.ValueError, ValueError):
            raise WrongPassphrase() from None
        key = IdentityKey.from_seed(seed)
        if key.public_key != self.public_key:
            raise KeyFileError("The key file is damaged (public key does not match).")
        return key

    def unlock_with_password(self, password: str) -> tuple[IdentityKey, bytes]:
        file_key = self.file_key(password)
        return self.unlock(file_key), file_key


def write_private_file(path: Path, data: bytes) -> None:
    """Atomically write ``data`` to ``path`` with mode 0600 (write, fsync, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(data)
            while view:  # os.write may write less than asked (a full disk)
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise KeyFileError(f"Cannot write {path}: {exc.strerror}.") from None


# -- trust anchor ------------------------------------------------------------------------


def format_trust_anchor(public_key: bytes) -> str:
    return f"{TRUST_ANCHOR_TAG} {base64.b64encode(public_key).decode('ascii')}\n"


def parse_trust_anchor(text: str, where: str = "CA key file") -> bytes:
    parts = text.split()
    if len(parts) != 2 or parts[0] != TRUST_ANCHOR_TAG:
        raise TrustAnchorError(
            f"The {where} is not a CA public key (expected '{TRUST_ANCHOR_TAG} <base64>')."
        )
    try:
        key = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raise TrustAnchorError(f"The {where} is damaged (bad base64).") from None
    if len(key) != PUBLIC_KEY_SIZE:
        raise TrustAnchorError(f"The {where} is damaged (the key is not 32 bytes).")
    return key


def read_trust_anchor(path: Path) -> bytes:
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not text"
        raise TrustAnchorError(f"Cannot read the CA key file {path}: {reason}.") from None
    return parse_trust_anchor(text, where=f"CA key file {path}")


def key_fingerprint(public_key: bytes) -> str:
    """A short printable fingerprint of a public key (for logs and status)."""
    digest = nacl.hash.blake2b(public_key, digest_size=10, encoder=nacl.encoding.RawEncoder)
    return base64.b32encode(digest).decode("ascii").lower()
