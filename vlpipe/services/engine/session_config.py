"""A session's configuration: what `session.update` may change and how it reads back.

`SessionConfig.updated(patch)` validates a `session.update` payload against the current
configuration and returns the new one (or raises `ClientError` naming the field);
`to_wire()` renders it as the `session` object of `session.created` / `session.updated`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from vlpipe.services.engine.errors import ClientError, invalid_type, invalid_value
from vlpipe.services.engine.vad import VadConfig
from vlpipe.shared.audio import AudioFormat

VAD_TYPES = (
    "server_vad",
    "azure_semantic_vad",
    "azure_semantic_vad_en",
    "azure_semantic_vad_multilingual",
)
MODALITIES = ("text", "audio")
TOOL_CHOICES = ("auto", "none", "required")
DEFAULT_VOICE = "alloy"


@dataclass(frozen=True)
class TurnDetection:
    """Server-side turn detection. Every accepted type runs the same VAD."""

    type: str = "server_vad"
    vad: VadConfig = field(default_factory=VadConfig)
    create_response: bool = True
    interrupt_response: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # accepted, echoed, not used

    def to_wire(self) -> dict[str, Any]:
        return {
            **self.extra,
            "type": self.type,
            "threshold": self.vad.threshold,
            "prefix_padding_ms": self.vad.prefix_padding_ms,
            "silence_duration_ms": self.vad.silence_duration_ms,
            "create_response": self.create_response,
            "interrupt_response": self.interrupt_response,
        }


@dataclass(frozen=True)
class FunctionTool:
    """A function the client declares; `parameters` is its JSON Schema (an object schema)."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {
            "type": "function",
            "name": self.name,
            "description": self.description,
            "parameters": self.parameters,
        }


@dataclass(frozen=True)
class SessionConfig:
    """Everything a session has configured. Immutable: updates return a new one."""

    model: str = "local"
    instructions: str = ""
    voice: str | dict[str, Any] = DEFAULT_VOICE
    modalities: tuple[str, ...] = MODALITIES
    input_format: AudioFormat = AudioFormat.PCM16
    output_format: AudioFormat = AudioFormat.PCM16
    turn_detection: TurnDetection | None = field(default_factory=TurnDetection)
    input_audio_transcription: dict[str, Any] | None = None
    tools: tuple[FunctionTool, ...] = ()
    tool_choice: str | dict[str, Any] = "auto"
    temperature: float = 0.8
    max_response_output_tokens: int | str = "inf"

    @property
    def voice_name(self) -> str:
        """The voice's name whether it was given as a string or as a voice object."""
        if isinstance(self.voice, dict):
            return str(self.voice.get("name", DEFAULT_VOICE))
        return self.voice

    def updated(self, patch: Any) -> SessionConfig:
        """This configuration with a `session.update` payload applied (raises ClientError)."""
        if not isinstance(patch, dict):
            raise invalid_type("session", "an object")
        changes: dict[str, Any] = {}
        if "instructions" in patch:
            changes["instructions"] = _string(patch["instructions"], "session.instructions")
        if "voice" in patch:
            changes["voice"] = _voice(patch["voice"])
        if "modalities" in patch:
            changes["modalities"] = parse_modalities(patch["modalities"], "session.modalities")
        if "input_audio_format" in patch or "input_audio_sampling_rate" in patch:
            changes["input_format"] = _input_format(
                patch.get("input_audio_format", self.input_format.wire_name),
                patch.get("input_audio_sampling_rate"),
            )
        if "output_audio_format" in patch:
            changes["output_format"] = parse_output_format(
                patch["output_audio_format"], "session.output_audio_format"
            )
        if "turn_detection" in patch:
            changes["turn_detection"] = _turn_detection(patch["turn_detection"])
        if "input_audio_transcription" in patch:
            changes["input_audio_transcription"] = _transcription(
                patch["input_audio_transcription"]
            )
        if "tools" in patch:
            changes["tools"] = parse_tools(patch["tools"], "session.tools")
        if "tool_choice" in patch:
            changes["tool_choice"] = parse_tool_choice(patch["tool_choice"], "session.tool_choice")
        if "temperature" in patch:
            changes["temperature"] = _number(patch["temperature"], "session.temperature")
        if "max_response_output_tokens" in patch:
            changes["max_response_output_tokens"] = _max_tokens(patch["max_response_output_tokens"])
        return replace(self, **changes)

    def to_wire(self, session_id: str) -> dict[str, Any]:
        """The `session` object of `session.created` / `session.updated`."""
        return {
            "id": session_id,
            "object": "realtime.session",
            "model": self.model,
            "modalities": list(self.modalities),
            "instructions": self.instructions,
            "voice": self.voice,
            "input_audio_format": self.input_format.wire_name,
            "input_audio_sampling_rate": self.input_format.rate,
            "output_audio_format": self.output_format.value,
            "input_audio_transcription": self.input_audio_transcription,
            "turn_detection": None
            if self.turn_detection is None
            else self.turn_detection.to_wire(),
            "tools": [tool.to_wire() for tool in self.tools],
            "tool_choice": self.tool_choice,
            "temperature": self.temperature,
            "max_response_output_tokens": self.max_response_output_tokens,
        }


