"""Instant messages: end-to-end encrypted, signed, delivered now or held for offline users.

A message travels in a signed envelope (``client.envelope``) of kind "msg", so the recipient
knows who wrote it and to whom; its body is encrypted to the recipient, so supernodes carry it
without reading it::

    body       = CBOR [1, box]
    box        = NaCl Box(sender's X25519 private key, recipient's X25519 public key), with its
                 24-byte nonce in front; both X25519 keys are converted from the users' Ed25519
                 identity keys (the recipient's from the certificate in their presence record)
    plaintext  = CBOR [id (16 random bytes), seq (per sender and recipient, from 1), text]

Text is at most 500 UTF-8 bytes, so the envelope stays within ``MAX_ENVELOPE``.  The sender's
daemon looks the recipient up (an overlay search: the record names the recipient's key, also
when they are offline, for 72 h), checks the key against the pins (``client.keypins``; a changed
key refuses the message), and ``post``s the envelope (``overlay.mailbox``): its supernode
delivers it at once, or has it held by the supernodes of the recipient's slot.

The recipient opens an envelope up to 73 h old (``open_envelope(max_age=...)``; the sender's
certificate is checked as of when it was sealed), and shows each message once: ids already
seen are remembered (the last 5,000, persisted), since a held message may be pushed twice.  The
inbox is ordered by (sent_at, seq).  A key that differs from the pinned one does not drop the
message: it is marked ``key_changed`` and shown loudly.  The recipient answers with a signed
"receipt" envelope, body ``CBOR [1, [id, ...]]`` (at most 16 ids, sent 0.3 s after the first
message from that sender, so a batch of held messages gets one receipt), posted like a message
(held when the sender is offline); the sender's outbox marks those ids "delivered".

State: ``STATE/messages-USER.json`` (mode 0600, written atomically after each change): the inbox
and the outbox (the last 1,000 each), the seen ids and the next sequence number per peer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import cbor2
import nacl.exceptions
import nacl.public
import nacl.signing
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from client.account import NotLoggedIn
from client.envelope import Envelope, EnvelopeError, ReplayGuard, open_envelope, seal
from overlay.certificate import SignedCertificate
from overlay.errors import ProtocolError, VoipError
from overlay.identity import IdentityKey, write_private_file
from overlay.mailbox import HOLD_FOR
from overlay.usernames import canonical_username

MESSAGE_KIND = "msg"
RECEIPT_KIND = "receipt"
BODY_VERSION = 1
MAX_TEXT = 500
ID_SIZE = 16
MAX_RECEIPT_IDS = 16
#: Envelopes of held messages are opened this late (the hold, plus clocks an hour apart).
MAX_MESSAGE_AGE = HOLD_FOR + 3600
RECEIPT_DELAY = 0.3
INBOX_LIMIT = 1000
OUTBOX_LIMIT = 1000
SEEN_LIMIT = 5000

log = Logger()
Credentials = Callable[[], Any]  # -> (IdentityKey, SignedCertificate) | None


class MessageBodyError(ProtocolError):
    """A message's body is not valid."""

    code = "bad-message-body"


class MessageRefused(VoipError):
    """The message cannot be sent."""

    code = "message-refused"


class NoSuchUser(VoipError):
    """No such user, or they have not been online in the last 72 h."""

    code = "no-such-user"


# -- the body --------------------------------------------------------------------------------


def _decode(data: bytes, what: str) -> Any:
    try:
        return cbor2.loads(data)
    except Exception:  # noqa: BLE001 - cbor2 raises many types on garbage
        raise MessageBodyError(f"The {what} is not valid CBOR.") from None


def plaintext(message_id: bytes, seq: int, text: str) -> bytes:
    return bytes(cbor2.dumps([message_id, seq, text], canonical=True))


def parse_plaintext(data: bytes) -> tuple[bytes, int, str]:
    """``(id, seq, text)``; raises only ``MessageBodyError``."""
    document = _decode(data, "message")
    if not isinstance(document, list) or len(document) != 3:
        raise MessageBodyError("The message is not a 3-element array.")
    message_id, seq, text = document
    if not isinstance(message_id, bytes) or len(message_id) != ID_SIZE:
        raise MessageBodyError("The message id is not 16 bytes.")
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 < seq < 2**63:
        raise MessageBodyError("The message sequence number is not valid.")
    if not isinstance(text, str) or not 0 < len(text.encode()) <= MAX_TEXT:
        raise MessageBodyError(f"The message text is not 1-{MAX_TEXT} bytes of text.")
    return message_id, seq, text


