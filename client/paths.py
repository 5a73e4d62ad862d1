"""Where the daemon keeps its state and its control socket by default."""

from __future__ import annotations

import os
from pathlib import Path

#: sun_path is 108 bytes on Linux, with the terminating NUL.
MAX_SOCKET_PATH = 107


def runtime_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and Path(base).is_dir():
        return Path(base) / "voip"
    return Path(f"/tmp/voip-{os.getuid()}")  # noqa: S108 - per-user, created 0700 and checked


def default_socket_path() -> Path:
    """``$VOIP_SOCKET``, else ``voipd.sock`` in the user's runtime directory."""
    env = os.environ.get("VOIP_SOCKET")
    if env:
        return Path(env)
    return runtime_dir() / "voipd.sock"


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "voip"
