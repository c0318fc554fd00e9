"""WebM (Matroska) Opus framing: stream bytes in, Opus packets out, as they arrive.

`WebmOpusReader` walks the EBML element tree of a WebM stream cut into chunks anywhere:
it reads the Tracks element for the audio track and its OpusHead (CodecPrivate), and hands
out the frames of that track's blocks (SimpleBlock or BlockGroup, any lacing) as soon as a
block is complete. Segments and clusters of unknown size, as browsers' MediaRecorder writes
them, end where an element that cannot be their child begins.

FFmpeg's Matroska demuxer (which PyAV wraps) cannot be resumed by a new owner in the middle
of a cluster: started without the cluster's header it skips to the next cluster, seconds of
audio later. This reader's `carry()` is what is in flight between two chunks (the open
elements and their ends, a partial block, the bytes of an element being skipped), so
`WebmOpusReader.resume(header, carry)` continues at the next byte. Pure: no I/O, no threads.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from vlpipe.services.ingest.framing import Packet, b64, unb64

EBML = 0x1A45DFA3
SEGMENT = 0x18538067
CLUSTER = 0x1F43B675
TRACKS = 0x1654AE6B
TRACK_ENTRY, TRACK_NUMBER, TRACK_TYPE, CODEC_ID, CODEC_PRIVATE = 0xAE, 0xD7, 0x83, 0x86, 0x63A2
SIMPLE_BLOCK, BLOCK_GROUP, BLOCK = 0xA3, 0xA0, 0xA1
VOID, CRC32 = 0xEC, 0xBF
CLUSTER_CHILDREN = {0xE7, 0x5854, 0xA7, 0xAB, SIMPLE_BLOCK, BLOCK_GROUP, 0xAF, VOID, CRC32}
SEEK_HEAD, INFO, CUES, ATTACHMENTS, CHAPTERS, TAGS = (
    0x114D9B74, 0x1549A966, 0x1C53BB6B, 0x1941A469, 0x1043A770, 0x1254C367,
)  # fmt: skip
SEGMENT_CHILDREN = {
    SEEK_HEAD,
    INFO,
    TRACKS,
    CLUSTER,
    CUES,
    ATTACHMENTS,
    CHAPTERS,
    TAGS,
    VOID,
    CRC32,
}
AUDIO_TRACK = 2
UNKNOWN = -1  # end of an element whose size is unknown (live streams)
MAX_ELEMENT = 1 << 20  # elements read whole (header, tracks, blocks) are at most this big
_CLUSTER_ID = CLUSTER.to_bytes(4, "big")


class _Garbage(ValueError):
    """Bytes that are not a WebM element where one should begin."""


def _vint(data: bytes | bytearray, at: int, *, marker: bool) -> tuple[int, int] | None:
    """The EBML variable-length integer at `at`: (value, length), None if cut short.

    `marker` keeps the length marker bit (element IDs); sizes drop it, and a size of all
    ones (unknown) comes back as UNKNOWN.
    """
    if at >= len(data):
        return None
    first = data[at]
    if first == 0:
        raise _Garbage("invalid EBML number")
    length = 9 - first.bit_length()
    if at + length > len(data):
        return None
    value = int.from_bytes(data[at : at + length], "big")
    if marker:
        return value, length
    value &= (1 << (7 * length)) - 1
    return (UNKNOWN if value == (1 << (7 * length)) - 1 else value), length


def _children(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(id, body) of each element in a complete master element's body."""
    at = 0
    while at < len(data):
        ident = _vint(data, at, marker=True)
        size = ident and _vint(data, at + ident[1], marker=False)
        if ident is None or not size or size[0] == UNKNOWN:
            raise _Garbage("truncated or unsized element inside a complete one")
        start = at + ident[1] + size[1]
        if start + size[0] > len(data):
            raise _Garbage("element larger than its parent")
        yield ident[0], data[start : start + size[0]]
        at = start + size[0]


