"""Compressed streams (Ogg/WebM Opus, MP3) decoded as their chunks arrive, resumable.

`ContainerDecoder` is pure and synchronous: a chunk in, the PCM of every packet the chunk
completes out, before `feed()` returns (a caller that pauses after its last words is heard
at once). The framing is this package's own (`ogg`, `webm`, `mp3`): it knows exactly which
bytes are in flight between two chunks, which PyAV's demuxers cannot tell. The decoding is
FFmpeg's, through PyAV's codec contexts, one packet at a time; no thread is involved.

A new owner of a session continues a stream with `ContainerDecoder.resume()` from what
`header()` (learned once per stream) and `carry()` (what is in flight) returned. The old
decoder's internal state cannot be exported, and a decoder started mid-stream needs time to
converge: Opus predicts each frame's band energies from the previous frame's (a fresh decoder
is ~200 ms off a tone), and MP3 frames borrow bits from the frames before them (a fresh
decoder gives ~100 ms of silence). So `carry()` also holds the last few packets, which a new
owner decodes and drops before the next chunk (the pre-roll RFC 7845 §4.6 recommends for
seeking). The number of samples is kept exactly: no packet is lost or decoded twice.
"""

from __future__ import annotations

import contextlib
from collections import deque
from typing import Any

import av
import numpy as np
from av.audio.codeccontext import AudioCodecContext

from vlpipe.services.ingest.framing import Packet, b64, unb64
from vlpipe.services.ingest.mp3 import Mp3Reader
from vlpipe.services.ingest.ogg import OggOpusReader
from vlpipe.services.ingest.webm import WebmOpusReader

Reader = OggOpusReader | WebmOpusReader | Mp3Reader
DEMUXERS: dict[str, type[Reader]] = {"ogg": OggOpusReader, "webm": WebmOpusReader, "mp3": Mp3Reader}
Decoded = tuple[int, np.ndarray]
"""(sample rate in Hz, mono samples as float32 on the PCM16 scale)."""

PREROLL_MS = {"ogg": 160, "webm": 160, "mp3": 130}
PREROLL_BYTES = 3072
"""A new owner's decoder is warmed with the old one's last packets: at least this much
audio, in at most these many bytes. Measured on tones (the worst case for Opus's energy
prediction), 160 ms of Opus leaves the new decoder within 1% of the old one's output after
25 ms (80 ms, what RFC 7845 asks for seeking: within 15% after 100 ms; none: 200 ms off),
and on Chrome's MediaRecorder WebM (stereo, 60 ms packets of ~1 kB) within 4 LSB; 130 ms of
MP3 (5 frames at 44.1 kHz) within 3 LSB (3 frames leave 20 ms of silence). The bytes cap
bounds the checkpoint at high bitrates, at the cost of a shorter warm-up there."""
OPUS_HEAD_SIZE = 19
PRE_SKIP = slice(10, 12)  # OpusHead: samples at 48 kHz to drop at the stream's start


class ContainerError(ValueError):
    """The stream has a problem, named in the message. `decoded` is the audio that the
    chunk did give (a problem is reported, but good audio is never dropped for it)."""

    def __init__(self, message: str, decoded: list[Decoded]) -> None:
        super().__init__(message)
        self.decoded = decoded


def _opus_decoder(head: bytes) -> tuple[AudioCodecContext, int]:
    """A decoder for the stream an OpusHead describes, and the samples to skip at its start.

    The pre-skip is zeroed in the decoder's copy of the header and skipped here instead, so a
    new owner's decoder, which starts mid-stream, does not drop audio a second time.
    """
    if len(head) < OPUS_HEAD_SIZE or head[8] == 0 or head[8] > 15 or head[9] == 0:
        raise ValueError(f"bad OpusHead ({len(head)} bytes): version or channel count")
    pre_skip = int.from_bytes(head[PRE_SKIP], "little")
    codec = av.CodecContext.create("opus", "r")
    assert isinstance(codec, AudioCodecContext)
    codec.extradata = head[: PRE_SKIP.start] + b"\x00\x00" + head[PRE_SKIP.stop :]
    return codec, pre_skip


def _mp3_decoder() -> AudioCodecContext:
    codec = av.CodecContext.create("mp3", "r")
    assert isinstance(codec, AudioCodecContext)
    return codec


def _mono(frame: av.AudioFrame) -> np.ndarray:
    """A decoded frame down-mixed to mono float32 on the PCM16 scale."""
    fmt = frame.format
    channels = frame.layout.nb_channels
    samples = frame.to_ndarray().astype(np.float32)
    if not fmt.is_planar:
        samples = samples.reshape(-1, channels).T
    if fmt.name.startswith(("flt", "dbl")):
        samples *= 32768.0
    elif fmt.name.startswith("s32"):
        samples /= 65536.0
    elif not fmt.name.startswith("s16"):
        raise ValueError(f"decoder gave samples as {fmt.name}")
    mono: np.ndarray = samples.mean(axis=0) if channels > 1 else samples.reshape(-1)
    return mono


