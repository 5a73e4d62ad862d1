"""The account store: SQLite in WAL mode, versioned schema, argon2id hashes only."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from login_server.accounts import (
    SCHEMA_VERSION,
    AccountStore,
    AccountStoreError,
    check_password,
    hash_password,
)
from overlay.identity import MIN_COST
from overlay.login_protocol import UnknownUser, UsernameTaken

PASSWORD = "correct horse battery staple"
NOBODY = 65534


@pytest.fixture
def store(tmp_path: Path) -> Iterator[AccountStore]:
    store = AccountStore.create(tmp_path / "accounts.db")
    yield store
    store.close()


def _hash(password: str = PASSWORD) -> bytes:
    return hash_password(password, MIN_COST)


def _tables(path: Path) -> set[str]:
    db = sqlite3.connect(path)
    try:
        rows = db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    finally:
        db.close()
    return {row[0] for row in rows}


def test_create_makes_a_wal_database_at_the_current_schema(tmp_path: Path) -> None:
    path = tmp_path / "accounts.db"
    store = AccountStore.create(path)
    try:
        assert store.schema_version == SCHEMA_VERSION
        (mode,) = store._db.execute("PRAGMA journal_mode").fetchone()
        assert mode == "wal"
        assert store.integrity_check() == "ok"
    finally:
        store.close()
    # WAL mode is a property of the file: a fresh connection sees it too.
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        db.close()
    assert {"accounts", "certificates"} <= _tables(path)


def test_create_refuses_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "accounts.db"
    AccountStore.create(path).close()
    with pytest.raises(AccountStoreError) as caught:
        AccountStore.create(path)
    assert str(caught.value) == f"The account database {path} exists already."


def test_open_existing_requires_the_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.db"
    with pytest.raises(AccountStoreError) as caught:
        AccountStore.open_existing(path)
    assert str(caught.value) == (
        f"There is no account database at {path}; run 'voip-login-server init' first."
    )
    assert not path.exists()


def test_accounts_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "accounts.db"
    store = AccountStore.create(path)
    store.add("alice", _hash(), 1000.0)
    store.close()
    store = AccountStore.open_existing(path)
    try:
        account = store.get("alice")
        assert account is not None
        assert account.created_at == 1000.0
        assert check_password(account.password_hash, PASSWORD)
    finally:
        store.close()


def test_migrations_upgrade_a_version_0_database(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 0")
    db.commit()
    db.close()
    assert _tables(path) == set()

    store = AccountStore.open_existing(path)
    try:
        assert store.schema_version == SCHEMA_VERSION
        # The upgraded database is usable: the tables the migrations made are there.
        assert store.add("alice", _hash(), 1.0) == "alice"
        assert store.record_certificate("alice", b"k" * 32, "user", 1.0, 2.0) == 1
    finally:
        store.close()
    assert {"accounts", "certificates"} <= _tables(path)


def test_refuses_a_database_from_newer_software(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(AccountStoreError) as caught:
        AccountStore.open_existing(path)
    assert str(caught.value) == (
        f"The account database {path} has schema {SCHEMA_VERSION + 1}, newer than this "
        f"software ({SCHEMA_VERSION}); upgrade voip-login-server."
    )
    # Nothing was "migrated" behind the operator's back.
    assert _tables(path) == set()


def test_add_get_delete(store: AccountStore) -> None:
    assert store.get("alice") is None
    assert store.add("alice", _hash(), 42.0) == "alice"
    account = store.get("alice")
    assert account is not None
    assert (account.username, account.created_at, account.disabled) == ("alice", 42.0, False)
    assert store.usernames() == ["alice"]

    store.delete("alice")
    assert store.get("alice") is None
    assert store.usernames() == []


def test_usernames_are_unique_case_insensitively(store: AccountStore) -> None:
    assert store.add("Alice", _hash(), 1.0) == "alice"
    with pytest.raises(UsernameTaken) as caught:
        store.add("alice", _hash("another password"), 2.0)
    assert str(caught.value) == "The username alice is taken."
    with pytest.raises(UsernameTaken):
        store.add("ALICE", _hash(), 3.0)
    account = store.get("ALICE")
    assert account is not None
    assert account.username == "alice"
    # The first password is still the one that works.
    assert check_password(account.password_hash, PASSWORD)
    assert store.usernames() == ["alice"]


def test_delete_is_case_insensitive_and_unknown_users_are_reported(store: AccountStore) -> None:
    store.add("alice", _hash(), 1.0)
    store.delete("ALICE")
    assert store.get("alice") is None
    with pytest.raises(UnknownUser) as caught:
        store.delete("alice")
    assert str(caught.value) == "There is no account named alice."
    with pytest.raises(UnknownUser) as caught:
        store.delete("Bob")
    assert str(caught.value) == "There is no account named bob."


def test_certificate_serials_increase(store: AccountStore) -> None:
    serials = [
        store.record_certificate("alice", bytes([i]) * 32, "user", float(i), float(i + 60))
        for i in range(5)
    ]
    assert serials == sorted(set(serials))
    assert serials[0] >= 1
    # A deleted account does not make serials go back.
    store.add("bob", _hash(), 1.0)
    store.delete("bob")
    assert store.record_certificate("bob", b"b" * 32, "user", 9.0, 99.0) > serials[-1]


def test_only_an_argon2id_hash_is_stored(tmp_path: Path) -> None:
    path = tmp_path / "accounts.db"
    store = AccountStore.create(path)
    try:
        password_hash = hash_password(PASSWORD, MIN_COST)
        assert password_hash.startswith(b"$argon2id$")
        store.add("alice", password_hash, 1.0)
        account = store.get("alice")
        assert account is not None
        assert account.password_hash.startswith(b"$argon2id$")
        assert check_password(account.password_hash, PASSWORD)
        assert not check_password(account.password_hash, PASSWORD + "!")
        # While the store is open the row may still sit in the WAL file: look at every file.
        files = sorted(tmp_path.glob("accounts.db*"))
        assert path in files
        everything = b"".join(f.read_bytes() for f in files)
        assert b"$argon2id$" in everything  # we are looking at the right bytes
        assert PASSWORD.encode() not in everything
    finally:
        store.close()
    assert PASSWORD.encode() not in path.read_bytes()


def test_check_password_rejects_a_damaged_hash() -> None:
    assert not check_password(b"$argon2id$nonsense", PASSWORD)


# -- a database we may not write ---------------------------------------------------------


@contextlib.contextmanager
def _as_unprivileged_user() -> Iterator[None]:
    """Run the body as a user file modes apply to (root ignores them)."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(NOBODY)
    try:
        yield
    finally:
        os.seteuid(0)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory outside pytest's private (0700) tree, so an unprivileged user can enter."""
    path = Path(tempfile.mkdtemp(prefix="accounts-ro-"))
    try:
        yield path
    finally:
        for mode_fixed in (path, *path.iterdir()):
            os.chmod(mode_fixed, 0o700)
        shutil.rmtree(path)


