"""Every message on every stream, defined once.

Two encodings exist on the wire:

* **Plain fields** (`Encoding.FIELDS`), for every producer- or consumer-facing stream: one
  Redis stream field per model field, with documented names, so that any language and
  `redis-cli` can write and read them. Text and numbers are UTF-8 strings, booleans are
  `1`/`0`, structured values (session config, tools, details) are JSON strings, audio is
  a raw binary field value.
* **msgpack envelope** (`Encoding.MSGPACK`), for internal hops (frames, events): one field
  `m` holding the model as a msgpack map, audio as msgpack `bin`.

Each message carries a schema version `v`. `encode()` turns a message into stream fields;
`decode()` validates stream fields into a message and raises `ContractError` naming the
offending field. The JSON Schema and AsyncAPI files in `docs/contracts/` are generated
from these models (`vlpipe contracts --write`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from enum import Enum, StrEnum
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import msgpack
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
)

from vlpipe.shared.audio import AudioFormat
from vlpipe.shared.keys import SESSION_ID_PATTERN

SCHEMA_VERSION = 1
MAX_AUDIO_BYTES = 1 << 20  # one raw audio entry: 1 MiB (about 22 s of 24 kHz PCM16)
MAX_TEXT_CHARS = 32_768

ENVELOPE_FIELD = "m"


class ContractError(ValueError):
    """A stream entry that does not match its contract; the message names the field."""


class Encoding(StrEnum):
    FIELDS = "fields"
    MSGPACK = "msgpack"


def _json_if_str(value: Any) -> Any:
    """Structured fields arrive as JSON text from plain stream fields."""
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON: {exc.msg} at position {exc.pos}") from None
    return value


SessionId = Annotated[str, Field(pattern=SESSION_ID_PATTERN, description="Session id.")]
JsonDict = Annotated[dict[str, Any], BeforeValidator(_json_if_str)]
JsonList = Annotated[list[dict[str, Any]], BeforeValidator(_json_if_str)]
Traceparent = Annotated[
    str | None,
    Field(default=None, description="W3C traceparent of the span that produced this message."),
]


class Message(BaseModel):
    """Base of every stream message."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)
    encoding: ClassVar[Encoding] = Encoding.FIELDS

    v: int = Field(default=SCHEMA_VERSION, description="Schema version of this message.")


# --------------------------------------------------------------------------------------
# Session configuration (carried by session start and `session.update` control messages)
# --------------------------------------------------------------------------------------


class SessionConfig(BaseModel):
    """What the broker sends upstream as `session.update`.

    Unknown keys are passed through to Voice Live unchanged (noise reduction, echo
    cancellation, avatar, ...). `turn_detection: null` means manual turns.
    """

    model_config = ConfigDict(extra="allow")

    instructions: str | None = Field(default=None, max_length=MAX_TEXT_CHARS)
    voice: str | dict[str, Any] | None = Field(
        default=None, description="Voice name, or a Voice Live voice object."
    )
    modalities: list[Literal["text", "audio"]] | None = None
    input_audio_format: AudioFormat = Field(
        default=AudioFormat.PCM16,
        description="Format of the frames ingest produces and the upstream receives.",
    )
    output_audio_format: AudioFormat = Field(
        default=AudioFormat.PCM16, description="Format the upstream speaks in."
    )
    turn_detection: dict[str, Any] | None = Field(
        default_factory=lambda: {"type": "server_vad"},
        description="Voice Live turn detection; null for manual turns (commit + response.create).",
    )
    input_audio_transcription: dict[str, Any] | None = Field(
        default_factory=lambda: {"model": "whisper-1"}
    )
    tools: list[dict[str, Any]] = Field(default_factory=list)
    tool_choice: str | dict[str, Any] | None = None
    temperature: float | None = None
    max_response_output_tokens: int | Literal["inf"] | None = None

    def session_update(self) -> dict[str, Any]:
        """The `session` object of a Voice Live `session.update` event."""
        body = self.model_dump(exclude_none=True, exclude={"input_audio_format"})
        body["input_audio_format"] = self.input_audio_format.wire_name
        body["input_audio_sampling_rate"] = self.input_audio_format.rate
        body["output_audio_format"] = self.output_audio_format.value
        body["turn_detection"] = self.turn_detection  # None is meaningful: manual turns
        if not self.tools:
            body.pop("tools", None)
        return body

    def merged(self, update: Mapping[str, Any]) -> SessionConfig:
        """This config with the keys of a partial update applied."""
        return SessionConfig.model_validate({**self.model_dump(), **dict(update)})


