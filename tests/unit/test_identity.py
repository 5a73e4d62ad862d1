"""Identity keys, their encrypted files (mode 0600, atomic writes) and the trust-anchor file."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path
from typing import Any

import cbor2
import pytest

from overlay.errors import KeyFileError, TrustAnchorError, WrongPassphrase
from overlay.identity import (
    DEFAULT_COST,
    MIN_COST,
    IdentityKey,
    KdfCost,
    KeyFile,
    format_trust_anchor,
    key_fingerprint,
    parse_trust_anchor,
    read_trust_anchor,
    verify_signature,
)

PASSWORD = "correct horse battery staple"

# RFC 8032, section 7.1, TEST 1 (empty message).
RFC8032_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC8032_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
RFC8032_SIGNATURE = bytes.fromhex(
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- keys and signatures ---------------------------------------------------------------------


def test_generated_keys_are_fresh_ed25519_keys() -> None:
    a, b = IdentityKey.generate(), IdentityKey.generate()
    assert len(a.public_key) == 32
    assert len(a.seed) == 32
    assert a.public_key != b.public_key
    assert IdentityKey.from_seed(a.seed).public_key == a.public_key


def test_signing_matches_the_rfc_8032_vector() -> None:
    key = IdentityKey.from_seed(RFC8032_SEED)
    assert key.public_key == RFC8032_PUBLIC
    assert key.sign(b"") == RFC8032_SIGNATURE
    assert verify_signature(RFC8032_PUBLIC, b"", RFC8032_SIGNATURE)


def test_sign_and_verify() -> None:
    key = IdentityKey.generate()
    signature = key.sign(b"hello bob")
    assert len(signature) == 64
    assert verify_signature(key.public_key, b"hello bob", signature)


def test_verify_signature_is_false_for_anything_not_signed_by_that_key() -> None:
    key, other = IdentityKey.generate(), IdentityKey.generate()
    signature = key.sign(b"hello bob")
    assert not verify_signature(other.public_key, b"hello bob", signature)
    assert not verify_signature(key.public_key, b"hello eve", signature)
    assert not verify_signature(key.public_key, b"hello bob", signature[:63])
    assert not verify_signature(key.public_key, b"hello bob", signature + b"\x00")
    assert not verify_signature(key.public_key, b"hello bob", b"")
    assert not verify_signature(key.public_key[:31], b"hello bob", signature)
    assert not verify_signature(b"", b"hello bob", signature)
    flipped = bytes([signature[0] ^ 1]) + signature[1:]
    assert not verify_signature(key.public_key, b"hello bob", flipped)


def test_a_seed_must_be_32_bytes() -> None:
    with pytest.raises(KeyFileError) as caught:
        IdentityKey.from_seed(bytes(31))
    assert str(caught.value) == "An identity key seed must be 32 bytes."


def test_fingerprint_is_short_stable_and_per_key() -> None:
    fingerprint = key_fingerprint(RFC8032_PUBLIC)
    assert fingerprint == key_fingerprint(RFC8032_PUBLIC)
    assert len(fingerprint) == 16
    assert fingerprint.isalnum()
    assert fingerprint == fingerprint.lower()
    assert fingerprint != key_fingerprint(IdentityKey.generate().public_key)


# -- encrypted key files ---------------------------------------------------------------------


def test_key_file_round_trip(tmp_path: Path) -> None:
    key = IdentityKey.generate()
    path = tmp_path / "identity.key"
    file_key = key.save(path, PASSWORD, MIN_COST)

    key_file = KeyFile.read(path)
    assert key_file.public_key == key.public_key
    assert key_file.cost == MIN_COST
    unlocked, derived = key_file.unlock_with_password(PASSWORD)
    assert unlocked.seed == key.seed
    assert derived == file_key
    # The kept file key (a daemon that stays logged in) unlocks without the password.
    assert KeyFile.read(path).unlock(file_key).public_key == key.public_key
    # The seed is not in the file in the clear.
    assert key.seed not in path.read_bytes()


def test_key_file_round_trip_with_the_default_cost(tmp_path: Path) -> None:
    key = IdentityKey.generate()
    path = tmp_path / "identity.key"
    key.save(path, PASSWORD)
    key_file = KeyFile.read(path)
    assert key_file.cost == DEFAULT_COST
    assert key_file.unlock_with_password(PASSWORD)[0].seed == key.seed


def test_two_saves_use_fresh_salts() -> None:
    key = IdentityKey.generate()
    first = KeyFile.parse(key.encrypt(PASSWORD, MIN_COST)[0])
    second = KeyFile.parse(key.encrypt(PASSWORD, MIN_COST)[0])
    assert first.salt != second.salt
    assert first.sealed != second.sealed


def test_wrong_password_is_wrong_passphrase(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    IdentityKey.generate().save(path, PASSWORD, MIN_COST)
    with pytest.raises(WrongPassphrase) as caught:
        KeyFile.read(path).unlock_with_password(PASSWORD + "!")
    assert str(caught.value) == "The password does not unlock this key."
    assert isinstance(caught.value, KeyFileError)
    assert caught.value.code == "wrong-passphrase"


def test_key_file_has_mode_0600_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    old_umask = os.umask(0)
    try:
        IdentityKey.generate().save(path, PASSWORD, MIN_COST)
    finally:
        os.umask(old_umask)
    assert mode_of(path) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["identity.key"]


def test_overwriting_a_readable_file_makes_it_private(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    path.write_bytes(b"old")
    path.chmod(0o644)
    key = IdentityKey.generate()
    key.save(path, PASSWORD, MIN_COST)
    assert mode_of(path) == 0o600
    assert KeyFile.read(path).public_key == key.public_key
    assert sorted(p.name for p in tmp_path.iterdir()) == ["identity.key"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    # A directory in the way makes the final rename fail after the data was written.
    path = tmp_path / "identity.key"
    path.mkdir()
    (path / "keep").write_bytes(b"x")
    with pytest.raises(KeyFileError) as caught:
        IdentityKey.generate().save(path, PASSWORD, MIN_COST)
    assert str(caught.value) == f"Cannot write {path}: Is a directory."
    assert sorted(p.name for p in tmp_path.iterdir()) == ["identity.key"]
    assert (path / "keep").read_bytes() == b"x"


def test_a_short_write_still_writes_the_whole_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = os.write

    def one_byte_at_a_time(fd: int, data: Any) -> int:
        return real_write(fd, bytes(data[:1]))

    monkeypatch.setattr(os, "write", one_byte_at_a_time)
    key = IdentityKey.generate()
    path = tmp_path / "identity.key"
    key.save(path, PASSWORD, MIN_COST)
    monkeypatch.undo()
    assert KeyFile.read(path).unlock_with_password(PASSWORD)[0].seed == key.seed


def test_unreadable_key_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.key"
    with pytest.raises(KeyFileError) as caught:
        KeyFile.read(path)
    assert str(caught.value) == f"Cannot read the key file {path}: No such file or directory."


@pytest.fixture
def key_file_document() -> dict[str, Any]:
    data, _ = IdentityKey.generate().encrypt(PASSWORD, MIN_COST)
    document: dict[str, Any] = cbor2.loads(data)
    return document


def write_document(path: Path, document: dict[str, Any]) -> Path:
    path.write_bytes(cbor2.dumps(document, canonical=True))
    return path


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"", "is damaged (not a key file)"),
        (b"\xff\xfe garbage", "is damaged (not a key file)"),
        (b"\x1c", "is damaged (not a key file)"),  # reserved CBOR additional information
        (cbor2.dumps("a string"), "has an unknown format version"),
        (cbor2.dumps([1, 2, 3]), "has an unknown format version"),
        (cbor2.dumps({"v": 2}), "has an unknown format version"),
        (cbor2.dumps({}), "has an unknown format version"),
    ],
)
def test_garbage_key_files(tmp_path: Path, data: bytes, problem: str) -> None:
    path = tmp_path / "identity.key"
    path.write_bytes(data)
    with pytest.raises(KeyFileError) as caught:
        KeyFile.read(path)
    assert str(caught.value) == f"The key file {path} {problem}."
    assert not isinstance(caught.value, WrongPassphrase)


@pytest.mark.parametrize("keep", [1, 10, 40, -1])
def test_truncated_key_file(tmp_path: Path, keep: int) -> None:
    path = tmp_path / "identity.key"
    IdentityKey.generate().save(path, PASSWORD, MIN_COST)
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(KeyFileError) as caught:
        KeyFile.read(path)
    assert str(caught.value) == f"The key file {path} is damaged (not a key file)."


@pytest.mark.parametrize("field", ["salt", "ops", "mem", "public_key", "box"])
def test_key_file_without_a_field(
    tmp_path: Path, key_file_document: dict[str, Any], field: str
) -> None:
    del key_file_document[field]
    path = write_document(tmp_path / "identity.key", key_file_document)
    with pytest.raises(KeyFileError) as caught:
        KeyFile.read(path)
    assert str(caught.value) == f"The key file {path} is damaged (no {field})."


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("kdf", "scrypt"),
        ("salt", bytes(15)),
        ("salt", "not bytes"),
        ("ops", "2"),
        ("mem", 1.5),
        ("public_key", bytes(31)),
        ("box", None),
    ],
)
def test_key_file_with_bad_fields(
    tmp_path: Path, key_file_document: dict[str, Any], field: str, value: Any
) -> None:
    key_file_document[field] = value
    path = write_document(tmp_path / "identity.key", key_file_document)
    with pytest.raises(KeyFileError) as caught:
        KeyFile.read(path)
    assert str(caught.value) == f"The key file {path} is damaged (bad fields)."


def test_tampered_box_does_not_unlock(tmp_path: Path, key_file_document: dict[str, Any]) -> None:
    box = bytearray(key_file_document["box"])
    box[-1] ^= 0x01
    key_file_document["box"] = bytes(box)
    path = write_document(tmp_path / "identity.key", key_file_document)
    with pytest.raises(WrongPassphrase):
        KeyFile.read(path).unlock_with_password(PASSWORD)


def test_tampered_public_key_is_detected(tmp_path: Path, key_file_document: dict[str, Any]) -> None:
    key_file_document["public_key"] = IdentityKey.generate().public_key
    path = write_document(tmp_path / "identity.key", key_file_document)
    with pytest.raises(KeyFileError) as caught:
        KeyFile.read(path).unlock_with_password(PASSWORD)
    assert str(caught.value) == "The key file is damaged (public key does not match)."


@pytest.mark.parametrize(
    "cost",
    [
        KdfCost(0, MIN_COST.mem),
        KdfCost(-1, MIN_COST.mem),
        KdfCost(2**70, MIN_COST.mem),
        KdfCost(MIN_COST.ops, 1),
        KdfCost(MIN_COST.ops, -5),
        KdfCost(MIN_COST.ops, 2**70),
    ],
)
def test_unsupported_cost_is_a_key_file_error(
    tmp_path: Path, key_file_document: dict[str, Any], cost: KdfCost
) -> None:
    key_file_document["ops"], key_file_document["mem"] = cost.ops, cost.mem
    path = write_document(tmp_path / "identity.key", key_file_document)
    with pytest.raises(KeyFileError) as caught:
        KeyFile.read(path).unlock_with_password(PASSWORD)
    # Refused when the file is read, before any slow key derivation is attempted.
    assert str(caught.value) == f"The key file {path} asks for an unsupported argon2id cost."


def test_plain_key_file_round_trip(tmp_path: Path) -> None:
    key = IdentityKey.generate()
    path = tmp_path / "ca.key"
    key.save_plain(path)
    assert mode_of(path) == 0o600
    assert IdentityKey.load_plain(path).public_key == key.public_key
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.key"]


def test_plain_key_file_of_the_wrong_size(tmp_path: Path) -> None:
    path = tmp_path / "ca.key"
    path.write_bytes(bytes(33))
    with pytest.raises(KeyFileError) as caught:
        IdentityKey.load_plain(path)
    assert str(caught.value) == f"The key file {path} is damaged (wrong size)."
    with pytest.raises(KeyFileError) as caught:
        IdentityKey.load_plain(tmp_path / "none")
    assert str(caught.value) == (
        f"Cannot read the key file {tmp_path / 'none'}: No such file or directory."
    )


# -- trust anchor ----------------------------------------------------------------------------


def test_trust_anchor_format_and_round_trip(tmp_path: Path) -> None:
    text = format_trust_anchor(RFC8032_PUBLIC)
    assert text == "voip-ca-ed25519 11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=\n"
    assert parse_trust_anchor(text) == RFC8032_PUBLIC
    path = tmp_path / "ca.pub"
    path.write_text(text, encoding="ascii")
    assert read_trust_anchor(path) == RFC8032_PUBLIC
    # Surrounding whitespace (an editor's extra newline) is fine.
    assert parse_trust_anchor("  " + text + "\n\n") == RFC8032_PUBLIC


NOT_AN_ANCHOR = "is not a CA public key (expected 'voip-ca-ed25519 <base64>')"
KEY_B64 = base64.b64encode(RFC8032_PUBLIC).decode()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", NOT_AN_ANCHOR),
        ("voip-ca-ed25519", NOT_AN_ANCHOR),
        (f"ssh-ed25519 {KEY_B64}", NOT_AN_ANCHOR),
        (f"VOIP-CA-ED25519 {KEY_B64}", NOT_AN_ANCHOR),
        (f"voip-ca-ed25519 {KEY_B64} comment", NOT_AN_ANCHOR),
        ("voip-ca-ed25519 !!!!", "is damaged (bad base64)"),
        (f"voip-ca-ed25519 {KEY_B64.rstrip('=')}", "is damaged (bad base64)"),
        ("voip-ca-ed25519 ÅÅÅÅ", "is damaged (bad base64)"),
        (
            f"voip-ca-ed25519 {base64.b64encode(bytes(31)).decode()}",
            "is damaged (the key is not 32 bytes)",
        ),
        (
            f"voip-ca-ed25519 {base64.b64encode(bytes(33)).decode()}",
            "is damaged (the key is not 32 bytes)",
        ),
    ],
)
def test_trust_anchor_parse_failures(text: str, problem: str) -> None:
    with pytest.raises(TrustAnchorError) as caught:
        parse_trust_anchor(text)
    assert str(caught.value) == f"The CA key file {problem}."
    assert caught.value.code == "bad-trust-anchor"


def test_trust_anchor_file_failures_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "ca.pub"
    with pytest.raises(TrustAnchorError) as caught:
        read_trust_anchor(path)
    assert str(caught.value) == f"Cannot read the CA key file {path}: No such file or directory."

    path.write_bytes(b"voip-ca-ed25519 \xff\xfe")
    with pytest.raises(TrustAnchorError) as caught:
        read_trust_anchor(path)
    assert str(caught.value) == f"Cannot read the CA key file {path}: not text."

    path.write_text("voip-ca-ed25519 AAAA\n", encoding="ascii")
    with pytest.raises(TrustAnchorError) as caught:
        read_trust_anchor(path)
    assert str(caught.value) == f"The CA key file {path} is damaged (the key is not 32 bytes)."
