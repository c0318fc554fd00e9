"""One Voice Live realtime session as a pure state machine: client events in, server events out.

`EngineSession` does no I/O and never blocks on a model. The shell around it (see
`server.py`) feeds it and does the slow work it asks for:

- `start()` returns `session.created`;
- `handle_client_message(raw)` / `handle_client_event(event)` return the server events a
  client event causes (`error` events for bad ones; the session always survives);
- `take_jobs()` drains the work the session needs done off the event loop: a
  `TranscriptionJob` (speech-to-text of a user item) or a `SynthesisJob` (speech for a
  response). The shell reports back with `transcription_finished` / `speech_synthesized`
  (or their `_failed` twins), which return more events;
- `next_audio()` hands out the active response's audio one 100 ms `response.audio.delta` at
  a time and, once it is all out, the events that close the response; the shell paces it.

Input audio is decoded from the session's input format and resampled to 16 kHz PCM16, on
which the VAD and speech-to-text run; times (`audio_start_ms`, `audio_end_ms`) are
milliseconds of audio appended since the session began. With `echo=True` the session
replies to each turn with the user's own audio and asks for no transcription or synthesis.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import secrets
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from vlpipe.services.engine.conversation import (
    Conversation,
    FunctionCall,
    FunctionCallOutput,
    InputAudio,
    InputText,
    Item,
    Message,
    OutputAudio,
    OutputText,
)
from vlpipe.services.engine.errors import ClientError, invalid_type, invalid_value, missing
from vlpipe.services.engine.responder import CallTool, ToolResult, TurnContext, reply_to
from vlpipe.services.engine.session_config import (
    FunctionTool,
    SessionConfig,
    parse_modalities,
    parse_output_format,
    parse_tool_choice,
    parse_tools,
)
from vlpipe.services.engine.vad import (
    VAD_RATE,
    SpeechStarted,
    TurnDetector,
    VoiceActivityModel,
)
from vlpipe.shared.audio import AudioFormat, FormatConverter, StreamingResampler, decode_to_pcm16

AUDIO_CHUNK_MS = 100  # audio per response.audio.delta
MIN_COMMIT_MS = 100  # a commit needs at least this much buffered audio
MAX_BUFFER_MS = 5 * 60 * 1000  # without VAD the input buffer keeps at most this much
AUDIO_TOKENS_PER_SECOND = 10  # usage estimate; text tokens are characters / 4
_BYTES_PER_MS_16K = VAD_RATE * 2 // 1000

UNSUPPORTED_EVENTS = frozenset(
    {
        "input_audio.turn.start",
        "input_audio.turn.append",
        "input_audio.turn.end",
        "input_audio.turn.cancel",
        "input_audio.clear",
        "session.avatar.connect",
        "mcp_approval_response",
        "input_text.delta",
        "input_text.done",
        "transcription_session.update",
    }
)


class IdSource:
    """Makes ids like `item_3fZ...`; with `seed`, deterministic counters (for tests)."""

    def __init__(self, seed: int | None = None) -> None:
        self._counter = 0 if seed is None else seed
        self._random = seed is None

    def __call__(self, prefix: str) -> str:
        if self._random:
            return f"{prefix}_{secrets.token_hex(10)}"
        self._counter += 1
        return f"{prefix}_{self._counter}"


@dataclass(frozen=True)
class TranscriptionJob:
    """Transcribe `audio` (PCM16 mono 16 kHz) of user item `item_id`."""

    item_id: str
    audio: bytes


@dataclass(frozen=True)
class SynthesisJob:
    """Speak `text` with session voice `voice` for response `response_id`."""

    response_id: str
    text: str
    voice: str


Job = TranscriptionJob | SynthesisJob


@dataclass(frozen=True)
class AudioChunk:
    """Events to send, of which `duration_ms` is response audio (0 for closing events)."""

    events: list[dict[str, Any]]
    duration_ms: float
    response_id: str


@dataclass
class _Response:
    id: str
    modalities: tuple[str, ...]
    voice: str | dict[str, Any]
    output_format: AudioFormat
    instructions: str
    tools: tuple[FunctionTool, ...]
    tool_choice: str | dict[str, Any]
    temperature: float
    max_output_tokens: int | str
    output: list[Item] = field(default_factory=list)
    started: bool = False
    audio_item: Message | None = None
    audio_chunks: deque[bytes] = field(default_factory=deque)
    synthesis_pending: bool = False
    sent_audio_ms: float = 0.0
    output_text: str = ""

    @property
    def voice_name(self) -> str:
        if isinstance(self.voice, dict):
            return str(self.voice.get("name", ""))
        return self.voice


class EngineSession:
    """The state of one realtime session (see the module docstring for the contract)."""

    def __init__(
        self,
        vad: VoiceActivityModel,
        *,
        echo: bool = False,
        model: str = "local",
        ids: IdSource | None = None,
    ) -> None:
        self.ids = ids or IdSource()
        self.echo = echo
        self.vad = vad
        self.session_id = self.ids("sess")
        self.conversation_id = self.ids("conv")
        self.config = SessionConfig(model=model)
        self.conversation = Conversation()
        self._jobs: list[Job] = []
        self._response: _Response | None = None
        self._resampler = StreamingResampler(self.config.input_format.rate, VAD_RATE)
        self._buffer = bytearray()  # PCM16 16 kHz since the last commit or clear
        self._buffer_start_ms = 0.0  # session audio time of _buffer[0]
        self._detector = self._new_detector()
        self._speech_item_id: str | None = None
        self._speech_start_ms = 0.0
        self._handlers: dict[str, Callable[[dict[str, Any]], list[dict[str, Any]]]] = {
            "session.update": self._session_update,
            "input_audio_buffer.append": self._buffer_append,
            "input_audio_buffer.commit": self._buffer_commit,
            "input_audio_buffer.clear": self._buffer_clear,
            "conversation.item.create": self._item_create,
            "conversation.item.truncate": self._item_truncate,
            "conversation.item.delete": self._item_delete,
            "conversation.item.retrieve": self._item_retrieve,
            "response.create": self._response_create,
            "response.cancel": self._response_cancel,
            "output_audio_buffer.clear": self._output_buffer_clear,
        }

    # ---- the shell's entry points -------------------------------------------------

    def start(self) -> list[dict[str, Any]]:
        """The events a new connection receives: `session.created`."""
        return [self._event("session.created", session=self.config.to_wire(self.session_id))]

    def handle_client_message(self, raw: str | bytes) -> list[dict[str, Any]]:
        """Server events for one WebSocket message (text or binary JSON)."""
        try:
            event = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            return [self._error(ClientError("invalid_json", f"Invalid JSON: {exc}"), None)]
        if not isinstance(event, dict):
            return [self._error(invalid_type("event", "a JSON object"), None)]
        return self.handle_client_event(event)

    def handle_client_event(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """Server events for one parsed client event."""
        event_id = event.get("event_id")
        event_id = event_id if isinstance(event_id, str) else None
        kind = event.get("type")
        try:
            if not isinstance(kind, str):
                raise missing("type")
            handler = self._handlers.get(kind)
            if handler is None:
                if kind in UNSUPPORTED_EVENTS:
                    raise ClientError(
                        "unsupported_event",
                        f"The local engine does not support '{kind}'.",
                        "type",
                    )
                raise invalid_value(
                    "type",
                    f"Invalid value: '{kind}'. Supported values are: {sorted(self._handlers)}.",
                )
            return handler(event)
        except ClientError as error:
            return [self._error(error, event_id)]

    def take_jobs(self) -> list[Job]:
        """The work requested since the last call, oldest first."""
        jobs, self._jobs = self._jobs, []
        return jobs

    def transcription_finished(
        self, item_id: str, segments: tuple[str, ...]
    ) -> list[dict[str, Any]]:
        """Record the transcript of user item `item_id`, given as recognized segments."""
        texts = [s.strip() for s in segments if s.strip()]
        transcript = " ".join(texts)
        item = self.conversation.get(item_id)
        events: list[dict[str, Any]] = []
        if isinstance(item, Message):
            index, part = _pending_audio_part(item)
            if part is not None:
                part.transcript = transcript
                if self.config.input_audio_transcription is not None:
                    for n, text in enumerate(texts):
                        events.append(
                            self._event(
                                "conversation.item.input_audio_transcription.delta",
                                item_id=item_id,
                                content_index=index,
                                delta=text if n == 0 else f" {text}",
                            )
                        )
                    events.append(
                        self._event(
                            "conversation.item.input_audio_transcription.completed",
                            item_id=item_id,
                            content_index=index,
                            transcript=transcript,
                        )
                    )
        return events + self._resume_response()

    def transcription_failed(self, item_id: str, message: str) -> list[dict[str, Any]]:
        """Speech-to-text of `item_id` failed: report it and treat the turn as unheard."""
        item = self.conversation.get(item_id)
        events: list[dict[str, Any]] = []
        if isinstance(item, Message):
            index, part = _pending_audio_part(item)
            if part is not None:
                part.transcript = ""
                if self.config.input_audio_transcription is not None:
                    events.append(
                        self._event(
                            "conversation.item.input_audio_transcription.failed",
                            item_id=item_id,
                            content_index=index,
                            error={
                                "type": "server_error",
                                "code": "transcription_failed",
                                "message": message,
                            },
                        )
                    )
        return events + self._resume_response()

    def speech_synthesized(self, response_id: str, pcm: bytes, rate: int) -> list[dict[str, Any]]:
        """The speech of response `response_id`: PCM16 mono at `rate` Hz.

        Queues it, in the response's output format, for `next_audio`. Ignored if that
        response is no longer active (it was cancelled meanwhile).
        """
        response = self._response
        if response is None or response.id != response_id or response.audio_item is None:
            return []
        self._queue_audio(response, pcm, rate)
        response.synthesis_pending = False
        return []

    def synthesis_failed(self, response_id: str, message: str) -> list[dict[str, Any]]:
        """Speech synthesis of `response_id` failed: the response ends as `failed`."""
        response = self._response
        if response is None or response.id != response_id:
            return []
        details = {"type": "failed", "error": {"type": "server_error", "message": message}}
        return self._finish_response("failed", details)

    @property
    def audio_pending(self) -> bool:
        """True when `next_audio` has something to hand out now."""
        response = self._response
        return bool(
            response is not None
            and response.audio_item is not None
            and (response.audio_chunks or not response.synthesis_pending)
        )

    @property
    def active_response_id(self) -> str | None:
        return None if self._response is None else self._response.id

    def next_audio(self) -> AudioChunk | None:
        """The next `response.audio.delta` of the active response, or the events closing it
        once its audio is all out; None when there is nothing to send now."""
        response = self._response
        if response is None or response.audio_item is None:
            return None
        item = response.audio_item
        where = self._where(response, item)
        if response.audio_chunks:
            chunk = response.audio_chunks.popleft()
            duration = response.output_format.ms_for_bytes(len(chunk))
            response.sent_audio_ms += duration
            delta = base64.b64encode(chunk).decode("ascii")
            event = self._event("response.audio.delta", **where, content_index=0, delta=delta)
            return AudioChunk([event], duration, response.id)
        if response.synthesis_pending:
            return None
        part = item.content[0]
        assert isinstance(part, OutputAudio)
        part.duration_ms = response.sent_audio_ms
        item.status = "completed"
        events = [
            self._event("response.audio.done", **where, content_index=0),
            self._event(
                "response.audio_transcript.done",
                **where,
                content_index=0,
                transcript=part.transcript,
            ),
            self._event(
                "response.content_part.done", **where, content_index=0, part=part.to_wire()
            ),
            self._event(
                "response.output_item.done",
                response_id=response.id,
                output_index=where["output_index"],
                item=item.to_wire(),
            ),
        ]
        return AudioChunk(events + self._finish_response("completed"), 0.0, response.id)

    # ---- client events --------------------------------------------------------------

    def _session_update(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        if "session" not in event:
            raise missing("session")
        before = self.config
        self.config = before.updated(event["session"])
        if self.config.input_format.rate != before.input_format.rate:
            self._take_audio(self._resampler.flush())
            self._resampler = StreamingResampler(self.config.input_format.rate, VAD_RATE)
        if self.config.turn_detection != before.turn_detection:
            self._detector = self._new_detector()
            self._speech_item_id = None
        return [self._event("session.updated", session=self.config.to_wire(self.session_id))]

    def _buffer_append(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        pcm = self._decode_input_audio(event.get("audio"), "audio")
        return self._take_audio(self._resampler.process(pcm))

    def _buffer_commit(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        if len(self._buffer) < MIN_COMMIT_MS * _BYTES_PER_MS_16K:
            raise ClientError(
                "input_audio_buffer_commit_empty",
                f"Error committing input audio buffer: buffer too small. Expected at least "
                f"{MIN_COMMIT_MS}ms of audio, but buffer only has "
                f"{len(self._buffer) / _BYTES_PER_MS_16K:.2f}ms of audio.",
            )
        item_id = self._speech_item_id or self.ids("item")
        audio = bytes(self._buffer)
        self._drop_buffer_to(self._buffer_start_ms + len(self._buffer) / _BYTES_PER_MS_16K)
        self._detector = self._new_detector()
        self._speech_item_id = None
        return self._commit_audio(item_id, audio)

    def _buffer_clear(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        self._drop_buffer_to(self._buffer_start_ms + len(self._buffer) / _BYTES_PER_MS_16K)
        self._detector = self._new_detector()
        self._speech_item_id = None
        return [self._event("input_audio_buffer.cleared")]

    def _item_create(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        raw = event.get("item")
        if raw is None:
            raise missing("item")
        if not isinstance(raw, dict):
            raise invalid_type("item", "an object")
        previous = event.get("previous_item_id")
        if previous is not None and not isinstance(previous, str):
            raise invalid_type("previous_item_id", "a string")
        item = self._parse_item(raw)
        previous_id = self.conversation.add(item, previous)
        if isinstance(item, Message) and not self.echo:
            for part in item.content:
                if isinstance(part, InputAudio) and part.transcript is None:
                    self._jobs.append(TranscriptionJob(item.id, part.audio))
        return [
            self._event(
                "conversation.item.created", previous_item_id=previous_id, item=item.to_wire()
            )
        ]

    def _item_truncate(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        item_id = _required(event, "item_id", str)
        content_index = _required(event, "content_index", int)
        audio_end_ms = _required(event, "audio_end_ms", int)
        item = self.conversation.get(item_id)
        if not isinstance(item, Message) or item.role != "assistant":
            raise ClientError(
                "item_truncate_invalid_item_id",
                f"Assistant message item with id '{item_id}' not found.",
                "item_id",
            )
        if not 0 <= content_index < len(item.content) or not isinstance(
            item.content[content_index], OutputAudio
        ):
            raise invalid_value("content_index", "content_index does not name an audio part.")
        part = item.content[content_index]
        assert isinstance(part, OutputAudio)
        produced = part.duration_ms
        if self._response is not None and self._response.audio_item is item:
            produced = self._response.sent_audio_ms
        if audio_end_ms < 0 or audio_end_ms > produced + 1:
            raise invalid_value(
                "audio_end_ms",
                f"audio_end_ms {audio_end_ms} is outside the item's {produced:.0f} ms of audio.",
            )
        part.duration_ms = float(audio_end_ms)
        part.transcript = ""  # like the service: no text the user has not heard
        return [
            self._event(
                "conversation.item.truncated",
                item_id=item_id,
                content_index=content_index,
                audio_end_ms=audio_end_ms,
            )
        ]

    def _item_delete(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        item_id = _required(event, "item_id", str)
        if not self.conversation.delete(item_id):
            raise ClientError(
                "item_delete_invalid_item_id", f"Item with id '{item_id}' not found.", "item_id"
            )
        events = [self._event("conversation.item.deleted", item_id=item_id)]
        return events + self._resume_response()  # it may have been awaited

    def _item_retrieve(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        item_id = _required(event, "item_id", str)
        item = self.conversation.get(item_id)
        if item is None:
            raise ClientError(
                "item_retrieve_invalid_item_id", f"Item with id '{item_id}' not found.", "item_id"
            )
        return [self._event("conversation.item.retrieved", item=item.to_wire())]

    def _response_create(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        params = event.get("response") or {}
        if not isinstance(params, dict):
            raise invalid_type("response", "an object")
        extra = event.get("additional_instructions")
        if extra is not None and not isinstance(extra, str):
            raise invalid_type("additional_instructions", "a string")
        events: list[dict[str, Any]] = []
        if self._response is not None:
            if not params.get("cancel_previous"):
                raise ClientError(
                    "conversation_already_has_active_response",
                    f"Conversation already has an active response in progress: "
                    f"{self._response.id}. Wait until the response is finished before "
                    "creating a new one.",
                )
            events += self._cancel_response("client_cancelled")
        response = self._new_response(params, extra)
        if params.get("commit") and len(self._buffer) >= MIN_COMMIT_MS * _BYTES_PER_MS_16K:
            events += self._buffer_commit({})
        return events + self._start_response(response)

    def _response_cancel(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        response_id = event.get("response_id")
        if self._response is None:
            raise ClientError(
                "response_cancel_not_active",
                "Cancellation failed: no active response found.",
            )
        if response_id is not None and response_id != self._response.id:
            raise invalid_value("response_id", f"Response '{response_id}' is not active.")
        return self._cancel_response("client_cancelled")

    def _output_buffer_clear(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if self._response is not None and self._response.audio_item is not None:
            events += self._cancel_response("client_cancelled")
        return [*events, self._event("output_audio_buffer.cleared")]

    # ---- input audio and turns ------------------------------------------------------

    def _new_detector(self) -> TurnDetector | None:
        detection = self.config.turn_detection
        if detection is None:
            return None
        self.vad.reset()
        return TurnDetector(self.vad, detection.vad, start_ms=self._clock_ms)

    @property
    def _clock_ms(self) -> float:
        """Session audio time: ms of 16 kHz audio taken in so far."""
        return self._buffer_start_ms + len(self._buffer) / _BYTES_PER_MS_16K

    def _decode_input_audio(self, value: Any, param: str) -> bytes:
        if value is None:
            raise missing(param)
        if not isinstance(value, str):
            raise invalid_type(param, "a base64 string")
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise invalid_value(param, "Invalid base64 audio.") from None
        fmt = self.config.input_format
        if not fmt.is_g711 and len(data) % 2:
            raise invalid_value(param, "pcm16 audio must be a whole number of 2-byte samples.")
        return decode_to_pcm16(data, fmt)

    def _take_audio(self, pcm: bytes) -> list[dict[str, Any]]:
        self._buffer += pcm
        events: list[dict[str, Any]] = []
        if self._detector is None:
            overflow = len(self._buffer) - MAX_BUFFER_MS * _BYTES_PER_MS_16K
            if overflow > 0:
                self._drop_buffer_to(self._buffer_start_ms + overflow / _BYTES_PER_MS_16K)
            return events
        for turn in self._detector.feed(pcm):
            if isinstance(turn, SpeechStarted):
                events += self._speech_started(turn.audio_start_ms)
            else:
                events += self._speech_stopped(turn.audio_end_ms)
        if not self._detector.speaking:
            # Keep only what a coming speech start may reach back to.
            keep_ms = self._detector.config.prefix_padding_ms + 250
            self._drop_buffer_to(self._clock_ms - keep_ms)
        return events

    def _drop_buffer_to(self, ms: float) -> None:
        drop = round((ms - self._buffer_start_ms) * VAD_RATE / 1000) * 2
        if drop <= 0:
            return
        drop = min(drop, len(self._buffer))
        del self._buffer[:drop]
        self._buffer_start_ms += drop / _BYTES_PER_MS_16K

    def _speech_started(self, audio_start_ms: int) -> list[dict[str, Any]]:
        self._speech_item_id = self.ids("item")
        # The prefix padding never reaches back into audio already committed or cleared.
        self._speech_start_ms = float(max(audio_start_ms, math.ceil(self._buffer_start_ms)))
        events = [
            self._event(
                "input_audio_buffer.speech_started",
                audio_start_ms=int(self._speech_start_ms),
                item_id=self._speech_item_id,
            )
        ]
        detection = self.config.turn_detection
        if self._response is not None and detection is not None and detection.interrupt_response:
            events += self._cancel_response("turn_detected")
        return events

    def _speech_stopped(self, audio_end_ms: int) -> list[dict[str, Any]]:
        item_id = self._speech_item_id or self.ids("item")
        self._speech_item_id = None
        events = [
            self._event(
                "input_audio_buffer.speech_stopped", audio_end_ms=audio_end_ms, item_id=item_id
            )
        ]
        self._drop_buffer_to(self._speech_start_ms)
        end = min(len(self._buffer), round((audio_end_ms - self._buffer_start_ms) * 16) * 2)
        audio = bytes(self._buffer[:end])
        self._drop_buffer_to(float(audio_end_ms))
        events += self._commit_audio(item_id, audio)
        detection = self.config.turn_detection
        if detection is not None and detection.create_response and self._response is None:
            events += self._start_response(self._new_response({}, None))
        return events

    def _commit_audio(self, item_id: str, audio: bytes) -> list[dict[str, Any]]:
        item = Message(item_id, "user", [InputAudio(audio)])
        previous = self.conversation.add(item)
        if not self.echo:
            self._jobs.append(TranscriptionJob(item_id, audio))
        return [
            self._event("input_audio_buffer.committed", previous_item_id=previous, item_id=item_id),
            self._event(
                "conversation.item.created", previous_item_id=previous, item=item.to_wire()
            ),
        ]

    # ---- responses ------------------------------------------------------------------

    def _new_response(self, params: dict[str, Any], extra: str | None) -> _Response:
        config = self.config
        instructions = params.get("instructions", config.instructions)
        if not isinstance(instructions, str):
            raise invalid_type("response.instructions", "a string")
        if extra:
            instructions = f"{instructions}\n{extra}"
        voice = params.get("voice", config.voice)
        if not isinstance(voice, str | dict):
            raise invalid_type("response.voice", "a voice name or object")
        modalities = config.modalities
        if "modalities" in params:
            modalities = parse_modalities(params["modalities"], "response.modalities")
        output_format = config.output_format
        if "output_audio_format" in params:
            output_format = parse_output_format(
                params["output_audio_format"], "response.output_audio_format"
            )
        tools = config.tools
        if "tools" in params:
            tools = parse_tools(params["tools"], "response.tools")
        tool_choice = config.tool_choice
        if "tool_choice" in params:
            tool_choice = parse_tool_choice(params["tool_choice"], "response.tool_choice")
        return _Response(
            id=self.ids("resp"),
            modalities=modalities,
            voice=voice,
            output_format=output_format,
            instructions=instructions,
            tools=tools,
            tool_choice=tool_choice,
            temperature=float(params.get("temperature", config.temperature)),
            max_output_tokens=params.get("max_output_tokens", config.max_response_output_tokens),
        )

    def _start_response(self, response: _Response) -> list[dict[str, Any]]:
        self._response = response
        created = self._event(
            "response.created", response=self._response_wire(response, "in_progress")
        )
        return [created, *self._resume_response()]

    def _resume_response(self) -> list[dict[str, Any]]:
        """Generate the active response's output once every transcript it needs is in."""
        response = self._response
        if response is None or response.started:
            return []
        if not self.echo and any(
            isinstance(item, Message) and item.transcription_pending
            for item in self.conversation.items
        ):
            return []
        response.started = True
        if self.echo:
            return self._echo_reply(response)
        reply = reply_to(self._turn_context(response))
        if isinstance(reply, CallTool):
            return self._function_call(response, reply)
        return self._message(response, reply.text)

    def _turn_context(self, response: _Response) -> TurnContext:
        last_user = self.conversation.last_user_message()
        results: list[ToolResult] = []
        tool_called = False
        for item in self.conversation.since_last_user_message():
            if isinstance(item, FunctionCall):
                tool_called = True
            elif isinstance(item, FunctionCallOutput):
                name = self.conversation.function_name(item.call_id) or item.call_id
                results.append(ToolResult(name, item.output))
            elif isinstance(item, Message) and item.role == "assistant":
                results.clear()  # already answered
        return TurnContext(
            instructions=response.instructions,
            utterance=None if last_user is None else last_user.text,
            tool_results=tuple(results),
            tool_called=tool_called,
            tools=response.tools,
            tool_choice=response.tool_choice,
        )

    def _add_output(self, response: _Response, item: Item) -> list[dict[str, Any]]:
        output_index = len(response.output)
        response.output.append(item)
        previous = self.conversation.add(item)
        return [
            self._event(
                "response.output_item.added",
                response_id=response.id,
                output_index=output_index,
                item=item.to_wire(),
            ),
            self._event(
                "conversation.item.created", previous_item_id=previous, item=item.to_wire()
            ),
        ]

    def _where(self, response: _Response, item: Item) -> dict[str, Any]:
        return {
            "response_id": response.id,
            "item_id": item.id,
            "output_index": response.output.index(item),
        }

    def _function_call(self, response: _Response, call: CallTool) -> list[dict[str, Any]]:
        item = FunctionCall(self.ids("item"), call.name, self.ids("call"), status="in_progress")
        events = self._add_output(response, item)
        arguments = json.dumps(call.arguments)
        response.output_text = arguments
        where = {**self._where(response, item), "call_id": item.call_id}
        for piece in _pieces(arguments, 24):
            events.append(
                self._event("response.function_call_arguments.delta", **where, delta=piece)
            )
        events.append(
            self._event(
                "response.function_call_arguments.done",
                **where,
                name=call.name,
                arguments=arguments,
            )
        )
        item.arguments = arguments
        return events + self._complete(response, item, where["output_index"])

    def _complete(self, response: _Response, item: Any, output_index: int) -> list[dict[str, Any]]:
        """Mark the response's last output item done and finish the response."""
        item.status = "completed"
        done = self._event(
            "response.output_item.done",
            response_id=response.id,
            output_index=output_index,
            item=item.to_wire(),
        )
        return [done, *self._finish_response("completed")]

    def _message(self, response: _Response, text: str) -> list[dict[str, Any]]:
        item = Message(self.ids("item"), "assistant", [], status="in_progress")
        events = self._add_output(response, item)
        where = self._where(response, item)
        response.output_text = text
        if "audio" in response.modalities:
            item.content.append(OutputAudio(transcript=text))
            events.append(
                self._event(
                    "response.content_part.added",
                    **where,
                    content_index=0,
                    part=OutputAudio().to_wire(),
                )
            )
            for word in _words(text):
                events.append(
                    self._event(
                        "response.audio_transcript.delta", **where, content_index=0, delta=word
                    )
                )
            response.audio_item = item
            response.synthesis_pending = True
            self._jobs.append(SynthesisJob(response.id, text, response.voice_name))
            return events
        part = OutputText(text)
        item.content.append(part)
        events.append(
            self._event(
                "response.content_part.added", **where, content_index=0, part=OutputText().to_wire()
            )
        )
        for word in _words(text):
            events.append(self._event("response.text.delta", **where, content_index=0, delta=word))
        events.append(self._event("response.text.done", **where, content_index=0, text=text))
        events.append(
            self._event("response.content_part.done", **where, content_index=0, part=part.to_wire())
        )
        return events + self._complete(response, item, where["output_index"])

    def _echo_reply(self, response: _Response) -> list[dict[str, Any]]:
        last_user = self.conversation.last_user_message()
        audio = b"".join(
            part.audio
            for part in (last_user.content if last_user else [])
            if isinstance(part, InputAudio)
        )
        if not audio or "audio" not in response.modalities:
            return self._finish_response("completed")
        item = Message(self.ids("item"), "assistant", [OutputAudio()], status="in_progress")
        events = self._add_output(response, item)
        events.append(
            self._event(
                "response.content_part.added",
                **self._where(response, item),
                content_index=0,
                part=OutputAudio().to_wire(),
            )
        )
        response.audio_item = item
        self._queue_audio(response, audio, VAD_RATE)
        return events

    def _queue_audio(self, response: _Response, pcm: bytes, rate: int) -> None:
        converter = FormatConverter(rate, response.output_format)
        encoded = converter.process(pcm) + converter.flush()
        step = response.output_format.bytes_for_ms(AUDIO_CHUNK_MS)
        response.audio_chunks.extend(encoded[i : i + step] for i in range(0, len(encoded), step))

    def _cancel_response(self, reason: str) -> list[dict[str, Any]]:
        response = self._response
        if response is None:
            return []
        response.audio_chunks.clear()
        for item in response.output:
            if isinstance(item, Message | FunctionCall) and item.status == "in_progress":
                item.status = "incomplete"
        if response.audio_item is not None:
            part = response.audio_item.content[0]
            assert isinstance(part, OutputAudio)
            part.duration_ms = response.sent_audio_ms
        return self._finish_response("cancelled", {"type": "cancelled", "reason": reason})

    def _finish_response(
        self, status: str, details: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        response = self._response
        assert response is not None
        self._response = None
        wire = self._response_wire(response, status, details)
        wire["usage"] = self._usage(response)
        return [self._event("response.done", response=wire)]

    def _response_wire(
        self, response: _Response, status: str, details: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        return {
            "id": response.id,
            "object": "realtime.response",
            "status": status,
            "status_details": details,
            "output": [item.to_wire() for item in response.output],
            "usage": None,
            "conversation_id": self.conversation_id,
            "modalities": list(response.modalities),
            "voice": response.voice,
            "output_audio_format": response.output_format.value,
            "temperature": response.temperature,
            "max_output_tokens": response.max_output_tokens,
        }

    def _usage(self, response: _Response) -> dict[str, Any]:
        input_text = len(response.instructions)
        input_audio_ms = 0.0
        for item in self.conversation.items:
            if item in response.output:
                continue
            if isinstance(item, Message):
                for part in item.content:
                    if isinstance(part, InputAudio):
                        input_audio_ms += part.duration_ms
                    elif isinstance(part, InputText | OutputText):
                        input_text += len(part.text)
                    else:
                        input_text += len(part.transcript)
            elif isinstance(item, FunctionCall):
                input_text += len(item.arguments)
            else:
                input_text += len(item.output)
        text_in = math.ceil(input_text / 4)
        audio_in = math.ceil(input_audio_ms * AUDIO_TOKENS_PER_SECOND / 1000)
        text_out = math.ceil(len(response.output_text) / 4)
        audio_out = math.ceil(response.sent_audio_ms * AUDIO_TOKENS_PER_SECOND / 1000)
        return {
            "total_tokens": text_in + audio_in + text_out + audio_out,
            "input_tokens": text_in + audio_in,
            "output_tokens": text_out + audio_out,
            "input_token_details": {
                "cached_tokens": 0,
                "text_tokens": text_in,
                "audio_tokens": audio_in,
                "image_tokens": 0,
                "cached_tokens_details": {"text_tokens": 0, "audio_tokens": 0, "image_tokens": 0},
            },
            "output_token_details": {"text_tokens": text_out, "audio_tokens": audio_out},
        }

    # ---- items from the client -------------------------------------------------------

    def _parse_item(self, raw: dict[str, Any]) -> Item:
        item_id = raw.get("id") or self.ids("item")
        if not isinstance(item_id, str):
            raise invalid_type("item.id", "a string")
        kind = raw.get("type", "message")
        if kind == "function_call_output":
            call_id = _required(raw, "call_id", str, "item.")
            output = raw.get("output", "")
            if not isinstance(output, str):
                output = json.dumps(output)
            return FunctionCallOutput(item_id, call_id, output)
        if kind == "function_call":
            return FunctionCall(
                item_id,
                _required(raw, "name", str, "item."),
                _required(raw, "call_id", str, "item."),
                str(raw.get("arguments", "")),
            )
        if kind != "message":
            raise invalid_value("item.type", f"Unsupported item type {kind!r}.")
        role = raw.get("role")
        if role not in ("user", "assistant", "system"):
            raise invalid_value("item.role", "role must be 'user', 'assistant' or 'system'.")
        content = raw.get("content")
        if not isinstance(content, list) or not content:
            raise invalid_type("item.content", "a non-empty list of content parts")
        parts = [self._parse_part(role, part, n) for n, part in enumerate(content)]
        return Message(item_id, role, parts)

    def _parse_part(
        self, role: str, raw: Any, index: int
    ) -> InputText | InputAudio | OutputText | OutputAudio:
        param = f"item.content[{index}]"
        if not isinstance(raw, dict):
            raise invalid_type(param, "an object")
        kind = raw.get("type")
        text = raw.get("text")
        if kind == "input_text" and role in ("user", "system") and isinstance(text, str):
            return InputText(text)
        if kind in ("text", "output_text") and role == "assistant" and isinstance(text, str):
            return OutputText(text)
        if kind == "input_audio" and role == "user":
            transcript = raw.get("transcript")
            audio = raw.get("audio")
            if audio is None and isinstance(transcript, str):
                return InputAudio(b"", transcript)
            pcm = self._resample_whole(self._decode_input_audio(audio, f"{param}.audio"))
            return InputAudio(pcm, transcript if isinstance(transcript, str) else None)
        if kind == "audio" and role == "assistant":
            return OutputAudio(transcript=str(raw.get("transcript") or ""))
        raise invalid_value(
            f"{param}.type",
            f"Content part {kind!r} (with its fields) is not valid for a {role} message.",
        )

    def _resample_whole(self, pcm: bytes) -> bytes:
        resampler = StreamingResampler(self.config.input_format.rate, VAD_RATE)
        return resampler.process(pcm) + resampler.flush()

    # ---- event plumbing ---------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        return {"type": kind, "event_id": self.ids("event"), **fields}

    def _error(self, error: ClientError, event_id: str | None) -> dict[str, Any]:
        return self._event(
            "error",
            error={
                "type": error.error_type,
                "code": error.code,
                "message": error.message,
                "param": error.param,
                "event_id": event_id,
            },
        )


def _required(event: dict[str, Any], name: str, kind: type, prefix: str = "") -> Any:
    value = event.get(name)
    if value is None:
        raise missing(prefix + name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise invalid_type(prefix + name, kind.__name__)
    return value


def _pending_audio_part(item: Message) -> tuple[int, InputAudio | None]:
    for index, part in enumerate(item.content):
        if isinstance(part, InputAudio) and part.transcript is None:
            return index, part
    return 0, None


def _words(text: str) -> list[str]:
    """`text` cut into word deltas whose concatenation is `text`."""
    return re.findall(r"\S+\s*", text) or [text]


def _pieces(text: str, size: int) -> Iterator[str]:
    for start in range(0, len(text), size):
        yield text[start : start + size]