def _laced_frames(data: bytes, lacing: int) -> list[bytes]:
    """A block's frames (Matroska lacing: 1 Xiph, 2 fixed size, 3 EBML)."""
    if lacing == 0:
        return [data]
    if not data:
        raise _Garbage("laced block without a frame count")
    count, at, sizes = data[0] + 1, 1, []
    if lacing == 1:
        for _ in range(count - 1):
            size = 0
            while at < len(data) and data[at] == 255:
                size, at = size + 255, at + 1
            if at >= len(data):
                raise _Garbage("Xiph lacing cut short")
            sizes.append(size + data[at])
            at += 1
    elif lacing == 2:
        sizes = [(len(data) - 1) // count] * (count - 1)
    else:
        first = _vint(data, at, marker=False)
        if first is None or first[0] == UNKNOWN:
            raise _Garbage("EBML lacing cut short")
        sizes, at = [first[0]], at + first[1]
        for _ in range(count - 2):
            diff = _vint(data, at, marker=False)
            if diff is None:
                raise _Garbage("EBML lacing cut short")
            sizes.append(sizes[-1] + diff[0] - ((1 << (7 * diff[1] - 1)) - 1))
            at += diff[1]
    frames = []
    for size in sizes:
        if size < 0 or at + size > len(data):
            raise _Garbage("laced frame sizes exceed the block")
        frames.append(data[at : at + size])
        at += size
    frames.append(data[at:])
    return frames


@dataclass
class WebmOpusReader:
    """Opus packets of one WebM stream fed in chunks cut anywhere."""

    track: int | None = None
    """Number of the audio track followed; None until the Tracks element was read."""
    head: bytes = b""
    """Its CodecPrivate: the OpusHead that configures the decoder."""
    _buf: bytearray = field(default_factory=bytearray)  # bytes not yet read
    _pos: int = 0  # stream offset of _buf[0]
    _stack: list[list[int]] = field(default_factory=list)  # [id, end] of open elements
    _skip: int = 0  # bytes of a skipped element still to come
    _started: bool = False
    _lost: bool = False  # after bytes that were not WebM: looking for the next cluster

    def feed(self, data: bytes) -> tuple[list[Packet], list[str]]:
        """Packets completed by `data`, and the problems met (in plain words)."""
        self._buf += data
        packets: list[Packet] = []
        problems: list[str] = []
        while True:
            try:
                if not self._step(packets, problems):
                    break
            except _Garbage as exc:
                self._resync(str(exc), problems)
        return packets, problems

    # ------------------------------------------------------------------ new owner

    def header(self) -> dict[str, Any]:
        """What is learned once per stream: the audio track's number and OpusHead."""
        if self.track is None:
            return {}
        return {"track": self.track, "head": b64(self.head)}

    def carry(self) -> dict[str, Any]:
        """What is in flight between two chunks; small (< one block)."""
        return {
            "buf": b64(self._buf),
            "pos": self._pos,
            "stack": self._stack,
            "skip": self._skip,
            "started": self._started,
            "lost": self._lost,
        }

    @classmethod
    def resume(cls, header: dict[str, Any], carry: dict[str, Any]) -> WebmOpusReader:
        """A reader continuing from another's `header()` and `carry()` (ValueError if bad)."""
        reader = cls()
        if header:
            reader.track = int(header["track"])
            reader.head = unb64(header["head"])
        if carry:
            reader._buf = bytearray(unb64(carry["buf"]))
            reader._pos = int(carry["pos"])
            reader._stack = [[int(ident), int(end)] for ident, end in carry["stack"]]
            reader._skip = int(carry["skip"])
            reader._started = bool(carry["started"])
            reader._lost = bool(carry["lost"])
            if reader._pos < 0 or reader._skip < 0 or any(e < UNKNOWN for _, e in reader._stack):
                raise ValueError("WebM reader state with negative offsets")
        return reader

    # ------------------------------------------------------------------ internals

    def _consume(self, n: int) -> bytes:
        data = bytes(self._buf[:n])
        del self._buf[:n]
        self._pos += n
        return data

    def _step(self, packets: list[Packet], problems: list[str]) -> bool:
        """Read one element (or part of a skipped one); False when more bytes are needed."""
        if self._skip:
            n = min(self._skip, len(self._buf))
            self._consume(n)
            self._skip -= n
            return not self._skip
        if self._lost:
            at = self._buf.find(_CLUSTER_ID)
            if at < 0:
                self._consume(max(0, len(self._buf) - (len(_CLUSTER_ID) - 1)))
                return False
            self._consume(at)
            self._lost = False
        while self._stack and self._stack[-1][1] != UNKNOWN and self._pos >= self._stack[-1][1]:
            self._stack.pop()
        ident_len = _vint(self._buf, 0, marker=True)
        if ident_len is None:
            return False
        ident, id_len = ident_len
        if id_len > 4:
            raise _Garbage("invalid element ID")
        size_len = _vint(self._buf, id_len, marker=False)
        if size_len is None:
            return False
        size, n = size_len
        header = id_len + n
        if not self._started and ident != EBML:
            self._started = True
            raise _Garbage("not a WebM stream: it does not start with an EBML header")
        self._started = True
        if not self._fits(ident):
            # The end of a cluster (or segment) of unknown size, or of one cut short by a
            # lost chunk; then the element is judged again one level up.
            self._stack.pop()
            return True
        parent = self._stack[-1] if self._stack else None
        if (
            parent
            and parent[1] != UNKNOWN
            and size != UNKNOWN
            and self._pos + header + size > parent[1]
        ):
            raise _Garbage("element larger than its parent")
        if ident in (SEGMENT, CLUSTER):
            self._consume(header)
            self._stack.append([ident, UNKNOWN if size == UNKNOWN else self._pos + size])
            return True
        if size == UNKNOWN:
            raise _Garbage(f"element {ident:#x} of unknown size")
        if ident in (EBML, TRACKS, SIMPLE_BLOCK, BLOCK_GROUP):
            if size > MAX_ELEMENT:
                raise _Garbage(f"element {ident:#x} of {size} bytes is too large")
            if len(self._buf) < header + size:
                return False
            body = self._consume(header + size)[header:]
            self._element(ident, body, packets, problems)
            return True
        self._consume(header)
        self._skip = size
        return True

    def _fits(self, ident: int) -> bool:
        """Whether `ident` may begin here; raises _Garbage if it may begin nowhere open."""
        parent = self._stack[-1][0] if self._stack else None
        if parent == CLUSTER and ident in CLUSTER_CHILDREN:
            return True
        if parent == SEGMENT and ident in SEGMENT_CHILDREN:
            return True
        if parent is None and ident in (EBML, SEGMENT):
            return True
        if parent is not None and ident in SEGMENT_CHILDREN | {EBML, SEGMENT}:
            return False
        raise _Garbage(f"element {ident:#x} where it cannot be")

    def _element(self, ident: int, body: bytes, packets: list[Packet], problems: list[str]) -> None:
        if ident == EBML:
            self.track, self.head = None, b""  # a new stream (a producer that restarted)
        elif ident == TRACKS:
            self._tracks(body, packets, problems)
        elif ident == SIMPLE_BLOCK:
            self._block(body, packets, problems)
        else:
            for child, data in _children(body):
                if child == BLOCK:
                    self._block(data, packets, problems)

    def _tracks(self, body: bytes, packets: list[Packet], problems: list[str]) -> None:
        for ident, entry in _children(body):
            if ident != TRACK_ENTRY:
                continue
            fields = dict(_children(entry))
            if int.from_bytes(fields.get(TRACK_TYPE, b""), "big") != AUDIO_TRACK:
                continue
            codec = fields.get(CODEC_ID, b"").rstrip(b"\x00").decode("ascii", "replace")
            head = fields.get(CODEC_PRIVATE, b"")
            if codec != "A_OPUS" or not head.startswith(b"OpusHead"):
                problems.append(f"WebM audio track with codec {codec!r}; only Opus (A_OPUS)")
                return
            self.track = int.from_bytes(fields.get(TRACK_NUMBER, b""), "big")
            self.head = head
            packets.append(Packet("head", head))
            return
        problems.append("WebM stream without an audio track")

    def _block(self, body: bytes, packets: list[Packet], problems: list[str]) -> None:
        track = _vint(body, 0, marker=False)
        if track is None or len(body) < track[1] + 3:
            raise _Garbage("block cut short")
        if self.track is None:
            problems.append("WebM audio before the stream's Tracks element")
            return
        if track[0] != self.track:
            return
        lacing = (body[track[1] + 2] >> 1) & 3
        for frame in _laced_frames(body[track[1] + 3 :], lacing):
            packets.append(Packet("audio", frame))

    def _resync(self, why: str, problems: list[str]) -> None:
        """Skip to the next cluster: the first place a reader can start again."""
        problems.append(f"{why} (at byte {self._pos}); skipping to the next cluster")
        self._consume(1)
        self._skip = 0
        self._lost = True
        self._stack = [entry for entry in self._stack if entry[0] == SEGMENT] or [
            [SEGMENT, UNKNOWN]
        ]
