"""The account store: one SQLite file (WAL) in the login server's data directory.

Only argon2id hashes of passwords are stored.  Usernames are kept in canonical (lower-case)
form and are unique case-insensitively.  The schema is versioned with ``PRAGMA user_version``
and upgraded by the migrations below, in order, each in its own transaction.
Every certificate issued is recorded, and its row id is the certificate's serial number.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nacl.exceptions
import nacl.pwhash

from overlay.errors import VoipError
from overlay.identity import KdfCost
from overlay.login_protocol import UnknownUser, UsernameTaken
from overlay.usernames import canonical_username

MIGRATIONS: tuple[str, ...] = (
    # 1: accounts and the certificates issued to them
    """
    CREATE TABLE accounts (
        username      TEXT PRIMARY KEY COLLATE NOCASE,
        password_hash TEXT NOT NULL,
        created_at    REAL NOT NULL,
        disabled      INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE certificates (
        serial     INTEGER PRIMARY KEY AUTOINCREMENT,
        username   TEXT NOT NULL COLLATE NOCASE,
        public_key BLOB NOT NULL,
        role       TEXT NOT NULL,
        issued_at  REAL NOT NULL,
        not_after  REAL NOT NULL
    );
    CREATE INDEX certificates_by_user ON certificates (username);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


class AccountStoreError(VoipError):
    """The account database cannot be used."""

    code = "account-store"


@dataclass(frozen=True)
class Account:
    username: str
    password_hash: bytes
    created_at: float
    disabled: bool


def hash_password(password: str, cost: KdfCost) -> bytes:
    """An argon2id hash string (slow on purpose: run it off the reactor thread)."""
    return bytes(nacl.pwhash.argon2id.str(password.encode("utf-8"), cost.ops, cost.mem))


def check_password(password_hash: bytes, password: str) -> bool:
    try:
        return bool(nacl.pwhash.verify(password_hash, password.encode("utf-8")))
    except (nacl.exceptions.InvalidkeyError, nacl.exceptions.CryptoError):
        return False


class AccountStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._migrate()
        except sqlite3.Error as exc:
            self._close_quietly()
            raise self._failure("open", exc) from None
        except AccountStoreError:
            self._close_quietly()
            raise

    def _close_quietly(self) -> None:
        db = getattr(self, "_db", None)
        if db is not None:
            db.close()

    @classmethod
    def create(cls, path: Path) -> AccountStore:
        if path.exists():
            raise AccountStoreError(f"The account database {path} exists already.")
        return cls(path)

    @classmethod
    def open_existing(cls, path: Path) -> AccountStore:
        if not path.exists():
            raise AccountStoreError(
                f"There is no account database at {path}; run 'voip-login-server init' first."
            )
        return cls(path)

    def _failure(self, doing: str, exc: sqlite3.Error) -> AccountStoreError:
        reason = str(exc).rstrip(".")
        if "readonly" in reason or "unable to open" in reason or "disk I/O" in reason:
            return AccountStoreError(f"Cannot write the account database {self.path}: {reason}.")
        return AccountStoreError(f"The account database {self.path} failed to {doing}: {reason}.")

    def _migrate(self) -> None:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise AccountStoreError(
                f"The account database {self.path} has schema {version}, newer than this "
                f"software ({SCHEMA_VERSION}); upgrade voip-login-server."
            )
        for number in range(version, SCHEMA_VERSION):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for statement in MIGRATIONS[number].split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {number + 1}")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    @property
    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _write(self, doing: str, action: Callable[[sqlite3.Connection], None]) -> None:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                action(self._db)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        except sqlite3.IntegrityError:
            raise
        except sqlite3.Error as exc:
            raise self._failure(doing, exc) from None

    def add(self, username: str, password_hash: bytes, now: float) -> str:
        name = canonical_username(username)

        def insert(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO accounts (username, password_hash, created_at) VALUES (?, ?, ?)",
                (name, password_hash.decode("ascii"), now),
            )

        try:
            self._write("add an account", insert)
        except sqlite3.IntegrityError:
            raise UsernameTaken(f"The username {name} is taken.") from None
        return name

    def delete(self, username: str) -> None:
        name = canonical_username(username)
        deleted: list[int] = []

        def remove(db: sqlite3.Connection) -> None:
            deleted.append(db.execute("DELETE FROM accounts WHERE username = ?", (name,)).rowcount)

        self._write("delete an account", remove)
        if not deleted[0]:
            raise UnknownUser(f"There is no account named {name}.")

    def get(self, username: str) -> Account | None:
        try:
            row = self._db.execute(
                "SELECT username, password_hash, created_at, disabled FROM accounts "
                "WHERE username = ?",
                (username,),
            ).fetchone()
        except sqlite3.Error as exc:
            raise self._failure("read", exc) from None
        if row is None:
            return None
        return Account(row[0], row[1].encode("ascii"), row[2], bool(row[3]))

    def usernames(self) -> list[str]:
        rows = self._db.execute("SELECT username FROM accounts ORDER BY username").fetchall()
        return [r[0] for r in rows]

    def record_certificate(
        self, username: str, public_key: bytes, role: str, issued_at: float, not_after: float
    ) -> int:
        """Record an issued certificate; returns its serial number."""
        serial: list[int] = []

        def insert(db: sqlite3.Connection) -> None:
            cursor = db.execute(
                "INSERT INTO certificates (username, public_key, role, issued_at, not_after) "
                "VALUES (?, ?, ?, ?, ?)",
                (username, public_key, role, issued_at, not_after),
            )
            serial.append(int(cursor.lastrowid or 0))

        self._write("record a certificate", insert)
        return serial[0]

    def integrity_check(self) -> str:
        return str(self._db.execute("PRAGMA integrity_check").fetchone()[0])

    def close(self) -> None:
        self._db.close()