# --------------------------------------------------------------------------------------
# vl:sessions
# --------------------------------------------------------------------------------------


class SessionStart(Message):
    """Announces a session. Written by producers and the CLI to `vl:sessions`."""

    type: Literal["start"] = "start"
    session: SessionId
    config: Annotated[SessionConfig, BeforeValidator(_json_if_str)] = Field(
        default_factory=SessionConfig,
        description="Session config as a JSON object; defaults apply to what it leaves out.",
    )
    audio_out: AudioFormat = Field(
        default=AudioFormat.PCM16,
        description="Format of the audio-out stream egress writes for consumers.",
    )
    audio_in: AudioFormat | None = Field(
        default=None,
        description="Format of every chunk the producer will write to vl:audio:{sid}, when "
        "it is fixed. When it is the session's input_audio_format (pcm16 at 24 kHz, "
        "g711_ulaw or g711_alaw at 8 kHz, mono), the broker sends the chunks upstream as "
        "they are and ingest is skipped; a chunk in another format is refused.",
    )
    traceparent: Traceparent = None

    @property
    def direct_input(self) -> bool:
        """The producer's chunks are already in the upstream's input format: the broker
        reads `vl:audio:{sid}` itself, without ingest."""
        return self.audio_in is not None and self.audio_in == self.config.input_audio_format


class SessionEnd(Message):
    """Ends a session: no more input will come. In-flight responses still finish."""

    type: Literal["end"] = "end"
    session: SessionId
    reason: str = Field(default="producer", max_length=256)


SessionAnnouncement = Annotated[SessionStart | SessionEnd, Field(discriminator="type")]


# --------------------------------------------------------------------------------------
# vl:audio:{sid}
# --------------------------------------------------------------------------------------


class InputFormat(StrEnum):
    """Encodings a producer may write to the raw audio stream."""

    PCM16 = "pcm16"  # little-endian signed 16-bit, interleaved if stereo
    F32 = "f32"  # little-endian IEEE float32, interleaved if stereo
    G711_ULAW = "g711_ulaw"  # also accepted: mulaw, ulaw, pcmu
    G711_ALAW = "g711_alaw"  # also accepted: alaw, pcma
    WAV = "wav"  # chunks of one WAV file, header first
    OGG = "ogg"  # chunks of an Ogg Opus stream
    WEBM = "webm"  # chunks of a WebM/Matroska (Opus) stream, as MediaRecorder produces
    MP3 = "mp3"  # chunks of an MP3 stream


_FORMAT_ALIASES = {
    "s16le": "pcm16",
    "pcm_s16le": "pcm16",
    "l16": "pcm16",
    "f32le": "f32",
    "float32": "f32",
    "mulaw": "g711_ulaw",
    "ulaw": "g711_ulaw",
    "pcmu": "g711_ulaw",
    "alaw": "g711_alaw",
    "pcma": "g711_alaw",
    "opus": "ogg",
}


