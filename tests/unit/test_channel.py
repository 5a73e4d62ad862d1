"""The encrypted channel: handshake against a pinned key, then sealed frames in order."""

from __future__ import annotations

import contextlib
import struct

import nacl.bindings as sodium
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.channel import (
    HANDSHAKE_CONTEXT,
    MAX_INNER_FRAME,
    ChannelError,
    ClientHandshake,
    Hello,
    HelloReply,
    Sealed,
    ServerNotTrusted,
    Session,
    server_handshake,
)
from overlay.errors import ProtocolError
from overlay.framing import MAX_PAYLOAD, FrameDecoder
from overlay.identity import IdentityKey
from overlay.login_protocol import Register
from overlay.messages import Message, Ping, Pong, decode

SETTINGS = settings(max_examples=200, deadline=None)
SERVER_KEY = IdentityKey.generate()
NOT_OPENED = "A sealed frame failed to decrypt (altered or replayed)."


def over_the_wire(message: Message) -> Message:
    """What the other side decodes: through bytes and a stream decoder."""
    (frame,) = FrameDecoder().feed(bytes(message))
    return decode(frame)


def handshake(pinned: bytes | None = None) -> tuple[Session, Session]:
    client = ClientHandshake(pinned if pinned is not None else SERVER_KEY.public_key)
    hello = over_the_wire(client.hello())
    assert isinstance(hello, Hello)
    reply, server = server_handshake(SERVER_KEY, hello, now=1234.5)
    received = over_the_wire(reply)
    assert isinstance(received, HelloReply)
    assert received.time == 1234.5
    return client.finish(received), server


def transfer(sender: Session, receiver: Session, message: Message) -> Message:
    sealed = over_the_wire(sender.seal(message))
    assert isinstance(sealed, Sealed)
    return receiver.open(sealed)


def test_both_sides_agree_on_keys_and_transcript() -> None:
    client, server = handshake()
    assert client.tx_key == server.rx_key
    assert client.rx_key == server.tx_key
    assert client.tx_key != client.rx_key
    assert client.transcript == server.transcript
    assert len(client.transcript) == 32


def test_every_connection_has_fresh_keys() -> None:
    first, _ = handshake()
    second, _ = handshake()
    assert first.tx_key != second.tx_key
    assert first.rx_key != second.rx_key
    assert first.transcript != second.transcript


def test_seal_and_open_in_both_directions() -> None:
    client, server = handshake()
    assert transfer(client, server, Ping(1)) == Ping(1)
    assert transfer(server, client, Pong(1, 5.0)) == Pong(1, 5.0)
    for rid in range(2, 6):
        assert transfer(client, server, Ping(rid)) == Ping(rid)
    assert transfer(server, client, Pong(2, 6.0)) == Pong(2, 6.0)
    assert (client.tx_counter, server.rx_counter) == (5, 5)
    assert (server.tx_counter, client.rx_counter) == (2, 2)


def test_the_same_message_seals_differently_each_time() -> None:
    client, _ = handshake()
    assert client.seal(Ping(1)).box != client.seal(Ping(1)).box


def test_sealed_frames_hide_the_message() -> None:
    client, _ = handshake()
    secret = Register(1, "alice", "hunter2-hunter2")
    assert b"hunter2" not in bytes(client.seal(secret))


def open_error(session: Session, sealed: Sealed) -> str:
    with pytest.raises(ChannelError) as caught:
        session.open(sealed)
    assert caught.value.code == "channel-error"
    return str(caught.value)


def test_a_replayed_frame_is_refused() -> None:
    client, server = handshake()
    sealed = client.seal(Ping(1))
    assert server.open(sealed) == Ping(1)
    assert open_error(server, sealed) == NOT_OPENED


def test_reordered_frames_are_refused() -> None:
    client, server = handshake()
    client.seal(Ping(1))  # sent first, lost or delayed
    second = client.seal(Ping(2))
    assert open_error(server, second) == NOT_OPENED


@pytest.mark.parametrize("position", [0, 5, -17, -1])
def test_an_altered_frame_is_refused(position: int) -> None:
    client, server = handshake()
    box = bytearray(client.seal(Ping(1)).box)
    box[position] ^= 0x40
    assert open_error(server, Sealed(bytes(box))) == NOT_OPENED


@pytest.mark.parametrize("box", [b"", bytes(15), bytes(16), bytes(100)])
def test_short_or_forged_boxes_are_refused(box: bytes) -> None:
    _, server = handshake()
    assert open_error(server, Sealed(box)) == NOT_OPENED


def test_a_frame_reflected_back_to_its_sender_is_refused() -> None:
    client, _ = handshake()
    assert open_error(client, client.seal(Ping(1))) == NOT_OPENED


def test_a_frame_from_another_connection_is_refused() -> None:
    client, _ = handshake()
    _, other_server = handshake()
    assert open_error(other_server, client.seal(Ping(1))) == NOT_OPENED


def test_a_server_with_another_key_is_not_trusted() -> None:
    impostor = IdentityKey.generate()
    client = ClientHandshake(SERVER_KEY.public_key)
    reply, _ = server_handshake(impostor, client.hello(), now=0.0)
    with pytest.raises(ServerNotTrusted) as caught:
        client.finish(reply)
    assert str(caught.value) == "The server did not prove it holds the CA key you trust."
    assert caught.value.code == "server-not-trusted"