def parse_modalities(value: Any, param: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise invalid_type(param, "a non-empty list of 'text' and 'audio'")
    for modality in value:
        if modality not in MODALITIES:
            raise invalid_value(
                param, f"Invalid modality {modality!r}; supported: {list(MODALITIES)}."
            )
    return tuple(m for m in MODALITIES if m in value)


def parse_output_format(value: Any, param: str) -> AudioFormat:
    if not isinstance(value, str):
        raise invalid_type(param, "a string")
    try:
        return AudioFormat.parse(value)
    except ValueError as exc:
        raise invalid_value(param, str(exc)) from None


def parse_tools(value: Any, param: str) -> tuple[FunctionTool, ...]:
    if not isinstance(value, list):
        raise invalid_type(param, "a list")
    tools: list[FunctionTool] = []
    for index, tool in enumerate(value):
        where = f"{param}[{index}]"
        if not isinstance(tool, dict):
            raise invalid_type(where, "an object")
        if tool.get("type", "function") != "function":
            raise invalid_value(f"{where}.type", "The local engine supports only 'function' tools.")
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise invalid_value(f"{where}.name", "A function tool needs a non-empty name.")
        parameters = tool.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise invalid_type(f"{where}.parameters", "a JSON Schema object")
        description = tool.get("description") or ""
        tools.append(FunctionTool(name, _string(description, f"{where}.description"), parameters))
    return tuple(tools)


def parse_tool_choice(value: Any, param: str) -> str | dict[str, Any]:
    if isinstance(value, str):
        if value not in TOOL_CHOICES:
            raise invalid_value(param, f"tool_choice must be one of {list(TOOL_CHOICES)}.")
        return value
    if isinstance(value, dict) and value.get("type") == "function":
        name = value.get("name") or (value.get("function") or {}).get("name")
        if isinstance(name, str) and name:
            return {"type": "function", "name": name}
    raise invalid_value(param, "tool_choice must be a string or {'type': 'function', 'name': ...}.")


def _string(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise invalid_type(param, "a string")
    return value


def _number(value: Any, param: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid_type(param, "a number")
    return float(value)


def _voice(value: Any) -> str | dict[str, Any]:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, dict) and isinstance(value.get("name"), str):
        return value
    raise invalid_type("session.voice", "a voice name or a voice object with a name")


def _input_format(name: Any, rate: Any) -> AudioFormat:
    if not isinstance(name, str):
        raise invalid_type("session.input_audio_format", "a string")
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int)):
        raise invalid_type("session.input_audio_sampling_rate", "an integer")
    try:
        return AudioFormat.parse(name, rate)
    except ValueError as exc:
        param = "session.input_audio_sampling_rate" if rate else "session.input_audio_format"
        raise invalid_value(param, str(exc)) from None


def _turn_detection(value: Any) -> TurnDetection | None:
    if value is None:
        return None
    param = "session.turn_detection"
    if not isinstance(value, dict):
        raise invalid_type(param, "an object or null")
    kind = value.get("type", "server_vad")
    if kind not in VAD_TYPES:
        raise invalid_value(f"{param}.type", f"Unsupported turn detection {kind!r}.")
    defaults = VadConfig()
    threshold = value.get("threshold", defaults.threshold)
    padding = value.get("prefix_padding_ms", defaults.prefix_padding_ms)
    silence = value.get("silence_duration_ms", defaults.silence_duration_ms)
    threshold = defaults.threshold if threshold is None else threshold
    padding = defaults.prefix_padding_ms if padding is None else padding
    silence = defaults.silence_duration_ms if silence is None else silence
    if not 0.0 <= _number(threshold, f"{param}.threshold") <= 1.0:
        raise invalid_value(f"{param}.threshold", "threshold must be between 0.0 and 1.0.")
    for key, ms in (("prefix_padding_ms", padding), ("silence_duration_ms", silence)):
        if isinstance(ms, bool) or not isinstance(ms, int) or not 0 <= ms <= 10_000:
            raise invalid_value(f"{param}.{key}", f"{key} must be an integer 0..10000.")
    known = {"type", "threshold", "prefix_padding_ms", "silence_duration_ms"}
    known |= {"create_response", "interrupt_response"}
    return TurnDetection(
        type=kind,
        vad=VadConfig(float(threshold), padding, silence),
        create_response=bool(value.get("create_response", True)),
        interrupt_response=bool(value.get("interrupt_response", True)),
        extra={k: v for k, v in value.items() if k not in known},
    )


def _transcription(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise invalid_type("session.input_audio_transcription", "an object or null")
    return {"model": "whisper-1", **value}


def _max_tokens(value: Any) -> int | str:
    if value == "inf" or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return value  # type: ignore[no-any-return]
    raise ClientError(
        "invalid_value",
        "max_response_output_tokens must be a positive integer or 'inf'.",
        "session.max_response_output_tokens",
    )
