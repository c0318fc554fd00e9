"""The pure per-session audio normalizer: producer chunks in, fixed frames out.

`Normalizer` turns `RawAudio` chunks of one session into frames of exactly `frame_ms`
milliseconds in the session's input format (PCM16 at 24, 16 or 8 kHz, or G.711 at 8 kHz).
It decodes (PCM16, float32, G.711, WAV), down-mixes stereo to mono, resamples with
state kept across chunks (soxr), and cuts frames, keeping the leftover partial frame for
the next chunk. No Redis, no I/O: the ingest service feeds it.

Bad input raises `BadAudio` naming the problem; the normalizer stays usable for the next
chunk. Compressed streams (Ogg/WebM Opus, MP3) are decoded by `ContainerDecoder`.

`snapshot()` is what another process needs to continue the session's stream after a
takeover, as two checkpoint fields: `stream`, what the stream's header taught (the WAV
format, the container's codec header), which changes once per stream; and `carry`, what is
in flight between two chunks (the partial frame, the resampler's held-back input, a partial
WAV sample or container packet), a few kB at most. `Normalizer.resume()` builds the
normalizer that continues from them: no audio is lost or repeated, and the frames match an
uninterrupted run's but for the first ~100 ms of a compressed stream's decoding.
"""

from __future__ import annotations

import io
import json
import logging
import wave
from collections.abc import Mapping
from typing import Any

import numpy as np

from vlpipe.services.ingest.containers import DEMUXERS, ContainerDecoder, ContainerError, Decoded
from vlpipe.services.ingest.framing import b64, unb64
from vlpipe.services.ingest.resampling import ResumableResampler
from vlpipe.shared.audio import AudioFormat, alaw_to_pcm16, encode_pcm16, ulaw_to_pcm16
from vlpipe.shared.contracts import InputFormat, RawAudio

log = logging.getLogger("vlpipe.ingest")

