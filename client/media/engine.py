"""The media session of a call: audio in, sealed RTP out; sealed RTP in, audio out.

One ``MediaSession`` per call.  The call engine gives it a way to send a datagram, the two media
keys, an audio source and sink, and feeds it every media datagram that arrives.  On each 20 ms
tick of a drift-free ``FrameClock`` it:

- reads one frame from the source (silence once a file source has ended: packets keep flowing
  until hang-up, so NAT bindings stay open and the peer's jitter buffer keeps its timing),
  encodes it, wraps it in RTP (``rtp``), seals it (``mediacrypto``) and sends it;
- takes one frame from the jitter buffer (``jitterbuffer``) and plays it: a frame that is here is
  decoded; a lost one is rebuilt from the next packet's in-band FEC when that packet is already
  here, else concealed (PLC); while the buffer waits it conceals, and after ``MAX_CONCEALED``
  frames in a row it plays silence;
- about once a second sends a sealed RTCP sender report whose report block tells the peer its
  loss, jitter and the LSR/DLSR echo for its RTT (``stats``).  The loss the peer reports about
  our stream sets the encoder's expected loss, so FEC grows with it.

Nothing here blocks: a tick's work (encode, seal, open, decode) is a few hundred microseconds of
CPU, most of it the Opus encoder (``tools/bench/media_engine.py``).  Bad datagrams (not media,
forged, replayed, malformed, undecodable) are counted and dropped; they never raise out of
``datagram_received``.
"""

from __future__ import annotations

import math
import random
from collections import Counter, deque
from collections.abc import Callable
from typing import Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from client.media.audio import AudioSink, AudioSource
from client.media.frameclock import FrameClock
from client.media.jitterbuffer import JitterBuffer, Missing, Play
from client.media.mediacrypto import (
    MediaKeys,
    MediaOpener,
    MediaSealer,
    OpenedReport,
    OpenedRtp,
)
from client.media.rtp import (
    FRAME_TICKS,
    OPUS_PAYLOAD_TYPE,
    ReportBlock,
    RtcpReport,
    SenderInfo,
    is_rtp_or_rtcp,
    ntp_middle,
    ntp_timestamp,
)
from client.media.stats import (
    BitrateMeter,
    MediaStats,
    ReceiveStatistics,
    RoundTrip,
    compact_delay,
)
from overlay.errors import ProtocolError

FRAME_SECONDS = 0.020
#: Frames sent and played at most per tick when the reactor fell behind (200 ms).
MAX_CATCH_UP = 10
#: Concealed frames in a row before playing plain silence.
MAX_CONCEALED = 10
REPORT_INTERVAL = 1.0
#: Expected loss (percent) the encoder is told at least / at most.  0 on a clean link: FEC bits
#: would come out of the speech (PESQ-WB 4.17 -> 3.56 at 24 kbit/s); it arms once loss is seen.
MIN_EXPECTED_LOSS = 0
MAX_EXPECTED_LOSS = 50
#: How many of the peer's latest loss reports the expected loss follows (the worst of them).
LOSS_MEMORY = 5
_U32 = 0xFFFFFFFF


class Encoder(Protocol):
    sample_rate: int
    frame_samples: int

    def encode(self, pcm: bytes) -> bytes: ...

    def set_expected_loss(self, percent: int) -> None: ...


class Decoder(Protocol):
    sample_rate: int
    frame_samples: int

    def decode(self, payload: bytes) -> bytes: ...

    def decode_fec(self, next_payload: bytes) -> bytes: ...

    def conceal(self) -> bytes: ...