def _input_format(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        value = value.strip().lower()
        return _FORMAT_ALIASES.get(value, value)
    return value


class RawAudio(Message):
    """A chunk of audio from any producer, appended to `vl:audio:{sid}`."""

    audio: bytes = Field(max_length=MAX_AUDIO_BYTES, description="Raw audio bytes.")
    format: Annotated[InputFormat, BeforeValidator(_input_format)] = InputFormat.PCM16
    rate: int | None = Field(
        default=None,
        ge=8000,
        le=48000,
        description="Sample rate in Hz; required for pcm16 and f32, 8000 for G.711, "
        "read from the container otherwise.",
    )
    channels: int = Field(default=1, ge=1, le=2, description="1 (mono) or 2 (interleaved).")
    seq: int | None = Field(
        default=None, ge=0, description="Producer sequence number, for reordering and gaps."
    )
    ts: float | None = Field(default=None, description="Producer timestamp, ms since epoch.")
    traceparent: Traceparent = None

    def is_format(self, fmt: AudioFormat) -> bool:
        """This chunk is `fmt` as the upstream takes it: its codec, its rate (G.711 may
        leave the rate out), mono."""
        rate = self.rate if self.rate is not None or not fmt.is_g711 else fmt.rate
        return self.format.value == fmt.wire_name and rate == fmt.rate and self.channels == 1


# --------------------------------------------------------------------------------------
# vl:frames:{sid} (internal)
# --------------------------------------------------------------------------------------


class Frame(Message):
    """A fixed-length frame of normalized audio in the session's input format."""

    encoding: ClassVar[Encoding] = Encoding.MSGPACK

    session: SessionId
    seq: int = Field(ge=0, description="Frame number within the session, from 0, no gaps.")
    format: AudioFormat
    audio: bytes = Field(description="Frame audio; empty on the final marker.")
    ts: float | None = Field(
        default=None, description="Source timestamp of the frame's first sample, ms since epoch."
    )
    final: bool = Field(default=False, description="True on the end-of-input marker.")
    traceparent: Traceparent = None


# --------------------------------------------------------------------------------------
# vl:ctl:{sid}
# --------------------------------------------------------------------------------------


class UpdateSession(Message):
    """Changes the session config mid-session (a partial config; keys it omits stay)."""

    type: Literal["session.update"] = "session.update"
    config: JsonDict


class AddText(Message):
    """Adds a text item to the conversation; by default the assistant answers it."""

    type: Literal["text"] = "text"
    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    role: Literal["user", "system"] = "user"
    respond: bool = True


class CreateResponse(Message):
    """Asks for a response now (manual turns, or after adding items)."""

    type: Literal["response.create"] = "response.create"
    instructions: str | None = Field(default=None, max_length=MAX_TEXT_CHARS)


class CancelResponse(Message):
    type: Literal["response.cancel"] = "response.cancel"


class CommitInput(Message):
    """Manual turns: the audio so far is the user's turn."""

    type: Literal["input_audio_buffer.commit"] = "input_audio_buffer.commit"


class ClearInput(Message):
    type: Literal["input_audio_buffer.clear"] = "input_audio_buffer.clear"


class ToolResult(Message):
    """A tool worker's answer to a call from `vl:tool-calls`."""

    type: Literal["tool.result"] = "tool.result"
    call_id: str = Field(min_length=1, max_length=256)
    output: str = Field(max_length=MAX_TEXT_CHARS, description="Result, usually JSON text.")
    traceparent: Traceparent = None


class EndSession(Message):
    """Ends the session at once, cancelling any response in flight."""

    type: Literal["session.end"] = "session.end"
    reason: str = Field(default="control", max_length=256)


Control = Annotated[
    UpdateSession
    | AddText
    | CreateResponse
    | CancelResponse
    | CommitInput
    | ClearInput
    | ToolResult
    | EndSession,
    Field(discriminator="type"),
]


# --------------------------------------------------------------------------------------
# vl:events:{sid} (internal)
# --------------------------------------------------------------------------------------


class Event(Message):
    """A server event (or a broker event, type `vlpipe.*`) in arrival order.

    For `response.audio.delta` the base64 `delta` is decoded into `audio` and removed
    from `event`, so the audio crosses Redis once, as bytes.
    """

    encoding: ClassVar[Encoding] = Encoding.MSGPACK

    session: SessionId
    seq: int = Field(ge=0, description="Per-session event number, from 0.")
    received: float = Field(description="When the broker received it, ms since epoch.")
    type: str
    event: dict[str, Any] = Field(default_factory=dict, description="The event's JSON.")
    audio: bytes | None = None
    traceparent: Traceparent = None


# --------------------------------------------------------------------------------------
# vl:tool-calls
# --------------------------------------------------------------------------------------


class ToolCall(Message):
    """A function call for tool workers. Answer with a `tool.result` on `vl:ctl:{session}`."""

    session: SessionId
    call_id: str
    name: str
    arguments: str = Field(description="The arguments as JSON text, as the model produced them.")
    response_id: str | None = None
    item_id: str | None = None
    deadline: float | None = Field(
        default=None, description="Answer before this time (ms since epoch) or time out."
    )
    traceparent: Traceparent = None


# --------------------------------------------------------------------------------------
# Outputs: vl:transcript:{sid}, vl:transcripts, vl:audio-out:{sid}, vl:status:{sid}
# --------------------------------------------------------------------------------------


class TranscriptPiece(Message):
    """A piece of transcript. Partials of an item are replaced by its final entry."""

    session: SessionId
    speaker: Literal["user", "assistant"]
    text: str
    final: bool
    item_id: str | None = None
    response_id: str | None = None
    start_ms: float | None = Field(default=None, description="Offset in the session's audio.")
    end_ms: float | None = None
    language: str | None = None
    seq: int = Field(ge=0, description="Per-session output number.")
    traceparent: Traceparent = None


class AudioOut(Message):
    """The assistant's audio, or a marker (`end` of a response, `clear` on cancellation)."""

    session: SessionId
    kind: Literal["audio", "end", "clear"]
    format: AudioFormat
    audio: bytes = b""
    response_id: str | None = None
    item_id: str | None = None
    offset_ms: float = Field(default=0.0, description="Offset of this chunk in the response.")
    seq: int = Field(ge=0, description="Per-session output number.")
    speech_end: float | None = Field(
        default=None,
        description="On a response's first chunk: when the user's speech ended (ms since "
        "epoch, as the broker saw it), so a consumer can measure the silence it heard.",
    )
    traceparent: Traceparent = None


class Status(Message):
    """What happened to a session: state changes, gaps, errors, tool calls in flight."""

    session: SessionId
    service: Literal["ingest", "broker", "egress", "gateway", "cli"]
    kind: str = Field(description="state | gap | error | tool_call | tool_result | latency | ...")
    message: str = ""
    detail: Annotated[dict[str, Any], BeforeValidator(_json_if_str)] = Field(default_factory=dict)
    traceparent: Traceparent = None


class DeadLetter(Message):
    """An entry that could not be handled. The original fields follow as `orig.<name>`."""

    stream: str
    id: str
    reason: str
    service: str
    group: str | None = None
    deliveries: int = 0


# --------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------

M = TypeVar("M", bound=BaseModel)
FieldValue = bytes | str | int | float
Fields = dict[str, FieldValue]


def _field_value(value: Any) -> FieldValue:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, bytes | str | int | float):
        return value
    if isinstance(value, BaseModel):
        return value.model_dump_json(exclude_none=False)
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def encode(msg: BaseModel) -> Fields:
    """The stream fields for `msg` (plain fields or the msgpack envelope)."""
    if getattr(msg, "encoding", Encoding.FIELDS) is Encoding.MSGPACK:
        payload = msg.model_dump(mode="python", exclude_none=True)
        return {ENVELOPE_FIELD: msgpack.packb(payload, use_bin_type=True, default=_pack_default)}
    out: Fields = {}
    for name in type(msg).model_fields:
        value = getattr(msg, name)
        if value is None:
            continue
        out[name] = _field_value(value)
    return out


