"""The login server's data directory: CA key, trust anchor, account database.

DIR/ca.key        the CA's Ed25519 seed, mode 0600 (keep a backup offline)
DIR/ca.pub        the trust anchor nodes pin (give it to your users)
DIR/accounts.db   SQLite (WAL) account store
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from login_server.accounts import AccountStore
from overlay.errors import VoipError
from overlay.identity import IdentityKey, format_trust_anchor, write_private_file


class DataDirError(VoipError):
    """The login server's data directory cannot be used."""

    code = "data-dir"


@dataclass(frozen=True)
class DataDir:
    path: Path

    @property
    def ca_key_path(self) -> Path:
        return self.path / "ca.key"

    @property
    def ca_pub_path(self) -> Path:
        return self.path / "ca.pub"

    @property
    def db_path(self) -> Path:
        return self.path / "accounts.db"

    def init(self) -> IdentityKey:
        """Make the directory, a new CA key and an empty account database."""
        if self.ca_key_path.exists() or self.db_path.exists():
            raise DataDirError(f"{self.path} is already initialised; not overwriting its CA key.")
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise DataDirError(f"Cannot create {self.path}: {exc.strerror}.") from None
        key = IdentityKey.generate()
        key.save_plain(self.ca_key_path)
        try:
            self.ca_pub_path.write_text(format_trust_anchor(key.public_key), encoding="ascii")
        except OSError as exc:
            raise DataDirError(f"Cannot write {self.ca_pub_path}: {exc.strerror}.") from None
        AccountStore.create(self.db_path).close()
        return key

    def check(self) -> None:
        if not self.path.is_dir():
            raise DataDirError(
                f"{self.path} is not a login server data directory; "
                f"run 'voip-login-server init --data {self.path}' first."
            )
        if not self.ca_key_path.exists():
            raise DataDirError(f"{self.path} has no ca.key; run 'voip-login-server init' first.")

    def load_ca_key(self) -> IdentityKey:
        self.check()
        mode = os.stat(self.ca_key_path).st_mode & 0o077
        if mode:
            raise DataDirError(
                f"{self.ca_key_path} is readable by others (mode {oct(mode)}); chmod 600 it."
            )
        return IdentityKey.load_plain(self.ca_key_path)

    def open_store(self) -> AccountStore:
        self.check()
        return AccountStore.open_existing(self.db_path)

    def write_ca_pub(self, key: IdentityKey) -> None:
        write_private_file(self.ca_pub_path, format_trust_anchor(key.public_key).encode())
