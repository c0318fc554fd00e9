"""The ingest service: the thin Redis shell around `Normalizer`.

For each session it owns (SessionOwnership, group `ingest`), it follows the session's raw
audio stream from its checkpoint (one SessionStreamReader for the whole process), turns
each batch of `RawAudio` entries into frames, and writes the frames, the gap and stale
reports and its checkpoint, and the trim of the audio stream behind the checkpoint (it is
the stream's only reader), as one fenced write (`SessionOwnership.commit`): a replica
that takes the session over continues with the next frame number and no frame lost or
repeated, and a stalled replica that lost the session writes nothing. A failed write is
retried unchanged until it is applied, so the normalizer's state never runs ahead of what
Redis has. A bad chunk goes to `vl:dead` and to the session's status stream; the session
goes on. When the producer has ended the session and the audio stream is drained, it
flushes the last partial frame (padded to a full frame) and writes the final frame marker.

Hot path per batch: one XREAD (shared), one script call with the frames, the checkpoint
and the trim. No per-frame round trip, no per-frame log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from opentelemetry.metrics import Observation
from opentelemetry.trace import SpanKind

from vlpipe.services.ingest.containers import DEMUXERS
from vlpipe.services.ingest.normalize import SNAPSHOT_FIELDS, BadAudio, Normalizer
from vlpipe.services.ingest.settings import IngestSettings
from vlpipe.shared import telemetry
from vlpipe.shared.contracts import ContractError, Frame, RawAudio, Status, decode, encode
from vlpipe.shared.fencing import SessionLost
from vlpipe.shared.ownership import OwnedSession
from vlpipe.shared.reorder import Notice, SequenceWindow, describe
from vlpipe.shared.service import ServiceContext
from vlpipe.shared.sessions import refuse, run_sessions, session_ownership, session_reader
from vlpipe.shared.streams import REDIS_DOWN, Entry, entry_key, through_outages

log = logging.getLogger("vlpipe.ingest")

LOOK_EVERY_WRITES = 25
"""A write in this many trims the audio stream and reads the broker's backlog and turn
marker (every half second at one 20 ms chunk per write; every write in a backlog)."""


@dataclass
class SessionIngest:
    """One owned session's normalizer and frame numbering."""

    owned: OwnedSession
    normalizer: Normalizer
    next_seq: int
    last_id: str
    order: SequenceWindow[tuple[Entry, RawAudio]]
    paused: bool = False
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    written_at: deque[tuple[int, int]] = field(default_factory=lambda: deque(maxlen=3000))
    """(frame seq, time written in ns) of the last minute of frames, for the turn traces."""
    turn_seen: bytes = b""
    writes: int = 0
    checkpointed: dict[str, str | int | float] = field(default_factory=dict)
    """The checkpoint fields as last written: a write carries only those that changed."""


