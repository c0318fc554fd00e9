"""Direct input: a producer's chunks that are already the upstream's input format.

A session announced with `audio_in` equal to its `input_audio_format` (`SessionStart.
direct_input`) skips ingest: its chunks would come out of ingest as they went in, at the
cost of a second stream hop and a fenced write per 20 ms chunk. The broker reads
`vl:audio:{sid}` itself and sends each chunk upstream as it is (any length; the core's
replay accounting goes by duration, not by frame count).

What ingest does for such chunks still happens here, purely (`DirectInput.read` and
`DirectInput.accept`):

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

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vlpipe.shared.audio import AudioFormat
from vlpipe.shared.contracts import (
    MAX_AUDIO_BYTES,
    SCHEMA_VERSION,
    ContractError,
    RawAudio,
    decode,
)
from vlpipe.shared.reorder import Notice, SequenceWindow
from vlpipe.shared.streams import Entry, entry_key

NO_SEQ = -1
"""The frame number of a chunk the producer did not number."""

_PLAIN_FIELDS = frozenset({b"audio", b"format", b"rate", b"channels", b"seq", b"v"})
_PLAIN_VERSION = str(SCHEMA_VERSION).encode()
_SEQ_DIGITS = 18
"""A plain chunk's `seq` has at most this many digits (well inside a 64-bit integer)."""


@dataclass
class DirectInput:
    sid: str
    fmt: AudioFormat
    expected: int | None = None
    """The producer `seq` expected next (from the checkpoint), if the producer numbers."""
    noticed_through: str = "0-0"
    """The last chunk an earlier owner made sequence notices for: read again, its notices
    are not made twice."""
    order: SequenceWindow[tuple[Entry, DirectFrame]] = field(init=False)
    _plain_format: bytes = field(init=False)
    _plain_rate: bytes = field(init=False)

    def __post_init__(self) -> None:
        self.order = SequenceWindow(window=0, expected=self.expected)
        self._plain_format = self.fmt.wire_name.encode()
        self._plain_rate = str(self.fmt.rate).encode()

    def read(
        self, entries: list[Entry]
    ) -> tuple[list[tuple[Entry, DirectFrame]], list[tuple[Entry, str]]]:
        """The entries' chunks that can go upstream as they are (as frames; `accept` then
        checks their producer order), and the refused entries with the reason (not a
        `RawAudio`, or not the session's format); nothing changes (the shell writes the
        refusals before it accepts the rest, so a failed refusal retried accepts nothing
        twice). A refused chunk's number is not taken: a gap if none comes for it."""
        good: list[tuple[Entry, DirectFrame]] = []
        refused: list[tuple[Entry, str]] = []
        for entry in entries:
            chunk = self.plain(entry.fields)
            if chunk is None:
                try:
                    raw: RawAudio = decode(RawAudio, entry.fields)
                except ContractError as exc:
                    refused.append((entry, str(exc)))
                    continue
                problem = self.mismatch(raw)
                if problem is not None:
                    refused.append((entry, problem))
                    continue
                chunk = self.frame(raw)
            good.append((entry, chunk))
        return good, refused

    def plain(self, fields: Mapping[Any, Any]) -> DirectFrame | None:
        """The usual chunk, seen to be good without building `RawAudio` (1.3 µs a chunk
        instead of 3.7, on every 20 ms chunk of every session): the session's codec and
        rate as their wire names, mono, numbered in plain digits or not numbered, no other
        field. None for anything else, which goes through `RawAudio` (that names
        what is wrong); a chunk this takes, `RawAudio` and `mismatch` take as the same."""
        if not fields.keys() <= _PLAIN_FIELDS:
            return None
        audio = fields.get(b"audio")
        if (
            type(audio) is not bytes or not audio or len(audio) > MAX_AUDIO_BYTES
            or len(audio) % self.fmt.bytes_per_sample
            or fields.get(b"format") != self._plain_format
            or fields.get(b"channels", b"1") != b"1"
            or fields.get(b"v", _PLAIN_VERSION) != _PLAIN_VERSION
        ):  # fmt: skip
            return None
        rate = fields.get(b"rate")
        if rate != self._plain_rate and not (rate is None and self.fmt.is_g711):
            return None
        seq = fields.get(b"seq")
        if seq is None:
            return DirectFrame(NO_SEQ, self.fmt, audio, False, None)
        if (
            type(seq) is not bytes or not seq.isdigit() or len(seq) > _SEQ_DIGITS
            or (len(seq) > 1 and seq.startswith(b"0"))
        ):  # fmt: skip
            return None
        return DirectFrame(int(seq), self.fmt, audio, False, None)

    def accept(
        self, chunks: list[tuple[Entry, DirectFrame]]
    ) -> tuple[list[tuple[str, DirectFrame]], list[Notice]]:
        """The frames for the upstream and the sequence notices, for a batch of chunks
        `read` let through, in stream order."""
        frames: list[tuple[str, DirectFrame]] = []
        notices: list[Notice] = []
        for entry, chunk in chunks:
            seq = None if chunk.seq == NO_SEQ else chunk.seq
            ready, noticed = self.order.accept(seq, (entry, chunk))
            if noticed and entry_key(entry.id) > entry_key(self.noticed_through):
                notices += noticed
            for ready_entry, ready_chunk in ready:
                if ready_chunk.audio:
                    frames.append((ready_entry.id, ready_chunk))
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

    def frame(self, chunk: RawAudio) -> DirectFrame:
        """A chunk the model and `mismatch` let through, as the frame it goes upstream as."""
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
