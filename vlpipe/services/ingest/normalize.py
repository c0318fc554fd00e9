"""The pure per-session audio normalizer: producer chunks in, fixed frames out.

`Normalizer` turns `RawAudio` chunks of one session into frames of exactly `frame_ms`
milliseconds in the session's input format (PCM16 at 24, 16 or 8 kHz, or G.711 at 8 kHz).
It decodes (PCM16, float32, G.711, WAV), down-mixes stereo to mono, resamples with
state kept across chunks (soxr), and cuts frames, keeping the leftover partial frame for
the next chunk. No Redis, no I/O: the ingest service feeds it.

Bad input raises `BadAudio` naming the problem; the normalizer stays usable for the next
chunk. Compressed streams (Ogg/WebM Opus, MP3) are decoded by `ContainerDecoder`.
"""

from __future__ import annotations

import io
import wave

import numpy as np

from vlpipe.services.ingest.containers import ContainerDecoder, ContainerError
from vlpipe.shared.audio import (
    AudioFormat,
    StreamingResampler,
    alaw_to_pcm16,
    encode_pcm16,
    ulaw_to_pcm16,
)
from vlpipe.shared.contracts import InputFormat, RawAudio

G711_RATE = 8000


class BadAudio(ValueError):
    """A chunk that cannot be decoded as it says it is; the message names the problem."""


def _downmix(samples: np.ndarray, channels: int) -> np.ndarray:
    if channels == 1:
        return samples
    mono: np.ndarray = samples.reshape(-1, channels).mean(axis=1)
    return mono


def _pcm16(data: bytes, channels: int) -> np.ndarray:
    width = 2 * channels
    if len(data) % width:
        raise BadAudio(
            f"pcm16 with {channels} channel(s) needs a multiple of {width} bytes, got {len(data)}"
        )
    return _downmix(np.frombuffer(data, dtype="<i2").astype(np.float32), channels)


def _f32(data: bytes, channels: int) -> np.ndarray:
    width = 4 * channels
    if len(data) % width:
        raise BadAudio(
            f"f32 with {channels} channel(s) needs a multiple of {width} bytes, got {len(data)}"
        )
    samples = np.frombuffer(data, dtype="<f4")
    if not np.all(np.isfinite(samples)):
        raise BadAudio("f32 audio contains NaN or infinite samples")
    return _downmix(np.clip(samples, -1.0, 1.0) * 32767.0, channels)


def _joined(
    pieces: list[tuple[int, np.ndarray]], source: tuple[int, str] | None
) -> tuple[int, np.ndarray]:
    """Decoded pieces of a container as one signal (a container keeps one rate)."""
    if not pieces:
        return (source[0] if source else 48000), np.zeros(0, dtype=np.float32)
    return pieces[0][0], np.concatenate([p for _, p in pieces])


def _to_int16_bytes(samples: np.ndarray) -> bytes:
    out: bytes = np.clip(np.rint(samples), -32768, 32767).astype("<i2").tobytes()
    return out


