"""The Opus codec of a call: one 20 ms frame of mono int16 PCM in, one Opus packet out.

Settings (DESIGN.md section 6 and RFC 7587):

- application VOIP, signal type voice; sample rates 8, 12, 16, 24 or 48 kHz (16 kHz, wideband, by
  default; 24 kbit/s by default);
- in-band FEC on: each packet can also carry a coarse copy of the previous frame, used when
  that frame was lost (``OpusDecoder.decode_fec``).  libopus only spends bits on it once told to
  expect loss, and those bits come out of the speech: measured with espeak speech at 24 kbit/s,
  PESQ-WB is 4.17 planning for 0% loss, 3.56 for 1%, 3.29 for 5% on a clean link, while at 5%
  real loss FEC lifts 2.55 (concealment only) to 3.27.  So, like WebRTC, the encoder starts at
  0% (``DEFAULT_EXPECTED_LOSS``) and the call engine sets the loss it measures
  (``set_expected_loss``); a higher bit rate under loss buys the quality back (32 kbit/s: 3.68
  at 5% loss);
- DTX off: a packet every 20 ms, also in silence, so NAT bindings stay open and the receiver's
  jitter buffer keeps its timing;
- constrained VBR: the packet size follows the speech a little, within a bounded range;
- complexity ``COMPLEXITY`` (of 0..10): 8 scores as well as 10 (PESQ-WB 4.17 against 4.03 at 6)
  and encoding plus decoding a call's audio takes about 1.5% of one core.

The decoder never lets a libopus error out: a payload libopus rejects, or one holding other
than exactly one 20 ms frame, raises ``OpusPayloadError`` (a ``ProtocolError``) with the reason.
opuslib's high-level ``Encoder`` has broken setters (in-band FEC and DTX ignore their value),
so both classes drive libopus through ``opuslib.api`` directly.
"""

from __future__ import annotations

from typing import Any

import opuslib
import opuslib.api.ctl
import opuslib.api.decoder
import opuslib.api.encoder
import opuslib.api.info
import opuslib.exceptions

from client.media import audio
from client.media.audio import SAMPLE_BYTES, frame_samples
from overlay.errors import ProtocolError, VoipError

#: Duration of one Opus frame (one packet) in a call.
FRAME_MS = audio.FRAME_MS
#: Sample rates libopus encodes and decodes at.
SAMPLE_RATES = (8000, 12000, 16000, 24000, 48000)
#: Encoder complexity, 0 (cheapest) to 10.
COMPLEXITY = 8
#: Expected loss (percent) the encoder plans FEC for until the call engine measures the real one.
DEFAULT_EXPECTED_LOSS = 0
#: Bit rates ``set_bitrate`` accepts (bit/s).
MIN_BITRATE = 6000
MAX_BITRATE = 510000
#: The largest packet one Opus frame can make (RFC 6716, section 3.4).
MAX_PACKET = 1275


class CodecError(VoipError):
    """The Opus codec could not be set up."""

    code = "codec"


class OpusPayloadError(ProtocolError):
    """A peer sent an Opus payload that cannot be decoded."""

    code = "bad-opus-payload"


def _opus_reason(error: opuslib.exceptions.OpusError) -> str:
    code = getattr(error, "code", None)
    if isinstance(code, int):
        text: bytes | None = opuslib.api.info.strerror(code)
        return text.decode("ascii", "replace") if text else f"libopus error {code}"
    return str(code)


def _check_rate(sample_rate: int) -> None:
    if sample_rate not in SAMPLE_RATES:
        rates = ", ".join(str(r) for r in SAMPLE_RATES)
        raise CodecError(f"Opus cannot run at {sample_rate} Hz (it takes {rates})")


