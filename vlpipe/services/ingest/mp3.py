"""MP3 framing: stream bytes in, MP3 frames out, with FFmpeg's MPEG audio parser (PyAV).

An MP3 stream has no header a decoder needs: every frame starts with a sync word, and the
parser finds the next one after a cut or junk. The parser hands out frames as contiguous
slices of its input, so the bytes it holds between two chunks are exactly the input's
suffix after the last frame it returned; that suffix (less than a frame) is `carry()`, and
a new owner's parser fed it first continues with no frame lost. An ID3v2 tag at the start
(which may be large: cover art) is skipped here, so that it never reaches the decoder glued
to the first frame. Pure: no I/O, no threads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import av
from av.audio.codeccontext import AudioCodecContext

from vlpipe.services.ingest.framing import Packet, b64, unb64

ID3_HEADER = 10
MAX_CARRY = 8192
"""More than any MPEG audio frame (2881 bytes at most): bytes the parser dropped are not
carried on."""


def _parser() -> AudioCodecContext:
    codec = av.CodecContext.create("mp3", "r")
    assert isinstance(codec, AudioCodecContext)
    return codec


@dataclass
class Mp3Reader:
    """MP3 frames of one stream fed in chunks cut anywhere."""

    _parser: AudioCodecContext = field(default_factory=_parser)
    _unparsed: bytearray = field(default_factory=bytearray)  # not out as frames yet
    _given: int = 0  # how many of those the parser has (a new owner's has none)
    _head: bytearray = field(default_factory=bytearray)  # first bytes, until no ID3 tag is sure
    _skip: int = 0  # bytes of an ID3v2 tag still to come
    _started: bool = False

    def feed(self, data: bytes) -> tuple[list[Packet], list[str]]:
        """Frames completed by `data` (as audio packets); MP3 framing reports no problems."""
        data = self._without_tag(data)
        self._unparsed += data
        fresh = bytes(self._unparsed[self._given :])
        frames = [bytes(p) for p in self._parser.parse(fresh)] if fresh else []
        out = sum(len(f) for f in frames)
        del self._unparsed[: max(out, len(self._unparsed) - MAX_CARRY)]
        self._given = len(self._unparsed)
        return [Packet("audio", f) for f in frames], []

    def _without_tag(self, data: bytes) -> bytes:
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            data = data[n:]
        if self._started:
            return data
        self._head += data
        if len(self._head) < ID3_HEADER and b"ID3".startswith(bytes(self._head[:3])):
            return b""  # too early to tell
        self._started = True
        head, self._head = bytes(self._head), bytearray()
        if head[:3] == b"ID3" and all(b < 0x80 for b in head[6:10]):
            size = ID3_HEADER + sum(b << (7 * (3 - i)) for i, b in enumerate(head[6:10]))
            if head[5] & 0x10:  # a footer follows the tag
                size += ID3_HEADER
            self._skip = max(0, size - len(head))
            return head[size:]
        return head

    # ------------------------------------------------------------------ new owner

    def header(self) -> dict[str, Any]:
        """Nothing: an MP3 stream can be decoded from any frame on."""
        return {}

    def carry(self) -> dict[str, Any]:
        """The bytes of the frame in progress (and of an ID3 tag being skipped)."""
        return {
            "buf": b64(self._unparsed),
            "head": b64(self._head),
            "skip": self._skip,
            "started": self._started,
        }

    @classmethod
    def resume(cls, header: dict[str, Any], carry: dict[str, Any]) -> Mp3Reader:
        """A reader continuing from another's `carry()` (ValueError if it is bad)."""
        reader = cls()
        if carry:
            reader._head = bytearray(unb64(carry["head"]))
            reader._skip = max(0, int(carry["skip"]))
            reader._started = bool(carry["started"])
            reader._unparsed = bytearray(unb64(carry["buf"]))  # parsed again with the next chunk
        return reader
