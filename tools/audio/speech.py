"""Speech WAV files for tests and benchmarks, synthesized with espeak-ng and converted with sox.

    .venv/bin/python -m tools.audio.speech caller   # prints the path of the caller's sample

``speech_wav(text)`` returns a mono 16-bit WAV (16 kHz unless asked otherwise) of ``text`` spoken
by espeak-ng, with a little silence before and after.  Files are cached in a directory under
the system's temporary directory, keyed by everything that shapes them, and written atomically,
so parallel tests share them.  ``caller_speech()`` and ``callee_speech()`` give the two
directions of a call different sentences and different voices, so a test can tell which way
audio went.  Both commands are Debian packages (``espeak-ng``, ``sox``); ``SpeechToolMissing``
says which one is absent.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CALLER_TEXT = (
    "Hello Bob, this is Alice calling over the overlay. "
    "The weather here is bright and windy, and the train was twelve minutes late this morning. "
    "Could you send me the report before Thursday? Thank you, talk to you soon."
)
CALLEE_TEXT = (
    "Hi Alice, Bob here, I can hear you clearly. "
    "It has been raining all day, so I stayed inside and fixed the kitchen shelf. "
    "The report is almost finished; I will send it tomorrow at nine."
)
CALLER_VOICE = "en-us"
CALLEE_VOICE = "en-gb+f3"
#: Silence added before and after the speech (seconds).
PAD_SECONDS = 0.3


class SpeechToolMissing(RuntimeError):
    """A command needed to make speech samples is not installed."""


def cache_dir() -> Path:
    """Where synthesized speech is kept between runs."""
    path = Path(tempfile.gettempdir()) / "voip-speech-cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _need(command: str) -> str:
    found = shutil.which(command)
    if found is None:
        raise SpeechToolMissing(f"{command} is not installed (apt-get install {command})")
    return found


def speech_wav(text: str, sample_rate: int = 16000, voice: str = CALLER_VOICE) -> Path:
    """A mono 16-bit WAV at ``sample_rate`` of ``text`` spoken by espeak-ng's ``voice``."""
    key = hashlib.sha256(f"{text}\0{voice}\0{sample_rate}\0{PAD_SECONDS}".encode()).hexdigest()
    target = cache_dir() / f"speech-{key[:24]}.wav"
    if target.exists():
        return target
    espeak = _need("espeak-ng")
    sox = _need("sox")
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        raw = Path(tmp) / "espeak.wav"
        out = Path(tmp) / "speech.wav"
        subprocess.run(
            [espeak, "-v", voice, "-s", "150", "-w", str(raw), text],
            check=True,
            capture_output=True,
        )
        pad = str(PAD_SECONDS)
        subprocess.run(
            [
                sox,
                str(raw),
                "-r",
                str(sample_rate),
                "-c",
                "1",
                "-b",
                "16",
                str(out),
                "pad",
                pad,
                pad,
            ],
            check=True,
            capture_output=True,
        )
        os.replace(out, target)  # atomic: a parallel run sees the whole file or none
    return target


def caller_speech(sample_rate: int = 16000) -> Path:
    """The caller's side of a test call (Alice speaking)."""
    return speech_wav(CALLER_TEXT, sample_rate, CALLER_VOICE)


def callee_speech(sample_rate: int = 16000) -> Path:
    """The callee's side of a test call (Bob speaking, another voice)."""
    return speech_wav(CALLEE_TEXT, sample_rate, CALLEE_VOICE)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    which = args[0] if args else "caller"
    if which not in ("caller", "callee"):
        print("usage: python -m tools.audio.speech [caller|callee]", file=sys.stderr)
        return 2
    print(caller_speech() if which == "caller" else callee_speech())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
