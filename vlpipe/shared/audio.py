"""Session audio formats and the codecs between them.

A session's wire format is one of the formats Voice Live speaks (`AudioFormat`). Inside the
pipeline audio is PCM16 little-endian mono; G.711 is only ever a wire encoding at 8 kHz.
The G.711 codecs are the C implementations of the standard library's `audioop` (the
`audioop-lts` package on Python 3.13+); resampling is `soxr`'s streaming resampler, which
keeps state between chunks so that chunk boundaries leave no clicks.
"""

from __future__ import annotations

import sys
import warnings
from enum import StrEnum
from functools import cached_property

import numpy as np
import soxr

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    if sys.version_info >= (3, 13):  # pragma: no cover - depends on the interpreter
        import audioop  # provided by audioop-lts
    else:
        import audioop

SAMPLE_WIDTH = 2  # bytes per PCM16 sample


class AudioFormat(StrEnum):
    """A session's audio wire format, named as Voice Live names its output formats."""

    # The properties are computed once per member: they are read for every frame.

    PCM16 = "pcm16"  # PCM16 at 24 kHz
    PCM16_16K = "pcm16_16000hz"
    PCM16_8K = "pcm16_8000hz"
    G711_ULAW = "g711_ulaw"  # 8 kHz
    G711_ALAW = "g711_alaw"  # 8 kHz

    @cached_property
    def rate(self) -> int:
        """Sample rate in Hz."""
        return _RATES[self]

    @cached_property
    def is_g711(self) -> bool:
        return self in (AudioFormat.G711_ULAW, AudioFormat.G711_ALAW)

    @cached_property
    def bytes_per_sample(self) -> int:
        return 1 if self.is_g711 else SAMPLE_WIDTH

    @cached_property
    def wire_name(self) -> str:
        """The codec name Voice Live uses for `input_audio_format`: pcm16, g711_ulaw or g711_alaw."""
        return self.value if self.is_g711 else "pcm16"

    def bytes_for_ms(self, ms: float) -> int:
        """Byte count of `ms` milliseconds of audio in this format."""
        return round(self.rate * ms / 1000) * self.bytes_per_sample

    def ms_for_bytes(self, n: int) -> float:
        """Duration in milliseconds of `n` bytes of audio in this format."""
        return n / self.bytes_per_sample * 1000 / self.rate

    @classmethod
    def parse(cls, name: str, rate: int | None = None) -> AudioFormat:
        """The format for a Voice Live codec name plus an optional sampling rate.

        Accepts the output-format names (`pcm16_16000hz`) and the input pair
        (`pcm16`, 16000). Raises ValueError naming the problem otherwise.
        """
        try:
            fmt = cls(name.lower())
        except ValueError:
            raise ValueError(
                f"unknown audio format {name!r}; expected one of {[f.value for f in cls]}"
            ) from None
        if rate is None or fmt.is_g711 or fmt is not AudioFormat.PCM16:
            if rate is not None and rate != fmt.rate:
                raise ValueError(f"format {fmt.value} is {fmt.rate} Hz, not {rate} Hz")
            return fmt
        for candidate in (AudioFormat.PCM16, AudioFormat.PCM16_16K, AudioFormat.PCM16_8K):
            if candidate.rate == rate:
                return candidate
        raise ValueError(f"pcm16 sessions run at 8000, 16000 or 24000 Hz, not {rate} Hz")


_RATES = {
    AudioFormat.PCM16: 24000,
    AudioFormat.PCM16_16K: 16000,
    AudioFormat.PCM16_8K: 8000,
    AudioFormat.G711_ULAW: 8000,
    AudioFormat.G711_ALAW: 8000,
}


def ulaw_to_pcm16(data: bytes) -> bytes:
    return audioop.ulaw2lin(data, SAMPLE_WIDTH)


def alaw_to_pcm16(data: bytes) -> bytes:
    return audioop.alaw2lin(data, SAMPLE_WIDTH)


def pcm16_to_ulaw(data: bytes) -> bytes:
    return audioop.lin2ulaw(data, SAMPLE_WIDTH)


def pcm16_to_alaw(data: bytes) -> bytes:
    return audioop.lin2alaw(data, SAMPLE_WIDTH)


def encode_pcm16(pcm: bytes, fmt: AudioFormat) -> bytes:
    """PCM16 at `fmt.rate` to `fmt`'s wire encoding (identity for PCM16 formats)."""
    if fmt is AudioFormat.G711_ULAW:
        return pcm16_to_ulaw(pcm)
    if fmt is AudioFormat.G711_ALAW:
        return pcm16_to_alaw(pcm)
    return pcm


def decode_to_pcm16(data: bytes, fmt: AudioFormat) -> bytes:
    """`fmt`'s wire encoding to PCM16 at `fmt.rate` (identity for PCM16 formats)."""
    if fmt is AudioFormat.G711_ULAW:
        return ulaw_to_pcm16(data)
    if fmt is AudioFormat.G711_ALAW:
        return alaw_to_pcm16(data)
    return data


class StreamingResampler:
    """PCM16 mono resampling that keeps filter state across chunks.

    Feeding a signal in any chunking and then calling `flush()` yields the same samples
    (within rounding) as resampling it whole. Identity when the rates match.
    """

    def __init__(self, in_rate: int, out_rate: int, quality: str = "LQ") -> None:
        self.in_rate = in_rate
        self.out_rate = out_rate
        self._stream = (
            None
            if in_rate == out_rate
            else soxr.ResampleStream(in_rate, out_rate, 1, dtype="int16", quality=quality)
        )

    def process(self, pcm: bytes) -> bytes:
        """Resample a chunk of PCM16 mono; may return fewer samples than will eventually come."""
        if self._stream is None:
            return pcm
        samples = np.frombuffer(pcm, dtype="<i2")
        out: np.ndarray = self._stream.resample_chunk(samples)
        return out.astype("<i2", copy=False).tobytes()

    def flush(self) -> bytes:
        """The samples still held in the filter; call once at end of signal."""
        if self._stream is None:
            return b""
        tail: np.ndarray = self._stream.resample_chunk(np.zeros(0, dtype="<i2"), last=True)
        return tail.astype("<i2", copy=False).tobytes()


class FormatConverter:
    """Streaming PCM16 (at `in_rate`) to a session wire format, resampling with state."""

    def __init__(self, in_rate: int, out: AudioFormat, quality: str = "LQ") -> None:
        self.out = out
        self._resampler = StreamingResampler(in_rate, out.rate, quality)

    def process(self, pcm: bytes) -> bytes:
        return encode_pcm16(self._resampler.process(pcm), self.out)

    def flush(self) -> bytes:
        return encode_pcm16(self._resampler.flush(), self.out)