class Normalizer:
    """Normalizes one session's audio into frames of `frame_ms` in `target`'s encoding.

    Frames are byte-exact: `target.bytes_for_ms(frame_ms)` bytes each. The source may
    change format or rate between chunks; the resampler then restarts.
    """

    def __init__(self, target: AudioFormat, frame_ms: int = 20) -> None:
        if frame_ms <= 0 or (target.rate * frame_ms) % 1000:
            raise ValueError(f"{frame_ms} ms is not a whole number of samples at {target.rate} Hz")
        self.target = target
        self.frame_ms = frame_ms
        self._frame_pcm_bytes = target.rate * frame_ms // 1000 * 2
        self._pending = bytearray()  # PCM16 at the target rate, less than one frame
        self._source: tuple[int, str] | None = None  # (rate, format) the resampler is for
        self._resampler: StreamingResampler | None = None
        self._wav: tuple[int, int, int] | None = None  # (rate, channels, sample width)
        self._container: ContainerDecoder | None = None

    def push(self, chunk: RawAudio) -> list[bytes]:
        """Frames completed by this chunk, in order. Raises BadAudio for bad input."""
        rate, samples = self._decode(chunk)
        if not len(samples):
            return []
        pcm = _to_int16_bytes(samples)
        source = (
            "container"
            if self._container is not None and chunk.format.value == self._container.format
            else chunk.format.value
        )
        return self._frames(self._resample(rate, source, pcm))

    def flush(self, pad: bool = True) -> list[bytes]:
        """At end of session: the resampler's tail and the last partial frame.

        With `pad` the partial frame is completed with silence, so every frame has the same
        size; without it the partial frame is returned as it is (or nothing if empty).
        """
        out: list[bytes] = []
        if self._container is not None:
            try:
                pieces = self._container.close()
            except ContainerError:
                pieces = []
            self._container = None
            if pieces:
                rate, samples = _joined(pieces, self._source)
                out += self._frames(self._resample(rate, "container", _to_int16_bytes(samples)))
        if self._resampler is not None:
            out += self._frames(self._resampler.flush())
            self._resampler = None
        if self._pending:
            tail = bytes(self._pending)
            self._pending.clear()
            if pad:
                tail += b"\x00" * (self._frame_pcm_bytes - len(tail))
            out.append(encode_pcm16(tail, self.target))
        return out

    def _decode(self, chunk: RawAudio) -> tuple[int, np.ndarray]:
        fmt = chunk.format
        if fmt is InputFormat.PCM16:
            return self._require_rate(chunk), _pcm16(chunk.audio, chunk.channels)
        if fmt is InputFormat.F32:
            return self._require_rate(chunk), _f32(chunk.audio, chunk.channels)
        if fmt in (InputFormat.G711_ULAW, InputFormat.G711_ALAW):
            rate = chunk.rate or G711_RATE
            decode = ulaw_to_pcm16 if fmt is InputFormat.G711_ULAW else alaw_to_pcm16
            if len(chunk.audio) % chunk.channels:
                raise BadAudio(f"G.711 with {chunk.channels} channels: odd byte count")
            return rate, _pcm16(decode(chunk.audio), chunk.channels)
        if fmt is InputFormat.WAV:
            return self._decode_wav(chunk.audio)
        return self._decode_container(fmt.value, chunk.audio)

    def _decode_container(self, fmt: str, data: bytes) -> tuple[int, np.ndarray]:
        if self._container is None or self._container.format != fmt:
            self._container = ContainerDecoder(fmt)
        try:
            pieces = self._container.feed(data)
        except ContainerError as exc:
            self._container = None
            raise BadAudio(str(exc)) from None
        return _joined(pieces, self._source)

    @staticmethod
    def _require_rate(chunk: RawAudio) -> int:
        if chunk.rate is None:
            raise BadAudio(f"format {chunk.format.value!r} needs a 'rate' field")
        return chunk.rate

    def _decode_wav(self, data: bytes) -> tuple[int, np.ndarray]:
        """A WAV stream's first chunk carries the header; later chunks are its raw data."""
        if data[:4] == b"RIFF":
            try:
                with wave.open(io.BytesIO(data)) as wav:
                    self._wav = (wav.getframerate(), wav.getnchannels(), wav.getsampwidth())
                    frames = wav.readframes(wav.getnframes())
            except (wave.Error, EOFError) as exc:
                raise BadAudio(f"WAV header: {exc}") from None
            rate, channels, width = self._wav
            if width != 2:
                raise BadAudio(f"WAV with {8 * width}-bit samples; only 16-bit PCM is supported")
            if not 8000 <= rate <= 48000:
                raise BadAudio(f"WAV at {rate} Hz; 8000 to 48000 Hz is supported")
            return rate, _pcm16(frames[: len(frames) - len(frames) % (2 * channels)], channels)
        if self._wav is None:
            raise BadAudio("WAV data before any WAV header (the first chunk must start with RIFF)")
        rate, channels, _ = self._wav
        return rate, _pcm16(data, channels)

    def _resample(self, rate: int, fmt: str, pcm: bytes) -> bytes:
        if self._source != (rate, fmt) or self._resampler is None:
            tail = self._resampler.flush() if self._resampler is not None else b""
            self._resampler = StreamingResampler(rate, self.target.rate)
            self._source = (rate, fmt)
            return tail + self._resampler.process(pcm)
        return self._resampler.process(pcm)

    def _frames(self, pcm: bytes) -> list[bytes]:
        self._pending += pcm
        size = self._frame_pcm_bytes
        count = len(self._pending) // size
        frames = [
            encode_pcm16(bytes(self._pending[i * size : (i + 1) * size]), self.target)
            for i in range(count)
        ]
        del self._pending[: count * size]
        return frames