def test_a_man_in_the_middle_cannot_swap_the_server_key() -> None:
    client = ClientHandshake(SERVER_KEY.public_key)
    reply, _ = server_handshake(SERVER_KEY, client.hello(), now=0.0)
    attacker_public, _ = sodium.crypto_kx_keypair()
    with pytest.raises(ServerNotTrusted):
        client.finish(HelloReply(attacker_public, reply.signature, reply.time))


def test_a_reply_for_another_client_is_not_trusted() -> None:
    other = ClientHandshake(SERVER_KEY.public_key)
    reply, _ = server_handshake(SERVER_KEY, other.hello(), now=0.0)
    client = ClientHandshake(SERVER_KEY.public_key)
    with pytest.raises(ServerNotTrusted):
        client.finish(reply)


@pytest.mark.parametrize("signature", [b"", bytes(63), bytes(64), bytes(65)])
def test_a_malformed_signature_is_not_trusted(signature: bytes) -> None:
    client = ClientHandshake(SERVER_KEY.public_key)
    reply, _ = server_handshake(SERVER_KEY, client.hello(), now=0.0)
    with pytest.raises(ServerNotTrusted):
        client.finish(HelloReply(reply.server_eph, signature, 0.0))


@pytest.mark.parametrize("size", [0, 31, 33])
def test_wrong_size_ephemeral_keys(size: int) -> None:
    with pytest.raises(ChannelError) as caught:
        server_handshake(SERVER_KEY, Hello(bytes(size)), now=0.0)
    assert str(caught.value) == "The client's handshake key has the wrong size."

    client = ClientHandshake(SERVER_KEY.public_key)
    reply, _ = server_handshake(SERVER_KEY, client.hello(), now=0.0)
    with pytest.raises(ChannelError) as caught:
        client.finish(HelloReply(bytes(size), reply.signature, 0.0))
    assert str(caught.value) == "The server's handshake key has the wrong size."


def test_an_all_zero_ephemeral_key_is_not_usable() -> None:
    # A low-order point would make the shared secret known to everyone.
    with pytest.raises(ChannelError) as caught:
        server_handshake(SERVER_KEY, Hello(bytes(32)), now=0.0)
    assert str(caught.value) == "The client's handshake key is not usable."

    client = ClientHandshake(SERVER_KEY.public_key)
    signature = SERVER_KEY.sign(HANDSHAKE_CONTEXT + client.hello().client_eph + bytes(32))
    with pytest.raises(ChannelError) as caught:
        client.finish(HelloReply(bytes(32), signature, 0.0))
    assert str(caught.value) == "The server's handshake key is not usable."


def register_of_size(size: int) -> Register:
    """A register message whose frame is exactly ``size`` bytes."""
    base = len(bytes(Register(1, "alice", "")))
    for extra in range(size - base, size - base - 8, -1):
        message = Register(1, "alice", "x" * extra)
        if len(bytes(message)) == size:
            return message
    raise AssertionError(f"no register message of {size} bytes")


def test_the_inner_frame_limit() -> None:
    client, server = handshake()
    largest = register_of_size(MAX_INNER_FRAME)
    sealed = client.seal(largest)
    # The sealed frame still fits a TCP control frame, and opens.
    assert len(bytes(sealed)) <= 7 + MAX_PAYLOAD
    received = over_the_wire(sealed)
    assert isinstance(received, Sealed)
    assert server.open(received) == largest

    too_large = register_of_size(MAX_INNER_FRAME + 1)
    with pytest.raises(ChannelError) as caught:
        client.seal(too_large)
    assert str(caught.value) == "Message register is too large to send."
    # Nothing was sent, so the stream stays in step.
    assert transfer(client, server, Ping(9)) == Ping(9)


def seal_raw(sender: Session, data: bytes) -> Sealed:
    """Encrypt arbitrary bytes as ``sender`` would (a peer that holds the keys)."""
    nonce = b"\x00" * 4 + struct.pack("!Q", sender.tx_counter)
    sender.tx_counter += 1
    return Sealed(
        sodium.crypto_aead_chacha20poly1305_ietf_encrypt(data, None, nonce, sender.tx_key)
    )


def test_an_oversized_inner_frame_from_a_peer_is_refused() -> None:
    client, server = handshake()
    header = struct.pack("!BHI", 1, Ping.TYPE, MAX_INNER_FRAME + 1)
    with pytest.raises(ProtocolError) as caught:
        server.open(seal_raw(client, header + bytes(MAX_INNER_FRAME + 1)))
    assert str(caught.value) == (
        f"Frame of {MAX_INNER_FRAME + 1} bytes exceeds the limit of {MAX_INNER_FRAME}."
    )


@SETTINGS
@given(st.binary(max_size=200))
def test_open_raises_only_protocol_errors_on_random_boxes(box: bytes) -> None:
    _, server = handshake()
    with pytest.raises(ProtocolError):
        server.open(Sealed(box))


@SETTINGS
@given(st.binary(max_size=200))
def test_open_raises_only_protocol_errors_on_garbage_from_a_keyed_peer(data: bytes) -> None:
    client, server = handshake()
    with contextlib.suppress(ProtocolError):
        server.open(seal_raw(client, data))
