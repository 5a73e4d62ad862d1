"""The STUN Binding server of a supernode: answers on the overlay's own UDP port.

``DatagramEndpoint(stun_server=True)`` hands every datagram that ``is_stun`` to a
``StunResponder`` before the overlay's framing parser (no overlay frame can pass ``is_stun``).

    request                                   answer
    Binding request                           Binding success: XOR-MAPPED-ADDRESS of the source,
                                              plus FINGERPRINT when the request carried one
    request, unknown comprehension-required   420 Unknown Attribute + UNKNOWN-ATTRIBUTES
      attributes
    request of another method (TURN ...)      400 Bad Request
    request that does not parse               400 Bad Request (its header still names it)
    indication (keep-alive), response         nothing; counted
    bad FINGERPRINT                           nothing (RFC 8489: not a STUN message); counted

No authentication: MESSAGE-INTEGRITY and USERNAME in a request are ignored, no SOFTWARE is sent.

Amplification: an error response is never larger than its request (the reason phrase is dropped,
then the answer, to fit).  A Binding success is the smallest RFC answer: 32 bytes for IPv4 (44
for IPv6), +8 with FINGERPRINT, to a request of at least 20 (28 with FINGERPRINT) bytes, so at
most 1.6x (IPv4) or 2.2x (IPv6).  Standard clients send a bare 20-byte request (coturn's
``turnutils_stunclient`` does), which a strict 1:1 rule would leave unanswered; ``strict=True``
applies the rule to successes too, and our own client pads its requests (PADDING) so it is
answered either way.  Every outcome is counted in ``counters`` under a ``stun-`` name.
"""

from __future__ import annotations

import struct
from collections import Counter

from overlay.stun import (
    FINGERPRINT,
    HEADER_SIZE,
    UNKNOWN_ATTRIBUTES,
    XOR_MAPPED_ADDRESS,
    Address,
    Attribute,
    Method,
    StunClass,
    StunError,
    StunIntegrityError,
    StunMessage,
    is_stun,
)


class StunResponder:
    def __init__(self, counters: Counter[str] | None = None, *, strict: bool = False) -> None:
        self.counters: Counter[str] = counters if counters is not None else Counter()
        #: Never answer with more bytes than the request had, not even a Binding success.
        self.strict = strict

    def respond(self, datagram: bytes, source: Address) -> bytes | None:
        """The datagram to send back to ``source`` for this STUN datagram, or None."""
        self.counters["stun-received"] += 1
        if not is_stun(datagram):
            self.counters["stun-malformed"] += 1
            return None
        try:
            request = StunMessage.parse(datagram)
        except StunIntegrityError:
            self.counters["stun-bad-fingerprint"] += 1
            return None
        except StunError:
            self.counters["stun-malformed"] += 1
            return self._bad_header(datagram)
        if request.message_class is StunClass.INDICATION:
            self.counters["stun-indications"] += 1
            return None
        if request.message_class is not StunClass.REQUEST:
            self.counters["stun-stray-responses"] += 1
            return None
        self.counters["stun-requests"] += 1
        unknown = request.unknown_required()
        if unknown:
            return self._error(request, 420, len(datagram), UNKNOWN_ATTRIBUTES(unknown))
        if request.method != Method.BINDING:
            return self._error(request, 400, len(datagram))
        reply = request.success(XOR_MAPPED_ADDRESS(source))
        if request.has(FINGERPRINT):
            reply = reply.with_fingerprint()
        data = bytes(reply)
        if self.strict and len(data) > len(datagram):
            self.counters["stun-amplification-refused"] += 1
            return None
        self.counters["stun-answers"] += 1
        return data

    def _bad_header(self, datagram: bytes) -> bytes | None:
        """400 to a request whose header is sound (``is_stun``) but whose attributes are not."""
        (type_,) = struct.unpack_from("!H", datagram)
        if type_ & 0x0110:  # not the request class
            return None
        method = (type_ & 0x000F) | ((type_ & 0x00E0) >> 1) | ((type_ & 0x3E00) >> 2)
        request = StunMessage(method, StunClass.REQUEST, datagram[8:HEADER_SIZE])
        return self._error(request, 400, len(datagram))

    def _error(
        self, request: StunMessage, code: int, limit: int, *attributes: Attribute
    ) -> bytes | None:
        for reason in (None, ""):  # the RFC's phrase, then none at all
            reply = request.error(code, *attributes, reason=reason)
            if request.has(FINGERPRINT):
                reply = reply.with_fingerprint()
            data = bytes(reply)
            if len(data) <= limit:
                self.counters[f"stun-errors-{code}"] += 1
                return data
        self.counters["stun-amplification-refused"] += 1
        return None
