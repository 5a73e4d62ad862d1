"""The exception hierarchy shared by every component.

The docstring of each class is the user-facing text for that failure; the message given when
raising fills in the specifics ("Wrong password for alice.").  ``voipctl`` maps these to one
line on standard error and a non-zero exit in one place (``client.errors_cli``); only an
exception outside this hierarchy prints a traceback.
"""

from __future__ import annotations


class VoipError(Exception):
    """Something went wrong."""

    #: A stable machine-readable code, carried in error replies and ``--json`` output.
    code = "error"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message if message is not None else (self.__doc__ or "").strip())

    @property
    def message(self) -> str:
        return str(self)


class ProtocolError(VoipError, ValueError):
    """A peer sent something that does not follow the protocol."""

    code = "protocol-error"


class CertificateError(ProtocolError):
    """The certificate is not valid."""

    code = "bad-certificate"


class KeyFileError(VoipError):
    """A key file could not be read or written."""

    code = "key-file"


class WrongPassphrase(KeyFileError):
    """The password does not unlock this key."""

    code = "wrong-passphrase"


class TrustAnchorError(VoipError):
    """The CA public key file (trust anchor) could not be read."""

    code = "bad-trust-anchor"
