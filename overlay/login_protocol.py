"""The login protocol: messages between a node and the login server, and its errors.

Message table (every frame after the handshake travels sealed, see ``overlay.channel``)::

    node -> server           server -> node              when
    hello                    hello-reply                 first, in the clear
    ping {rid}               pong {rid, time}            any time
    register {rid, ...}      registered {rid, username}  self sign-up (open registration)
    login {rid, ...}         certificate {rid, ...}      password + proof of the identity key
    renew {rid, ...}         certificate {rid, ...}      before the certificate expires
    (any request)            error {rid, request, code, message, retry_after}

``proof`` is the identity key's signature of ``PROOF_CONTEXT || transcript || username ||
public_key``: it binds the login to this channel, so it cannot be replayed elsewhere.
A frame the server cannot parse is answered with ``error`` (request "frame") and, when the
stream cannot be resynchronised, the connection is closed; other connections go on.
"""

from __future__ import annotations

from overlay.errors import ProtocolError, VoipError
from overlay.identity import key_fingerprint
from overlay.messages import Message, Record, message, record

PROOF_CONTEXT = b"voip-login-proof-v1"
#: How long a node waits for the login server before it gives up on a request.
DEFAULT_TIMEOUT = 15.0


#: The username in a supernode certificate: "sn-" and the node key's fingerprint.
SN_PREFIX = "sn-"


def supernode_name(node_key: bytes) -> str:
    return SN_PREFIX + key_fingerprint(node_key)


def proof_message(transcript: bytes, username: str, public_key: bytes) -> bytes:
    return PROOF_CONTEXT + transcript + username.encode("ascii") + b"\x00" + public_key


@record
class Contact(Record):
    """How to reach a supernode."""

    host: str
    port: int
    udp_port: int | None = None
    #: The supernode's node key, pinned when connecting to it.
    node_id: bytes | None = None


@message(0x0020, "register")
class Register(Message):
    rid: int
    username: str
    password: str


@message(0x0021, "registered", reply=True)
class Registered(Message):
    rid: int
    username: str


@message(0x0022, "login")
class Login(Message):
    rid: int
    username: str
    password: str
    public_key: bytes
    proof: bytes


@message(0x0023, "certificate", reply=True)
class CertificateReply(Message):
    rid: int
    certificate: bytes
    bootstrap: tuple[Contact, ...] = ()
    time: float = 0.0


@message(0x0024, "renew")
class Renew(Message):
    rid: int
    certificate: bytes
    proof: bytes


# -- errors the login server reports (the code travels in ``error.code``) ------------------


class LoginError(VoipError):
    """The login server refused the request."""

    code = "login-refused"


class UnknownUser(LoginError):
    """There is no such account."""

    code = "unknown-user"


class WrongPassword(LoginError):
    """Wrong password."""

    code = "wrong-password"


class UsernameTaken(LoginError):
    """That username is taken."""

    code = "username-taken"


class RegistrationClosed(LoginError):
    """Registration is closed on this login server; ask its operator for an account."""

    code = "registration-closed"


class RateLimited(LoginError):
    """Too many failed attempts; try again later."""

    code = "rate-limited"

    def __init__(self, message: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class WeakPassword(LoginError):
    """Passwords need at least 8 characters."""

    code = "weak-password"


class BadProof(LoginError):
    """The proof of your identity key did not verify."""

    code = "bad-proof"


class SessionExpired(LoginError):
    """Your session has expired; log in again."""

    code = "session-expired"


class ServerError(LoginError):
    """The login server failed; try again later."""

    code = "server-error"


class NotReachable(LoginError):
    """The login server could not reach you from outside; only reachable nodes become supernodes."""

    code = "not-reachable"


class NotNeeded(LoginError):
    """The overlay has enough supernodes for now."""

    code = "not-needed"


class UnknownSupernode(LoginError):
    """This node is not a supernode (any more); apply again."""

    code = "unknown-supernode"


class InvalidUsernameReply(LoginError):
    """That username is not valid."""

    code = "invalid-username"


class RemoteProtocolError(LoginError):
    """The login server could not understand the request."""

    code = "protocol-error"


_ERRORS: dict[str, type[LoginError]] = {
    cls.code: cls
    for cls in (
        UnknownUser,
        WrongPassword,
        UsernameTaken,
        RegistrationClosed,
        RateLimited,
        WeakPassword,
        BadProof,
        SessionExpired,
        ServerError,
        InvalidUsernameReply,
        RemoteProtocolError,
        NotReachable,
        NotNeeded,
        UnknownSupernode,
    )
}


def error_from_reply(code: str, text: str, retry_after: float | None) -> LoginError:
    """The exception for an ``error`` reply (an unknown code still carries its text)."""
    cls = _ERRORS.get(code, LoginError)
    if cls is RateLimited:
        return RateLimited(text, retry_after)
    return cls(text)


__all__ = [
    "BadProof",
    "CertificateReply",
    "Contact",
    "Login",
    "LoginError",
    "ProtocolError",
    "RateLimited",
    "Register",
    "Registered",
    "RegistrationClosed",
    "Renew",
    "SessionExpired",
    "UnknownUser",
    "UsernameTaken",
    "WeakPassword",
    "WrongPassword",
    "error_from_reply",
    "proof_message",
]
