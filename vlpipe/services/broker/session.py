"""One session's upstream WebSocket: the I/O shell around `SessionCore`.

The core (`vlpipe/services/broker/core.py`) holds the session's state and makes every
decision; this shell only moves bytes between it, the upstream socket and Redis:

* `_upstream_life` opens the upstream socket (backoff with jitter; refused credentials
  counted apart), serves it, and opens a new one after a drop or at a rollover. Each new
  upstream session gets what `core.upstream_opened` queued: the config, the remembered
  conversation and the audio the last one had not committed, before live audio.
* `_receive_loop` parses each server event, decodes audio deltas and feeds the core.
* `_send_loop` feeds the core the frames and control messages the shared readers queued,
  and the clock, and watches for the end (input finished and drained, `session.end`, a
  rollover due). At most `max_pending_frames` wait in memory; past that the frames stream
  is not read (the backlog waits in Redis) until the core has them.
* `_pump` sends what the core queued for the upstream, in order, one sender at a time; it
  reads the playback position when the core asks for it (a barge-in) and hands refused
  entries to the service.
* `_write_loop` writes the core's events, status entries, tool calls and checkpoint as
  fenced writes (`SessionOwnership.commit`): a replica that takes the session over
  continues with the next event number and no event written twice, and a stalled replica
  that lost the session writes nothing. A failed write is retried unchanged. A write with
  only the checkpoint waits up to `CHECKPOINT_EVERY_S` for company.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import random
import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from vlpipe.services.broker.core import InputFrame, SessionCore, SessionEnded
from vlpipe.services.broker.direct import DirectFrame, DirectInput
from vlpipe.services.broker.upstream import UpstreamError, open_upstream
from vlpipe.services.egress.outputs import Outputs, SessionOutputs
from vlpipe.services.egress.writing import prefixed
from vlpipe.shared.contracts import EndSession, Event, Message, SessionEnd, encode
from vlpipe.shared.fencing import SessionLost, SessionWrite, done_field
from vlpipe.shared.ownership import OwnedSession
from vlpipe.shared.reorder import describe
from vlpipe.shared.streams import REDIS_DOWN, Entry, entry_key, entry_ms, through_outages

if TYPE_CHECKING:
    from vlpipe.services.broker.service import BrokerService

LATENCY_SAMPLE_EVERY = 50
"""Of a session's batches of frames, the one in this many whose latency is recorded: at
real-time pace one a second of each session (a histogram's record costs tens of µs; one
in ten was 1% of the broker's CPU at 25 calls)."""

log = logging.getLogger("vlpipe.broker")

CHECKPOINT_EVERY_S = 0.5
EVENTS_TRIM_EVERY_S = 5.0
"""When the broker makes the outputs: how often its write trims the events stream."""
OUTPUTS_PREFIX = "out."
"""The checkpoint fields of the session's outputs (`SessionOutputs.snapshot`), when the
broker makes them: prefixed, as some of their names are the core's too."""
CLOSE_WAIT_S = 1.0
"""At the end, the most the upstream's close handshake or the writer's last write may take
(a stopping replica has a drain budget to keep)."""


class BrokerSession:
    def __init__(self, service: BrokerService, owned: OwnedSession) -> None:
        self.svc = service
        self.settings = service.settings
        self.owned = owned
        self.sid = owned.sid
        start = owned.start
        # Chunks already in the upstream's format come from the producer's stream itself.
        self.input_key = (service.keys.audio if start.direct_input else service.keys.frames)(
            owned.sid
        )
        self.core = SessionCore(
            owned.sid, start.config, owned.checkpoint, service.settings,
            taken_over=owned.taken_over, replica=service.ctx.replica,
            frames_key=self.input_key, producer_traceparent=start.traceparent,
            direct_input=start.direct_input,
        )  # fmt: skip
        self.direct: DirectInput | None = None
        if start.direct_input:
            fmt = start.config.input_audio_format
            self.direct = DirectInput(owned.sid, fmt, self.core.source_seq, self.core.input_read)
        # Work queued by the shared reader for the sender.
        self.frames: deque[tuple[str, InputFrame]] = deque()
        self.controls: deque[tuple[Entry, Message]] = deque()
        self.queued_frames_id = self.core.frames_id
        self.reading_frames = False
        self.work = asyncio.Event()
        self.waiting = False
        """The sender is idle, waiting for work, with nothing left to send."""
        self.due = True
        """Time-driven checks are due at the sender's next turn (see `_send_loop`)."""
        self.last_input_at = time.monotonic()
        self.idle_ended = False
        self.batches = 0
        # Writing.
        self.in_flight: tuple[SessionWrite, int, Outputs] | None = None
        """A write not applied yet, its event count and the outputs it carries."""
        self.outputs: SessionOutputs | None = None
        """The session's outputs, when the broker makes them (`VLPIPE_OUTPUTS_BY`)."""
        self.events_trimmed_at = 0.0
        self.outputs_written: dict[str, str] = {}
        """Their checkpoint fields as last written: a write carries only those that changed."""
        # Decided when the session starts, by the broker that starts it, and kept by every
        # owner after it (its checkpoint says so): replicas with different settings (a
        # rolling change) never number a session's outputs twice or leave them unmade.
        made_here = OUTPUTS_PREFIX + "seqs" in owned.checkpoint
        starting = self.core.seq == 0  # (its first event, which says who, is still to come)
        if made_here or (starting and self.settings.outputs_by == "broker"):
            self.outputs = SessionOutputs(
                owned.sid, start.audio_out, start.config.output_audio_format,
                self.settings.partial_ms, service="broker",
            )  # fmt: skip
            self.outputs_written = prefixed(owned.checkpoint, OUTPUTS_PREFIX)
            self.outputs.load(self.outputs_written)
        self.trimmed = ("", "")
        """The input and control streams' positions the last write trimmed to."""
        self.output_ready = asyncio.Event()
        self.events_ready = asyncio.Event()  # events (not just a checkpoint) to write
        self.closing = False
        # The upstream.
        self.ws: ClientConnection | None = None
        self.send_lock = asyncio.Lock()
        self._rollover_requested = False

    # ---------------------------------------------------------------- life

    async def run(self) -> None:
        core, svc = self.core, self.svc
        if self.owned.taken_over:  # what the previous owner wrote but did not relay
            await svc.relay_tool_calls(self.sid)
            if self.outputs is not None:
                await svc.relay_transcripts(self.sid)
        if core.ended:
            return
        writer = asyncio.create_task(self._write_loop(), name=f"broker-write-{self.sid}")
        svc.ctl_reader.add(svc.keys.ctl(self.sid), core.ctl_id, svc.on_ctl)
        self._read_frames()
        input_end: asyncio.Task[None] | None = None
        if self.direct is not None and not core.input_final:
            input_end = asyncio.create_task(self._direct_input_end(),
                                            name=f"broker-input-end-{self.sid}")  # fmt: skip
        reason = "cancelled"
        try:
            if core.seq == 0:
                core.emit("vlpipe.session.started", {
                    "config": core.config.model_dump(mode="json"),
                    "outputs_by": "egress" if self.outputs is None else "broker",
                })  # fmt: skip
                self._changed()
            reason = await self._upstream_life()
        except SessionEnded as exc:
            reason = exc.reason
        finally:
            core.turns.end()
            if input_end is not None:
                input_end.cancel()
            svc.ctl_reader.remove(svc.keys.ctl(self.sid))
            svc.reader.remove(self.input_key)
            if self.ws is not None:
                # A silent upstream would hold the close handshake for its whole timeout.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(self.ws.close(1001, "broker stopping")),
                                           CLOSE_WAIT_S)  # fmt: skip
            self.closing = True
            self.output_ready.set()
            self.events_ready.set()
            if self.owned.lost.is_set():
                writer.cancel()
            else:
                if not core.ended and reason != "cancelled":
                    core.end(reason)
                # Leave the last events and the checkpoint behind, even when cancelled:
                # the writer stops after the write in progress, then one last write.
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(writer, timeout=CLOSE_WAIT_S)
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._flush())
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(svc.tool_call_outbox.settle(self.sid), CLOSE_WAIT_S)
                if self.outputs is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(svc.outputs.transcripts.settle(self.sid),
                                               CLOSE_WAIT_S)  # fmt: skip
        log.info("session finished", extra={"session": self.sid, "reason": reason})

    async def _upstream_life(self) -> str:
        """Connect, serve, reconnect until the session ends; returns why it ended."""
        core = self.core
        failures = refusals = 0
        while True:
            if core.end_reason:
                return core.end_reason
            try:
                self.ws = await open_upstream(self.settings, self.svc.auth, self.svc.url)
            except UpstreamError as exc:
                if exc.refused:
                    refusals += 1
                else:
                    failures += 1
                self.svc.reconnects.add(1, {"outcome": "refused" if exc.refused else "failed"})
                core.status(
                    "error", str(exc), {"status": exc.status, "attempt": failures + refusals}
                )
                log.warning(str(exc), extra={"session": self.sid})
                if refusals >= self.settings.auth_attempts:
                    return "upstream_refused_credentials"
                if failures >= self.settings.reconnect_attempts:
                    return "upstream_unreachable"
                delay = _jittered(0.5 * 2 ** (failures + refusals - 1), cap=15.0)
                core.emit("vlpipe.upstream.reconnecting", {
                    "attempt": failures + refusals, "error": str(exc), "retry_in_s": round(delay, 2),
                })  # fmt: skip
                self._changed()
                await self._sleep_unless_ended(delay)
                continue
            now = time.monotonic()
            core.emit("vlpipe.upstream.connected", {
                "resumed": core.resumed, "takeover": self.owned.taken_over and not failures,
                "replayed_ms": round(sum(f.end_ms - f.at_ms for f in core.retained), 1),
            })  # fmt: skip
            core.upstream_opened(now)
            closed = await self._serve_connection()
            if closed is None:  # the session is over
                return core.end_reason or ("idle" if self.idle_ended else "input_ended")
            code, why = closed
            lived = time.monotonic() - now
            failures = 0 if lived > 10 else failures + 1
            if failures >= self.settings.reconnect_attempts:
                return "upstream_unstable"
            if why != "rollover":
                self.svc.reconnects.add(1, {"outcome": "dropped"})
                core.status("error", f"upstream closed the socket ({code} {why}); reconnecting",
                            {"code": code, "reason": why})  # fmt: skip
            delay = 0.0 if why == "rollover" else _jittered(0.2 * 2**failures, cap=10.0)
            core.trace.mark("vlpipe.upstream.reconnect", **{"vlpipe.close.code": code,
                                                             "vlpipe.close.reason": why})  # fmt: skip
            core.emit("vlpipe.upstream.reconnecting", {
                "code": code, "reason": why, "in_flight_response": core.conv.response_id,
                "retry_in_s": round(delay, 2),
            })  # fmt: skip
            core.upstream_lost()
            self._changed()
            await self._sleep_unless_ended(delay)

    async def _serve_connection(self) -> tuple[int | None, str] | None:
        """Serve one upstream connection; None when the session ended, else why it closed."""
        ws = self.ws
        assert ws is not None
        receiver = asyncio.create_task(self._receive_loop(ws), name=f"broker-recv-{self.sid}")
        sender = asyncio.create_task(self._send_loop(ws), name=f"broker-send-{self.sid}")
        try:
            done, _ = await asyncio.wait({receiver, sender}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = task.exception()
                if isinstance(exc, SessionEnded):
                    self.core.end_reason = self.core.end_reason or exc.reason
                elif exc is not None and not isinstance(exc, ConnectionClosed):
                    raise exc
            if self._rollover_requested:
                self._rollover_requested = False
                return 1000, "rollover"
            if self.core.end_reason or (sender in done and sender.exception() is None):
                await ws.close(1000, "session ended")
                return None
            return _close_cause(ws)
        finally:
            for task in (receiver, sender):
                task.cancel()
            await asyncio.gather(receiver, sender, return_exceptions=True)
            self.ws = None

    # ---------------------------------------------------------------- to the upstream

    async def _pump(self) -> None:
        """Act on what the core decided: the playback position it asked for, refusals,
        then its upstream messages, in order (one sender at a time)."""
        core = self.core
        if core.playback_needed is not None:
            if core.barge_in(await self.svc.playback(self.sid), time.time()):
                self.svc.barge_ins.add(1)
        while core.refusals:
            entry, reason = core.refusals.pop(0)
            await self.svc.refuse(self.sid, entry, reason)
        if core.upstream:
            async with self.send_lock:
                ws = self.ws
                while core.upstream and ws is not None:
                    await ws.send(_wire(core.upstream.popleft()))
        self._changed()

    async def _send_loop(self, ws: ClientConnection) -> None:
        """Frames and control messages upstream; returns when the session is done.

        A wake for frames only sends them: what waits on time passing (the drain after the
        input ended, a rollover, tool deadlines, idleness) is looked at when the service's
        tick, a control message or an upstream event woke the loop (`due`)."""
        core = self.core
        await self._pump()  # what upstream_opened queued: config, conversation, replay
        while True:
            self.work.clear()  # work queued from here on wakes the wait below at once
            while self.controls:
                entry, msg = self.controls.popleft()
                core.control(entry, msg, time.monotonic())
                await self._pump()
            if self.frames:
                await self._send_frames()
            if not self.reading_frames and not core.input_final and not core.ended:
                self._read_frames()
            if core.end_reason:
                raise SessionEnded(core.end_reason)
            if self.due:
                self.due = False
                now = time.monotonic()
                if core.finished(now):
                    return
                if core.rollover_due(now):
                    self._rollover_requested = True
                    await ws.close(1000, "rollover")
                    return
                core.tick(now)
                self._check_idle(now)
                if core.upstream or core.refusals or core.playback_needed is not None:
                    await self._pump()
                self._changed()
            self.waiting = True
            try:
                await self.work.wait()
            finally:
                self.waiting = False

    async def _send_frames(self) -> None:
        batch = list(self.frames)
        self.frames.clear()
        self._audio(batch)
        await self._pump()

    def _audio(self, batch: Sequence[tuple[str, InputFrame]]) -> None:
        """The frames to the core (which queues their appends), and their count; the
        latency of one batch in `LATENCY_SAMPLE_EVERY` (the oldest frame's)."""
        self.batches += 1
        if self.batches % LATENCY_SAMPLE_EVERY == 0:
            latency = max(0.0, time.time() * 1000 - entry_ms(batch[0][0]))
            self.svc.frame_latency.record(latency)
            self.svc.sampled_latency_ms.append(latency)
        sent, appends = self.core.audio(batch, time.monotonic())
        if self.core.input_final:
            self.due = True  # the drain may be over already
        if sent:
            totals = self.svc.totals
            totals["frames"] += sent
            totals["appends"] += len(appends)
            totals["largest_append_bytes"] = max(totals["largest_append_bytes"], *appends)

    def _send_at_once(self, frames: Sequence[tuple[str, InputFrame]]) -> bool:
        """Frames straight from the reader to the upstream socket, when the sender is idle
        with nothing queued and the socket takes them without waiting: at real-time pace,
        every 20 ms frame of every session, with no wake of the sender task and no await.
        False (nothing done) when the sender must have them instead."""
        ws, core = self.ws, self.core
        if (
            ws is None or not self.waiting or self.frames or self.controls or self.due
            or core.upstream or core.playback_needed is not None or core.refusals
            or self.send_lock.locked() or not _takes_at_once(ws)
        ):  # fmt: skip
            return False
        self._audio(frames)
        if core.upstream:  # it takes the first: just seen
            _write_at_once(ws, _wire(core.upstream.popleft()))
        while core.upstream:  # more: frames that waited, coalesced, or the input's end
            if not _takes_at_once(ws):
                self.due = True  # the sender sends the rest, in order
                break
            _write_at_once(ws, _wire(core.upstream.popleft()))
        if self.due:
            self.work.set()
        self._changed()
        return True

    def _check_idle(self, now: float) -> None:
        """No input audio and no control for `session_idle_s`: end the session the normal
        way (an end announcement every service follows), once."""
        if self.idle_ended or self.core.input_final:
            return
        if now - self.last_input_at < self.settings.session_idle_s:
            return
        self.idle_ended = True
        log.info("session idle: ending it", extra={"session": self.sid})
        task = asyncio.create_task(self._announce_idle_end())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _announce_idle_end(self) -> None:
        end = SessionEnd(session=self.sid, reason="idle")
        while not self.owned.lost.is_set() and not self.closing:
            try:
                await self.svc.redis.xadd(self.svc.keys.sessions, encode(end))  # type: ignore[arg-type]
                return
            except REDIS_DOWN:
                await asyncio.sleep(1.0)

    # ---------------------------------------------------------------- from the upstream

    async def _receive_loop(self, ws: ClientConnection) -> None:
        core = self.core
        async for raw in ws:
            received = time.time() * 1000
            if isinstance(raw, bytes):
                core.status("error", "upstream sent a binary message; ignored", {"bytes": len(raw)})
                self._changed()
                continue
            try:
                event = json.loads(raw)
                kind = event["type"]
            except (ValueError, KeyError, TypeError):
                core.status("error", "upstream sent a message that is not a JSON event; ignored",
                            {"bytes": len(raw)})  # fmt: skip
                self._changed()
                continue
            audio: bytes | None = None
            if kind == "response.audio.delta":
                try:
                    audio = base64.b64decode(event.pop("delta", ""), validate=True)
                except ValueError:
                    core.status("error", "upstream audio delta is not base64; dropped", {})
                    audio = b""
            elif kind == "error":
                error = event.get("error") or {}
                code = str(error.get("code") or error.get("type") or "unknown")
                self.svc.upstream_errors.add(1, {"code": code})
                log.warning(f"upstream error {code}", extra={"session": self.sid})
            elif kind == "response.function_call_arguments.done":
                self.svc.tool_calls.add(1)
            core.server_event(event, audio, received, time.monotonic())
            await self._pump()
            self.due = True
            self.work.set()

    # ---------------------------------------------------------------- to Redis

    def refused(self, entry: Entry) -> None:
        """An input entry was dead-lettered: into the next checkpoint."""
        self.core.refused_entry(entry)
        self._changed()

    def _changed(self) -> None:
        """Wake the writer for what the core queued."""
        core = self.core
        if core.events or core.side:
            self.output_ready.set()
            self.events_ready.set()
        elif core.dirty or core.conversation_dirty:
            self.output_ready.set()

    async def _write_loop(self) -> None:
        core = self.core
        while not self.closing:
            await self.output_ready.wait()
            self.output_ready.clear()
            if not core.events and not core.side and not self.closing:
                # Only the checkpoint moved: write it at most every `CHECKPOINT_EVERY_S`.
                self.events_ready.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(CHECKPOINT_EVERY_S):
                        await self.events_ready.wait()
            if self.closing:
                return
            try:
                await self._flush()
            except SessionLost:
                return
            except Exception as exc:
                log.warning("writing events failed; retrying",
                            extra={"session": self.sid, "error": repr(exc)[:300]})  # fmt: skip
                await asyncio.sleep(0.5)
                self.output_ready.set()

    async def _flush(self) -> None:
        """Write what is queued: first a write whose earlier try failed, unchanged (a
        retry of one that was applied is recognised), then what was queued since."""
        core = self.core
        if self.owned.lost.is_set():
            return
        if self.in_flight is None:
            if not (core.events or core.side or core.dirty or core.conversation_dirty):
                return
            self.in_flight = self._next_write()
        write, events, out = self.in_flight
        await self.svc.ownership.commit(self.owned, write)
        self.in_flight = None
        if events:
            self.svc.totals["events"] += events
        if self.svc.tool_call_outbox.pending_in(write, self.sid):
            self.svc.tool_call_outbox.relay_soon(self.sid)
        writer = self.svc.outputs
        if self.outputs is not None:
            if writer.transcripts.pending_in(write, self.sid) and not out.ended:
                writer.transcripts.relay_soon(self.sid)  # (the end settles them)
            writer.written(self.sid, out)

    def _next_write(self) -> tuple[SessionWrite, int, Outputs]:
        """The core's events, side entries, checkpoint and trims as one fenced write; and
        the outputs of the events, when the broker makes them."""
        core, keys, keep = self.core, self.svc.keys, self.svc.retention
        events = core.take_events()
        write = self.svc.ownership.write(self.owned)
        for event in events:
            write.xadd(keys.events(self.sid), encode(event))
        out, outputs_state = self._outputs(write, events)
        for kind, msg in core.take_side():
            if kind == "tool_call":
                # Trimmed behind its consumer groups by housekeeping, never on write; on a
                # cluster through the session's outbox (vlpipe.shared.outbox).
                self.svc.tool_call_outbox.add(write, self.sid, encode(msg))
            else:
                write.xadd(keys.status(self.sid), encode(msg), maxlen=keep.status)
        write.checkpoint({**core.checkpoint(), **outputs_state})
        # Frames the upstream has not committed stay: a new upstream session gets them. A
        # position that has not moved since the last write has nothing new to trim (the
        # control stream's, nearly always).
        if core.frames_id != self.trimmed[0]:
            write.trim_before(self.input_key, core.frames_id, approximate=False)
        if core.ctl_id != self.trimmed[1]:
            write.trim_before(keys.ctl(self.sid), core.ctl_id, approximate=False)
        self.trimmed = (core.frames_id, core.ctl_id)
        return write, len(events), out

    def _outputs(self, write: SessionWrite, events: list[Event]) -> tuple[Outputs, dict[str, str]]:
        """When the broker makes the outputs: those of `events`, added to `write`, and the
        checkpoint fields of their state that changed."""
        out = Outputs()
        if self.outputs is None or not events:
            return out, {}  # (their state moves only with events: a checkpoint-only write)
        for event in events:
            try:
                self.outputs.observe(event, out)
            except Exception as exc:  # an event the outputs cannot read: its outputs only
                log.warning("an event's outputs could not be made",
                            extra={"session": self.sid, "event": event.type, "error": repr(exc)[:300]})  # fmt: skip
                self.core.status("error", f"the outputs of a {event.type} event could not be "
                                 f"made: {exc!r}"[:500], {"seq": event.seq})  # fmt: skip
        self.svc.outputs.add(write, self.sid, self.outputs, out)
        if out.ended:
            # Egress has nothing to do for the session (it let it go, or will at once): its
            # mark goes with the broker's last write too. Egress's own let-go is written
            # near the start, and a Redis failover that loses it (acknowledged, never
            # replicated) leaves egress nothing later to notice the loss by, while the
            # broker's writes go on.
            write.hset(write.state_key, {done_field("egress"): 1})
        # Egress trims the events stream as it reads it; when the broker makes the
        # outputs nothing reads it, and it keeps the last `events_s` (trimmed every few
        # seconds, whole blocks of entries at a time).
        now = time.time()
        if now - self.events_trimmed_at >= EVENTS_TRIM_EVERY_S:
            self.events_trimmed_at = now
            oldest_ms = int((now - self.svc.retention.events_s) * 1000)
            write.trim_before(self.svc.keys.events(self.sid), f"{oldest_ms}-0")
        snapshot = self.outputs.snapshot()
        changed = {
            OUTPUTS_PREFIX + name: value
            for name, value in snapshot.items()
            if self.outputs_written.get(name) != value
        }
        self.outputs_written = snapshot
        return out, changed

    # ---------------------------------------------------------------- from the reader

    def _read_frames(self) -> None:
        handler = self.svc.on_frames if self.direct is None else self.svc.on_audio
        self.svc.reader.add(self.input_key, self.queued_frames_id, handler)
        self.reading_frames = True

    async def _direct_input_end(self) -> None:
        """Direct input: once the producer ended the session and every chunk it wrote was
        read, the end-of-input marker (ingest writes it for the sessions it normalizes)."""
        assert self.direct is not None
        await self.owned.ended.wait()
        redis, key = self.svc.redis, self.input_key
        while True:
            last: Any = await through_outages(lambda: redis.xrevrange(key, count=1), "input end")
            last_id = last[0][0].decode() if last else "0-0"
            read = max(self.queued_frames_id, self.svc.reader.position(key) or "0-0",
                       key=entry_key)  # fmt: skip
            if entry_key(read) >= entry_key(last_id):
                break
            await asyncio.sleep(0.05)
        self.queue_frames([(read, self.direct.final())])

    def direct_frames(self, chunks: list[tuple[Entry, DirectFrame]]) -> None:
        """Direct input: queue what goes upstream, report sequence notices (the chunks
        `DirectInput.read` let through)."""
        assert self.direct is not None
        frames, notices = self.direct.accept(chunks)
        for notice in notices:
            self.core.status(*describe(notice))
        if chunks:
            self.core.input_read = chunks[-1][0].id
        if notices:
            self._changed()
        if frames:
            self.queue_frames(frames)

    def queue_frames(self, frames: Sequence[tuple[str, InputFrame]]) -> None:
        self.queued_frames_id = frames[-1][0]
        self.last_input_at = time.monotonic()
        if self._send_at_once(frames):
            return
        self.frames.extend(frames)
        if len(self.frames) >= self.settings.max_pending_frames:
            # The upstream is slower than the audio: leave the rest in Redis for now.
            self.svc.reader.remove(self.input_key)
            self.reading_frames = False
        self.work.set()

    def queue_control(self, entry: Entry, msg: Message) -> None:
        self.controls.append((entry, msg))
        self.last_input_at = time.monotonic()
        self.due = True
        self.work.set()

    async def _sleep_unless_ended(self, delay: float) -> None:
        """Wait before reconnecting; only an end matters while there is no upstream (the
        other controls wait for the next upstream session)."""
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline:
            if self.controls and isinstance(self.controls[0][1], EndSession):
                entry, msg = self.controls.popleft()
                self.core.control(entry, msg, time.monotonic())
                raise SessionEnded(self.core.end_reason or "control")
            self.work.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await self.work.wait()


def _wire(event: dict[str, Any]) -> str:
    """A client event as JSON text; an audio append (most of them) without the encoder."""
    if event.get("type") == "input_audio_buffer.append" and len(event) == 2:
        return '{"type":"input_audio_buffer.append","audio":"' + str(event["audio"]) + '"}'
    return json.dumps(event, separators=(",", ":"))


def _takes_at_once(ws: ClientConnection) -> bool:
    """The socket is open and its write buffer empty: a message written now goes out at
    once (what `Connection.send` would do without waiting)."""
    return (
        ws.protocol.state is State.OPEN
        and ws.send_in_progress is None
        and not ws.transport.is_closing()
        and not ws.transport.get_write_buffer_size()
    )


def _write_at_once(ws: ClientConnection, text: str) -> None:
    """A text message through the connection's own protocol (framing, masking), written
    to its transport without `Connection.send`'s await, when `_takes_at_once(ws)`."""
    ws.protocol.send_text(text.encode())
    for data in ws.protocol.data_to_send():
        if data:
            ws.transport.write(data)


def _close_cause(ws: ClientConnection) -> tuple[int | None, str]:
    """Why a socket closed: the upstream's close frame, else the one this side sent."""
    received, sent = ws.protocol.close_rcvd, ws.protocol.close_sent
    if received is not None:
        return received.code, received.reason or "closed by the upstream"
    if sent is not None:  # e.g. 1011 keepalive ping timeout: the upstream went silent
        return sent.code, sent.reason or "closed"
    return 1006, "connection lost"


def _jittered(delay: float, cap: float) -> float:
    """Full jitter: a random share of the capped exponential delay, never below 50 ms."""
    return max(0.05, random.uniform(0.5, 1.0) * min(delay, cap))
