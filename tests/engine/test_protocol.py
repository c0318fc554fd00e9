"""The session state machine without sockets or models: events in, events and jobs out."""

from __future__ import annotations

import base64
import json
from typing import Any

import jsonschema
import pytest

from tests.engine.conftest import LoudnessModel, resample, silence, tone
from tests.engine.sdk_models import parse_server_event
from vlpipe.services.engine.protocol import (
    EngineSession,
    IdSource,
    SynthesisJob,
    TranscriptionJob,
)
from vlpipe.shared.audio import AudioFormat, encode_pcm16

TTS_RATE = 22050


class Harness:
    """Drives an EngineSession like the server does, with stand-in STT and TTS."""

    def __init__(self, echo: bool = False, transcript: tuple[str, ...] = ("hello there",)):
        self.session = EngineSession(LoudnessModel(), echo=echo, ids=IdSource(seed=0))
        self.transcript = transcript
        self.spoken: list[str] = []
        self.events = self._checked(self.session.start())

    def _checked(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for event in events:
            parse_server_event(event)
            assert event["event_id"]
        return events

    def send(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        out = self._checked(self.session.handle_client_event(event))
        self.events += out
        return out

    def append(
        self, pcm: bytes, fmt: AudioFormat = AudioFormat.PCM16, chunk_ms: int = 20
    ) -> list[dict[str, Any]]:
        wire = encode_pcm16(resample(pcm, 16000, fmt.rate), fmt)
        step = fmt.bytes_for_ms(chunk_ms)
        out: list[dict[str, Any]] = []
        for start in range(0, len(wire), step):
            audio = base64.b64encode(wire[start : start + step]).decode()
            out += self.send({"type": "input_audio_buffer.append", "audio": audio})
        return out

    def run_jobs(self, speech_ms: int = 1000) -> list[dict[str, Any]]:
        """Complete every requested job: the STT hears `transcript`, the TTS speaks a tone."""
        out: list[dict[str, Any]] = []
        while jobs := self.session.take_jobs():
            for job in jobs:
                if isinstance(job, TranscriptionJob):
                    out += self.session.transcription_finished(job.item_id, self.transcript)
                else:
                    assert isinstance(job, SynthesisJob)
                    self.spoken.append(job.text)
                    pcm = tone(speech_ms, TTS_RATE)
                    out += self.session.speech_synthesized(job.response_id, pcm, TTS_RATE)
        self.events += self._checked(out)
        return out

    def drain_audio(self, max_chunks: int = 10_000) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for _ in range(max_chunks):
            chunk = self.session.next_audio()
            if chunk is None:
                break
            out += chunk.events
        self.events += self._checked(out)
        return out


def types(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


def test_session_update_is_reflected_in_session_updated() -> None:
    h = Harness()
    assert types(h.events) == ["session.created"]
    tool = {"type": "function", "name": "f", "description": "d", "parameters": {"type": "object"}}
    [updated] = h.send(
        {
            "type": "session.update",
            "session": {
                "instructions": "Be brief.",
                "voice": {"name": "en-US-AvaNeural", "type": "azure-standard"},
                "modalities": ["text"],
                "input_audio_format": "g711_alaw",
                "output_audio_format": "pcm16_8000hz",
                "input_audio_transcription": {"model": "whisper-1"},
                "turn_detection": {
                    "type": "azure_semantic_vad",
                    "threshold": 0.3,
                    "prefix_padding_ms": 200,
                    "silence_duration_ms": 700,
                    "remove_filler_words": True,
                },
                "tools": [tool],
                "tool_choice": {"type": "function", "name": "f"},
            },
        }
    )
    session = updated["session"]
    assert updated["type"] == "session.updated"
    assert session["instructions"] == "Be brief."
    assert session["voice"] == {"name": "en-US-AvaNeural", "type": "azure-standard"}
    assert session["modalities"] == ["text"]
    assert (session["input_audio_format"], session["input_audio_sampling_rate"]) == (
        "g711_alaw",
        8000,
    )
    assert session["output_audio_format"] == "pcm16_8000hz"
    assert session["input_audio_transcription"]["model"] == "whisper-1"
    detection = session["turn_detection"]
    assert detection["type"] == "azure_semantic_vad"
    assert (
        detection["threshold"],
        detection["prefix_padding_ms"],
        detection["silence_duration_ms"],
    ) == (0.3, 200, 700)
    assert detection["remove_filler_words"] is True
    assert session["tools"] == [tool]
    assert session["tool_choice"] == {"type": "function", "name": "f"}
    [manual] = h.send(
        {
            "type": "session.update",
            "session": {
                "turn_detection": None,
                "input_audio_sampling_rate": 16000,
                "input_audio_format": "pcm16",
            },
        }
    )
    assert manual["session"]["turn_detection"] is None
    assert manual["session"]["input_audio_sampling_rate"] == 16000


AUDIO = base64.b64encode(b"\0\0" * 100).decode()


@pytest.mark.parametrize(
    ("event", "code", "param"),
    [
        ({"type": "no.such.event", "event_id": "e1"}, "invalid_value", "type"),
        ({"event_id": "e1"}, "missing_required_parameter", "type"),
        (
            {"type": "input_audio_buffer.append", "event_id": "e1"},
            "missing_required_parameter",
            "audio",
        ),
        (
            {"type": "input_audio_buffer.append", "event_id": "e1", "audio": "@@@"},
            "invalid_value",
            "audio",
        ),
        (
            {"type": "input_audio_buffer.append", "event_id": "e1", "audio": "AA=="},
            "invalid_value",
            "audio",
        ),
        (
            {"type": "input_audio_buffer.commit", "event_id": "e1"},
            "input_audio_buffer_commit_empty",
            None,
        ),
        ({"type": "response.cancel", "event_id": "e1"}, "response_cancel_not_active", None),
        (
            {
                "type": "conversation.item.truncate",
                "event_id": "e1",
                "item_id": "x",
                "content_index": 0,
                "audio_end_ms": 0,
            },
            "item_truncate_invalid_item_id",
            "item_id",
        ),
        (
            {"type": "conversation.item.truncate", "event_id": "e1", "item_id": "x"},
            "missing_required_parameter",
            "content_index",
        ),
        (
            {"type": "conversation.item.delete", "event_id": "e1", "item_id": "x"},
            "item_delete_invalid_item_id",
            "item_id",
        ),
        (
            {"type": "conversation.item.retrieve", "event_id": "e1", "item_id": "x"},
            "item_retrieve_invalid_item_id",
            "item_id",
        ),
        (
            {
                "type": "conversation.item.create",
                "event_id": "e1",
                "item": {"type": "message", "role": "user", "content": []},
            },
            "invalid_type",
            "item.content",
        ),
        (
            {
                "type": "conversation.item.create",
                "event_id": "e1",
                "previous_item_id": "nope",
                "item": {
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": "hi"}],
                },
            },
            "invalid_value",
            "previous_item_id",
        ),
        (
            {"type": "session.update", "event_id": "e1", "session": {"output_audio_format": "mp3"}},
            "invalid_value",
            "session.output_audio_format",
        ),
        (
            {
                "type": "session.update",
                "event_id": "e1",
                "session": {"input_audio_sampling_rate": 44100},
            },
            "invalid_value",
            "session.input_audio_sampling_rate",
        ),
        (
            {
                "type": "session.update",
                "event_id": "e1",
                "session": {"turn_detection": {"type": "magic"}},
            },
            "invalid_value",
            "session.turn_detection.type",
        ),
        (
            {
                "type": "session.update",
                "event_id": "e1",
                "session": {"tools": [{"type": "mcp", "name": "x"}]},
            },
            "invalid_value",
            "session.tools[0].type",
        ),
        ({"type": "input_audio.turn.start", "event_id": "e1"}, "unsupported_event", "type"),
    ],
)
def test_bad_client_events_get_an_error_and_the_session_goes_on(
    event: dict[str, Any], code: str, param: str | None
) -> None:
    h = Harness()
    [error] = h.send(event)
    assert error["type"] == "error"
    assert error["error"]["code"] == code
    assert error["error"]["param"] == param
    assert error["error"]["event_id"] == "e1"
    assert error["error"]["message"]
    assert types(h.send({"type": "session.update", "session": {"instructions": "ok"}})) == [
        "session.updated"
    ]


def test_malformed_json_gets_an_error() -> None:
    h = Harness()
    for raw in ("{not json", "[1, 2]", b"\xff\xfe"):
        [error] = h.session.handle_client_message(raw)
        parse_server_event(error)
        assert error["type"] == "error"
        assert error["error"]["code"] in ("invalid_json", "invalid_type")


def test_a_second_response_while_one_is_active_is_refused() -> None:
    h = Harness()
    h.send({"type": "response.create"})
    [error] = h.send({"type": "response.create", "event_id": "e2"})
    assert error["error"]["code"] == "conversation_already_has_active_response"


def speak_turn(h: Harness, fmt: AudioFormat = AudioFormat.PCM16) -> list[dict[str, Any]]:
    return h.append(silence(500) + tone(1200) + silence(800), fmt)


def test_a_vad_turn_is_committed_transcribed_and_answered_in_order() -> None:
    h = Harness(transcript=("Ever tried.", "Ever failed."))
    h.send(
        {"type": "session.update", "session": {"input_audio_transcription": {"model": "whisper-1"}}}
    )
    turn = speak_turn(h)
    assert types(turn) == [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.created",
        "response.created",
    ]
    started, stopped, committed, created, _ = turn
    assert abs(started["audio_start_ms"] - (500 - 300)) <= 40  # 32 ms windows
    assert 1700 + 500 <= stopped["audio_end_ms"] <= 1700 + 600
    assert started["item_id"] == stopped["item_id"] == committed["item_id"] == created["item"]["id"]
    [job] = h.session.take_jobs()
    assert isinstance(job, TranscriptionJob)
    assert abs(len(job.audio) / 32 - (stopped["audio_end_ms"] - started["audio_start_ms"])) < 40
    h.session._jobs.append(job)  # give it back for run_jobs

    answer = h.run_jobs(speech_ms=1000)
    assert types(answer)[:2] == [
        "conversation.item.input_audio_transcription.delta",
        "conversation.item.input_audio_transcription.delta",
    ]
    completed = answer[2]
    assert completed["transcript"] == "Ever tried. Ever failed."
    assert "".join(e["delta"] for e in answer[:2]) == completed["transcript"]
    assert types(answer)[3:6] == [
        "response.output_item.added",
        "conversation.item.created",
        "response.content_part.added",
    ]
    assert h.spoken == ["You said: Ever tried. Ever failed."]
    audio = h.drain_audio()
    deltas = [e for e in audio if e["type"] == "response.audio.delta"]
    assert len(deltas) == 10  # 1000 ms in 100 ms chunks
    assert all(len(base64.b64decode(d["delta"])) == 4800 for d in deltas)  # 100 ms at 24 kHz
    assert types(audio)[len(deltas) :] == [
        "response.audio.done",
        "response.audio_transcript.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.done",
    ]
    done = audio[-1]["response"]
    assert done["status"] == "completed"
    assert done["output"][0]["content"][0]["transcript"] == "You said: Ever tried. Ever failed."
    assert done["usage"]["output_token_details"]["audio_tokens"] == 10
    assert done["usage"]["input_token_details"]["audio_tokens"] > 0
    transcript = "".join(
        e["delta"] for e in h.events if e["type"] == "response.audio_transcript.delta"
    )
    assert transcript == "You said: Ever tried. Ever failed."
    assert h.session.next_audio() is None


def test_speech_during_a_response_cancels_it() -> None:
    h = Harness()
    speak_turn(h)
    h.run_jobs(speech_ms=3000)
    first = h.drain_audio(max_chunks=3)
    assert types(first) == ["response.audio.delta"] * 3
    barge_in = h.append(tone(300))
    assert types(barge_in) == ["input_audio_buffer.speech_started", "response.done"]
    assert barge_in[1]["response"]["status"] == "cancelled"
    assert barge_in[1]["response"]["status_details"] == {
        "type": "cancelled",
        "reason": "turn_detected",
    }
    assert h.session.next_audio() is None


def test_response_cancel_stops_the_audio() -> None:
    h = Harness()
    h.send({"type": "response.create"})
    h.run_jobs(speech_ms=3000)
    h.drain_audio(max_chunks=2)
    [done] = h.send({"type": "response.cancel", "event_id": "c1"})
    assert done["type"] == "response.done"
    assert done["response"]["status"] == "cancelled"
    assert done["response"]["output"][0]["status"] == "incomplete"
    assert h.session.next_audio() is None
    assert h.send({"type": "response.cancel"})[0]["error"]["code"] == "response_cancel_not_active"


def test_output_audio_buffer_clear_drops_the_rest_of_the_audio() -> None:
    h = Harness()
    h.send({"type": "response.create"})
    h.run_jobs(speech_ms=2000)
    h.drain_audio(max_chunks=1)
    assert types(h.send({"type": "output_audio_buffer.clear"})) == [
        "response.done",
        "output_audio_buffer.cleared",
    ]
    assert h.session.next_audio() is None


def test_text_input_with_text_modality_answers_in_text() -> None:
    h = Harness()
    h.send({"type": "session.update", "session": {"modalities": ["text"], "turn_detection": None}})
    h.send(
        {
            "type": "conversation.item.create",
            "item": {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "Fail better"}],
            },
        }
    )
    answer = h.send({"type": "response.create"})
    assert h.session.take_jobs() == []
    assert "response.audio.delta" not in types(answer)
    [done_text] = [e for e in answer if e["type"] == "response.text.done"]
    assert done_text["text"] == "You said: Fail better."
    assert (
        "".join(e["delta"] for e in answer if e["type"] == "response.text.delta")
        == done_text["text"]
    )
    assert answer[-1]["type"] == "response.done"
    assert answer[-1]["response"]["output"][0]["content"] == [
        {"type": "text", "text": "You said: Fail better."}
    ]


WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather for a city",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city"],
    },
}


