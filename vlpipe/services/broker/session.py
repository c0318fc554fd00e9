"""One session's upstream WebSocket, kept healthy from the session's start to its end.

Three loops share the session's state:

* `_send_loop` takes what the shared reader queued (frames, control messages) and sends
  it upstream. When it is caught up, each frame goes out as its own
  `input_audio_buffer.append` at once; when it has fallen behind, pending frames are
  coalesced into fewer appends of at most `max_append_ms`. At most `max_pending_frames`
  wait in memory; past that the session's frames stream is no longer read (the backlog
  waits in Redis) until the sender has caught up.
* `_receive_loop` turns every server event into an `Event` for the events stream, in
  order, with a per-session sequence number and its arrival time, and reacts to those the
  broker acts on (errors, barge-in, tool calls, the end of a response).
* `_write_loop` writes the queued events, tool calls and status messages together with
  the session's checkpoint (next event number, last frame and control entry sent, the
  config, the conversation) and the trims of its input streams as one fenced write
  (`SessionOwnership.commit`), so a replica that takes the session over continues with
  the next event number and no event written twice, and a stalled replica that lost the
  session writes nothing. A failed write is retried unchanged until it is applied.

A dropped socket is reopened with backoff and jitter; the new upstream session gets the
config and the conversation so far (`Conversation.replay`). So is an upstream session that
reached `max_upstream_s`, at the next moment nothing is in flight (a rollover).
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
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from vlpipe.services.broker.conversation import Conversation
from vlpipe.services.broker.turns import SessionTrace, TurnTracer
from vlpipe.services.broker.upstream import UpstreamError, open_upstream
from vlpipe.shared import telemetry
from vlpipe.shared.contracts import (
    AddText,
    CancelResponse,
    ClearInput,
    CommitInput,
    CreateResponse,
    EndSession,
    Event,
    Frame,
    Message,
    SessionConfig,
    Status,
    ToolCall,
    ToolResult,
    UpdateSession,
    encode,
    playback_ms,
)
from vlpipe.shared.fencing import SessionLost, SessionWrite
from vlpipe.shared.ownership import OwnedSession
from vlpipe.shared.streams import Entry, entry_ms

if TYPE_CHECKING:
    from vlpipe.services.broker.service import BrokerService

log = logging.getLogger("vlpipe.broker")

CHECKPOINT_EVERY_S = 0.5
TOOL_TIMEOUT_OUTPUT = '{"error":"timeout","message":"the tool did not answer in time"}'


class SessionEnded(Exception):
    """The session is over (input finished, `session.end`, or the upstream gave up)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BrokerSession:
    def __init__(self, service: BrokerService, owned: OwnedSession) -> None:
        self.svc = service
        self.settings = service.settings
        self.owned = owned
        self.sid = owned.sid
        cp = owned.checkpoint
        self.seq = int(cp.get("seq", "0"))
        self.frames_id = cp.get("frames_id", "0-0")
        self.ctl_id = cp.get("ctl_id", "0-0")
        self.config = (
            SessionConfig.model_validate_json(cp["config"])
            if cp.get("config")
            else owned.start.config
        )
        self.conv = Conversation.load(cp.get("conversation"), self.settings.history_items)
        if not cp.get("conversation"):
            self.conv.output_format = self.config.output_audio_format
        self.input_final = cp.get("input_final") == "1"
        self.ended = cp.get("ended") == "1"
        # Work queued by the shared reader for the sender.
        self.frames: deque[tuple[str, Frame]] = deque()
        self.controls: deque[tuple[Entry, Message]] = deque()
        self.queued_frames_id = self.frames_id
        self.reading_frames = False
        self.work = asyncio.Event()
        # Output queued for the writer.
        self.outbox: list[Event] = []
        self.side: list[tuple[str, Message, int | None]] = []  # (key, message, maxlen)
        self.checkpoint_dirty = False
        self.conversation_dirty = False
        self.in_flight: tuple[SessionWrite, int] | None = None  # a write, its event count
        self.output_ready = asyncio.Event()
        self.events_ready = asyncio.Event()  # events (not just a checkpoint) to write
        # Upstream state.
        self.ws: ClientConnection | None = None
        self.connected_at = 0.0
        self.last_event_at = time.monotonic()
        self.final_at: float | None = None
        self.expect_response = False
        self.respond_when_idle = False
        self.calls: dict[str, tuple[float, str | None]] = {}  # call_id -> (deadline, response)
        self.response_calls: set[str] = set()
        self.respond_after_calls = False
        self.end_now: str | None = None
        self.closing = False
        self._rollover_requested = False
        self.trace = SessionTrace(self.sid, cp.get("trace") or None, owned.start.traceparent)
        if self.seq == 0:
            self.trace.mark("vlpipe.session.start")
        elif owned.taken_over:
            self.trace.mark("vlpipe.session.takeover", **{"vlpipe.replica": service.ctx.replica})
        self.turns = TurnTracer(self.sid, self.trace.traceparent, service.keys.frames(self.sid))
        self.frame_traceparent: str | None = None
        # Where each recent frame sits in the upstream's audio (ms since this connection's
        # first append), its number and its arrival: a turn starts at its first frame.
        self.timeline: deque[tuple[float, int, float]] = deque(maxlen=3000)
        self.upstream_ms = 0.0
        self.turn_marker = ""

    # ---------------------------------------------------------------- life

    async def run(self) -> None:
        if self.ended:
            return
        svc = self.svc
        writer = asyncio.create_task(self._write_loop(), name=f"broker-write-{self.sid}")
        svc.reader.add(svc.keys.ctl(self.sid), self.ctl_id, svc.on_ctl)
        self._read_frames()
        reason = "cancelled"
        try:
            if self.seq == 0:
                self._event(
                    "vlpipe.session.started", {"config": self.config.model_dump(mode="json")}
                )
            reason = await self._upstream_life()
        except SessionEnded as exc:
            reason = exc.reason
        finally:
            self.turns.end()
            svc.reader.remove(svc.keys.ctl(self.sid))
            svc.reader.remove(svc.keys.frames(self.sid))
            if self.ws is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.ws.close(1001, "broker stopping"))
            self.closing = True
            self.output_ready.set()
            self.events_ready.set()
            if self.owned.lost.is_set():
                writer.cancel()
            else:
                if not self.ended and reason != "cancelled":
                    self.trace.mark("vlpipe.session.end", **{"vlpipe.reason": reason})
                    self._event("vlpipe.session.ended", {"reason": reason})
                    self.ended = True
                # Leave the last events and the checkpoint behind, even when cancelled:
                # the writer stops after the write in progress, then one last write.
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(writer, timeout=5)
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._flush())
        log.info("session finished", extra={"session": self.sid, "reason": reason})

    async def _upstream_life(self) -> str:
        """Connect, serve, reconnect until the session ends; returns why it ended."""
        failures = refusals = 0
        resumed = self.owned.taken_over or self.seq > 0
        while True:
            if self.end_now:
                return self.end_now
            try:
                self.ws = await open_upstream(self.settings, self.svc.auth, self.svc.url)
            except UpstreamError as exc:
                if exc.refused:
                    refusals += 1
                else:
                    failures += 1
                self.svc.reconnects.add(1, {"outcome": "refused" if exc.refused else "failed"})
                self._status(
                    "error", str(exc), {"status": exc.status, "attempt": failures + refusals}
                )
                if refusals >= self.settings.auth_attempts:
                    return "upstream_refused_credentials"
                if failures >= self.settings.reconnect_attempts:
                    return "upstream_unreachable"
                delay = _jittered(0.5 * 2 ** (failures + refusals - 1), cap=15.0)
                self._event(
                    "vlpipe.upstream.reconnecting",
                    {
                        "attempt": failures + refusals,
                        "error": str(exc),
                        "retry_in_s": round(delay, 2),
                    },
                )
                await self._sleep_unless_ended(delay)
                continue
            self.connected_at = time.monotonic()
            self._event(
                "vlpipe.upstream.connected",
                {"resumed": resumed, "takeover": self.owned.taken_over and not failures},
            )
            closed = await self._serve_connection(resumed)
            if closed is None:  # the session is over
                return self.end_now or "input_ended"
            code, why = closed
            lived = time.monotonic() - self.connected_at
            failures = 0 if lived > 10 else failures + 1
            if failures >= self.settings.reconnect_attempts:
                return "upstream_unstable"
            resumed = True
            if why != "rollover":
                self.svc.reconnects.add(1, {"outcome": "dropped"})
                self._status("error", f"upstream closed the socket ({code} {why}); reconnecting",
                             {"code": code, "reason": why})  # fmt: skip
            delay = 0.0 if why == "rollover" else _jittered(0.2 * 2**failures, cap=10.0)
            self.trace.mark("vlpipe.upstream.reconnect", **{"vlpipe.close.code": code,
                                                             "vlpipe.close.reason": why})  # fmt: skip
            self._event(
                "vlpipe.upstream.reconnecting",
                {
                    "code": code,
                    "reason": why,
                    "in_flight_response": self.conv.response_id,
                    "retry_in_s": round(delay, 2),
                },
            )
            # Whatever was in flight died with the old upstream session.
            self.turns.end()
            self.conv.response_id = None
            self.conv.user_speaking = False
            self.expect_response = False
            await self._sleep_unless_ended(delay)

    async def _serve_connection(self, resumed: bool) -> tuple[int | None, str] | None:
        """Serve one upstream connection; None when the session ended, else why it closed."""
        ws = self.ws
        assert ws is not None
        self.upstream_ms = 0.0  # the new upstream session counts its audio from zero
        self.timeline.clear()
        await self._send({"type": "session.update", "session": self.config.session_update()})
        if resumed:
            for item in self.conv.replay():
                await self._send(item)
        receiver = asyncio.create_task(self._receive_loop(ws), name=f"broker-recv-{self.sid}")
        sender = asyncio.create_task(self._send_loop(ws), name=f"broker-send-{self.sid}")
        try:
            done, _ = await asyncio.wait({receiver, sender}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = task.exception()
                if isinstance(exc, SessionEnded):
                    self.end_now = self.end_now or exc.reason
                elif exc is not None and not isinstance(exc, ConnectionClosed):
                    raise exc
            if self._rollover_requested:
                self._rollover_requested = False
                return 1000, "rollover"
            if self.end_now or (sender in done and sender.exception() is None):
                await ws.close(1000, "session ended")
                return None
            return _close_cause(ws)
        finally:
            for task in (receiver, sender):
                task.cancel()
            await asyncio.gather(receiver, sender, return_exceptions=True)
            self.ws = None

    # ---------------------------------------------------------------- to the upstream

    async def _send(self, event: dict[str, Any]) -> None:
        assert self.ws is not None
        await self.ws.send(json.dumps(event, separators=(",", ":")))

    async def _send_loop(self, ws: ClientConnection) -> None:
        """Frames and control messages upstream; returns when the session is done."""
        max_bytes = self.config.input_audio_format.bytes_for_ms(self.settings.max_append_ms)
        while True:
            while self.controls:
                entry, msg = self.controls.popleft()
                await self._control(entry, msg)
                self.ctl_id = entry.id
                self.checkpoint_dirty = True
            if self.frames:
                await self._send_frames(max_bytes)
                continue
            if not self.reading_frames and not self.input_final and not self.ended:
                self._read_frames()
            if self.end_now:
                raise SessionEnded(self.end_now)
            if self._finished():
                return
            if self._rollover_due():
                self._rollover_requested = True
                await ws.close(1000, "rollover")
                return
            self._check_tool_deadlines()
            self.turns.close_finished()
            self.work.clear()
            await self.work.wait()  # new work, or the service's tick (deadlines, drain)

    async def _send_frames(self, max_bytes: int) -> None:
        chunk: list[bytes] = []
        size = 0
        now_ms = time.time() * 1000
        last_id = self.frames_id
        final = False
        while self.frames and (not chunk or size + len(self.frames[0][1].audio) <= max_bytes):
            entry_id, frame = self.frames.popleft()
            last_id = entry_id
            if frame.traceparent:
                self.frame_traceparent = frame.traceparent
            if frame.final:
                final = True
                break
            chunk.append(frame.audio)
            size += len(frame.audio)
            arrived_ms = entry_ms(entry_id)
            self.timeline.append((self.upstream_ms, frame.seq, arrived_ms))
            self.upstream_ms += frame.format.ms_for_bytes(len(frame.audio))
            latency = max(0.0, now_ms - arrived_ms)
            self.svc.frame_latency.record(latency)
            self.svc.recent_latency_ms.append(latency)
        if chunk:
            audio = b"".join(chunk)
            await self._send(
                {"type": "input_audio_buffer.append", "audio": base64.b64encode(audio).decode()}
            )
            self.svc.frames_sent.add(len(chunk))
            self.svc.appends_sent.add(1)
            self.svc.totals["frames"] += len(chunk)
            self.svc.totals["appends"] += 1
            self.svc.totals["largest_append_bytes"] = max(
                self.svc.totals["largest_append_bytes"], len(audio)
            )
        self.frames_id = last_id
        self.checkpoint_dirty = True
        self.output_ready.set()
        if final:
            await self._input_finished()

    async def _input_finished(self) -> None:
        """The final frame marker: finish the turn in flight, then close."""
        self.input_final = True
        self.final_at = time.monotonic()
        self.checkpoint_dirty = True
        if self.conv.user_speaking and self.config.turn_detection is not None:
            # The audio stopped mid-utterance: that is the user's last turn. A client's
            # commit never creates a response by itself, even with server VAD.
            await self._send({"type": "input_audio_buffer.commit"})
            await self._create_response()

    def _finished(self) -> bool:
        if not self.input_final or self.final_at is None:
            return False
        now = time.monotonic()
        if now - self.final_at > self.settings.drain_max_s:
            return True
        in_flight = self.conv.busy or self.expect_response or self.calls or self.respond_after_calls
        return not in_flight and now - self.last_event_at >= self.settings.drain_quiet_s

    def _rollover_due(self) -> bool:
        age = time.monotonic() - self.connected_at
        return (
            age >= self.settings.max_upstream_s
            and not self.conv.busy
            and not self.expect_response
            and not self.calls
        )

    async def _control(self, entry: Entry, msg: Message) -> None:
        if isinstance(msg, UpdateSession):
            try:
                config = self.config.merged(msg.config)
            except ValidationError as exc:
                await self.svc.refuse(self.sid, entry, f"invalid session.update: {_errors(exc)}")
                return
            self.config = config
            self.conversation_dirty = True
            await self._send({"type": "session.update", "session": config.session_update()})
        elif isinstance(msg, AddText):
            await self._send(
                {
                    "type": "conversation.item.create",
                    "item": {
                        "type": "message",
                        "role": msg.role,
                        "content": [{"type": "input_text", "text": msg.text}],
                    },
                }
            )
            if msg.respond:
                await self._create_response()
        elif isinstance(msg, CreateResponse):
            await self._create_response(msg.instructions)
        elif isinstance(msg, CancelResponse):
            await self._send({"type": "response.cancel"})
            await self._interrupt("cancelled by control")
        elif isinstance(msg, CommitInput):
            # Manual turns: the producer asks for the response itself (`response.create`).
            await self._send({"type": "input_audio_buffer.commit"})
        elif isinstance(msg, ClearInput):
            await self._send({"type": "input_audio_buffer.clear"})
        elif isinstance(msg, ToolResult):
            await self._tool_result(entry, msg)
        elif isinstance(msg, EndSession):
            if self.conv.response_id is not None:
                await self._send({"type": "response.cancel"})
            self.end_now = f"control: {msg.reason}"

    async def _create_response(self, instructions: str | None = None) -> None:
        if self.conv.response_id is not None or self.expect_response:
            self.respond_when_idle = True  # one at a time: after the one in flight
            return
        event: dict[str, Any] = {"type": "response.create"}
        if instructions:
            event["response"] = {"instructions": instructions}
        self.expect_response = True
        await self._send(event)

    # ---------------------------------------------------------------- tool calls

    def _tool_call(self, event: dict[str, Any]) -> None:
        call_id = str(event.get("call_id") or "")
        if not call_id:
            return
        deadline = time.time() + self.settings.tool_timeout_s
        self.calls[call_id] = (
            time.monotonic() + self.settings.tool_timeout_s,
            event.get("response_id"),
        )
        self.response_calls.add(call_id)
        call = ToolCall(
            session=self.sid, call_id=call_id, name=str(event.get("name") or ""),
            arguments=str(event.get("arguments") or ""), response_id=event.get("response_id"),
            item_id=event.get("item_id"), deadline=deadline * 1000,
            traceparent=telemetry.current_traceparent(),
        )  # fmt: skip
        # Trimmed behind its consumer groups by housekeeping, never on write.
        self.side.append((self.svc.keys.tool_calls, call, None))
        self.svc.tool_calls.add(1)

    async def _tool_result(self, entry: Entry, msg: ToolResult) -> None:
        if msg.call_id not in self.calls:
            if msg.call_id in self.conv.answered_calls:
                reason = f"tool.result for call {msg.call_id} came after its timeout; ignored"
            else:
                reason = f"tool.result for unknown call {msg.call_id!r}; ignored"
            await self.svc.refuse(self.sid, entry, reason)
            return
        await self._answer_call(msg.call_id, msg.output)

    async def _answer_call(self, call_id: str, output: str) -> None:
        self.calls.pop(call_id, None)
        self.conv.answered_calls.add(call_id)
        self.conversation_dirty = True
        await self._send(
            {
                "type": "conversation.item.create",
                "item": {"type": "function_call_output", "call_id": call_id, "output": output},
            }
        )
        if not self.calls and self.respond_after_calls:
            self.respond_after_calls = False
            await self._create_response()

    def _check_tool_deadlines(self) -> None:
        now = time.monotonic()
        for call_id, (deadline, _) in list(self.calls.items()):
            if now >= deadline:
                self._status(
                    "tool_timeout",
                    f"tool call {call_id} got no result in {self.settings.tool_timeout_s:g} s; "
                    "answered with a timeout result",
                    {"call_id": call_id, "output": TOOL_TIMEOUT_OUTPUT},
                )
                self.controls.appendleft(
                    (Entry(self.svc.keys.ctl(self.sid), self.ctl_id, {}),
                     ToolResult(call_id=call_id, output=TOOL_TIMEOUT_OUTPUT))
                )  # fmt: skip
                self.work.set()

    # ---------------------------------------------------------------- from the upstream

    async def _receive_loop(self, ws: ClientConnection) -> None:
        async for raw in ws:
            received = time.time() * 1000
            self.last_event_at = time.monotonic()
            if isinstance(raw, bytes):
                self._status(
                    "error", "upstream sent a binary message; ignored", {"bytes": len(raw)}
                )
                continue
            try:
                event = json.loads(raw)
                kind = event["type"]
            except (ValueError, KeyError, TypeError):
                self._status("error", "upstream sent a message that is not a JSON event; ignored",
                             {"bytes": len(raw)})  # fmt: skip
                continue
            audio: bytes | None = None
            if kind == "response.audio.delta":
                try:
                    audio = base64.b64decode(event.pop("delta", ""), validate=True)
                except ValueError:
                    self._status("error", "upstream audio delta is not base64; dropped", {})
                    audio = b""
            self.conv.observe(event, len(audio) if audio else 0)
            if kind == "input_audio_buffer.speech_started" or (
                kind == "response.created" and not self.turns.in_progress
            ):
                self._start_turn(kind.rpartition(".")[2], event)
            audio_ms = self.conv.output_format.ms_for_bytes(len(audio)) if audio else 0.0
            self.turns.observe(kind, event, audio_ms=audio_ms)
            self._event(kind, event, audio, received)
            await self._react(kind, event)

    def _start_turn(self, reason: str, event: dict[str, Any]) -> None:
        """A new turn's trace, starting when its first frame arrived (for speech)."""
        audio_start_ms = event.get("audio_start_ms")
        first: tuple[float, int, float] | None = None
        if isinstance(audio_start_ms, int | float):
            for at_ms, seq, arrived_ms in reversed(self.timeline):
                if at_ms <= audio_start_ms:
                    first = (at_ms, seq, arrived_ms)
                    break
        self.turns.start(
            reason, self.frame_traceparent,
            start_ns=int(first[2] * 1e6) if first else None,
            first_frame=first[1] if first else None,
            item_id=str(event["item_id"]) if event.get("item_id") else None,
        )  # fmt: skip
        if first is not None and self.turns.traceparent:
            # Ingest reads this to put its span of the utterance's first frame in the trace.
            self.turn_marker = f"{self.turns.traceparent} {first[1]}"
            self.checkpoint_dirty = True

    async def _react(self, kind: str, event: dict[str, Any]) -> None:
        if kind in ("conversation.item.created", "conversation.item.deleted",
                    "conversation.item.truncated", "response.done",
                    "conversation.item.input_audio_transcription.completed"):  # fmt: skip
            self.conversation_dirty = True
        if kind == "error":
            error = event.get("error") or {}
            code = str(error.get("code") or error.get("type") or "unknown")
            self.svc.upstream_errors.add(1, {"code": code})
            self._status("error", f"upstream error {code}: {error.get('message', '')}", error)
            self.expect_response = False
        elif kind == "response.created":
            self.expect_response = False
        elif kind == "input_audio_buffer.committed":
            detection = self.config.turn_detection
            if detection is not None and detection.get("create_response", True):
                self.expect_response = True
        elif kind == "input_audio_buffer.speech_started":
            await self._barge_in()
            # The barge-in check has run: earlier finished turns can no longer be cut.
            self.turns.close_finished(all_earlier=True)
        elif kind == "response.function_call_arguments.done":
            self._tool_call(event)
        elif kind == "response.done":
            await self._response_done(event)
        self.work.set()

    async def _response_done(self, event: dict[str, Any]) -> None:
        self.expect_response = False
        try:
            await self._after_response()
        finally:
            if not (self.calls or self.respond_after_calls or self.response_calls
                    or self.respond_when_idle or self.expect_response):  # fmt: skip
                # The turn's last response is done.
                self.turns.turn_done(str((event.get("response") or {}).get("id") or ""))

    async def _after_response(self) -> None:
        if self.response_calls:
            self.response_calls = set()
            if self.calls:
                self.respond_after_calls = True  # once every call is answered
            else:
                await self._create_response()
            return
        if self.respond_when_idle:
            self.respond_when_idle = False
            await self._create_response()

    async def _barge_in(self) -> None:
        detection = self.config.turn_detection
        if detection is None or detection.get("interrupt_response") is False:
            return
        # With server VAD the upstream cancels the response in progress itself; what it
        # cannot know is how much of the audio the user heard.
        await self._interrupt("user started speaking")

    async def _interrupt(self, why: str) -> None:
        """Stop the assistant's audio and cut its item to what the user heard."""
        item_id = self.conv.audio_item_id
        if item_id is None:
            return
        playback = await self.svc.playback(self.sid)
        cut = self.conv.cut_for_barge_in(
            played_ms=playback_ms(playback.get("played_ms")),
            delivered_ms=playback_ms(playback.get("delivered_ms")),
            playback_item=playback.get("item_id"),
        )
        if cut is None:
            return
        self.svc.barge_ins.add(1)
        self.turns.interrupt(cut.item_id)
        self._event(
            "vlpipe.barge_in",
            {"response_id": self.conv.response_id or playback.get("response_id"),
             "item_id": cut.item_id, "audio_end_ms": cut.audio_end_ms, "reason": why},
        )  # fmt: skip
        if cut.delete:
            # Nothing of it was heard: it must not stay in the conversation as if said.
            await self._send({"type": "conversation.item.delete", "item_id": cut.item_id})
        else:
            await self._send(
                {
                    "type": "conversation.item.truncate",
                    "item_id": cut.item_id,
                    "content_index": 0,
                    "audio_end_ms": cut.audio_end_ms,
                }
            )

    # ---------------------------------------------------------------- to Redis

    def _event(
        self,
        kind: str,
        body: dict[str, Any],
        audio: bytes | None = None,
        received: float | None = None,
    ) -> None:
        self.outbox.append(
            Event(
                session=self.sid,
                seq=self.seq,
                type=kind,
                event=body,
                audio=audio,
                received=received if received is not None else time.time() * 1000,
                traceparent=self.turns.traceparent_for(kind, body),
            )
        )
        self.seq += 1
        self.output_ready.set()
        self.events_ready.set()

    def _status(self, kind: str, message: str, detail: dict[str, Any]) -> None:
        status = Status(session=self.sid, service="broker", kind=kind, message=message,
                        detail=detail)  # fmt: skip
        self.side.append((self.svc.keys.status(self.sid), status, self.svc.retention.status))
        self.output_ready.set()
        self.events_ready.set()
        if kind == "error":
            log.warning(message, extra={"session": self.sid})

    async def _write_loop(self) -> None:
        while not self.closing:
            await self.output_ready.wait()
            self.output_ready.clear()
            if not self.outbox and not self.side and not self.closing:
                # Only the frame position moved: checkpoint it at most every
                # `CHECKPOINT_EVERY_S`. A takeover re-sends at most that much audio, to a
                # new upstream session that never had it.
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
        if self.owned.lost.is_set():
            return
        if self.in_flight is None:
            if not (self.outbox or self.side or self.checkpoint_dirty or self.conversation_dirty):
                return
            self.in_flight = self._next_write()
        write, events = self.in_flight
        await self.svc.ownership.commit(self.owned, write)
        self.in_flight = None
        if events:
            self.svc.events_out.add(events)

    def _next_write(self) -> tuple[SessionWrite, int]:
        """Everything queued, the checkpoint and the trims, as one fenced write."""
        events, self.outbox = self.outbox, []
        side, self.side = self.side, []
        keys = self.svc.keys
        values: dict[str, str | int | float] = {
            "seq": self.seq,  # every event numbered so far is in `events` or written
            "frames_id": self.frames_id, "ctl_id": self.ctl_id,
            "input_final": int(self.input_final), "ended": int(self.ended),
            "turn": self.turn_marker, "trace": self.trace.traceparent or "",
        }  # fmt: skip
        if self.conversation_dirty:
            values["conversation"] = self.conv.dump()
            values["config"] = self.config.model_dump_json()
        write = self.svc.ownership.write(self.owned)
        for event in events:
            write.xadd(keys.events(self.sid), encode(event))
        for key, msg, maxlen in side:
            write.xadd(key, encode(msg), maxlen=maxlen)
        write.checkpoint(values)
        write.trim_before(keys.frames(self.sid), self.frames_id, approximate=False)
        write.trim_before(keys.ctl(self.sid), self.ctl_id, approximate=False)
        self.checkpoint_dirty = False
        self.conversation_dirty = False
        return write, len(events)

    # ---------------------------------------------------------------- from the reader

    def _read_frames(self) -> None:
        self.svc.reader.add(
            self.svc.keys.frames(self.sid), self.queued_frames_id, self.svc.on_frames
        )
        self.reading_frames = True

    def queue_frames(self, frames: list[tuple[str, Frame]]) -> None:
        self.frames.extend(frames)
        self.queued_frames_id = frames[-1][0]
        if len(self.frames) >= self.settings.max_pending_frames:
            # The upstream is slower than the audio: leave the rest in Redis for now.
            self.svc.reader.remove(self.svc.keys.frames(self.sid))
            self.reading_frames = False
        self.work.set()

    def queue_control(self, entry: Entry, msg: Message) -> None:
        self.controls.append((entry, msg))
        self.work.set()

    async def _sleep_unless_ended(self, delay: float) -> None:
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline:
            while self.controls:  # only an end matters while there is no upstream
                entry, msg = self.controls[0]
                if isinstance(msg, EndSession):
                    self.controls.popleft()
                    self.ctl_id = entry.id
                    raise SessionEnded(f"control: {msg.reason}")
                break
            self.work.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await self.work.wait()


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


def _errors(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}"
        for e in exc.errors(include_url=False, include_input=False)
    )
