"""An encrypted channel authenticated by a pinned Ed25519 key (the login server's CA key).

Handshake (plain frames), then every frame travels sealed inside a ``sealed`` frame::

    client -> server   hello        {client_eph}                       X25519 public key
    server -> client   hello-reply  {server_eph, signature, time}
                       signature = Ed25519(server key, "voip-hs-v1" || client_eph || server_eph)

The client checks the signature against its pinned key and refuses to go on otherwise (a
server with another key, or a man in the middle).  Both sides then derive one key per
direction with libsodium's ``crypto_kx`` (BLAKE2b over the X25519 secret and both public keys),
so each connection has fresh keys (forward secrecy).  ``transcript`` (a hash of the handshake)
is what a client signs to prove possession of its identity key on *this* channel, so such a
proof cannot be replayed on another connection.

Sealed frames use ChaCha20-Poly1305 (IETF) with a 64-bit counter nonce per direction; the whole
inner frame, header included, is encrypted (no associated data is needed).  A frame out of
order, replayed or altered fails to open and the connection is closed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import nacl.bindings as sodium
import nacl.encoding
import nacl.exceptions
import nacl.hash

from overlay.errors import ProtocolError
from overlay.framing import MAX_PAYLOAD, Frame
from overlay.identity import IdentityKey, verify_signature
from overlay.messages import Message, decode, message

HANDSHAKE_CONTEXT = b"voip-hs-v1"
_NONCE_PREFIX = b"\x00\x00\x00\x00"
_AEAD_OVERHEAD = 16
#: An inner frame may use the whole payload limit less the AEAD tag and the CBOR wrapping.
MAX_INNER_FRAME = MAX_PAYLOAD - _AEAD_OVERHEAD - 16


class ChannelError(ProtocolError):
    """The encrypted channel failed."""

    code = "channel-error"


class ServerNotTrusted(ChannelError):
    """The server did not prove it holds the CA key you trust."""

    code = "server-not-trusted"


@message(0x0010, "hello")
class Hello(Message):
    client_eph: bytes


@message(0x0011, "hello-reply")
class HelloReply(Message):
    server_eph: bytes
    signature: bytes
    time: float
    #: A supernode shows its supernode certificate here; the login server sends none.
    certificate: bytes | None = None


@message(0x0012, "sealed")
class Sealed(Message):
    box: bytes


def _transcript(client_eph: bytes, server_eph: bytes, signature: bytes) -> bytes:
    return nacl.hash.blake2b(
        HANDSHAKE_CONTEXT + client_eph + server_eph + signature,
        digest_size=32,
        encoder=nacl.encoding.RawEncoder,
    )


@dataclass
class Session:
    """Keys of an established channel; seals and opens frames in order."""

    tx_key: bytes
    rx_key: bytes
    transcript: bytes
    tx_counter: int = 0
    rx_counter: int = 0

    def seal(self, inner: Message) -> Sealed:
        data = bytes(inner)
        if len(data) > MAX_INNER_FRAME:
            raise ChannelError(f"Message {inner.NAME} is too large to send.")
        nonce = _NONCE_PREFIX + struct.pack("!Q", self.tx_counter)
        self.tx_counter += 1
        box = sodium.crypto_aead_chacha20poly1305_ietf_encrypt(data, None, nonce, self.tx_key)
        return Sealed(box)

    def open(self, sealed: Sealed) -> Message:
        return decode(self.open_frame(sealed))

    def open_frame(self, sealed: Sealed) -> Frame:
        """The inner frame, not yet decoded (so a bad message can be named by its type)."""
        nonce = _NONCE_PREFIX + struct.pack("!Q", self.rx_counter)
        try:
            data = sodium.crypto_aead_chacha20poly1305_ietf_decrypt(
                sealed.box, None, nonce, self.rx_key
            )
        except (nacl.exceptions.CryptoError, nacl.exceptions.ValueError, ValueError):
            raise ChannelError("A sealed frame failed to decrypt (altered or replayed).") from None
        self.rx_counter += 1
        return Frame.parse(data, MAX_INNER_FRAME)


class ClientHandshake:
    """The client's half: make ``hello``, then check ``hello-reply`` against the pinned key."""

    def __init__(self, pinned_key: bytes) -> None:
        self._pinned_key = pinned_key
        self._public, self._secret = sodium.crypto_kx_keypair()

    def hello(self) -> Hello:
        return Hello(self._public)

    def finish(self, reply: HelloReply) -> Session:
        if len(reply.server_eph) != sodium.crypto_kx_PUBLIC_KEY_BYTES:
            raise ChannelError("The server's handshake key has the wrong size.")
        signed = HANDSHAKE_CONTEXT + self._public + reply.server_eph
        if not verify_signature(self._pinned_key, signed, reply.signature):
            raise ServerNotTrusted()
        try:
            rx, tx = sodium.crypto_kx_client_session_keys(
                self._public, self._secret, reply.server_eph
            )
        except (nacl.exceptions.CryptoError, nacl.exceptions.ValueError):
            raise ChannelError("The server's handshake key is not usable.") from None
        return Session(tx, rx, _transcript(self._public, reply.server_eph, reply.signature))


def server_handshake(
    server_key: IdentityKey, hello: Hello, now: float, certificate: bytes | None = None
) -> tuple[HelloReply, Session]:
    """The server's half: answer ``hello`` and derive the session."""
    if len(hello.client_eph) != sodium.crypto_kx_PUBLIC_KEY_BYTES:
        raise ChannelError("The client's handshake key has the wrong size.")
    public, secret = sodium.crypto_kx_keypair()
    signature = server_key.sign(HANDSHAKE_CONTEXT + hello.client_eph + public)
    try:
        rx, tx = sodium.crypto_kx_server_session_keys(public, secret, hello.client_eph)
    except (nacl.exceptions.CryptoError, nacl.exceptions.ValueError):
        raise ChannelError("The client's handshake key is not usable.") from None
    session = Session(tx, rx, _transcript(hello.client_eph, public, signature))
    return HelloReply(public, signature, now, certificate), session