class OpusEncoder:
    """Encodes 20 ms frames of mono int16 PCM at ``sample_rate`` into Opus packets."""

    def __init__(self, sample_rate: int = 16000, bitrate: int = 24000, fec: bool = True) -> None:
        _check_rate(sample_rate)
        self.sample_rate = sample_rate
        self.frame_samples = frame_samples(sample_rate)
        self._frame_bytes = self.frame_samples * SAMPLE_BYTES
        self.fec = fec
        try:
            self._state: Any = opuslib.api.encoder.create_state(
                sample_rate, 1, opuslib.APPLICATION_VOIP
            )
            self._ctl(opuslib.api.ctl.set_signal, opuslib.SIGNAL_VOICE)
            self._ctl(opuslib.api.ctl.set_complexity, COMPLEXITY)
            self._ctl(opuslib.api.ctl.set_vbr, 1)
            self._ctl(opuslib.api.ctl.set_vbr_constraint, 1)
            self._ctl(opuslib.api.ctl.set_dtx, 0)
            self._ctl(opuslib.api.ctl.set_inband_fec, 1 if fec else 0)
        except opuslib.exceptions.OpusError as e:
            raise CodecError(f"Opus encoder set-up failed: {_opus_reason(e)}") from e
        self.set_bitrate(bitrate)
        self.set_expected_loss(DEFAULT_EXPECTED_LOSS if fec else 0)

    def _ctl(self, request: Any, value: int) -> None:
        opuslib.api.encoder.encoder_ctl(self._state, request, value)

    def _get(self, request: Any) -> int:
        value: int = opuslib.api.encoder.encoder_ctl(self._state, request)
        return value

    @property
    def bitrate(self) -> int:
        """The target bit rate in bit/s."""
        return self._get(opuslib.api.ctl.get_bitrate)

    @property
    def expected_loss(self) -> int:
        """The packet loss (percent) the encoder plans its FEC for."""
        return self._get(opuslib.api.ctl.get_packet_loss_perc)

    def encode(self, pcm: bytes) -> bytes:
        """One Opus packet for exactly one 20 ms frame of int16 mono PCM."""
        if len(pcm) != self._frame_bytes:
            raise ValueError(
                f"an Opus frame at {self.sample_rate} Hz is {self._frame_bytes} bytes "
                f"({FRAME_MS} ms), not {len(pcm)}"
            )
        try:
            packet: bytes = opuslib.api.encoder.encode(
                self._state, pcm, self.frame_samples, MAX_PACKET
            )
        except opuslib.exceptions.OpusError as e:
            raise CodecError(f"Opus encoding failed: {_opus_reason(e)}") from e
        return packet

    def set_expected_loss(self, percent: int) -> None:
        """Plan the FEC for ``percent`` packet loss (0-100; clamped). Has no effect without FEC."""
        percent = max(0, min(100, int(percent)))
        self._ctl(opuslib.api.ctl.set_packet_loss_perc, percent if self.fec else 0)

    def set_bitrate(self, bps: int) -> None:
        """Change the target bit rate (bit/s, from 6000 to 510000)."""
        if not MIN_BITRATE <= bps <= MAX_BITRATE:
            raise ValueError(f"Opus bit rate must be {MIN_BITRATE}-{MAX_BITRATE} bit/s, not {bps}")
        self._ctl(opuslib.api.ctl.set_bitrate, int(bps))

    def __del__(self) -> None:
        state = getattr(self, "_state", None)
        if state is not None:
            opuslib.api.encoder.destroy(state)


class OpusDecoder:
    """Decodes Opus packets of one 20 ms frame into mono int16 PCM at ``sample_rate``.

    Every method returns exactly ``frame_samples`` samples.  Lost packets are bridged by
    ``decode_fec`` (when the next packet is there) or ``conceal``; both keep the decoder's
    state continuous, so call exactly one of the three methods per 20 ms frame, in order.
    """

    def __init__(self, sample_rate: int = 16000) -> None:
        _check_rate(sample_rate)
        self.sample_rate = sample_rate
        self.frame_samples = frame_samples(sample_rate)
        try:
            self._state: Any = opuslib.api.decoder.create_state(sample_rate, 1)
        except opuslib.exceptions.OpusError as e:
            raise CodecError(f"Opus decoder set-up failed: {_opus_reason(e)}") from e

    def _check(self, payload: bytes) -> None:
        if not payload:
            raise OpusPayloadError("Opus payload is empty")
        if len(payload) > MAX_PACKET * 3:
            raise OpusPayloadError(f"Opus payload of {len(payload)} bytes is too long")
        try:
            samples = opuslib.api.decoder.get_nb_samples(self._state, payload, len(payload))
        except opuslib.exceptions.OpusError as e:
            raise OpusPayloadError(f"Opus payload is invalid: {_opus_reason(e)}") from e
        if samples == 0:
            raise OpusPayloadError("Opus payload holds no audio frame")
        if samples != self.frame_samples:
            ms = samples * 1000 / self.sample_rate
            raise OpusPayloadError(
                f"Opus payload holds {ms:g} ms of audio, expected one {FRAME_MS} ms frame"
            )

    def _decode(self, payload: bytes | None, fec: bool) -> bytes:
        try:
            pcm: bytes = opuslib.api.decoder.decode(
                self._state,
                payload,
                0 if payload is None else len(payload),
                self.frame_samples,
                fec,
                channels=1,
            )
        except opuslib.exceptions.OpusError as e:
            raise OpusPayloadError(f"Opus payload could not be decoded: {_opus_reason(e)}") from e
        if len(pcm) != self.frame_samples * SAMPLE_BYTES:
            raise OpusPayloadError(
                f"Opus decoder returned {len(pcm) // SAMPLE_BYTES} samples, "
                f"expected {self.frame_samples}"
            )
        return pcm

    def decode(self, payload: bytes) -> bytes:
        """The 20 ms frame of PCM in ``payload``; a corrupt payload raises OpusPayloadError."""
        self._check(payload)
        return self._decode(payload, False)

    def decode_fec(self, next_payload: bytes) -> bytes:
        """The frame before ``next_payload``, rebuilt from the FEC data it carries.

        Without FEC data in ``next_payload`` libopus falls back to concealment.  Decode
        ``next_payload`` itself with ``decode`` afterwards, as usual.
        """
        self._check(next_payload)
        return self._decode(next_payload, True)

    def conceal(self) -> bytes:
        """Packet-loss concealment: a plausible frame in place of one that never arrived."""
        return self._decode(None, False)

    def __del__(self) -> None:
        state = getattr(self, "_state", None)
        if state is not None:
            opuslib.api.decoder.destroy(state)