def _pack_default(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    raise TypeError(f"cannot pack {type(value).__name__}")


def _text_fields(raw: Mapping[Any, Any], binary: frozenset[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
        if isinstance(value, bytes) and name not in binary:
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                raise ContractError(f"field {name!r}: not UTF-8 text") from None
        out[name] = value
    return out


def _binary_fields(model: type[BaseModel]) -> frozenset[str]:
    return frozenset(
        name
        for name, info in model.model_fields.items()
        if info.annotation in (bytes, bytes | None)
    )


def _describe(exc: ValidationError, what: str) -> str:
    parts = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = ".".join(str(p) for p in err["loc"]) or "(message)"
        parts.append(f"field {loc!r}: {err['msg']}")
    return f"invalid {what}: " + "; ".join(parts)


def validated(model: type[M], data: Mapping[str, Any]) -> M:
    """`model` built from Python values (not stream fields), for edges such as the gateway.

    Raises ContractError that names every offending field.
    """
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ContractError(_describe(exc, model.__name__)) from None


def playback_ms(value: Any) -> float | None:
    """A position in ms from the playback hash (`vl:playback:{sid}`, written by egress from
    what consumers report): None unless it is a finite number of at least 0."""
    try:
        ms = float(value)
    except (TypeError, ValueError):
        return None
    return ms if math.isfinite(ms) and ms >= 0 else None


def decode(model: type[M] | Any, raw: Mapping[Any, Any]) -> M:
    """Validate stream fields into `model` (a Message class or a discriminated union).

    Raises ContractError that names every offending field.
    """
    adapter, name, encoding, binary = _adapter_for(model)
    if encoding is Encoding.MSGPACK:
        blob = raw.get(ENVELOPE_FIELD.encode()) or raw.get(ENVELOPE_FIELD)
        if not isinstance(blob, bytes):
            raise ContractError(f"invalid {name}: missing msgpack field {ENVELOPE_FIELD!r}")
        try:
            data = msgpack.unpackb(blob, raw=False)
        except Exception as exc:
            raise ContractError(f"invalid {name}: field 'm' is not msgpack ({exc})") from None
        if not isinstance(data, dict):
            raise ContractError(f"invalid {name}: field 'm' is not a msgpack map")
    else:
        data = _text_fields(raw, binary)
    try:
        result: M = adapter.validate_python(data)
    except ValidationError as exc:
        raise ContractError(_describe(exc, name)) from None
    return result


_ADAPTERS: dict[Any, tuple[TypeAdapter[Any], str, Encoding, frozenset[str]]] = {}


def _adapter_for(model: Any) -> tuple[TypeAdapter[Any], str, Encoding, frozenset[str]]:
    cached = _ADAPTERS.get(model)
    if cached is not None:
        return cached
    members: list[type[BaseModel]]
    if isinstance(model, type) and issubclass(model, BaseModel):
        members = [model]
        name = model.__name__
    else:
        args = getattr(model, "__args__", ())
        union = args[0] if args else model
        members = [m for m in getattr(union, "__args__", ()) if isinstance(m, type)]
        name = " | ".join(m.__name__ for m in members) or str(model)
    encoding = getattr(members[0], "encoding", Encoding.FIELDS) if members else Encoding.FIELDS
    binary = frozenset().union(*(_binary_fields(m) for m in members)) if members else frozenset()
    entry = (TypeAdapter(model), name, encoding, binary)
    _ADAPTERS[model] = entry
    return entry


#: Every message model, for schema generation and documentation.
ALL_MESSAGES: tuple[type[Message], ...] = (
    SessionStart,
    SessionEnd,
    RawAudio,
    Frame,
    UpdateSession,
    AddText,
    CreateResponse,
    CancelResponse,
    CommitInput,
    ClearInput,
    ToolResult,
    EndSession,
    Event,
    ToolCall,
    TranscriptPiece,
    AudioOut,
    Status,
    DeadLetter,
)
