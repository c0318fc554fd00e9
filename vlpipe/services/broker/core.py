"""One Voice Live session as a state machine with no sockets and no Redis (sans-I/O).

`SessionCore` is what the broker knows and decides for one session. Its inputs are plain
calls with the clock passed in:

* `upstream_opened(now)` / `upstream_lost(now)`: a new upstream session, or the end of one;
* `audio(frames, now)`: frames read from the frames stream, in order;
* `control(entry, message, now)`: a control message (`session.update`, text, tools, end);
* `server_event(event, audio, received_ms, now)`: an upstream event, its audio decoded;
* `barge_in(playback, now)`: the playback position, when `playback_needed` asked for it;
* `tick(now)`: time passing (tool deadlines, an auto-response that never came).

Its outputs are queues the I/O shell (`BrokerSession`) empties: `upstream` (client events
to send, in order), `events` (numbered `Event`s for the events stream), `side` (status
entries and tool calls), `refusals` (entries to dead-letter), `checkpoint()` (what a new
owner needs), and the queries `finished(now)`, `rollover_due(now)` and `end_reason`.

What it guarantees, each tested without a socket (tests/broker/test_core.py):

* **No word lost.** Every frame sent upstream is kept (`retained`) until the upstream has
  committed it into a conversation item *and* that item's transcript arrived, so the
  conversation remembers it as text; silence outside any turn is let go once it is
  `SILENCE_KEEP_MS` old both in audio and in time since it was sent (a producer faster
  than real time leaves the VAD the same time to report a speech start in it), and at
  most `max_replay_s` is kept. Every new upstream session
  (reconnect, rollover) gets the config, the remembered conversation and then the kept
  frames before live audio; a new owner (takeover) reads the frames stream from the
  checkpoint (`frames_id`, the last frame let go), so it replays the same audio. A turn
  the upstream had committed and transcribed but not yet answered is answered by the new
  upstream session. Nothing committed is replayed, so no turn counts twice.
* **One response at a time.** A response request while one is in progress (or asked for,
  or about to be created by the upstream's VAD) waits for `response.done`; it is never
  sent into an `conversation_already_has_active_response` error.
* **Input end.** With server VAD, a caller who stops mid-utterance gets the silence the
  VAD needs to end the turn itself (then it answers as for any turn), never a client
  commit racing the VAD's own; also when the upstream reports the speech only after the
  input ended (audio read as a backlog goes upstream with its end at once, before the
  VAD has said anything about it).
"""

from __future__ import annotations

import base64
import json
import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import ValidationError

from vlpipe.services.broker.conversation import Conversation
from vlpipe.services.broker.settings import BrokerSettings
from vlpipe.services.broker.turns import SessionTrace, TurnTracer
from vlpipe.shared import telemetry
from vlpipe.shared.audio import AudioFormat, encode_pcm16
from vlpipe.shared.contracts import (
    AddText,
    CancelResponse,
    ClearInput,
    CommitInput,
    CreateResponse,
    EndSession,
    Event,
    Message,
    SessionConfig,
    Status,
    ToolCall,
    ToolResult,
    UpdateSession,
    playback_ms,
)
from vlpipe.shared.streams import Entry, entry_key, entry_ms

TOOL_TIMEOUT_OUTPUT = '{"error":"timeout","message":"the tool did not answer in time"}'
SILENCE_KEEP_MS = 1500.0
"""Silence outside any turn kept for a replay: what a speech start detected late (the
VAD's look-back and prefix padding) may still reach back to. It is kept for this long in
audio and in time since it was sent, as a VAD lags in time behind what it was sent."""
AUTO_RESPONSE_WAIT_S = 5.0
"""How long a response the upstream should create by itself (server VAD after a commit)
is waited for before requests queued behind it are sent."""
DEFAULT_SILENCE_MS = 500
_VAD_REPORTS = {
    "input_audio_buffer.speech_started": "audio_start_ms",
    "input_audio_buffer.speech_stopped": "audio_end_ms",
}
"""The VAD's reports and the field that says where in the input it was (the upstream
heard that far, at least)."""


@dataclass(slots=True)
class SentFrame:
    """A frame sent upstream and kept until the upstream committed it."""

    entry_id: str
    seq: int
    audio: bytes
    at_ms: float
    """Where it starts in the current upstream session's audio (ms since its first append)."""
    end_ms: float
    arrived_ms: float
    sent_s: float = 0.0
    """When it went to the current upstream session (the core's clock, s)."""