class MediaSession:
    log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        send: Callable[[bytes], None],
        keys: MediaKeys,
        source: AudioSource,
        sink: AudioSink,
        *,
        encoder: Encoder | None = None,
        decoder: Decoder | None = None,
        ssrc: int | None = None,
        payload_type: int = OPUS_PAYLOAD_TYPE,
        jitter_buffer: JitterBuffer | None = None,
        report_interval: float = REPORT_INTERVAL,
        codec_name: str | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if encoder is None or decoder is None:
            from client.media.codec import OpusDecoder, OpusEncoder

            encoder = encoder or OpusEncoder(source.sample_rate)
            decoder = decoder or OpusDecoder(sink.sample_rate)
        if encoder.sample_rate != source.sample_rate:
            raise ValueError(
                f"the audio source runs at {source.sample_rate} Hz, the encoder at "
                f"{encoder.sample_rate} Hz"
            )
        if decoder.sample_rate != sink.sample_rate:
            raise ValueError(
                f"the audio sink runs at {sink.sample_rate} Hz, the decoder at "
                f"{decoder.sample_rate} Hz"
            )
        rng = rng or random.SystemRandom()
        self.reactor = reactor
        self._send = send
        self.source = source
        self.sink = sink
        self.encoder = encoder
        self.decoder = decoder
        self.payload_type = payload_type
        self.ssrc = ssrc if ssrc is not None else rng.getrandbits(32)
        self.remote_ssrc: int | None = None
        self.codec = codec_name or f"opus {encoder.sample_rate // 1000} kHz"
        self.report_interval = report_interval
        self.jitter_buffer = jitter_buffer or JitterBuffer()
        self._sealer = MediaSealer(keys.send, self.ssrc, first_sequence=rng.randrange(0x8000))
        self._opener = MediaOpener(keys.receive)
        self._timestamp = rng.getrandbits(32)
        self._in_silence = bytes(2 * encoder.frame_samples)
        self._out_silence = bytes(2 * decoder.frame_samples)
        self._clock = FrameClock(reactor, FRAME_SECONDS, self._tick)
        self._receive = ReceiveStatistics()
        self._rtt = RoundTrip()
        self._sent_rate = BitrateMeter()
        self._received_rate = BitrateMeter()
        self._remote_losses: deque[int] = deque(maxlen=LOSS_MEMORY)
        self._expected_loss: int | None = None
        self._last_sr: tuple[int, float] | None = None
        self._first_packet = True
        self._source_ended = False
        self._concealed_run = 0
        self._started_at: float | None = None
        self._stopped_at: float | None = None
        self._next_report = 0.0
        self._final: MediaStats | None = None
        #: When the last authenticated datagram from the peer arrived (None: not yet).
        self.last_received: float | None = None
        self.packets_sent = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self._payload_octets = 0
        #: sent, send-errors, not-media, foreign-ssrc, wrong-payload-type, decode-errors,
        #: fec-recovered, concealed, silence, reports-sent, reports-received, skipped-ticks
        self.counters: Counter[str] = Counter()

    # -- life cycle ----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._clock.running

    def start(self) -> None:
        """Start sending and playing (the first frame goes out at once)."""
        if self._started_at is not None:
            return
        self._started_at = self.reactor.seconds()
        self._next_report = self._started_at + self.report_interval / 2
        self._clock.start()

    def stop(self) -> MediaStats:
        """Stop, close the source and the sink, and return the call's final statistics."""
        if self._final is not None:
            return self._final
        self._clock.stop()
        self._stopped_at = self.reactor.seconds()
        self._final = self.stats()
        try:
            self.source.close()
        finally:
            self.sink.close()
        return self._final

    # -- the 20 ms tick ------------------------------------------------------------------------

    def _tick(self, count: int) -> None:
        frames = min(count, MAX_CATCH_UP)
        if count > frames:
            self.counters["skipped-ticks"] += count - frames
            self._timestamp = (self._timestamp + (count - frames) * FRAME_TICKS) & _U32
        for _ in range(frames):
            self._send_frame()
            self._play_frame()
        now = self.reactor.seconds()
        if now >= self._next_report:
            self._next_report = now + self.report_interval
            self._send_report(now)

    def _transmit(self, datagram: bytes) -> None:
        try:
            self._send(datagram)
        except OSError as error:
            self.counters["send-errors"] += 1
            self.log.debug("media send failed: {error}", error=error)
            return
        self.bytes_sent += len(datagram)
        self._sent_rate.add(self.reactor.seconds(), len(datagram))

    def _send_frame(self) -> None:
        pcm = None if self._source_ended else self.source.read_frame()
        if pcm is None:
            if not self._source_ended:
                self._source_ended = True
                self.log.info("audio source ended; sending silence until hang-up")
            pcm = self._in_silence
        elif len(pcm) != len(self._in_silence):
            pcm = pcm[: len(self._in_silence)].ljust(len(self._in_silence), b"\0")
        payload = self.encoder.encode(pcm)
        datagram = self._sealer.seal_rtp(
            self.payload_type, self._timestamp, payload, marker=self._first_packet
        )
        self._first_packet = False
        self._timestamp = (self._timestamp + FRAME_TICKS) & _U32
        self.packets_sent += 1
        self._payload_octets += len(payload)
        self.counters["sent"] += 1
        self._transmit(datagram)

    def _play_frame(self) -> None:
        item = self.jitter_buffer.pop()
        pcm: bytes | None = None
        if isinstance(item, Play):
            pcm = self._decode(self.decoder.decode, item.payload)
        elif isinstance(item, Missing) and item.next_payload is not None:
            pcm = self._decode(self.decoder.decode_fec, item.next_payload)
            if pcm is not None:
                self.counters["fec-recovered"] += 1
        elif isinstance(item, Missing) or item.reason == "underrun":
            pcm = None
        else:  # still buffering: nothing has been played yet
            self.sink.write_frame(self._out_silence)
            return
        if pcm is not None:
            self._concealed_run = 0
        elif self._concealed_run < MAX_CONCEALED:
            self._concealed_run += 1
            self.counters["concealed"] += 1
            pcm = self.decoder.conceal()
        else:
            self.counters["silence"] += 1
            pcm = self._out_silence
        self.sink.write_frame(pcm)

    def _decode(self, decode: Callable[[bytes], bytes], payload: bytes) -> bytes | None:
        try:
            return decode(payload)
        except ProtocolError as error:
            self.counters["decode-errors"] += 1
            self.log.debug("undecodable media payload: {error}", error=error)
            return None

    # -- reports -------------------------------------------------------------------------------

    def _send_report(self, now: float) -> None:
        info = SenderInfo(
            ntp_timestamp(now),
            self._timestamp,
            self.packets_sent & _U32,
            self._payload_octets & _U32,
        )
        blocks: tuple[ReportBlock, ...] = ()
        if self.remote_ssrc is not None and self._receive.received:
            lsr, dlsr = 0, 0
            if self._last_sr is not None:
                lsr, dlsr = self._last_sr[0], compact_delay(now - self._last_sr[1])
            blocks = (self._receive.report_block(self.remote_ssrc, lsr, dlsr),)
        self.counters["reports-sent"] += 1
        self._transmit(self._sealer.seal_report(RtcpReport(self.ssrc, info, blocks)))

    def _on_report(self, report: RtcpReport, now: float) -> None:
        if self.remote_ssrc is not None and report.ssrc != self.remote_ssrc:
            self.counters["foreign-ssrc"] += 1
            return
        self.counters["reports-received"] += 1
        if report.sender_info is not None:
            self._last_sr = (ntp_middle(report.sender_info.ntp_timestamp), now)
        for block in report.blocks:
            if block.ssrc == self.ssrc:
                self._rtt.on_report_block(block, now)
                self._remote_losses.append(block.fraction_lost)
                self._adapt_fec()

    def _adapt_fec(self) -> None:
        percent = math.ceil(100 * max(self._remote_losses) / 256)
        expected = max(MIN_EXPECTED_LOSS, min(MAX_EXPECTED_LOSS, percent))
        if expected != self._expected_loss:
            self._expected_loss = expected
            self.encoder.set_expected_loss(expected)

    # -- receiving -----------------------------------------------------------------------------

    def datagram_received(self, data: bytes) -> None:
        """A datagram from the peer's media path (RTP or RTCP; anything else is counted)."""
        if self._final is not None:
            return
        if not is_rtp_or_rtcp(data):
            self.counters["not-media"] += 1
            return
        opened = self._opener.open(data)
        if opened is None:
            return
        now = self.reactor.seconds()
        self.last_received = now
        self.bytes_received += len(data)
        self._received_rate.add(now, len(data))
        if isinstance(opened, OpenedReport):
            self._on_report(opened.report, now)
            return
        self._on_rtp(opened, now, len(data))

    def _on_rtp(self, opened: OpenedRtp, now: float, size: int) -> None:
        header = opened.packet.header
        if self.remote_ssrc is None:
            self.remote_ssrc = header.ssrc
        elif header.ssrc != self.remote_ssrc:
            self.counters["foreign-ssrc"] += 1
            return
        if header.payload_type != self.payload_type:
            self.counters["wrong-payload-type"] += 1
            return
        self._receive.on_packet(opened.index, header.timestamp, now, size)
        self.jitter_buffer.push(opened.index, header.timestamp, opened.packet.payload, now)

    # -- statistics ----------------------------------------------------------------------------

    @property
    def expected_loss(self) -> int | None:
        """The expected loss (percent) last given to the encoder from the peer's reports."""
        return self._expected_loss

    def stats(self) -> MediaStats:
        """A snapshot of the call's media so far (the final one once stopped)."""
        if self._final is not None:
            return self._final
        now = self.reactor.seconds()
        end = self._stopped_at if self._stopped_at is not None else now
        start = self._started_at if self._started_at is not None else end
        receive, buffer, opener = self._receive, self.jitter_buffer, self._opener.counters
        remote_loss = self._remote_losses[-1] * 100 / 256 if self._remote_losses else None
        rtt = self._rtt.smoothed
        return MediaStats(
            duration_s=end - start,
            codec=self.codec,
            packets_sent=self.packets_sent,
            packets_received=receive.received,
            bytes_sent=self.bytes_sent,
            bytes_received=self.bytes_received,
            packets_lost=max(0, receive.lost),
            loss_percent=receive.loss_percent,
            remote_loss_percent=remote_loss,
            jitter_ms=receive.jitter_ms,
            rtt_ms=rtt * 1000 if rtt is not None else None,
            send_kbps=self._sent_rate.rate(now) / 1000,
            receive_kbps=self._received_rate.rate(now) / 1000,
            jitter_buffer_ms=buffer.depth_ms,
            jitter_buffer_target_ms=buffer.target_ms,
            late=buffer.counters["late"] + opener["too-old"],
            duplicates=opener["duplicate"] + buffer.counters["duplicate"],
            forged=opener["forged"],
            malformed=opener["malformed"] + self.counters["not-media"],
            fec_recovered=self.counters["fec-recovered"],
            concealed=self.counters["concealed"],
        )
