"""The AsyncAPI 3.0 document and JSON Schemas of every stream, generated from the models.

`docs/contracts/` holds the generated files; `vlpipe contracts --check` (and a test)
fails when they are stale.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from vlpipe.shared import contracts as c
from vlpipe.shared.keys import StreamKeys


@dataclass(frozen=True)
class Channel:
    id: str
    address: str
    messages: tuple[type[BaseModel], ...]
    writers: str
    readers: str
    description: str
    retention: str


_KEYS = StreamKeys("{prefix}")
_SID = "{sid}"

CHANNELS: tuple[Channel, ...] = (
    Channel(
        "sessions", _KEYS.sessions, (c.SessionStart, c.SessionEnd),
        "producers, CLI, gateway", "ingest, broker, egress (one consumer group each)",
        "Session start and end announcements. The start entry stays pending to the owning "
        "replica of each service while it owns the session.",
        "MINID behind the oldest entry still pending or undelivered in any group.",
    ),
    Channel(
        "audio", _KEYS.audio(_SID), (c.RawAudio,), "any producer, gateway",
        "ingest; the broker for a session whose start names audio_in equal to its "
        "input_audio_format (direct input: the chunks go upstream as they are)",
        "Raw audio in any supported format, plain fields, audio as a raw binary value.",
        "Trimmed by its reader up to its checkpoint (MINID); never past unread audio.",
    ),
    Channel(
        "frames", _KEYS.frames(_SID), (c.Frame,), "ingest", "broker",
        "Normalized fixed-length frames in the session's input format (msgpack envelope).",
        "Trimmed by the broker up to its checkpoint.",
    ),
    Channel(
        "ctl", _KEYS.ctl(_SID),
        (c.UpdateSession, c.AddText, c.CreateResponse, c.CancelResponse, c.CommitInput,
         c.ClearInput, c.ToolResult, c.EndSession),
        "producers, tool workers", "broker",
        "Control messages: config updates, text, responses, buffer control, tool results, end.",
        "Trimmed by the broker up to its checkpoint.",
    ),
    Channel(
        "events", _KEYS.events(_SID), (c.Event,), "broker", "egress",
        "Every server event in arrival order, plus broker events (`vlpipe.*`).",
        "Trimmed by egress up to its checkpoint.",
    ),
    Channel(
        "tool-calls", _KEYS.tool_calls, (c.ToolCall,), "broker",
        "tool workers (a consumer group, any language)",
        "Function calls to run; answer with `tool.result` on the session's ctl stream.",
        "MAXLEN ~ 10000.",
    ),
    Channel(
        "transcript", _KEYS.transcript(_SID), (c.TranscriptPiece,), "egress", "consumers",
        "The session's transcript pieces, partial and final, user and assistant.",
        "MAXLEN ~ 10000; expires an hour after the session ends.",
    ),
    Channel(
        "transcripts", _KEYS.transcripts, (c.TranscriptPiece,), "egress",
        "consumer groups (storage, analytics, search)",
        "Every session's final transcripts.", "MAXLEN ~ 100000.",
    ),
    Channel(
        "audio-out", _KEYS.audio_out(_SID), (c.AudioOut,), "egress", "consumers, gateway",
        "The assistant's audio in the session's output format, with end and clear markers.",
        "MAXLEN ~ 6000; expires an hour after the session ends.",
    ),
    Channel(
        "status", _KEYS.status(_SID), (c.Status,), "every service", "dashboards, gateway",
        "State changes, gaps, errors, tool calls in flight.",
        "MAXLEN ~ 2000; expires an hour after the session ends.",
    ),
    Channel(
        "dead", _KEYS.dead, (c.DeadLetter,), "every service", "operators",
        "Entries that could not be handled, with the reason; original fields as `orig.*`.",
        "MAXLEN ~ 10000.",
    ),
)  # fmt: skip

_ENCODING_NOTE = {
    c.Encoding.FIELDS: (
        "Plain Redis stream fields, one per property. Text and numbers as UTF-8 strings, "
        "booleans as 1/0, objects and arrays as JSON text, audio as a raw binary value."
    ),
    c.Encoding.MSGPACK: "One field `m` holding the message as a msgpack map (audio as bin).",
}


def json_schemas() -> dict[str, dict[str, Any]]:
    """One standalone JSON Schema per message model (and the session config)."""
    out: dict[str, dict[str, Any]] = {}
    models: list[type[BaseModel]] = [*c.ALL_MESSAGES, c.SessionConfig]
    for model in models:
        schema = model.model_json_schema(mode="validation")
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$id"] = f"https://vlpipe.dev/contracts/{model.__name__}.json"
        out[model.__name__] = schema
    return out


def asyncapi() -> dict[str, Any]:
    """The AsyncAPI 3.0 document for every stream."""
    models = [(m, "validation") for m in c.ALL_MESSAGES]
    _, defs = models_json_schema(models, ref_template="#/components/schemas/{model}")  # type: ignore[arg-type]
    schemas = defs.get("$defs", {})
    messages: dict[str, Any] = {}
    for model in c.ALL_MESSAGES:
        encoding = getattr(model, "encoding", c.Encoding.FIELDS)
        messages[model.__name__] = {
            "name": model.__name__,
            "title": model.__name__,
            "summary": (model.__doc__ or "").strip().split("\n")[0],
            "contentType": "application/msgpack"
            if encoding is c.Encoding.MSGPACK
            else "application/x-redis-stream-fields",
            "description": _ENCODING_NOTE[encoding],
            "payload": {"$ref": f"#/components/schemas/{model.__name__}"},
        }
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for ch in CHANNELS:
        channel: dict[str, Any] = {
            "address": ch.address,
            "description": f"{ch.description}\n\nWritten by: {ch.writers}. Read by: "
            f"{ch.readers}. Retention: {ch.retention}",
            "messages": {
                m.__name__: {"$ref": f"#/components/messages/{m.__name__}"} for m in ch.messages
            },
            "parameters": {"prefix": {"description": "Key prefix (VLPIPE_STREAM_PREFIX).",
                                      "default": "vl"}},
        }  # fmt: skip
        if _SID in ch.address:
            channel["parameters"]["sid"] = {"description": "Session id (a Redis hash tag)."}
        channels[ch.id] = channel
        refs = [{"$ref": f"#/channels/{ch.id}/messages/{m.__name__}"} for m in ch.messages]
        operations[f"write-{ch.id}"] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{ch.id}"},
            "summary": f"{ch.writers} XADD to {ch.address}",
            "messages": refs,
        }
        operations[f"read-{ch.id}"] = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{ch.id}"},
            "summary": f"{ch.readers} read {ch.address}",
            "messages": refs,
        }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "vlpipe streams",
            "version": str(c.SCHEMA_VERSION),
            "description": "Every Redis stream of the vlpipe voice pipeline. Generated from "
            "vlpipe/shared/contracts.py by `vlpipe contracts --write`; do not edit.",
        },
        "servers": {
            "redis": {
                "host": "localhost:6379",
                "protocol": "redis",
                "description": "VLPIPE_REDIS_URL",
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": schemas},
    }


def rendered() -> dict[str, str]:
    """Every generated file: relative path -> text."""
    files = {"asyncapi.json": _dump(asyncapi())}
    for name, schema in json_schemas().items():
        files[f"schemas/{name}.json"] = _dump(schema)
    return files


def _dump(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