class ContainerDecoder:
    """Decodes one compressed stream (`fmt`: ogg, webm or mp3) fed in chunks."""

    def __init__(self, fmt: str, reader: Reader | None = None) -> None:
        if fmt not in DEMUXERS:
            raise ValueError(f"no reader for {fmt!r}; expected one of {sorted(DEMUXERS)}")
        self.format = fmt
        self._reader: Reader = reader or DEMUXERS[fmt]()
        self._codec: AudioCodecContext | None = _mp3_decoder() if fmt == "mp3" else None
        self._skip = 0  # samples still to drop at the stream's start (Opus pre-skip)
        self._recent: deque[tuple[bytes, float]] = deque()  # (packet, ms): the pre-roll
        if isinstance(self._reader, OggOpusReader | WebmOpusReader) and self._reader.head:
            self._codec, _ = _opus_decoder(self._reader.head)

    def feed(self, data: bytes) -> list[Decoded]:
        """The audio of every packet `data` completes. Raises ContainerError (carrying that
        audio) when the stream has a problem; the decoder goes on with the next chunk."""
        packets, problems = self._reader.feed(data)
        decoded = self._decode(packets, problems)
        if problems:
            raise ContainerError(
                f"{self.format} stream: {'; '.join(dict.fromkeys(problems))}", decoded
            )
        return decoded

    def close(self) -> list[Decoded]:
        """End of stream: what the decoder still holds (codecs here hold nothing back)."""
        if self._codec is None:
            return []
        try:
            return self._samples(self._codec.decode(None))
        except av.FFmpegError:
            return []

    # ------------------------------------------------------------------ new owner

    def header(self) -> dict[str, Any]:
        """What a new owner needs that is learned once per stream (its codec header); empty
        until it is known, and for MP3, which has none."""
        return self._reader.header()

    def carry(self) -> dict[str, Any]:
        """What is in flight between two chunks: the container's format, the reader's state
        (less than a packet), the pre-skip left and the pre-roll."""
        return {
            "format": self.format,
            "reader": self._reader.carry(),
            "skip": self._skip,
            "preroll": [b64(p) for p in self._preroll()],
        }

    @classmethod
    def resume(cls, header: dict[str, Any], carry: dict[str, Any]) -> ContainerDecoder:
        """A decoder continuing another's stream at the next chunk (ValueError if the state
        is not one `header()` and `carry()` wrote)."""
        fmt = carry.get("format")
        if fmt not in DEMUXERS:
            raise ValueError(f"no reader for {fmt!r}")
        decoder = cls(fmt, DEMUXERS[fmt].resume(header, carry["reader"]))
        decoder._skip = max(0, int(carry["skip"]))
        for packet in carry["preroll"]:
            decoder._warm_up(unb64(packet))
        return decoder

    # ------------------------------------------------------------------ internals

    def _decode(self, packets: list[Packet], problems: list[str]) -> list[Decoded]:
        out: list[Decoded] = []
        failed: list[str] = []
        for kind, data in packets:
            if kind == "head":
                self._recent.clear()
                try:
                    self._codec, self._skip = _opus_decoder(data)
                except ValueError as exc:
                    self._codec = None
                    problems.append(str(exc))
                continue
            if self._codec is None:
                continue  # the reader reported audio before its header
            try:
                out += self._samples(self._decoded(data))
            except av.FFmpegError as exc:
                failed.append(f"{len(data)} bytes: {exc}")
        # MP3's parser hands over junk before a sync word (a stream joined mid-way, tags) as
        # frames: that is only a problem when nothing in the chunk decodes. An Opus packet
        # comes out of the container whole, so one that does not decode is corrupt.
        if failed and (self.format != "mp3" or not out):
            problems.append(f"{len(failed)} undecodable packet(s), e.g. {failed[0]}")
        return out

    def _decoded(self, packet: bytes) -> list[av.AudioFrame]:
        """Decode a packet, remembering it (and its length in ms) for the pre-roll."""
        assert self._codec is not None
        frames = self._codec.decode(av.Packet(packet))
        ms = sum(1000 * f.samples / f.sample_rate for f in frames)
        self._recent.append((packet, ms))
        while sum(m for _, m in self._recent) - self._recent[0][1] >= PREROLL_MS[self.format]:
            self._recent.popleft()
        return frames

    def _preroll(self) -> list[bytes]:
        """The newest packets within PREROLL_BYTES, oldest first."""
        kept: list[bytes] = []
        size = 0
        for packet, _ in reversed(self._recent):
            size += len(packet)
            if size > PREROLL_BYTES:
                break
            kept.append(packet)
        return kept[::-1]

    def _warm_up(self, packet: bytes) -> None:
        """Decode a packet the old owner decoded already, for the decoder's state only."""
        if self._codec is not None:
            with contextlib.suppress(av.FFmpegError):
                self._decoded(packet)

    def _samples(self, frames: list[av.AudioFrame]) -> list[Decoded]:
        out: list[Decoded] = []
        for frame in frames:
            mono = _mono(frame)
            if self._skip:
                dropped = min(self._skip, len(mono))
                mono, self._skip = mono[dropped:], self._skip - dropped
            if len(mono):
                out.append((frame.sample_rate, mono))
        return out
