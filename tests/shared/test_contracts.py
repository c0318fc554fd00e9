"""Contracts: generated files are current, invalid input names the field, round trips hold."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vlpipe.shared import contracts as c
from vlpipe.shared.asyncapi import asyncapi, json_schemas
from vlpipe.shared.audio import AudioFormat
from vlpipe.shared.keys import StreamKeys, check_session_id
from vlpipe.tools.contracts import stale_files

DOCS = Path(__file__).resolve().parents[2] / "docs" / "contracts"


def _as_redis(fields: c.Fields) -> dict[bytes, bytes]:
    """What a reader gets back from Redis for these fields: bytes keys and values."""
    return {k.encode(): v if isinstance(v, bytes) else str(v).encode() for k, v in fields.items()}


def test_checked_in_contract_files_match_the_models() -> None:
    assert stale_files(DOCS) == [], "run `vlpipe contracts --write` and commit docs/contracts"


def test_every_asyncapi_reference_resolves() -> None:
    doc = asyncapi()
    assert doc["asyncapi"] == "3.0.0"

    def resolve(ref: str) -> Any:
        node: Any = doc
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
        return node

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "$ref" in node:
                assert resolve(node["$ref"]) is not None
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    addresses = {ch["address"] for ch in doc["channels"].values()}
    assert "{prefix}:audio:{{sid}}" in addresses


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({b"type": b"start", b"session": b"has space"}, "session"),
        ({b"type": b"start", b"session": b"s1", b"config": b"{not json"}, "config"),
        ({b"type": b"start", b"session": b"s1", b"config": b'{"modalities":["smell"]}'}, "config.modalities.0"),
        ({b"type": b"start", b"session": b"s1", b"audio_out": b"mp3"}, "audio_out"),
        ({b"type": b"stop", b"session": b"s1"}, "(message)"),
    ],
)  # fmt: skip
def test_invalid_session_announcements_are_rejected_naming_the_field(
    raw: dict[bytes, bytes], field: str
) -> None:
    with pytest.raises(c.ContractError) as err:
        c.decode(c.SessionAnnouncement, raw)
    assert f"'{field}" in str(err.value) or f"{field}'" in str(err.value), str(err.value)


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({b"format": b"pcm16", b"rate": b"16000"}, "audio"),
        ({b"audio": b"\x00", b"format": b"aiff"}, "format"),
        ({b"audio": b"\x00", b"rate": b"96000"}, "rate"),
        ({b"audio": b"\x00", b"channels": b"6"}, "channels"),
        ({b"audio": b"\x00", b"seq": b"-1"}, "seq"),
        ({b"audio": b"\x00" * (c.MAX_AUDIO_BYTES + 1)}, "audio"),
        ({b"audio": b"\x00", b"surprise": b"1"}, "surprise"),
        ({b"audio": b"\x00", b"format": b"\xff\xfe"}, "format"),
    ],
)
def test_invalid_raw_audio_is_rejected_naming_the_field(
    raw: dict[bytes, bytes], field: str
) -> None:
    with pytest.raises(c.ContractError, match=f"'{field}'"):
        c.decode(c.RawAudio, raw)


def test_control_messages_from_redis_cli_style_fields() -> None:
    msg = c.decode(c.Control, {b"type": b"text", b"text": b"hello", b"respond": b"0"})
    assert isinstance(msg, c.AddText) and msg.text == "hello" and msg.respond is False
    upd = c.decode(c.Control, {b"type": b"session.update", b"config": b'{"voice":"x"}'})
    assert isinstance(upd, c.UpdateSession) and upd.config == {"voice": "x"}
    with pytest.raises(c.ContractError, match=r"'tool\.result\.call_id'"):
        c.decode(c.Control, {b"type": b"tool.result", b"output": b"{}"})


def test_internal_envelope_rejects_garbage() -> None:
    with pytest.raises(c.ContractError, match="msgpack"):
        c.decode(c.Frame, {b"m": b"\xc1\xc1garbage"})
    with pytest.raises(c.ContractError, match="missing"):
        c.decode(c.Frame, {b"x": b"1"})


def test_session_config_maps_to_voice_live_session_update() -> None:
    cfg = c.SessionConfig(
        instructions="be brief",
        input_audio_format=AudioFormat.PCM16_16K,
        output_audio_format=AudioFormat.G711_ULAW,
        turn_detection=None,
        input_audio_noise_reduction={"type": "azure_deep_noise_suppression"},  # type: ignore[call-arg]
    )
    body = cfg.session_update()
    assert body["input_audio_format"] == "pcm16"
    assert body["input_audio_sampling_rate"] == 16000
    assert body["output_audio_format"] == "g711_ulaw"
    assert body["turn_detection"] is None, "null means manual turns and must be sent"
    assert body["input_audio_noise_reduction"] == {"type": "azure_deep_noise_suppression"}
    assert "tools" not in body
    assert cfg.merged({"voice": "en-US-AvaNeural"}).voice == "en-US-AvaNeural"


texts = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=50)


@given(
    audio=st.binary(max_size=4000),
    fmt=st.sampled_from(list(c.InputFormat)),
    rate=st.none() | st.integers(8000, 48000),
    seq=st.none() | st.integers(0, 2**40),
    ts=st.none() | st.floats(0, 2e12, allow_nan=False),
)
def test_raw_audio_round_trips_through_plain_fields(
    audio: bytes, fmt: c.InputFormat, rate: int | None, seq: int | None, ts: float | None
) -> None:
    msg = c.RawAudio(audio=audio, format=fmt, rate=rate, seq=seq, ts=ts)
    assert c.decode(c.RawAudio, _as_redis(c.encode(msg))) == msg


@given(
    text=texts,
    final=st.booleans(),
    seq=st.integers(0, 10**9),
    speaker=st.sampled_from(["user", "assistant"]),
)
def test_transcripts_round_trip_through_plain_fields(
    text: str, final: bool, seq: int, speaker: str
) -> None:
    msg = c.TranscriptPiece(session="s-1", speaker=speaker, text=text, final=final, seq=seq)  # type: ignore[arg-type]
    assert c.decode(c.TranscriptPiece, _as_redis(c.encode(msg))) == msg


@given(
    audio=st.binary(max_size=2000),
    seq=st.integers(0, 2**31),
    event=st.dictionaries(texts, texts, max_size=4),
)
def test_internal_messages_round_trip_through_msgpack(
    audio: bytes, seq: int, event: dict[str, str]
) -> None:
    frame = c.Frame(session="s1", seq=seq, format=AudioFormat.PCM16_8K, audio=audio, ts=1.5)
    assert c.decode(c.Frame, _as_redis(c.encode(frame))) == frame
    ev = c.Event(session="s1", seq=seq, received=2.0, type="x", event=event, audio=audio or None)
    assert c.decode(c.Event, _as_redis(c.encode(ev))) == ev


def test_every_schema_is_valid_json_schema_and_accepts_a_real_message() -> None:
    schemas = json_schemas()
    for schema in schemas.values():
        jsonschema.Draft202012Validator.check_schema(schema)
    start = c.SessionStart(session="s1").model_dump(mode="json")
    jsonschema.validate(start, schemas["SessionStart"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**start, "session": "bad id"}, schemas["SessionStart"])


def test_keys_put_the_session_in_a_hash_tag() -> None:
    keys = StreamKeys("vl")
    assert keys.audio("abc") == "vl:audio:{abc}"
    assert keys.transcript("abc") == "vl:transcript:{abc}"
    assert StreamKeys("p").sessions == "p:sessions"
    with pytest.raises(ValueError, match="invalid session id"):
        check_session_id("a b")


@pytest.mark.parametrize(
    ("reported", "position"),
    [(b"1250.5", 1250.5), ("0", 0.0), (b"nan", None), ("inf", None), ("-40", None),
     (b"soon", None), (None, None)],
)  # fmt: skip
def test_a_playback_position_is_a_finite_number_of_ms_or_nothing(
    reported: Any, position: float | None
) -> None:
    # Consumers report what they played; a NaN taken at its word would break a barge-in cut.
    assert c.playback_ms(reported) == position


def test_values_from_an_edge_are_refused_with_the_field_named() -> None:
    with pytest.raises(c.ContractError, match="invalid RawAudio: field 'rate'"):
        c.validated(c.RawAudio, {"audio": b"", "rate": 100})
    assert c.validated(c.AddText, {"text": "hello"}).text == "hello"
