"""The real parts a call is built from, for ``voipd`` (tests inject fakes of the same shape).

    STUN client      overlay.stun_client.StunClient        reflexive address from our supernode
    checks           client.connectivity                     candidate pairs, hole punching
    relays           client.turnclient.TurnClient            TURN over the call socket or TCP
    media            client.media.engine.MediaSession        Opus over sealed RTP
    audio            client.media.wavfile / audiodevice      WAV files or the default devices

``netcheck`` is ``voipctl netcheck``: a throw-away UDP socket asks up to three supernodes how
they see us (STUN) and reports UDP, reflexive address, NAT mapping behaviour and RTTs.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import Factory, Protocol

from client.calls import AudioOptions, Environment
from client.callsocket import Address, CallSocket
from overlay.overlay_protocol import RelayOffer


def call_environment(
    reactor: Any,
    interface: str,
    stun_server: Callable[[], Address | None],
    trace: Callable[[bytes, str, str, str], None] | None = None,
    *,
    relay_offers: Callable[[], Awaitable[Sequence[RelayOffer]]] | None = None,
    nat_kind: Callable[[], str | None] | None = None,
    relay_only: bool = False,
) -> Environment:
    def listen_udp(protocol: CallSocket) -> Any:
        return reactor.listenUDP(0, protocol, interface=interface)

    def tcp_probe(address: Address, timeout: float) -> Deferred[float]:
        return _tcp_connect_time(reactor, interface, address, timeout)

    extra: dict[str, Any] = {}
    if relay_offers is not None:
        extra["relay_offers"] = relay_offers
    if nat_kind is not None:
        extra["nat_kind"] = nat_kind

    return Environment(
        reactor=reactor,
        listen_udp=listen_udp,
        stun_server=stun_server,
        stun_client=_stun_client,
        checker=_checker,
        media=_media,
        open_audio=open_audio,
        trace=trace,
        turn_udp=_turn_udp,
        turn_tcp=_turn_tcp,
        tcp_probe=tcp_probe,
        relay_only=relay_only,
        **extra,
    )


def _turn_udp(
    reactor: Any,
    server: Address,
    credential: tuple[str, str],
    send: Callable[[bytes, Address], None],
) -> Any:
    from client.turnclient import TurnClient

    return TurnClient(reactor, server, credential, send=send)


async def _turn_tcp(reactor: Any, server: Address, credential: tuple[str, str]) -> Any:
    from client.turnclient import TurnClient

    return await TurnClient.connect_tcp(reactor, server, credential)


def _tcp_connect_time(
    reactor: Any, interface: str, address: Address, timeout: float
) -> Deferred[float]:
    """Seconds a TCP connect to ``address`` takes (the connection is closed at once)."""
    kind = TCP6ClientEndpoint if ":" in address[0] else TCP4ClientEndpoint
    bind = (interface, 0) if interface else None
    endpoint = kind(reactor, address[0], address[1], timeout=timeout, bindAddress=bind)
    start = time.monotonic()

    def connected(protocol: Any) -> float:
        if protocol.transport is not None:
            protocol.transport.loseConnection()
        return time.monotonic() - start

    return endpoint.connect(Factory.forProtocol(Protocol)).addCallback(connected)


def _stun_client(reactor: Any, send: Callable[[bytes, Address], None]) -> Any:
    from overlay.stun_client import StunClient

    return StunClient(reactor, send)


def _checker(  # noqa: PLR0917 - the checker's own signature
    reactor: Any,
    send: Any,
    key: bytes,
    token: bytes,
    controlling: bool,
    local: Any,
    remote: Any,
    peer: str,
) -> Any:
    from client.connectivity import ConnectivityChecker

    return ConnectivityChecker(reactor, send, key, token, controlling, local, remote, peer=peer)


def _media(reactor: Any, send: Callable[[bytes], None], keys: Any, source: Any, sink: Any) -> Any:
    from client.media.engine import MediaSession
    from client.media.mediacrypto import MediaKeys

    return MediaSession(reactor, send, MediaKeys(keys.send, keys.receive), source, sink)


def open_audio(options: AudioOptions) -> tuple[Any, Any]:
    """The call's audio source and sink: the WAV files asked for, else the default devices."""
    # codec and engine are loaded now, before the call connects: imported only when media
    # started, they stalled a daemon's first call for ~0.1-0.2 s just as the peer's first packets
    # came in, so its jitter buffer started too deep and later dropped a frame (PESQ 4.2 -> 3.6).
    from client.media import audiodevice, codec, engine, wavfile  # noqa: F401

    source = wavfile.WavSource(options.play) if options.play else audiodevice.DeviceSource()
    sink: Any
    try:
        if options.record:
            sink = wavfile.WavSink(options.record, 16000)
        else:
            sink = audiodevice.DeviceSink()
    except BaseException:
        source.close()
        raise
    return source, sink


async def netcheck(reactor: Any, interface: str, servers: list[Address]) -> dict[str, Any]:
    from client.natcheck import discover
    from overlay.stun_client import StunClient

    sock = CallSocket()
    sock.port = reactor.listenUDP(0, sock, interface=interface)
    try:
        client = StunClient(reactor, sock.send)
        sock.handlers.append(client.datagram_received)
        report = await discover(client, (interface or "0.0.0.0", sock.local_port), servers)  # noqa: S104
    finally:
        sock.close()
    return report.to_json() if hasattr(report, "to_json") else dict(vars(report))