def _box(identity: IdentityKey, their_key: bytes) -> nacl.public.Box:
    ours = nacl.signing.SigningKey(identity.seed).to_curve25519_private_key()
    try:
        theirs = nacl.signing.VerifyKey(their_key).to_curve25519_public_key()
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise MessageBodyError("The peer's key cannot be used for encryption.") from None
    return nacl.public.Box(ours, theirs)


def encrypt(identity: IdentityKey, their_key: bytes, message: bytes) -> bytes:
    """The body of a "msg" envelope: ``message`` encrypted to the holder of ``their_key``."""
    sealed = bytes(_box(identity, their_key).encrypt(message))
    return bytes(cbor2.dumps([BODY_VERSION, sealed], canonical=True))


def decrypt(identity: IdentityKey, their_key: bytes, body: bytes) -> bytes:
    """The plaintext of a "msg" body from the holder of ``their_key``; ``MessageBodyError``."""
    document = _decode(body, "message body")
    if not isinstance(document, list) or len(document) != 2:
        raise MessageBodyError("The message body is not a 2-element array.")
    version, sealed = document
    if version != BODY_VERSION or isinstance(version, bool):
        raise MessageBodyError("The message body has an unknown version.")
    if not isinstance(sealed, bytes):
        raise MessageBodyError("The message body holds no ciphertext.")
    try:
        return bytes(_box(identity, their_key).decrypt(sealed))
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise MessageBodyError("The message does not decrypt: not for us, or altered.") from None


def receipt_body(ids: list[bytes]) -> bytes:
    return bytes(cbor2.dumps([BODY_VERSION, ids], canonical=True))


def parse_receipt(body: bytes) -> tuple[bytes, ...]:
    """The message ids a receipt names; raises only ``MessageBodyError``."""
    document = _decode(body, "receipt")
    if not isinstance(document, list) or len(document) != 2 or document[0] != BODY_VERSION:
        raise MessageBodyError("The receipt is not [1, ids].")
    ids = document[1]
    if not isinstance(ids, list) or not 0 < len(ids) <= MAX_RECEIPT_IDS:
        raise MessageBodyError(f"A receipt names 1-{MAX_RECEIPT_IDS} ids.")
    if not all(isinstance(i, bytes) and len(i) == ID_SIZE for i in ids):
        raise MessageBodyError("A receipt id is not 16 bytes.")
    return tuple(ids)


# -- the store -------------------------------------------------------------------------------