def test_a_matching_tool_is_called_and_its_output_is_spoken() -> None:
    h = Harness()
    h.send({"type": "session.update", "session": {"tools": [WEATHER_TOOL], "tool_choice": "auto"}})
    h.send(
        {
            "type": "conversation.item.create",
            "item": {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "What is the weather in Paris?"}],
            },
        }
    )
    call = h.send({"type": "response.create"})
    assert types(call) == [
        "response.created",
        "response.output_item.added",
        "conversation.item.created",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.done",
    ]
    done_args = call[4]
    assert done_args["name"] == "get_weather"
    arguments = json.loads(done_args["arguments"])
    jsonschema.validate(arguments, WEATHER_TOOL["parameters"])
    assert arguments == {"city": "Paris"}
    assert (
        "".join(e["delta"] for e in call if e["type"].endswith("arguments.delta"))
        == done_args["arguments"]
    )
    output = {
        "type": "function_call_output",
        "call_id": done_args["call_id"],
        "output": '{"temperature_c": 21}',
    }
    h.send({"type": "conversation.item.create", "item": output})
    h.send({"type": "response.create"})
    h.run_jobs()
    assert h.spoken == ["From get weather: temperature c is 21."]


def test_truncate_delete_and_retrieve_items() -> None:
    h = Harness()
    h.send({"type": "response.create"})
    h.run_jobs(speech_ms=1000)
    h.drain_audio()
    item_id = h.events[-1]["response"]["output"][0]["id"]
    [truncated] = h.send(
        {
            "type": "conversation.item.truncate",
            "item_id": item_id,
            "content_index": 0,
            "audio_end_ms": 400,
        }
    )
    assert (truncated["type"], truncated["audio_end_ms"]) == ("conversation.item.truncated", 400)
    too_far = h.send(
        {
            "type": "conversation.item.truncate",
            "item_id": item_id,
            "content_index": 0,
            "audio_end_ms": 5000,
        }
    )
    assert too_far[0]["error"]["param"] == "audio_end_ms"
    [retrieved] = h.send({"type": "conversation.item.retrieve", "item_id": item_id})
    assert retrieved["item"]["id"] == item_id
    assert retrieved["item"]["content"][0]["transcript"] == ""
    assert types(h.send({"type": "conversation.item.delete", "item_id": item_id})) == [
        "conversation.item.deleted"
    ]
    assert h.send({"type": "conversation.item.retrieve", "item_id": item_id})[0]["type"] == "error"