class InputFrame(Protocol):
    """What the core reads of a frame: a `Frame` from ingest, or a direct-input chunk
    (`vlpipe.services.broker.direct.DirectFrame`)."""

    @property
    def seq(self) -> int: ...
    @property
    def format(self) -> AudioFormat: ...
    @property
    def audio(self) -> bytes: ...
    @property
    def final(self) -> bool: ...
    @property
    def traceparent(self) -> str | None: ...


class SessionEnded(Exception):
    """The session is over (input finished, `session.end`, or the upstream gave up)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SessionCore:
    """The state of one session and the decisions about it; see the module docstring."""

    def __init__(
        self,
        sid: str,
        start_config: SessionConfig,
        checkpoint: dict[str, str],
        settings: BrokerSettings,
        *,
        taken_over: bool,
        replica: str,
        frames_key: str,
        producer_traceparent: str | None = None,
        direct_input: bool = False,
    ) -> None:
        self.sid = sid
        self.settings = settings
        cp = checkpoint
        self.seq = int(cp.get("seq", "0"))
        self._frames_mark = (cp.get("frames_id", "0-0"), False)
        """`frames_id` as it is, or the id just after it (True): the oldest frame kept."""
        self.direct_input = direct_input
        """Frames are the producer's own chunks (`vlpipe.services.broker.direct`)."""
        self.source_seq = int(cp["source_seq"]) if cp.get("source_seq") else None
        """Direct input: the producer `seq` expected after `frames_id`, if it numbers."""
        self.input_read = cp.get("input_read", "0-0")
        """Direct input: the last chunk whose sequence notices (gap, stale) were made; a
        new owner reading chunks again up to it does not report them twice."""
        self.ctl_id = cp.get("ctl_id", "0-0")
        self.refused: dict[str, str] = json.loads(cp["refused"]) if cp.get("refused") else {}
        """The last entry of each input stream dead-lettered: a new owner reads on from
        positions that may lie before it, and refuses nothing twice."""
        self.refused_dirty = False
        self.config = (
            SessionConfig.model_validate_json(cp["config"]) if cp.get("config") else start_config
        )
        self.conv = Conversation.load(cp.get("conversation"), settings.history_items)
        if not cp.get("conversation"):
            self.conv.output_format = self.config.output_audio_format
        self.input_final = cp.get("input_final") == "1"
        self.ended = cp.get("ended") == "1"
        self.answer_owed = cp.get("answer") == "1"
        """A committed, transcribed user turn has no answer yet (asked for on reconnect)."""
        self.resumed = taken_over or self.seq > 0
        # Outputs for the shell.
        self.upstream: deque[dict[str, Any]] = deque()
        self.events: list[Event] = []
        self.side: list[tuple[str, Message]] = []  # ("status" | "tool_call", message)
        self.refusals: list[tuple[Entry, str]] = []
        self.playback_needed: str | None = None
        self.end_reason: str | None = None
        self.dirty = False
        self.conversation_dirty = False
        # Responses: at most one in progress or asked for.
        self.requested = False
        """A response was asked for (by us, or by the VAD's commit) and not created yet."""
        self.requested_at = 0.0
        self.queued: deque[str | None] = deque()  # instructions of requests waiting
        self.asked: dict[str, str | None] = {}  # event_id -> instructions, until created
        self.asks = 0
        self.calls: dict[str, tuple[float, str | None]] = {}  # call_id -> (deadline, response)
        self.response_calls: set[str] = set()
        self.respond_after_calls = False
        # Input and replay.
        self.retained: deque[SentFrame] = deque()
        self.last_frame_id = ""
        self.last_frame_seq = -1
        self.upstream_ms = 0.0
        self.speech_end_ms: float | None = None
        self.manual_commits: deque[float] = deque()
        self.pending_commits: dict[str, tuple[float, float]] = {}
        """Items committed but not transcribed yet: the span of audio each was made of."""
        self.commit_point = 0.0
        """Where the input buffer starts: the last commit (or clear) of this upstream."""
        self.final_at: float | None = None
        self.silence_sent = False
        """The trailing silence went to this upstream session (after the input ended)."""
        self.last_event_at = 0.0
        self.heard_by = 0.0
        """When the upstream has heard all the audio sent to it, at the latest (monotonic s).
        It hears no slower than real time, so a backlog sent at once (read after a takeover
        or an outage, or from a producer faster than real time) takes its length to hear;
        its VAD's reports of where speech started or stopped show how far it got."""
        self.connected_at = 0.0
        self.now = 0.0
        """The clock (monotonic s) as of the last input."""
        self.connections = 0
        # Telemetry.
        self.trace = SessionTrace(sid, cp.get("trace") or None, producer_traceparent)
        if self.seq == 0:
            self.trace.mark("vlpipe.session.start")
        elif taken_over:
            self.trace.mark("vlpipe.session.takeover", **{"vlpipe.replica": replica})
        self.turns = TurnTracer(sid, self.trace.traceparent, frames_key)
        self.frame_traceparent: str | None = None
        self.turn_marker = ""

    @property
    def frames_id(self) -> str:
        """The last frame let go: a new owner reads (and replays) the frames after it. Made
        when asked (at a write), not each time the oldest frame kept changes (each frame)."""
        mark, after = self._frames_mark
        return _id_before(mark) if after else mark

    @frames_id.setter
    def frames_id(self, value: str) -> None:
        self._frames_mark = (value, False)

    # ================================================================ outputs

    def emit(
        self,
        kind: str,
        body: dict[str, Any],
        audio: bytes | None = None,
        received: float | None = None,
    ) -> None:
        """Number an event for the events stream."""
        self.events.append(
            Event(
                session=self.sid, seq=self.seq, type=kind, event=body, audio=audio,
                received=received if received is not None else time.time() * 1000,
                traceparent=self.turns.traceparent_for(kind, body),
            )
        )  # fmt: skip
        self.seq += 1

    def status(self, kind: str, message: str, detail: dict[str, Any]) -> None:
        status = Status(session=self.sid, service="broker", kind=kind, message=message,
                        detail=detail)  # fmt: skip
        self.side.append(("status", status))

    def take_events(self) -> list[Event]:
        events, self.events = self.events, []
        return events

    def take_side(self) -> list[tuple[str, Message]]:
        side, self.side = self.side, []
        return side

    def checkpoint(self) -> dict[str, str | int | float]:
        """What a new owner resumes from (the conversation only when it changed)."""
        values: dict[str, str | int | float] = {
            "seq": self.seq,  # every event numbered so far is in `events` or written
            "frames_id": self.frames_id, "ctl_id": self.ctl_id,
            "input_final": int(self.input_final), "ended": int(self.ended),
            "answer": int(self.answer_owed and not self.pending_commits),
            "turn": self.turn_marker, "trace": self.trace.traceparent or "",
        }  # fmt: skip
        if self.direct_input:
            values["input_read"] = self.input_read
            if self.source_seq is not None:
                values["source_seq"] = self.source_seq
        if self.refused_dirty:
            values["refused"] = json.dumps(self.refused)
            self.refused_dirty = False
        if self.conversation_dirty:
            values["conversation"] = self.conv.dump()
            values["config"] = self.config.model_dump_json()
        self.dirty = False
        self.conversation_dirty = False
        return values

    def refused_already(self, entry: Entry) -> bool:
        """Whether `entry` was dead-lettered already (by this owner or an earlier one)."""
        last = self.refused.get(entry.stream)
        return last is not None and entry_key(entry.id) <= entry_key(last)

    def refused_entry(self, entry: Entry) -> None:
        """`entry` was dead-lettered: the checkpoint says so."""
        self.refused[entry.stream] = entry.id
        self.refused_dirty = self.dirty = True

    def _send(self, event: dict[str, Any]) -> None:
        self.upstream.append(event)

    # ================================================================ the upstream session

    def upstream_opened(self, now: float) -> None:
        """A new upstream session: config, the conversation, the kept audio, then live."""
        self.now = self.connected_at = self.last_event_at = now
        if self.input_final and self.final_at is None:
            self.final_at = now  # taken over after the input ended: drain from here
        self.connections += 1
        self.upstream_ms = 0.0
        self.heard_by = now  # nothing sent to this upstream session yet
        self.speech_end_ms = None
        self.commit_point = 0.0
        self.manual_commits.clear()
        self.silence_sent = False
        self._send({"type": "session.update", "session": self.config.session_update()})
        if self.resumed:
            for item in self.conv.replay():
                self._send(item)
        self.resumed = True
        kept, self.retained = list(self.retained), deque()
        self._append(kept, replay=True)
        if kept and self.input_final:
            self._trailing_silence()
        if self.answer_owed and not self.pending_commits:
            self.request_response()
        elif self.queued:
            self._request_next()

    def upstream_lost(self) -> None:
        """Whatever was in flight died with the old upstream session; what it had not
        committed is still kept, and goes to the next one."""
        self.turns.end()
        self.upstream.clear()  # unsent appends are kept frames: the next session gets them
        self.playback_needed = None
        self.conv.response_id = None
        self.conv.user_speaking = False
        self.requested = False
        self.asked.clear()
        self.response_calls = set()
        # Items committed but not transcribed yet: their audio is kept and will be
        # committed again as new items.
        self.pending_commits.clear()

    def end(self, reason: str) -> None:
        """The session is over: the last event, and nothing kept for a replay."""
        self.trace.mark("vlpipe.session.end", **{"vlpipe.reason": reason})
        self.emit("vlpipe.session.ended", {"reason": reason})
        self.ended = True
        self.dirty = True
        self.retained.clear()
        self.frames_id = self.last_frame_id or self.frames_id

    def rollover_due(self, now: float) -> bool:
        age = now - self.connected_at
        return (
            age >= self.settings.max_upstream_s
            and not self.conv.busy
            and not self.requested
            and not self.calls
        )

    def finished(self, now: float) -> bool:
        """The input ended and what was in flight is done (or the drain budget is spent)."""
        if not self.input_final or self.final_at is None:
            return False
        if now - self.final_at > self.settings.drain_max_s:
            return True
        in_flight = (
            self.conv.busy or self.requested or self.queued or self.calls
            or self.respond_after_calls
        )  # fmt: skip
        # Quiet since the input ended and the upstream heard it all: audio sent with its
        # end, or in a backlog before it, has had no answer yet.
        quiet_since = max(self.last_event_at, self.final_at, self.heard_by)
        return not in_flight and now - quiet_since >= self.settings.drain_quiet_s

    # ================================================================ audio

    def audio(self, frames: Sequence[tuple[str, InputFrame]], now: float) -> tuple[int, list[int]]:
        """Frames to the upstream (appends of at most `max_append_ms`), kept for a replay.
        Returns how many frames went and the size in bytes of each append queued. A final
        marker ends the input (what comes after it is not sent)."""
        self.now = now
        batch: list[SentFrame] = []
        final = False
        for entry_id, frame in frames:
            self.last_frame_id = entry_id
            if frame.traceparent:
                self.frame_traceparent = frame.traceparent
            if frame.final:
                final = True
                if not self.retained and not batch:
                    self._moved_frames_id()  # a new owner need not read the marker again
                break
            self.last_frame_seq = frame.seq
            duration = frame.format.ms_for_bytes(len(frame.audio))
            batch.append(SentFrame(entry_id, frame.seq, frame.audio, 0.0, duration,
                                   entry_ms(entry_id)))  # fmt: skip
        appends = self._append(batch, replay=False)
        self._let_go_of_silence()
        if final:
            self._input_finished(now)
        return len(batch), appends

    def _append(self, frames: list[SentFrame], *, replay: bool) -> list[int]:
        if not frames:
            return []
        max_bytes = self.config.input_audio_format.bytes_for_ms(self.settings.max_append_ms)
        appends: list[int] = []
        chunk: list[bytes] = []
        size = 0
        for sent in frames:
            if chunk and size + len(sent.audio) > max_bytes:
                self._send_audio(b"".join(chunk))
                appends.append(size)
                chunk, size = [], 0
            duration = sent.end_ms - sent.at_ms if replay else sent.end_ms
            sent.at_ms = self.upstream_ms
            sent.end_ms = self.upstream_ms + duration
            sent.sent_s = self.now
            self.upstream_ms = sent.end_ms
            self.retained.append(sent)
            chunk.append(sent.audio)
            size += len(sent.audio)
        self._send_audio(b"".join(chunk))
        appends.append(size)
        return appends

    def _send_audio(self, audio: bytes) -> None:
        self._send({"type": "input_audio_buffer.append", "audio": base64.b64encode(audio).decode()})
        duration_s = self.config.input_audio_format.ms_for_bytes(len(audio)) / 1000
        self.heard_by = max(self.heard_by, self.now) + duration_s

    def _let_go(
        self, upto_ms: float, sent_by: float = math.inf, anyway_upto_ms: float = -math.inf
    ) -> None:
        """What ends by `upto_ms` (and was sent by `sent_by`), or by `anyway_upto_ms`,
        needs no replay: committed, silence outside a turn, or past the most kept. The
        frames are in the order they were sent and of their place in the audio, so what
        either rule lets go is the oldest frames: one pass."""
        retained, moved = self.retained, False
        upto_ms += 0.5
        anyway_upto_ms += 0.5
        while retained:
            oldest = retained[0]
            end_ms = oldest.end_ms
            if end_ms > anyway_upto_ms and (end_ms > upto_ms or oldest.sent_s > sent_by):
                break
            retained.popleft()
            moved = True
        if moved:
            self._moved_frames_id()

    def _let_go_span(self, start_ms: float, end_ms: float) -> None:
        """The upstream has this span in a transcribed item: the frames that start in it
        need no replay (a frame across the end is the item's: the VAD ends an item in
        silence, so the next one loses nothing of it). An earlier item may still wait for
        its transcript: its audio stays."""
        kept = deque(
            sent for sent in self.retained if not (start_ms - 0.5 <= sent.at_ms < end_ms - 0.5)
        )
        if len(kept) != len(self.retained):
            self.retained = kept
            self._moved_frames_id()

    def _moved_frames_id(self) -> None:
        """The checkpoint's frame position: just before the oldest frame still kept (a new
        owner reads on from there), or the last frame had when none is kept."""
        if self.retained:
            oldest = self.retained[0]
            self._frames_mark = (oldest.entry_id, True)
            if oldest.seq >= 0:
                self.source_seq = oldest.seq
        elif self.last_frame_id:
            self.frames_id = self.last_frame_id
            if self.last_frame_seq >= 0:
                self.source_seq = self.last_frame_seq + 1
        self.dirty = True

    def _let_go_of_silence(self) -> None:
        """Outside any turn, silence older than `SILENCE_KEEP_MS` (in audio and since it
        was sent) is no longer needed; and never more than `max_replay_s` is kept."""
        if not self.retained:
            return
        kept_ms = self.upstream_ms - self.settings.max_replay_s * 1000
        if (
            self.config.turn_detection is not None
            and not self.conv.user_speaking
            and not self.pending_commits
        ):
            silence_ms = self.upstream_ms - SILENCE_KEEP_MS
            self._let_go(silence_ms, self.now - SILENCE_KEEP_MS / 1000, anyway_upto_ms=kept_ms)
        else:
            self._let_go(kept_ms)

    def _input_finished(self, now: float) -> None:
        """The final frame marker: let the turn in flight finish, then close."""
        self.input_final = True
        self.final_at = now
        self.dirty = True
        if self.conv.user_speaking:
            self._trailing_silence()

    def _trailing_silence(self) -> None:
        """The audio stopped mid-utterance: that is the user's last turn. The VAD ends it,
        as for a caller who fell silent (a client commit would race the VAD's own)."""
        detection = self.config.turn_detection
        if detection is None:
            return  # manual turns: the producer commits
        silence_ms = float(detection.get("silence_duration_ms") or DEFAULT_SILENCE_MS) + 300
        fmt: AudioFormat = self.config.input_audio_format
        self._send_audio(encode_pcm16(b"\0\0" * int(fmt.rate * silence_ms / 1000), fmt))
        self.upstream_ms += silence_ms
        self.silence_sent = True

    # ================================================================ controls

    def control(self, entry: Entry, msg: Message, now: float) -> None:
        self.now = now
        self.ctl_id = entry.id
        self.dirty = True
        if isinstance(msg, UpdateSession):
            try:
                config = self.config.merged(msg.config)
            except ValidationError as exc:
                self.refusals.append((entry, f"invalid session.update: {_errors(exc)}"))
                return
            self.config = config
            self.conversation_dirty = True
            self._send({"type": "session.update", "session": config.session_update()})
        elif isinstance(msg, AddText):
            self._send({
                "type": "conversation.item.create",
                "item": {"type": "message", "role": msg.role,
                         "content": [{"type": "input_text", "text": msg.text}]},
            })  # fmt: skip
            if msg.respond:
                self.request_response()
        elif isinstance(msg, CreateResponse):
            self.request_response(msg.instructions)
        elif isinstance(msg, CancelResponse):
            self.queued.clear()  # and what was asked for after it
            # Sent even when no response is known here: one may be starting upstream.
            self._send({"type": "response.cancel"})
            self._interrupt("cancelled by control")
        elif isinstance(msg, CommitInput):
            # Manual turns: the producer asks for the response itself (`response.create`).
            self.manual_commits.append(self.upstream_ms)
            self._send({"type": "input_audio_buffer.commit"})
        elif isinstance(msg, ClearInput):
            self._send({"type": "input_audio_buffer.clear"})
            self._let_go(self.upstream_ms)
            self.commit_point = self.upstream_ms
        elif isinstance(msg, ToolResult):
            if msg.call_id not in self.calls:
                if msg.call_id in self.conv.answered_calls:
                    reason = f"tool.result for call {msg.call_id} came after its timeout; ignored"
                else:
                    reason = f"tool.result for unknown call {msg.call_id!r}; ignored"
                self.refusals.append((entry, reason))
                return
            self._answer_call(msg.call_id, msg.output)
        elif isinstance(msg, EndSession):
            if self.conv.response_id is not None:
                self._send({"type": "response.cancel"})
            self.end_reason = f"control: {msg.reason}"

    # ================================================================ responses

    def request_response(self, instructions: str | None = None) -> None:
        """Ask for a response now, or after the one in progress (or coming) is done: one
        is coming while the user speaks, when the VAD answers turns by itself."""
        if self.conv.response_id is not None or self.requested or self._vad_will_answer():
            self.queued.append(instructions)
            return
        self.asks += 1
        event_id = f"vlpipe-response-{self.asks}"
        event: dict[str, Any] = {"type": "response.create", "event_id": event_id}
        if instructions:
            event["response"] = {"instructions": instructions}
        self.requested = True
        self.requested_at = self.now
        self.asked[event_id] = instructions
        self._send(event)

    def _request_next(self) -> None:
        if self.queued and self.conv.response_id is None and not self.requested:
            if not self._vad_will_answer():
                self.request_response(self.queued.popleft())

    def _vad_answers(self) -> bool:
        detection = self.config.turn_detection
        return detection is not None and detection.get("create_response", True) is not False

    def _vad_will_answer(self) -> bool:
        """The user is speaking and the VAD will create a response when they stop."""
        return self.conv.user_speaking and self._vad_answers()

    def _expect_auto_response(self, now: float) -> None:
        """The upstream's VAD will create a response by itself after this commit."""
        self.requested = True
        self.requested_at = now

    # ================================================================ tool calls

    def _tool_call(self, event: dict[str, Any]) -> None:
        call_id = str(event.get("call_id") or "")
        if not call_id:
            return
        deadline = time.time() + self.settings.tool_timeout_s
        self.calls[call_id] = (self.now + self.settings.tool_timeout_s, event.get("response_id"))
        self.response_calls.add(call_id)
        call = ToolCall(
            session=self.sid, call_id=call_id, name=str(event.get("name") or ""),
            arguments=str(event.get("arguments") or ""), response_id=event.get("response_id"),
            item_id=event.get("item_id"), deadline=deadline * 1000,
            traceparent=telemetry.current_traceparent(),
        )  # fmt: skip
        self.side.append(("tool_call", call))

    def _answer_call(self, call_id: str, output: str) -> None:
        self.calls.pop(call_id, None)
        self.conv.answered_calls.add(call_id)
        self.conversation_dirty = True
        self._send({
            "type": "conversation.item.create",
            "item": {"type": "function_call_output", "call_id": call_id, "output": output},
        })  # fmt: skip
        if not self.calls and self.respond_after_calls:
            self.respond_after_calls = False
            self.request_response()

    def tick(self, now: float) -> None:
        """Time passing: tool deadlines, an auto-response that never came, finished turns."""
        self.now = now
        for call_id, (deadline, _) in list(self.calls.items()):
            if now >= deadline:
                self.status(
                    "tool_timeout",
                    f"tool call {call_id} got no result in {self.settings.tool_timeout_s:g} s; "
                    "answered with a timeout result",
                    {"call_id": call_id, "output": TOOL_TIMEOUT_OUTPUT},
                )
                self._answer_call(call_id, TOOL_TIMEOUT_OUTPUT)
        if self.requested and not self.asked and now - self.requested_at > AUTO_RESPONSE_WAIT_S:
            self.requested = False  # the VAD's response never came
            self._request_next()
        self.turns.close_finished()

    # ================================================================ upstream events

    def server_event(
        self, event: dict[str, Any], audio: bytes | None, received: float, now: float
    ) -> None:
        """One upstream event (a `response.audio.delta`'s audio already decoded)."""
        self.now = self.last_event_at = now
        kind = str(event.get("type", ""))
        if kind in _VAD_REPORTS:
            heard_ms = event.get(_VAD_REPORTS[kind])
            if isinstance(heard_ms, int | float):  # the upstream got this far, at least
                unheard_s = max(0.0, self.upstream_ms - heard_ms) / 1000
                self.heard_by = min(self.heard_by, now + unheard_s)
        self.conv.observe(event, len(audio) if audio else 0)
        if kind == "input_audio_buffer.speech_started" or (
            kind == "response.created" and not self.turns.in_progress
        ):
            self._start_turn(kind.rpartition(".")[2], event)
        audio_ms = self.conv.output_format.ms_for_bytes(len(audio)) if audio else 0.0
        self.turns.observe(kind, event, audio_ms=audio_ms)
        self.emit(kind, event, audio, received)
        self._react(kind, event, now)
        if kind == "input_audio_buffer.speech_started" and self.input_final:
            # The VAD found speech in audio sent before the input ended (it lags behind
            # what it was sent): after the end, only silence ends that turn.
            if not self.silence_sent:
                self._trailing_silence()

    def _start_turn(self, reason: str, event: dict[str, Any]) -> None:
        """A new turn's trace, starting when its first frame arrived (for speech)."""
        audio_start_ms = event.get("audio_start_ms")
        first: SentFrame | None = None
        if isinstance(audio_start_ms, int | float):
            for sent in reversed(self.retained):
                if sent.at_ms <= audio_start_ms:
                    first = sent
                    break
        self.turns.start(
            reason, self.frame_traceparent,
            start_ns=int(first.arrived_ms * 1e6) if first else None,
            first_frame=first.seq if first else None,
            item_id=str(event["item_id"]) if event.get("item_id") else None,
        )  # fmt: skip
        if first is not None and self.turns.traceparent:
            # Ingest reads this to put its span of the utterance's first frame in the trace.
            self.turn_marker = f"{self.turns.traceparent} {first.seq}"
            self.dirty = True

    def _react(self, kind: str, event: dict[str, Any], now: float) -> None:
        if kind in ("conversation.item.created", "conversation.item.deleted",
                    "conversation.item.truncated", "response.done",
                    "conversation.item.input_audio_transcription.completed"):  # fmt: skip
            self.conversation_dirty = True
        detection = self.config.turn_detection
        if kind == "error":
            error = event.get("error") or {}
            code = str(error.get("code") or error.get("type") or "unknown")
            self.status("error", f"upstream error {code}: {error.get('message', '')}", error)
            failed = str(error.get("event_id") or "")
            if failed in self.asked:  # our response.create was refused
                instructions = self.asked.pop(failed)
                self.requested = False
                if code == "conversation_already_has_active_response":
                    # A response we did not know of is in progress: ours waits for it.
                    self.queued.appendleft(instructions)
                    self._expect_auto_response(now)
                else:
                    self._request_next()
        elif kind == "response.created":
            self.requested = False
            self.asked.clear()
        elif kind == "input_audio_buffer.speech_stopped":
            end = event.get("audio_end_ms")
            self.speech_end_ms = float(end) if isinstance(end, int | float) else None
            if self._vad_answers() and self.conv.response_id is None:
                # The VAD commits and creates the response in the same moment.
                self._expect_auto_response(now)
        elif kind == "input_audio_buffer.committed":
            self._committed(str(event.get("item_id") or ""), now)
        elif kind in ("conversation.item.input_audio_transcription.completed",
                      "conversation.item.input_audio_transcription.failed"):  # fmt: skip
            self._transcribed(str(event.get("item_id") or ""))
        elif kind == "input_audio_buffer.cleared":
            self._let_go(self.upstream_ms)
            self.commit_point = self.upstream_ms
        elif kind == "input_audio_buffer.speech_started":
            if detection is not None and detection.get("interrupt_response") is not False:
                # With server VAD the upstream cancels the response in progress itself;
                # what it cannot know is how much of the audio the user heard.
                self._interrupt("user started speaking")
            if self.playback_needed is None:
                # The barge-in check has run: earlier finished turns can no longer be cut.
                self.turns.close_finished(all_earlier=True)
        elif kind == "response.function_call_arguments.done":
            self._tool_call(event)
        elif kind == "response.done":
            self._response_done(event)

    def _committed(self, item_id: str, now: float) -> None:
        """The upstream made an item of the audio up to the commit point."""
        if self.manual_commits:
            point = self.manual_commits.popleft()
        elif self.speech_end_ms is not None:
            point = self.speech_end_ms
        else:
            point = self.upstream_ms
        self.speech_end_ms = None
        span = (self.commit_point, point)
        self.commit_point = point
        if self.config.input_audio_transcription and item_id:
            self.pending_commits[item_id] = span  # let go once it is remembered as text
        else:
            self._let_go_span(*span)
        if self._vad_answers():
            self.answer_owed = True
            if self.conv.response_id is None:
                self._expect_auto_response(now)

    def _transcribed(self, item_id: str) -> None:
        span = self.pending_commits.pop(item_id, None)
        if span is not None:
            self._let_go_span(*span)

    def _response_done(self, event: dict[str, Any]) -> None:
        self.requested = False
        self.answer_owed = False
        self.dirty = True
        if self.response_calls:
            self.response_calls = set()
            if self.calls:
                self.respond_after_calls = True  # once every call is answered
            else:
                self.request_response()
        else:
            self._request_next()
        if not (self.calls or self.respond_after_calls or self.response_calls
                or self.queued or self.requested):  # fmt: skip
            # The turn's last response is done.
            self.turns.turn_done(str((event.get("response") or {}).get("id") or ""))

    # ================================================================ barge-in

    def _interrupt(self, why: str) -> None:
        """Stop the assistant's audio and cut its item to what the user heard: the shell
        reads the playback position and calls `barge_in`."""
        if self.conv.audio_item_id is not None:
            self.playback_needed = why

    def barge_in(self, playback: dict[str, str], wall_now: float | None = None) -> bool:
        """The playback position (`vl:playback:{sid}`) the pending cut asked for;
        `wall_now` is the wall clock (s), which bounds what can have been heard. True when
        the assistant's item was cut."""
        why, self.playback_needed = self.playback_needed, None
        if why is None:
            return False
        cut = self._cut(why, playback, wall_now)
        self.turns.close_finished(all_earlier=True)
        return cut

    def _cut(self, why: str, playback: dict[str, str], now: float | None) -> bool:
        cut = self.conv.cut_for_barge_in(
            played_ms=playback_ms(playback.get("played_ms")),
            delivered_ms=playback_ms(playback.get("delivered_ms")),
            playback_item=playback.get("item_id"),
            now=now,
        )
        if cut is None:
            return False
        self.turns.interrupt(cut.item_id)
        self.emit(
            "vlpipe.barge_in",
            {"response_id": self.conv.response_id or playback.get("response_id"),
             "item_id": cut.item_id, "audio_end_ms": cut.audio_end_ms, "reason": why},
        )  # fmt: skip
        if cut.delete:
            # Nothing of it was heard: it must not stay in the conversation as if said.
            self._send({"type": "conversation.item.delete", "item_id": cut.item_id})
        else:
            self._send({"type": "conversation.item.truncate", "item_id": cut.item_id,
                        "content_index": 0, "audio_end_ms": cut.audio_end_ms})  # fmt: skip
        return True


def _id_before(entry_id: str) -> str:
    """The stream id just before `entry_id` (an XREAD from it returns `entry_id` first)."""
    ms, _, seq = entry_id.partition("-")
    if int(seq or 0) > 0:
        return f"{ms}-{int(seq) - 1}"
    return f"{int(ms) - 1}-{2**64 - 1}"


def _errors(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}"
        for e in exc.errors(include_url=False, include_input=False)
    )
