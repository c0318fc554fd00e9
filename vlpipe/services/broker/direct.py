"""Direct input: a producer's chunks that are already the upstream's input format.

A session announced with `audio_in` equal to its `input_audio_format` (`SessionStart.
direct_input`) skips ingest: its chunks would come out of ingest as they went in, at the
cost of a second stream hop and a fenced write per 20 ms chunk. The broker reads
`vl:audio:{sid}` itself and sends each chunk upstream as it is (any length; the core's
replay accounting goes by duration, not by frame count).

What ingest does for such chunks still happens here, purely (`DirectInput.accept`):

* producer `seq`: a duplicate or a chunk older than one already sent is dropped and
  reported (`stale`), a skipped number is reported (`gap`). Chunks are not held back to
  reorder them (ingest's window would add latency to every chunk); a producer that needs
  reordering announces no `audio_in`.
* a chunk in another format, rate or channel count, or cut inside a sample, is refused
  with a reason naming what was expected (the shell dead-letters it).

The producer sequence number a new owner expects next is part of the broker's checkpoint
(`SessionCore.source_seq`), kept in step with the frame position it reads from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vlpipe.shared.audio import AudioFormat
from vlpipe.shared.contracts import RawAudio
from vlpipe.shared.reorder import Notice, SequenceWindow
from vlpipe.shared.streams import Entry, entry_key

NO_SEQ = -1
"""The frame number of a chunk the producer did not number."""


@dataclass
class DirectInput:
    sid: str
    fmt: AudioFormat
    expected: int | None = None
    """The producer `seq` expected next (from the checkpoint), if the producer numbers."""
    noticed_through: str = "0-0"
    """The last chunk an earlier owner made sequence notices for: read again, its notices
    are not made twice."""
    order: SequenceWindow[tuple[Entry, RawAudio]] = field(init=False)

    def __post_init__(self) -> None:
        self.order = SequenceWindow(window=0, expected=self.expected)

    def split(
        self, chunks: list[tuple[Entry, RawAudio]]
    ) -> tuple[list[tuple[Entry, RawAudio]], list[tuple[Entry, str]]]:
        """The chunks that can go upstream as they are, and the refused ones with the
        reason; nothing changes (the shell writes the refusals before it accepts the rest,
        so a failed refusal retried accepts nothing twice). A refused chunk's number is not
        taken: a gap if none comes for it."""
        good: list[tuple[Entry, RawAudio]] = []
        refused: list[tuple[Entry, str]] = []
        for entry, chunk in chunks:
            problem = self.mismatch(chunk)
            if problem is None:
                good.append((entry, chunk))
            else:
                refused.append((entry, problem))
        return good, refused

    def accept(
        self, chunks: list[tuple[Entry, RawAudio]]
    ) -> tuple[list[tuple[str, DirectFrame]], list[Notice]]:
        """The frames for the upstream and the sequence notices, for a batch of chunks
        `split` let through, in stream order."""
        frames: list[tuple[str, DirectFrame]] = []
        notices: list[Notice] = []
        for entry, chunk in chunks:
            ready, noticed = self.order.accept(chunk.seq, (entry, chunk))
            if noticed and entry_key(entry.id) > entry_key(self.noticed_through):
                notices += noticed
            for ready_entry, ready_chunk in ready:
                if ready_chunk.audio:
                    frames.append((ready_entry.id, self._frame(ready_chunk)))
        return frames, notices

    def mismatch(self, chunk: RawAudio) -> str | None:
        """Why `chunk` cannot go upstream as it is, or None."""
        fmt = self.fmt
        if not chunk.is_format(fmt):
            got = (
                f"{chunk.format.value} at {chunk.rate or 'no'} Hz with {chunk.channels} channel(s)"
            )
            return (
                f"session {self.sid} announced audio_in {fmt.value}, so its chunks go upstream "
                f"as they are and must be {fmt.wire_name} at {fmt.rate} Hz mono; got {got}"
            )
        if len(chunk.audio) % fmt.bytes_per_sample:
            return (
                f"{fmt.wire_name} needs a multiple of {fmt.bytes_per_sample} bytes, got "
                f"{len(chunk.audio)}"
            )
        return None

    def _frame(self, chunk: RawAudio) -> DirectFrame:
        seq = NO_SEQ if chunk.seq is None else chunk.seq
        return DirectFrame(seq, self.fmt, chunk.audio, False, chunk.traceparent)

    def final(self) -> DirectFrame:
        """The end-of-input marker, once the producer ended the session and every chunk it
        wrote was read."""
        return DirectFrame(NO_SEQ, self.fmt, b"", True, None)


@dataclass(frozen=True, slots=True)
class DirectFrame:
    """A chunk as the core reads a frame (`core.InputFrame`): it never leaves the process,
    so it is no `Frame` (whose construction, even unvalidated, cost as much as the rest
    of the chunk's way to the socket)."""

    seq: int
    format: AudioFormat
    audio: bytes
    final: bool
    traceparent: str | None