def test_manual_turns_commit_without_vad_or_automatic_response() -> None:
    h = Harness()
    h.send({"type": "session.update", "session": {"turn_detection": None}})
    assert speak_turn(h) == []
    committed = h.send({"type": "input_audio_buffer.commit"})
    assert types(committed) == ["input_audio_buffer.committed", "conversation.item.created"]
    [job] = h.session.take_jobs()
    assert isinstance(job, TranscriptionJob)
    assert abs(len(job.audio) / 32 - 2500) < 20  # all of it, less the resampler's delay
    assert (
        h.send({"type": "input_audio_buffer.commit"})[0]["error"]["code"]
        == "input_audio_buffer_commit_empty"
    )
    h.append(tone(200))
    assert types(h.send({"type": "input_audio_buffer.clear"})) == ["input_audio_buffer.cleared"]
    assert h.send({"type": "input_audio_buffer.commit"})[0]["type"] == "error"


@pytest.mark.parametrize("fmt", list(AudioFormat))
def test_echo_replies_with_the_users_audio_in_every_format(fmt: AudioFormat) -> None:
    h = Harness(echo=True)
    h.send(
        {
            "type": "session.update",
            "session": {
                "input_audio_format": fmt.wire_name,
                "input_audio_sampling_rate": fmt.rate,
                "output_audio_format": fmt.value,
            },
        }
    )
    turn = speak_turn(h, fmt)
    assert h.session.take_jobs() == []
    stopped = next(e for e in turn if e["type"] == "input_audio_buffer.speech_stopped")
    started = next(e for e in turn if e["type"] == "input_audio_buffer.speech_started")
    audio = b"".join(
        base64.b64decode(e["delta"]) for e in h.drain_audio() if e["type"] == "response.audio.delta"
    )
    assert (
        abs(fmt.ms_for_bytes(len(audio)) - (stopped["audio_end_ms"] - started["audio_start_ms"]))
        < 50
    )
    assert h.events[-1]["response"]["status"] == "completed"