def _read_only_db(directory: Path, dir_mode: int) -> Path:
    path = directory / "accounts.db"
    store = AccountStore.create(path)
    store.add("alice", _hash(), 1.0)
    store.close()
    path.chmod(0o444)
    directory.chmod(dir_mode)
    return path


def test_a_read_only_database_file_gives_one_line_when_written(shared_dir: Path) -> None:
    # The directory is writable (SQLite may make its -wal/-shm files), the database is not.
    path = _read_only_db(shared_dir, 0o777)
    with _as_unprivileged_user():
        store = AccountStore.open_existing(path)
        try:
            assert store.get("alice") is not None  # reading still works
            with pytest.raises(AccountStoreError) as added:
                store.add("bob", _hash(), 2.0)
            with pytest.raises(AccountStoreError) as recorded:
                store.record_certificate("alice", b"k" * 32, "user", 1.0, 2.0)
        finally:
            store.close()
    expected = f"Cannot write the account database {path}: attempt to write a readonly database."
    assert str(added.value) == expected
    assert str(recorded.value) == expected
    assert "\n" not in expected


def test_a_database_in_a_read_only_directory_is_refused_at_open(shared_dir: Path) -> None:
    path = _read_only_db(shared_dir, 0o555)
    with _as_unprivileged_user(), pytest.raises(AccountStoreError) as caught:
        AccountStore.open_existing(path)
    assert str(caught.value).startswith(f"Cannot write the account database {path}: ")
    assert "\n" not in str(caught.value)
