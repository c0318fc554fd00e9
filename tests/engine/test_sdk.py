"""The engine driven by the official `azure-ai-voicelive` SDK over a real socket."""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import jiwer
import jsonschema
import pytest
from azure.ai.voicelive.aio import ConnectionError as VoiceLiveConnectionError
from azure.ai.voicelive.aio import VoiceLiveConnection, connect
from azure.ai.voicelive.models import (
    AudioInputTranscriptionOptions,
    FunctionCallOutputItem,
    FunctionTool,
    InputTextContentPart,
    RequestSession,
    ServerEvent,
    ServerVad,
    UserMessageItem,
)
from azure.core.credentials import AzureKeyCredential

from tests.engine.conftest import SPEECH_WORDS, resample, silence
from tests.engine.sdk_models import parse_server_event
from vlpipe.services.engine.server import EngineServer, running_engine

KEY = "engine-test-key"


class SdkClient:
    """An SDK connection whose every received event is also checked strictly."""

    def __init__(self, connection: VoiceLiveConnection) -> None:
        self.connection = connection
        self.events: list[ServerEvent] = []
        self.raw: list[dict[str, Any]] = []
        self._task = asyncio.create_task(self._receive())

    async def _receive(self) -> None:
        while payload := await self.connection.recv_bytes():  # b"" once closing
            raw = json.loads(payload)
            self.events.append(parse_server_event(raw))
            self.raw.append(raw)

    async def wait_until(
        self, matches: Callable[[Any], bool], within: float = 20.0, after: int = 0
    ) -> Any:
        """The first event from index `after` on that `matches`, waiting for it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while loop.time() < deadline:
            for event in self.events[after:]:
                if matches(event):
                    return event
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.02)
        raise AssertionError(f"not seen in {within}s; got {[e.type for e in self.events[-10:]]}")

    async def wait_for(self, kind: str, within: float = 20.0, after: int = 0) -> Any:
        """The first event of type `kind` from index `after` on, waiting for it."""
        return await self.wait_until(lambda e: e.type == kind, within, after)

    def of_type(self, kind: str) -> list[Any]:
        return [e for e in self.events if e.type == kind]

    def close(self) -> None:
        self._task.cancel()


@asynccontextmanager
async def sdk_session(engine: EngineServer) -> AsyncIterator[tuple[VoiceLiveConnection, SdkClient]]:
    """An SDK connection to `engine` and the client recording what it receives."""
    async with connect(
        endpoint=engine.endpoint, credential=AzureKeyCredential(KEY), model="gpt-4o-realtime"
    ) as connection:
        client = SdkClient(connection)
        try:
            yield connection, client
        finally:
            client.close()


def words(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9']+", text.lower()))


def transcribe_back(engine: EngineServer, pcm24k: bytes) -> str:
    """What the engine's own speech-to-text hears in a response's 24 kHz audio."""
    assert engine.backends is not None and engine.backends.stt is not None
    return engine.backends.stt.transcribe(resample(pcm24k, 24000, 16000)).text


async def test_a_recording_streamed_in_real_time_is_heard_transcribed_and_answered(
    speech_16k: bytes,
) -> None:
    async with (
        running_engine(model="local", api_key=KEY) as engine,
        sdk_session(engine) as (connection, client),
    ):
        await client.wait_for("session.created")
        await connection.session.update(
            session=RequestSession(
                modalities=["text", "audio"],
                voice="alloy",
                input_audio_format="pcm16",
                input_audio_sampling_rate=24000,
                output_audio_format="pcm16",
                input_audio_transcription=AudioInputTranscriptionOptions(model="whisper-1"),
                turn_detection=ServerVad(
                    threshold=0.5, prefix_padding_ms=300, silence_duration_ms=500
                ),
            )
        )
        updated = await client.wait_for("session.updated")
        assert updated.session.turn_detection.silence_duration_ms == 500
        audio = resample(speech_16k + silence(1500), 16000, 24000)
        frame = 24000 * 2 // 50  # 20 ms
        loop = asyncio.get_running_loop()
        began = loop.time()
        for n, start in enumerate(range(0, len(audio), frame)):
            chunk = base64.b64encode(audio[start : start + frame]).decode()
            await connection.input_audio_buffer.append(audio=chunk)
            await asyncio.sleep(max(0.0, began + (n + 1) * 0.02 - loop.time()))

        # Each phrase is a turn; speech cancels the answer to the previous one, and the
        # last turn ("Fail better.") is answered in full once the user falls silent.
        done = await client.wait_until(
            lambda e: e.type == "response.done" and e.response.status == "completed"
        )
        assert client.events.index(done) > client.events.index(
            client.of_type("input_audio_buffer.speech_stopped")[-1]
        )
        started = client.of_type("input_audio_buffer.speech_started")
        stopped = client.of_type("input_audio_buffer.speech_stopped")
        assert 1 <= len(started) == len(stopped)
        for begin, end in zip(started, stopped, strict=True):
            assert begin.item_id == end.item_id
            assert 0 <= begin.audio_start_ms < end.audio_end_ms <= 11_500
        transcripts = client.of_type("conversation.item.input_audio_transcription.completed")
        heard = " ".join(t.transcript for t in transcripts)
        assert jiwer.wer(words(SPEECH_WORDS), words(heard)) <= 0.2, heard

        response_id = done.response.id
        speech = b"".join(
            e.delta for e in client.of_type("response.audio.delta") if e.response_id == response_id
        )
        assert len(speech) > 24000 * 2 * 0.5  # over half a second of 24 kHz PCM16
        said = client.of_type("response.audio_transcript.done")[-1].transcript
        assert said.startswith("You said:")
        assert jiwer.wer(words(said), words(transcribe_back(engine, speech))) <= 0.35
        assert done.response.usage.output_tokens > 0


WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
}


async def test_a_declared_tool_is_called_and_its_output_spoken() -> None:
    async with (
        running_engine(model="local", api_key=KEY, output_pace=0) as engine,
        sdk_session(engine) as (connection, client),
    ):
        await connection.session.update(
            session=RequestSession(
                tools=[
                    FunctionTool(
                        name="get_weather",
                        description="Get the current weather for a city",
                        parameters=WEATHER,
                    )
                ],
                tool_choice="auto",
            )
        )
        await client.wait_for("session.updated")
        await connection.conversation.item.create(
            item=UserMessageItem(
                content=[InputTextContentPart(text="What's the weather in Lisbon in fahrenheit?")]
            )
        )
        await connection.response.create()
        call = await client.wait_for("response.function_call_arguments.done")
        assert call.name == "get_weather"
        arguments = json.loads(call.arguments)
        jsonschema.validate(arguments, WEATHER)
        assert arguments == {"city": "fahrenheit", "unit": "fahrenheit"} or arguments["city"]
        assert (await client.wait_for("response.done")).response.status == "completed"

        mark = len(client.events)
        output = json.dumps({"temperature": 21, "sky": "sunny"})
        await connection.conversation.item.create(
            item=FunctionCallOutputItem(call_id=call.call_id, output=output)
        )
        await connection.response.create()
        done = await client.wait_for("response.done", after=mark)
        assert done.response.status == "completed"
        said = client.of_type("response.audio_transcript.done")[-1].transcript
        assert "21" in said and "sunny" in said
        speech = b"".join(
            e.delta
            for e in client.of_type("response.audio.delta")
            if e.response_id == done.response.id
        )
        heard = words(transcribe_back(engine, speech))
        assert "temperature" in heard and ("21" in heard or "twenty one" in heard), heard


async def test_response_cancel_mid_response_stops_the_audio() -> None:
    async with (
        running_engine(model="local", api_key=KEY) as engine,
        sdk_session(engine) as (connection, client),
    ):
        long_text = "Ever tried. Ever failed. No matter. Try again. Fail again. Fail better. " * 2
        await connection.conversation.item.create(
            item=UserMessageItem(content=[InputTextContentPart(text=long_text)])
        )
        await connection.response.create()
        first = await client.wait_for("response.audio.delta")
        await connection.response.cancel()
        done = await client.wait_for("response.done")
        assert done.response.status == "cancelled"
        assert done.response.status_details.reason == "client_cancelled"
        await asyncio.sleep(1.0)
        deltas = [e for e in client.events if e.type == "response.audio.delta"]
        after_done = client.events[client.events.index(done) :]
        assert not [e for e in after_done if e.type == "response.audio.delta"]
        assert all(e.response_id == first.response_id for e in deltas)
        sent_ms = sum(len(e.delta) for e in deltas) / 48
        assert sent_ms < 3000  # the full answer runs well over 8 s


async def test_bad_events_get_error_events_and_the_session_survives() -> None:
    async with (
        running_engine(model="echo", api_key=KEY) as engine,
        sdk_session(engine) as (connection, client),
    ):
        await connection.send({"type": "response.bogus", "event_id": "evt-1"})
        await connection.input_audio_buffer.commit(event_id="evt-2")
        await connection.response.cancel(event_id="evt-3")
        await connection.conversation.item.truncate(
            item_id="item_missing", audio_end_ms=10, content_index=0, event_id="evt-4"
        )
        await connection.session.update(session={"instructions": "still here"})
        updated = await client.wait_for("session.updated")
        assert updated.session.instructions == "still here"
        errors = {e.error.event_id: e.error for e in client.of_type("error")}
        assert errors["evt-1"].code == "invalid_value" and errors["evt-1"].param == "type"
        assert errors["evt-2"].code == "input_audio_buffer_commit_empty"
        assert errors["evt-3"].code == "response_cancel_not_active"
        assert errors["evt-4"].code == "item_truncate_invalid_item_id"
        assert all(
            error.type == "invalid_request_error" and error.message for error in errors.values()
        )


async def test_a_wrong_key_is_refused_at_the_handshake() -> None:
    async with running_engine(model="echo", api_key=KEY) as engine:
        bad = connect(endpoint=engine.endpoint, credential=AzureKeyCredential("wrong"))
        with pytest.raises(VoiceLiveConnectionError, match="401"):
            async with bad:
                pass
