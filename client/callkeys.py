"""Per-call keys: fresh X25519 key pairs, and the keys both ends derive from them.

Each call side makes a new X25519 key pair, sends the public half inside its signed INVITE or
ACCEPT, and forgets the private half when the call ends: a leaked identity key later does not
open past calls (forward secrecy).  From the shared secret and a transcript binding the call id,
both usernames and both public keys, each side derives

    caller-to-callee media key, callee-to-caller media key, connectivity-check key

with BLAKE2b in keyed mode, one label per key.  Supernodes and relays never see any of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import nacl.bindings
import nacl.exceptions
import nacl.hash
import nacl.public
from nacl.encoding import RawEncoder

from overlay.errors import ProtocolError

KEY_SIZE = 32
PERSON = b"voip-call-v1"


class BadCallKey(ProtocolError):
    """The peer's call key is not usable."""

    code = "bad-call-key"


@dataclass(frozen=True)
class CallKeys:
    """What one side of a call uses: its own send key, the peer's send key, the check key."""

    send: bytes
    receive: bytes
    check: bytes

    def __repr__(self) -> str:  # never print keys into a log
        return "CallKeys(<secret>)"


class EphemeralKey:
    """One call's X25519 key pair."""

    def __init__(self) -> None:
        self._private: nacl.public.PrivateKey | None = nacl.public.PrivateKey.generate()

    @property
    def public(self) -> bytes:
        assert self._private is not None, "the call key was already used"
        return bytes(self._private.public_key)

    def derive(  # noqa: PLR0917 - the transcript's parts, in transcript order
        self,
        peer_public: bytes,
        call_id: bytes,
        caller: str,
        callee: str,
        caller_public: bytes,
        callee_public: bytes,
        i_am_caller: bool,
    ) -> CallKeys:
        """Derive this side's keys and forget the private key (it is used once)."""
        if self._private is None:
            raise BadCallKey("This call key was already used.")
        if len(peer_public) != KEY_SIZE:
            raise BadCallKey("The peer's call key is not 32 bytes.")
        try:
            shared = nacl.bindings.crypto_scalarmult(bytes(self._private), peer_public)
        except nacl.exceptions.RuntimeError:
            raise BadCallKey("The peer's call key is a weak key.") from None
        finally:
            self._private = None
        if shared == bytes(KEY_SIZE):
            raise BadCallKey("The peer's call key is a weak key.")
        transcript = b"".join(
            [
                call_id,
                len(caller).to_bytes(1, "big"),
                caller.encode(),
                len(callee).to_bytes(1, "big"),
                callee.encode(),
                caller_public,
                callee_public,
            ]
        )

        def subkey(label: bytes) -> bytes:
            return nacl.hash.blake2b(
                label + transcript,
                digest_size=KEY_SIZE,
                key=shared,
                person=PERSON,
                encoder=RawEncoder,
            )

        forward, backward = subkey(b"media caller>callee"), subkey(b"media callee>caller")
        check = subkey(b"connectivity checks")
        if i_am_caller:
            return CallKeys(send=forward, receive=backward, check=check)
        return CallKeys(send=backward, receive=forward, check=check)
