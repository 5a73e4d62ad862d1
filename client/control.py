"""The control protocol between ``voipctl`` and ``voipd``: JSON lines on a unix socket.

    voipctl -> voipd   {"cmd": "login", "args": {...}}
    voipd -> voipctl   {"progress": "Logging in..."}              zero or more
                       {"ok": true, "result": {...}}              or
                       {"ok": false, "error": {"code": ..., "message": ...}}

One request per connection.  The socket is created with mode 0600 and the daemon also checks
the peer's uid (SO_PEERCRED): only its own user (or root) may talk to it.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure

from overlay.errors import VoipError

Progress = Callable[[str], None]
Handler = Callable[[dict[str, Any], Progress], Awaitable[dict[str, Any]]]
MAX_REQUEST = 64 * 1024


def peer_uid(sock: socket.socket) -> int | None:
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def uid_allowed(uid: int | None, own_uid: int) -> bool:
    return uid is not None and uid in (own_uid, 0)


class ControlProtocol(LineOnlyReceiver):
    log = Logger()
    delimiter = b"\n"
    MAX_LENGTH = MAX_REQUEST

    def __init__(
        self,
        handlers: dict[str, Handler],
        own_uid: int,
        cancellable: frozenset[str] = frozenset(),
    ) -> None:
        self.handlers = handlers
        self.own_uid = own_uid
        #: Commands stopped when their client goes away (e.g. ``buddies --watch`` after Ctrl-C);
        #: the others (a call) run to their end, which the client asks for with another command.
        self.cancellable = cancellable
        self.busy = False
        self._running: Deferred[dict[str, Any]] | None = None
        self._command = ""

    def connectionLost(self, reason: Failure | None = None) -> None:
        running = self._running
        if running is not None and not running.called and self._command in self.cancellable:
            running.cancel()

    def connectionMade(self) -> None:
        handle = self.transport.getHandle() if self.transport is not None else None  # type: ignore[attr-defined]
        uid = peer_uid(handle) if isinstance(handle, socket.socket) else None
        if not uid_allowed(uid, self.own_uid):
            self._reply_error("forbidden", "This daemon belongs to another user.")
            self.transport.loseConnection()  # type: ignore[union-attr]

    def _write(self, document: dict[str, Any]) -> None:
        if self.transport is not None and self.connected:
            self.transport.write(json.dumps(document).encode() + self.delimiter)

    def _reply_error(self, code: str, message: str) -> None:
        self._write({"ok": False, "error": {"code": code, "message": message}})

    def lineLengthExceeded(self, line: bytes) -> None:
        self._reply_error("bad-request", "Request too long.")
        self.transport.loseConnection()  # type: ignore[union-attr]

    def lineReceived(self, line: bytes) -> None:
        if self.busy:
            self._reply_error("bad-request", "One request per connection.")
            return
        try:
            request = json.loads(line)
            command = request["cmd"]
            args = request.get("args") or {}
            if not isinstance(command, str) or not isinstance(args, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            self._reply_error("bad-request", "Not a control request.")
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        handler = self.handlers.get(command)
        if handler is None:
            self._reply_error("unknown-command", f"voipd does not know the command {command!r}.")
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        self.busy = True

        async def run() -> dict[str, Any]:
            return await handler(args, lambda text: self._write({"progress": text}))

        def done(result: dict[str, Any]) -> None:
            self._write({"ok": True, "result": result})
            self.transport.loseConnection()  # type: ignore[union-attr]

        def failed(failure: Failure) -> None:
            if isinstance(failure.value, CancelledError):
                return  # the client went away (connectionLost)
            exc = failure.value
            if isinstance(exc, VoipError):
                self._reply_error(exc.code, str(exc))
            else:
                self.log.failure("control command {command} failed", failure, command=command)
                self._reply_error("internal", f"voipd failed: {exc!r} (see its log).")
            self.transport.loseConnection()  # type: ignore[union-attr]

        self._command = command
        self._running = Deferred.fromCoroutine(run())
        self._running.addCallbacks(done, failed)


class ControlFactory(Factory):
    def __init__(
        self, handlers: dict[str, Handler], cancellable: frozenset[str] = frozenset()
    ) -> None:
        self.handlers = handlers
        self.cancellable = cancellable

    def buildProtocol(self, addr: Any) -> ControlProtocol:
        return ControlProtocol(self.handlers, os.getuid(), self.cancellable)