G711_RATE = 8000
SNAPSHOT_VERSION = 1
SNAPSHOT_FIELDS = ("stream", "carry")


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
        # PCM16 at the target rate not yet returned as frames: less than a frame, except
        # after a chunk refused in part (its good audio waits here for the next push).
        self._pending = bytearray()
        self._resampler: ResumableResampler | None = None
        self._wav: tuple[int, int, int] | None = None  # (rate, channels, sample width)
        self._wav_partial = b""  # bytes of a WAV sample frame cut by the chunk's end
        self._container: ContainerDecoder | None = None
        self._snapshot_of: tuple[dict[str, Any], dict[str, Any]] = ({}, {})
        self._snapshot: dict[str, str] = {}

    def push(self, chunk: RawAudio) -> list[bytes]:
        """Frames completed by this chunk, in order. Raises BadAudio for bad input."""
        if chunk.format.value in DEMUXERS:
            return self._frames(self._container_pcm(chunk.format.value, chunk.audio))
        if chunk.format is InputFormat.PCM16 and chunk.channels == 1:
            # The common case (telephony bridges, browsers): already PCM16, no detour
            # through floats; only the rate may differ.
            if len(chunk.audio) % 2:
                raise BadAudio(f"pcm16 with 1 channel(s) needs a multiple of 2 bytes, got "
                               f"{len(chunk.audio)}")  # fmt: skip
            rate = self._require_rate(chunk)
            return self._frames(self._resample(rate, chunk.format.value, chunk.audio))
        rate, samples = self._decode(chunk)
        if not len(samples):
            return []
        return self._frames(self._resample(rate, chunk.format.value, _to_int16_bytes(samples)))

    def flush(self, pad: bool = True) -> list[bytes]:
        """At end of session: the resampler's tail and the last partial frame.

        With `pad` the partial frame is completed with silence, so every frame has the same
        size; without it the partial frame is returned as it is (or nothing if empty).
        """
        out: list[bytes] = []
        if self._container is not None:
            pieces = self._container.close()
            out += self._frames(self._decoded_pcm(self._container.format, pieces))
            self._container = None
        if self._resampler is not None:
            out += self._frames(self._resampler.flush())
            self._resampler = None
        if self._pending:
            tail = bytes(self._pending)
            self._pending.clear()
            if pad:
                tail += b"\x00" * (-len(tail) % self._frame_pcm_bytes)
            out += [
                encode_pcm16(tail[i : i + self._frame_pcm_bytes], self.target)
                for i in range(0, len(tail), self._frame_pcm_bytes)
            ]
        return out

    # ---------------------------------------------------------------- takeover

    def snapshot(self) -> dict[str, str]:
        """Checkpoint fields (`SNAPSHOT_FIELDS`) from which `resume` continues this stream.

        `stream` changes only when a stream header is learned; `carry` with most chunks.
        """
        stream = {
            "v": SNAPSHOT_VERSION,
            "wav": list(self._wav) if self._wav else None,
            "container": (self._container.header() or None) if self._container else None,
        }
        carry = {
            "v": SNAPSHOT_VERSION,
            "pending": b64(self._pending),
            "wav_partial": b64(self._wav_partial),
            "resampler": self._resampler.state() if self._resampler else None,
            "container": self._container.carry() if self._container else None,
        }
        # Between most writes nothing but the frames changed: the JSON is made only when
        # the state did.
        if stream != self._snapshot_of[0] or carry != self._snapshot_of[1]:
            self._snapshot_of = (stream, carry)
            self._snapshot = {"stream": _compact_json(stream), "carry": _compact_json(carry)}
        return self._snapshot

    @classmethod
    def resume(
        cls, target: AudioFormat, frame_ms: int, checkpoint: Mapping[str, str]
    ) -> Normalizer:
        """The normalizer continuing from another's `snapshot()` fields in `checkpoint`.

        Without them (a new session, or a checkpoint written before snapshots existed) it is
        a new normalizer. A snapshot that cannot be read is logged and ignored: the session
        goes on, and a WAV or compressed stream's later chunks are refused, naming why.
        """
        normalizer = cls(target, frame_ms)
        if not any(name in checkpoint for name in SNAPSHOT_FIELDS):
            return normalizer
        try:
            normalizer._load(
                json.loads(checkpoint.get("stream", "{}")),
                json.loads(checkpoint.get("carry", "{}")),
            )
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            log.warning("audio snapshot unreadable; starting afresh", extra={"error": str(exc)})
            return cls(target, frame_ms)
        return normalizer

    def _load(self, stream: dict[str, Any], carry: dict[str, Any]) -> None:
        if stream.get("v") != SNAPSHOT_VERSION or carry.get("v") != SNAPSHOT_VERSION:
            raise ValueError(f"snapshot version {stream.get('v')}/{carry.get('v')}")
        if stream.get("wav"):
            rate, channels, width = (int(x) for x in stream["wav"])
            if not (8000 <= rate <= 48000 and channels in (1, 2) and width == 2):
                raise ValueError(f"WAV format out of range: {stream['wav']}")
            self._wav = (rate, channels, width)
            self._wav_partial = unb64(carry["wav_partial"])
        if carry.get("container"):
            self._container = ContainerDecoder.resume(
                stream.get("container") or {}, carry["container"]
            )
        self._pending = bytearray(unb64(carry["pending"]))
        if len(self._pending) % 2:
            raise ValueError("partial frame of an odd number of bytes")
        if carry.get("resampler"):
            self._resampler, replayed = ResumableResampler.resume(
                self.target.rate, carry["resampler"]
            )
            self._pending += replayed

    # ---------------------------------------------------------------- decoding

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
        return self._decode_wav(chunk.audio)

    def _container_pcm(self, fmt: str, data: bytes) -> bytes:
        """PCM16 at the target rate from a compressed stream's next chunk."""
        if self._container is None or self._container.format != fmt:
            self._container = ContainerDecoder(fmt)  # a new stream (or the first)
        try:
            pieces = self._container.feed(data)
        except ContainerError as exc:
            # The problem is reported; the chunk's good audio is framed with the next push.
            self._pending += self._decoded_pcm(fmt, exc.decoded)
            raise BadAudio(str(exc)) from None
        return self._decoded_pcm(fmt, pieces)

    def _decoded_pcm(self, fmt: str, pieces: list[Decoded]) -> bytes:
        return b"".join(self._resample(rate, fmt, _to_int16_bytes(s)) for rate, s in pieces)

    @staticmethod
    def _require_rate(chunk: RawAudio) -> int:
        if chunk.rate is None:
            raise BadAudio(f"format {chunk.format.value!r} needs a 'rate' field")
        return chunk.rate

    def _decode_wav(self, data: bytes) -> tuple[int, np.ndarray]:
        """A WAV stream's first chunk carries the header; later chunks are its raw data,
        cut anywhere (a sample cut in two is completed by the next chunk)."""
        if data[:4] == b"RIFF":
            try:
                with wave.open(io.BytesIO(data)) as wav:
                    header = (wav.getframerate(), wav.getnchannels(), wav.getsampwidth())
                    data = wav.readframes(wav.getnframes())
            except (wave.Error, EOFError) as exc:
                raise BadAudio(f"WAV header: {exc}") from None
            rate, channels, width = header
            if width != 2:
                raise BadAudio(f"WAV with {8 * width}-bit samples; only 16-bit PCM is supported")
            if not 8000 <= rate <= 48000:
                raise BadAudio(f"WAV at {rate} Hz; 8000 to 48000 Hz is supported")
            self._wav, self._wav_partial = header, b""
        elif self._wav is None:
            raise BadAudio("WAV data before any WAV header (the first chunk must start with RIFF)")
        rate, channels, _ = self._wav
        data = self._wav_partial + data
        whole = len(data) - len(data) % (2 * channels)
        self._wav_partial = data[whole:]
        return rate, _pcm16(data[:whole], channels)

    # ---------------------------------------------------------------- framing

    def _resample(self, rate: int, kind: str, pcm: bytes) -> bytes:
        resampler = self._resampler
        if resampler is None or (resampler.in_rate, resampler.kind) != (rate, kind):
            tail = resampler.flush() if resampler is not None else b""
            self._resampler = ResumableResampler(rate, self.target.rate, kind)
            return tail + self._resampler.process(pcm)
        return resampler.process(pcm)

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


def _compact_json(value: dict[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"))