class IngestService:
    def __init__(self, ctx: ServiceContext, settings: IngestSettings) -> None:
        self.ctx = ctx
        self.settings = settings
        self.keys = ctx.keys
        self.retention = ctx.retention
        self.sessions: dict[str, SessionIngest] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.reader = session_reader(ctx, settings)
        self.ownership = session_ownership(ctx, settings, self.run_session)
        self.tracer = telemetry.tracer("ingest")
        meter = telemetry.meter("ingest")
        self.frames_written = 0
        # Counted per write and observed when metrics are collected: an instrument's add()
        # per 20 ms chunk of every session cost as much as the rest of the count.
        meter.create_observable_counter(
            "vlpipe.ingest.frames", description="Frames written",
            callbacks=[lambda _: [Observation(self.frames_written)]],
        )  # fmt: skip
        self.bad_chunks = meter.create_counter(
            "vlpipe.ingest.bad_chunks", description="Chunks refused"
        )

    async def run(self) -> None:
        await run_sessions(self.ctx, self.settings, self.reader, self.ownership)

    async def run_session(self, owned: OwnedSession) -> None:
        """Normalize one session until it ends and its audio is drained."""
        if owned.start.direct_input:
            return  # already the upstream's format: the broker reads the chunks itself
        checkpoint = owned.checkpoint
        normalizer, next_seq, order = self._resume(owned, checkpoint)
        state = SessionIngest(
            owned=owned, normalizer=normalizer, next_seq=next_seq, order=order,
            checkpointed={k: checkpoint[k] for k in SNAPSHOT_FIELDS if k in checkpoint},
            last_id=checkpoint.get("audio_id", "0-0"),
        )  # fmt: skip
        if checkpoint.get("final") == "1":
            return
        self.sessions[owned.sid] = state
        audio_key = self.keys.audio(owned.sid)
        self.reader.add(audio_key, state.last_id, self._on_audio)
        try:
            await owned.ended.wait()
            # The producer ended the session: everything it sent is in the stream now.
            while await self._unread(audio_key, self._read_up_to(state, audio_key)):
                state.idle.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(state.idle.wait(), timeout=1)
            await self._finish(state)
        finally:
            self.reader.remove(audio_key)
            self.sessions.pop(owned.sid, None)

    def _read_up_to(self, state: SessionIngest, key: str) -> str:
        """The last audio entry done with: written, or dead-lettered by the reader after
        its handler failed on it (then nothing was written for it)."""
        passed = self.reader.position(key) or state.last_id
        return max(passed, state.last_id, key=entry_key)

    async def _unread(self, key: str, after: str) -> bool:
        newer = await through_outages(
            lambda: self.ctx.redis.xrange(key, min=f"({after}", count=1), "unread audio"
        )
        return bool(newer)

    async def _on_audio(self, key: str, entries: list[Entry]) -> None:
        sid = key[key.index("{") + 1 : key.rindex("}")]
        state = self.sessions.get(sid)
        if state is None or state.owned.lost.is_set():
            return
        frames: list[Frame] = []
        notices: list[Notice] = []
        for entry in entries:
            try:
                chunk: RawAudio = decode(RawAudio, entry.fields)
            except ContractError as exc:
                await self._refuse(sid, entry, str(exc))
                continue
            ready, noticed = state.order.accept(chunk.seq, (entry, chunk))
            notices += noticed
            for ready_entry, ready_chunk in ready:
                frames += await self._normalize(state, ready_entry, ready_chunk)
        try:
            await self._write(state, frames, entries[-1].id, notices)
        except SessionLost:
            raise
        except Exception:
            # Not applied: back to the last checkpoint, so that the reader's retry of these
            # entries makes the same frames instead of dropping them as stale.
            self._rewind(state)
            raise
        state.idle.set()

    def _rewind(self, state: SessionIngest) -> None:
        """The session's state as of its last applied write (its checkpoint); chunks held
        for reordering from earlier batches are not kept (reported as a gap), as on a
        takeover."""
        owned = state.owned
        checkpoint = {**owned.checkpoint, **{k: str(v) for k, v in state.checkpointed.items()}}
        state.normalizer, state.next_seq, state.order = self._resume(owned, checkpoint)

    def _resume(
        self, owned: OwnedSession, checkpoint: dict[str, str]
    ) -> tuple[Normalizer, int, SequenceWindow[tuple[Entry, RawAudio]]]:
        """The normalizer, the next frame number and the reordering window as of
        `checkpoint`."""
        normalizer = Normalizer.resume(
            owned.start.config.input_audio_format, self.settings.frame_ms, checkpoint
        )
        expected = checkpoint.get("expected_seq")
        order: SequenceWindow[tuple[Entry, RawAudio]] = SequenceWindow(
            window=self.settings.reorder_window, expected=int(expected) if expected else None
        )
        return normalizer, int(checkpoint.get("next_seq", "0")), order

    async def _normalize(self, state: SessionIngest, entry: Entry, chunk: RawAudio) -> list[Frame]:
        try:
            if chunk.format.value in DEMUXERS:
                # Each compressed chunk waits for its decoding: off the event loop, so a
                # large one does not hold up every other session's audio.
                pcm_frames = await asyncio.to_thread(state.normalizer.push, chunk)
            else:
                pcm_frames = state.normalizer.push(chunk)
        except BadAudio as exc:
            await self._refuse(state.owned.sid, entry, str(exc))
            return []
        ts = chunk.ts if chunk.ts is not None else time.time() * 1000
        frames = []
        for i, audio in enumerate(pcm_frames):
            frames.append(
                Frame(
                    session=state.owned.sid,
                    seq=state.next_seq,
                    format=state.normalizer.target,
                    audio=audio,
                    ts=ts + i * self.settings.frame_ms,
                    traceparent=chunk.traceparent if i == 0 else None,
                )
            )
            state.next_seq += 1
        return frames

    def _statuses(self, sid: str, notices: list[Notice]) -> list[Status]:
        """Gaps and stale entries go to the session's status stream, never silently."""
        out = []
        for notice in notices:
            kind, message, detail = describe(notice)
            out.append(Status(session=sid, service="ingest", kind=kind, message=message,
                              detail=detail))  # fmt: skip
        return out

    async def _write(
        self,
        state: SessionIngest,
        frames: list[Frame],
        audio_id: str,
        notices: list[Notice],
        final: bool = False,
    ) -> None:
        """Frames, reports, checkpoint and trim in one fenced write (retried unchanged
        through outages; `SessionLost` if this replica may no longer write)."""
        sid = state.owned.sid
        write = self.ownership.write(state.owned)
        for frame in frames:
            write.xadd(self.keys.frames(sid), encode(frame))
        for status in self._statuses(sid, notices):
            write.xadd(self.keys.status(sid), encode(status), maxlen=self.retention.status)
        values: dict[str, str | int | float] = {
            "audio_id": audio_id, "next_seq": state.next_seq, "final": int(final),
        }  # fmt: skip
        if state.order.expected is not None:
            values["expected_seq"] = state.order.expected
        snapshot = state.normalizer.snapshot()
        values.update(snapshot)
        write.checkpoint({k: v for k, v in values.items() if state.checkpointed.get(k) != v})
        # At real-time pace every 20 ms chunk is a write of its own: the trim (approximate,
        # whole stream nodes only) and the looks at the broker's side go with some of them.
        state.writes += 1
        look = final or len(frames) > 1 or state.writes % LOOK_EVERY_WRITES == 0
        if look:
            write.trim_before(self.keys.audio(sid), audio_id)
            write.read("HGET", self.keys.session_state(sid), "broker.turn")
            write.read("XLEN", self.keys.frames(sid))
        replies = await self.ownership.commit(state.owned, write)
        state.checkpointed = values
        turn, backlog = replies if replies else (None, 0)
        now_ns = time.time_ns()
        state.written_at.extend((frame.seq, now_ns) for frame in frames)
        if turn and turn != state.turn_seen:
            state.turn_seen = turn
            self._trace_utterance(state, turn.decode())
        state.last_id = audio_id
        self.frames_written += len(frames)
        if backlog > self.settings.max_backlog_frames and not final and not state.paused:
            self._pause(state)

    def _trace_utterance(self, state: SessionIngest, marker: str) -> None:
        """The broker started a turn at frame N: a span, in the turn's trace, from when
        ingest wrote that first frame of the utterance to now. No span per frame."""
        traceparent, _, seq_text = marker.partition(" ")
        context = telemetry.extract(traceparent)
        if context is None or not seq_text.isdigit():
            return
        seq = int(seq_text)
        start = next((ns for s, ns in reversed(state.written_at) if s == seq), None)
        if start is None:
            return  # written before this replica took the session over
        sid = state.owned.sid
        attributes = dict(telemetry.messaging_attributes("send", self.keys.frames(sid)))
        attributes.update({"session.id": sid, "vlpipe.frame.seq": seq})
        self.tracer.start_span(
            "ingest.utterance", context=context, kind=SpanKind.PRODUCER,
            attributes=attributes, start_time=start,
        ).end()  # fmt: skip

    def _pause(self, state: SessionIngest) -> None:
        """Backpressure: the broker is behind, so leave the audio in Redis, not in memory.

        The broker trims the frames stream behind its checkpoint, so its length is what the
        broker has not read yet. Reading resumes once it is below half the limit.
        """
        sid = state.owned.sid
        audio_key = self.keys.audio(sid)
        self.reader.remove(audio_key)
        state.paused = True
        log.info("broker behind: pausing audio", extra={"session": sid})

        async def resume() -> None:
            while not state.owned.lost.is_set() and sid in self.sessions:
                with contextlib.suppress(*REDIS_DOWN):
                    backlog = await self.ctx.redis.xlen(self.keys.frames(sid))
                    if backlog <= self.settings.max_backlog_frames // 2:
                        state.paused = False
                        self.reader.add(audio_key, state.last_id, self._on_audio)
                        log.info("broker caught up: resuming audio", extra={"session": sid})
                        return
                await asyncio.sleep(0.2)

        task = asyncio.create_task(resume(), name=f"ingest-resume-{sid}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _finish(self, state: SessionIngest) -> None:
        sid = state.owned.sid
        held, notices = state.order.drain()
        frames: list[Frame] = []
        for entry, chunk in held:
            frames += await self._normalize(state, entry, chunk)
        frames += [
            Frame(session=sid, seq=state.next_seq + i, format=state.normalizer.target, audio=audio)
            # Off the loop: a compressed stream's decoder may take a moment to finish.
            for i, audio in enumerate(await asyncio.to_thread(state.normalizer.flush, True))
        ]
        state.next_seq += len(frames)
        frames.append(
            Frame(
                session=sid,
                seq=state.next_seq,
                format=state.normalizer.target,
                audio=b"",
                final=True,
            )
        )
        state.next_seq += 1
        await self._write(state, frames, state.last_id, notices, final=True)
        log.info("session input finished", extra={"session": sid, "frames": state.next_seq})

    async def _refuse(self, sid: str, entry: Entry, reason: str) -> None:
        self.bad_chunks.add(1)
        await refuse(self.ctx, sid, entry, reason)
