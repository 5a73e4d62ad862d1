"""An in-process login server for tests: real account store, real CA key, any clock."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from login_server.datadir import DataDir
from login_server.logic import LoginServer
from overlay.identity import MIN_COST, IdentityKey


@dataclass
class LoginServerFixture:
    data: DataDir
    ca_key: IdentityKey
    server: LoginServer

    @property
    def ca_public(self) -> bytes:
        return self.ca_key.public_key


def make_login_server(tmp: Path, clock: Any, **options: Any) -> LoginServerFixture:
    """A login server over a fresh data directory; cheap password hashing for speed."""
    data = DataDir(tmp / "ls")
    ca_key = data.init()
    options.setdefault("hash_cost", MIN_COST)
    server = LoginServer(clock, data.open_store(), ca_key, **options)
    return LoginServerFixture(data, ca_key, server)