class MessageStore:
    """One user's inbox, outbox, seen ids and sequence numbers, in one 0600 file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.inbox: list[dict[str, Any]] = []
        self.outbox: list[dict[str, Any]] = []
        self.seen: list[str] = []
        self.next_seq: dict[str, int] = {}
        try:
            document = json.loads(path.read_text())
        except FileNotFoundError:
            document = {}
        except (OSError, ValueError) as exc:
            raise VoipError(f"Cannot read the messages {path}: {exc}.") from None
        if isinstance(document, dict):  # a damaged file: keep what makes sense
            self.inbox = [m for m in document.get("inbox", []) if isinstance(m, dict)]
            self.outbox = [m for m in document.get("outbox", []) if isinstance(m, dict)]
            self.seen = [s for s in document.get("seen", []) if isinstance(s, str)]
            seqs = document.get("next_seq", {})
            if isinstance(seqs, dict):
                self.next_seq = {str(k): v for k, v in seqs.items() if isinstance(v, int) and v > 0}
        self._seen = set(self.seen)

    def save(self) -> None:
        document = {
            "inbox": self.inbox[-INBOX_LIMIT:],
            "outbox": self.outbox[-OUTBOX_LIMIT:],
            "seen": self.seen[-SEEN_LIMIT:],
            "next_seq": self.next_seq,
        }
        write_private_file(self.path, json.dumps(document, indent=1).encode())

    def take_seq(self, peer: str) -> int:
        seq = self.next_seq.get(peer, 1)
        self.next_seq[peer] = seq + 1
        return seq

    def has_seen(self, message_id: bytes) -> bool:
        return message_id.hex() in self._seen

    def add(self, entry: dict[str, Any]) -> None:
        """A new message in; the inbox stays ordered by (sent_at, seq), newest last."""
        self.seen.append(entry["id"])
        self._seen.add(entry["id"])
        if len(self.seen) > SEEN_LIMIT:
            self._seen.discard(self.seen.pop(0))
        key = (entry["sent_at"], entry["seq"])
        at = len(self.inbox)
        while at > 0 and (self.inbox[at - 1]["sent_at"], self.inbox[at - 1]["seq"]) > key:
            at -= 1
        self.inbox.insert(at, entry)
        del self.inbox[:-INBOX_LIMIT]

    def mark(self, peer: str, ids: tuple[bytes, ...], state: str, at: float) -> int:
        wanted = {i.hex() for i in ids}
        marked = 0
        for entry in self.outbox:
            if entry["to"] == peer and entry["id"] in wanted and entry["state"] != state:
                entry["state"] = state
                entry["delivered_at"] = at
                marked += 1
        return marked


# -- the daemon's part ------------------------------------------------------------------------


class Messenger:
    def __init__(  # noqa: PLR0917 - the daemon's parts it uses
        self,
        reactor: Any,
        ca_public_key: bytes,
        credentials: Credentials,
        state: Path,
        search: Callable[[str], Awaitable[Any]],
        post: Callable[[str, bytes], Awaitable[int]],
    ) -> None:
        self.reactor = reactor
        self.ca_public_key = ca_public_key
        self.credentials = credentials
        self.state = state
        self.search = search
        self.post = post
        self.guard = ReplayGuard()
        #: ``(username, public_key)``: raises (``KeyChanged``) when the key is not the one
        #: pinned; a received message is then kept but marked ``key_changed``, a message to
        #: that user is refused.  The daemon sets it to ``KeyPins.check``.
        self.key_check: Callable[[str, bytes], None] | None = None
        self.rejected = 0
        self.duplicates = 0
        self._stores: dict[str, MessageStore] = {}
        self._receipts: dict[str, list[bytes]] = {}

    def _me(self) -> tuple[IdentityKey, SignedCertificate]:
        credentials = self.credentials()
        if credentials is None:
            raise NotLoggedIn()
        identity, certificate = credentials
        return identity, certificate

    def store(self, username: str) -> MessageStore:
        if username not in self._stores:
            self._stores[username] = MessageStore(self.state / f"messages-{username}.json")
        return self._stores[username]

    # -- sending ---------------------------------------------------------------------------------

    async def send(self, peer: str, text: str, progress: Callable[[str], None]) -> dict[str, Any]:
        identity, certificate = self._me()
        peer = canonical_username(peer)
        size = len(text.encode())
        if not 0 < size <= MAX_TEXT:
            raise MessageRefused(
                "The message is empty."
                if size == 0
                else f"The message is too long: {size} bytes; at most {MAX_TEXT} (UTF-8)."
            )
        if peer == certificate.username:
            raise MessageRefused("You cannot message yourself.")
        progress(f"Looking up {peer}...")
        result = await self.search(peer)
        record = result.record
        if result.outcome == "failed" or record is None:
            if result.outcome == "failed":
                raise VoipError(f"Could not find {peer}: no supernode answered the search.")
            raise NoSuchUser(f"No such user, or {peer} has not been online in the last 72 h.")
        key = SignedCertificate.parse(record.certificate).public_key
        if self.key_check is not None:
            self.key_check(peer, key)
        store = self.store(certificate.username)
        message_id = os.urandom(ID_SIZE)
        seq = store.take_seq(peer)
        now = self.reactor.seconds()
        body = encrypt(identity, key, plaintext(message_id, seq, text))
        envelope = seal(identity, certificate, peer, MESSAGE_KIND, body, now)
        progress(f"Sending to {peer}...")
        try:
            replicas = await self.post(peer, envelope)
        finally:
            store.save()  # the sequence number is spent either way
        state = "queued" if replicas else "delivered"
        entry = {"id": message_id.hex(), "to": peer, "seq": seq, "sent_at": now, "text": text}
        entry.update(state=state, delivered_at=None if replicas else now)
        store.outbox.append(entry)
        del store.outbox[:-OUTBOX_LIMIT]
        store.save()
        return {"to": peer, "id": message_id.hex(), "outcome": state, "replicas": replicas}

    # -- receiving -------------------------------------------------------------------------------

    def received(self, data: bytes) -> None:
        """An envelope from the overlay: keep a message (once), note a receipt."""
        credentials = self.credentials()
        if credentials is None:
            return
        identity, certificate = credentials
        try:
            kind = Envelope.parse(data).kind
        except EnvelopeError:
            return  # the call manager counts what nobody can read
        if kind not in (MESSAGE_KIND, RECEIPT_KIND):
            return
        me = certificate.username
        now = self.reactor.seconds()
        try:
            opened = open_envelope(
                data, self.ca_public_key, me, now, self.guard, max_age=MAX_MESSAGE_AGE
            )
            if kind == RECEIPT_KIND:
                ids = parse_receipt(opened.body)
            else:
                message_id, seq, text = parse_plaintext(
                    decrypt(identity, opened.sender_key, opened.body)
                )
        except EnvelopeError as exc:
            if exc.code == "replayed":
                self.duplicates += 1
                return
            self.rejected += 1
            log.info("refused a message: {error}", error=exc)
            return
        except MessageBodyError as exc:
            self.rejected += 1
            log.info("refused a message from {s}: {error}", s=opened.sender, error=exc)
            return
        store = self.store(me)
        if kind == RECEIPT_KIND:
            if store.mark(opened.sender, ids, "delivered", now):
                store.save()
            return
        if store.has_seen(message_id):
            self.duplicates += 1
        else:
            changed = False
            if self.key_check is not None:
                try:
                    self.key_check(opened.sender, opened.sender_key)
                except VoipError as exc:
                    changed = True
                    log.warn("a message from {s}: {error}", s=opened.sender, error=exc)
            store.add(
                {
                    "id": message_id.hex(),
                    "from": opened.sender,
                    "seq": seq,
                    "sent_at": opened.sent_at,
                    "received_at": now,
                    "text": text,
                    "key_changed": changed,
                }
            )
            store.save()  # before the supernode hears "ack": then it may forget it
        self._receipt(opened.sender, message_id)

    def _receipt(self, sender: str, message_id: bytes) -> None:
        """Say "delivered" to ``sender``, batched over ``RECEIPT_DELAY``."""
        pending = self._receipts.setdefault(sender, [])
        if message_id not in pending:
            pending.append(message_id)
        if len(pending) == 1:
            self.reactor.callLater(RECEIPT_DELAY, self._send_receipts, sender)

    def _send_receipts(self, sender: str) -> None:
        ids = self._receipts.pop(sender, [])
        credentials = self.credentials()
        if credentials is None or not ids:
            return
        identity, certificate = credentials
        for at in range(0, len(ids), MAX_RECEIPT_IDS):
            body = receipt_body(ids[at : at + MAX_RECEIPT_IDS])
            envelope = seal(
                identity, certificate, sender, RECEIPT_KIND, body, self.reactor.seconds()
            )
            Deferred.fromCoroutine(_await(self.post(sender, envelope))).addErrback(
                lambda f: log.info("a receipt was not sent: {e}", e=f.getErrorMessage())
            )

    # -- listing ---------------------------------------------------------------------------------

    def listing(self, *, sent: bool = False) -> list[dict[str, Any]]:
        _, certificate = self._me()
        store = self.store(certificate.username)
        return [dict(entry) for entry in (store.outbox if sent else store.inbox)]

    def clear(self) -> int:
        _, certificate = self._me()
        store = self.store(certificate.username)
        cleared = len(store.inbox)
        store.inbox = []
        store.save()
        return cleared

    # -- control commands (voipctl msg, voipctl inbox) ----------------------------------------

    async def cmd_msg(
        self, args: dict[str, Any], progress: Callable[[str], None]
    ) -> dict[str, Any]:
        peer, text = args.get("username"), args.get("text")
        if not isinstance(peer, str) or not isinstance(text, str):
            raise MessageRefused("Say whom and what: voipctl msg NAME TEXT")
        return await self.send(peer, text, progress)

    async def cmd_inbox(
        self, args: dict[str, Any], progress: Callable[[str], None]
    ) -> dict[str, Any]:
        sent = bool(args.get("sent"))
        listing = self.listing(sent=sent)
        document: dict[str, Any] = {"sent" if sent else "messages": listing}
        if args.get("clear") and not sent:
            document["cleared"] = self.clear()
        return document


async def _await(work: Awaitable[Any]) -> None:
    await work
