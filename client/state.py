"""The daemon's state directory.

STATE/config.json      login server address and pinned CA key (saved at first start)
STATE/keys/NAME.key    each user's identity key, encrypted (mode 0600)
STATE/session          who stays logged in: username, file key, certificate (mode 0600);
                       present only when the user chose --stay-logged-in
STATE/voipd.sock       the control socket (mode 0600), unless --socket says otherwise
STATE/voipd.lock       held while a daemon runs here
STATE/voipd.log        the daemon's log
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import cbor2

from overlay.certificate import SignedCertificate
from overlay.errors import ProtocolError, VoipError
from overlay.identity import format_trust_anchor, parse_trust_anchor, write_private_file
from overlay.usernames import is_valid_username


class StateError(VoipError):
    """The daemon's state directory cannot be used."""

    code = "state-dir"


@dataclass(frozen=True)
class SavedSession:
    username: str
    file_key: bytes
    certificate: SignedCertificate


class StateDir:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock: IO[bytes] | None = None

    def prepare(self) -> None:
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            (self.path / "keys").mkdir(mode=0o700, exist_ok=True)
            os.chmod(self.path, 0o700)
        except OSError as exc:
            raise StateError(
                f"Cannot use the state directory {self.path}: {exc.strerror}."
            ) from None

    def lock(self) -> None:
        """Hold the directory for this daemon; fail if another daemon holds it."""
        path = self.path / "voipd.lock"
        try:
            handle = open(path, "a+b")  # noqa: SIM115 - held for the daemon's life
        except OSError as exc:
            raise StateError(f"Cannot write {path}: {exc.strerror}.") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            other = handle.read().decode(errors="replace").strip() or "?"
            handle.close()
            raise StateError(f"Another voipd (pid {other}) is running on {self.path}.") from None
        handle.truncate(0)
        handle.write(str(os.getpid()).encode())
        handle.flush()
        self._lock = handle

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    @property
    def socket_path(self) -> Path:
        return self.path / "voipd.sock"

    @property
    def log_path(self) -> Path:
        return self.path / "voipd.log"

    def key_path(self, username: str) -> Path:
        return self.path / "keys" / f"{username}.key"

    # -- config ------------------------------------------------------------------------------

    def load_config(self) -> dict[str, Any]:
        path = self.path / "config.json"
        try:
            document = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise StateError(f"Cannot read {path}: {exc}.") from None
        return document if isinstance(document, dict) else {}

    def save_config(self, login_server: str, ca_key: bytes) -> None:
        document = {"login_server": login_server, "ca": format_trust_anchor(ca_key).strip()}
        write_private_file(self.path / "config.json", json.dumps(document, indent=1).encode())

    @staticmethod
    def config_ca_key(config: dict[str, Any]) -> bytes | None:
        text = config.get("ca")
        return parse_trust_anchor(text, "saved CA key") if isinstance(text, str) else None

    # -- stay logged in ----------------------------------------------------------------------

    @property
    def session_path(self) -> Path:
        return self.path / "session"

    def save_session(self, session: SavedSession) -> None:
        document = {
            "username": session.username,
            "file_key": session.file_key,
            "certificate": bytes(session.certificate),
        }
        write_private_file(self.session_path, cbor2.dumps(document, canonical=True))

    def load_session(self) -> SavedSession | None:
        try:
            document = cbor2.loads(self.session_path.read_bytes())
            username, file_key = document["username"], document["file_key"]
            certificate = SignedCertificate.parse(document["certificate"])
        except FileNotFoundError:
            return None
        except (OSError, ProtocolError, KeyError, TypeError, ValueError, cbor2.CBORDecodeError):
            return None
        # A damaged file must not name another key file or hold a huge integer for a key.
        if not (
            isinstance(username, str)
            and is_valid_username(username)
            and username == certificate.username
            and isinstance(file_key, bytes)
        ):
            return None
        return SavedSession(username, file_key, certificate)

    def forget_session(self) -> None:
        self.session_path.unlink(missing_ok=True)
