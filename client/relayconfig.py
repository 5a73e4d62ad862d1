"""Relays a user configures (``voipd --relay turn:HOST:PORT``), offered to calls beside the
supernodes' own.

Any standard TURN server will do (coturn's ``turnserver`` is tested).  Credentials are either
fixed (``--relay-user`` and ``--relay-password``), or minted here from the server's shared secret
(``--relay-secret-file``), the way coturn's ``use-auth-secret`` expects: a username
``"<expiry>:<user>"`` and its HMAC as the password (``overlay.turn``).

    turn:203.0.113.7            UDP and TCP on 3478
    turn:203.0.113.7:3479       UDP and TCP on 3479
    turn:[2001:db8::7]:3478     an IPv6 relay
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from overlay.errors import VoipError
from overlay.overlay_protocol import RelayOffer
from overlay.turn import mint_credential

DEFAULT_TURN_PORT = 3478
#: A minted credential is valid this long (a call may last hours; the allocation is refreshed
#: with the same credential).
MINTED_TTL = 12 * 3600


class RelayConfigError(VoipError):
    """A configured relay is not usable as given."""


@dataclass(frozen=True)
class StaticRelay:
    host: str
    port: int
    username: str | None = None
    password: str | None = None
    secret: bytes | None = None

    @property
    def label(self) -> str:
        return f"{self.host}:{self.port}"

    def offer(self, user: str, now: float) -> RelayOffer:
        """An offer for a call: the fixed credential, or one minted for ``user`` now."""
        if self.secret is not None:
            credential = mint_credential(self.secret, user, now, MINTED_TTL)
            username, password, expires = (
                credential.username,
                credential.password,
                credential.expires,
            )
        else:
            assert self.username is not None and self.password is not None
            username, password, expires = self.username, self.password, 0
        return RelayOffer(self.host, self.port, self.port, username, password, expires, 1)


def parse_turn_uri(text: str) -> tuple[str, int]:
    """``turn:HOST[:PORT]`` (HOST an IP address; IPv6 in brackets) -> (host, port)."""
    scheme, sep, rest = text.partition(":")
    if scheme.lower() != "turn" or not sep or not rest:
        raise RelayConfigError(f"{text!r} is not a relay address like turn:203.0.113.7:3478.")
    rest = rest.split("?", 1)[0]
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        port_text = tail[1:] if tail.startswith(":") else ""
    elif rest.count(":") == 1:
        host, port_text = rest.split(":")
    else:
        host, port_text = rest, ""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise RelayConfigError(f"The relay host in {text!r} is not an IP address.") from None
    if not port_text:
        return host, DEFAULT_TURN_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise RelayConfigError(f"The relay port in {text!r} is not a port number.")
    return host, int(port_text)


def static_relay(
    uri: str,
    username: str | None = None,
    password: str | None = None,
    secret_file: Path | None = None,
) -> StaticRelay:
    """Check a ``--relay`` and its credential options; raises ``RelayConfigError``."""
    host, port = parse_turn_uri(uri)
    if secret_file is not None:
        if username is not None or password is not None:
            raise RelayConfigError(
                "Give either --relay-secret-file or --relay-user and --relay-password."
            )
        try:
            secret = secret_file.read_bytes().strip()
        except OSError as exc:
            raise RelayConfigError(f"Cannot read {secret_file}: {exc.strerror}.") from None
        if not secret:
            raise RelayConfigError(f"{secret_file} is empty.")
        return StaticRelay(host, port, secret=secret)
    if not username or not password:
        raise RelayConfigError(
            f"The relay {host}:{port} needs --relay-user and --relay-password, "
            "or --relay-secret-file."
        )
    return StaticRelay(host, port, username=username, password=password)
