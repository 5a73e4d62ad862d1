"""One framing for every control message, on TCP streams and in UDP datagrams.

    +---------+-----------+-------------+----------------------+
    | version | type      | length      | payload              |
    | 1 byte  | 2 bytes   | 4 bytes     | `length` bytes       |
    +---------+-----------+-------------+----------------------+   (network byte order)

On TCP the frames follow each other; ``FrameDecoder`` cuts a stream into frames.  In UDP one
datagram holds exactly one frame, and ``Frame.parse`` insists the length matches.  The payload
is a CBOR map (``overlay.messages``).  A frame larger than the limit of its channel is refused
before any of its payload is buffered.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from overlay.errors import ProtocolError

WIRE_VERSION = 1
HEADER = struct.Struct("!BHI")
HEADER_SIZE = HEADER.size
#: Largest payload on a TCP control connection.
MAX_PAYLOAD = 64 * 1024
#: Largest payload in one UDP datagram (fits a 1280-byte IPv6 MTU with headers to spare).
MAX_DATAGRAM_PAYLOAD = 1200


class FramingError(ProtocolError):
    """A frame is malformed."""

    code = "bad-frame"


@dataclass(frozen=True)
class Frame:
    type: int
    payload: bytes
    version: int = WIRE_VERSION

    def __bytes__(self) -> bytes:
        return HEADER.pack(self.version, self.type, len(self.payload)) + self.payload

    @classmethod
    def parse(cls, data: bytes, max_payload: int = MAX_DATAGRAM_PAYLOAD) -> Frame:
        """One whole frame (a datagram)."""
        if len(data) < HEADER_SIZE:
            raise FramingError("Frame shorter than its 7-byte header.")
        version, type_, length = HEADER.unpack_from(data)
        _check_header(version, length, max_payload)
        if length != len(data) - HEADER_SIZE:
            raise FramingError("Frame length does not match the datagram size.")
        return cls(type_, bytes(data[HEADER_SIZE:]), version)


def _check_header(version: int, length: int, max_payload: int) -> None:
    if version != WIRE_VERSION:
        raise FramingError(f"Unsupported wire version {version}.")
    if length > max_payload:
        raise FramingError(f"Frame of {length} bytes exceeds the limit of {max_payload}.")


class FrameDecoder:
    """Cuts a TCP byte stream into frames; raises ``FramingError`` and then stays broken."""

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self._buffer = bytearray()
        self._max_payload = max_payload
        self._broken = False

    def feed(self, data: bytes) -> Iterator[Frame]:
        if self._broken:
            raise FramingError("Stream already failed framing.")
        self._buffer += data
        while len(self._buffer) >= HEADER_SIZE:
            version, type_, length = HEADER.unpack_from(self._buffer)
            try:
                _check_header(version, length, self._max_payload)
            except FramingError:
                self._broken = True
                self._buffer.clear()
                raise
            end = HEADER_SIZE + length
            if len(self._buffer) < end:
                return
            payload = bytes(self._buffer[HEADER_SIZE:end])
            del self._buffer[:end]
            yield Frame(type_, payload, version)

    @property
    def buffered(self) -> int:
        return len(self._buffer)
