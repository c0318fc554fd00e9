"""Session start to end against the real local engine, with server VAD and manual turns."""

from __future__ import annotations

from pathlib import Path

import redis.asyncio as aioredis

from tests.broker.helpers import (
    FrameWriter,
    assert_in_order,
    control,
    read_wav,
    running_broker,
    silence,
    start_session,
    statuses,
    types,
    wait_for_event,
)
from tests.waiting import wait_until
from vlpipe.services.engine.server import running_engine
from vlpipe.shared.contracts import Event
from vlpipe.shared.keys import StreamKeys


async def test_server_vad_session_start_to_end(
    redis_url: str, redis: aioredis.Redis, keys: StreamKeys, speech_wav: Path
) -> None:
    async with (
        running_engine(model="echo", output_pace=0) as engine,
        running_broker(redis_url, keys, engine.endpoint),
    ):
        await start_session(redis, keys, "s1")
        frames = FrameWriter(redis, keys, "s1")
        await frames.write(read_wav(speech_wav) + silence(1200))
        await frames.finish()
        evs = await wait_for_event(redis, keys, "s1", "vlpipe.session.ended", within=60)
    assert_in_order(evs)
    kinds = types(evs)
    assert kinds[0] == "vlpipe.session.started"
    assert kinds[-1] == "vlpipe.session.ended"
    assert "session.updated" in kinds
    assert "input_audio_buffer.speech_started" in kinds
    assert "response.done" in kinds
    assert kinds.index("response.done") < kinds.index("vlpipe.session.ended")
    audio = [e for e in evs if e.type == "response.audio.delta"]
    assert audio and all(e.audio and "delta" not in e.event for e in audio)
    updated = next(e for e in evs if e.type == "session.updated")
    assert updated.event["session"]["input_audio_sampling_rate"] == 16000


def transcripts(evs: list[Event], kind: str = "response.audio_transcript.done") -> list[str]:
    return [e.event.get("transcript", "") for e in evs if e.type == kind]


async def test_manual_turns_commit_and_response_create_with_the_local_model(
    redis_url: str, redis: aioredis.Redis, keys: StreamKeys, speech_wav: Path
) -> None:
    async with (
        running_engine(model="local", output_pace=0) as engine,
        running_broker(redis_url, keys, engine.endpoint),
    ):
        await start_session(redis, keys, "m1", turn_detection=None)
        frames = FrameWriter(redis, keys, "m1")
        await frames.write(read_wav(speech_wav))
        await wait_for_event(redis, keys, "m1", "session.updated")
        # With no VAD nothing happens until the producer says the turn is over.
        await control(redis, keys, "m1", type="input_audio_buffer.commit")
        await control(redis, keys, "m1", type="response.create")
        evs = await wait_for_event(redis, keys, "m1", "response.done", within=60)
        assert "input_audio_buffer.speech_started" not in types(evs)
        await frames.finish()
        evs = await wait_for_event(redis, keys, "m1", "vlpipe.session.ended", within=60)
    assert_in_order(evs)
    heard = transcripts(evs, "conversation.item.input_audio_transcription.completed")
    assert heard and "try again" in heard[0].lower()
    said = transcripts(evs)
    assert said and said[0].startswith("You said:") and "fail" in said[0].lower()


async def test_config_update_and_text_input_mid_session(
    redis_url: str, redis: aioredis.Redis, keys: StreamKeys
) -> None:
    async with (
        running_engine(model="local", output_pace=0) as engine,
        running_broker(redis_url, keys, engine.endpoint),
    ):
        await start_session(redis, keys, "c1", modalities=["text"])
        await control(redis, keys, "c1", type="text", text="What is the weather like?")
        evs = await wait_for_event(redis, keys, "c1", "response.done", within=60)
        first = [e.event["text"] for e in evs if e.type == "response.text.done"]
        assert len(first) == 1 and first[0].startswith("You said: What is the weather like")
        await control(
            redis, keys, "c1", type="session.update",
            config={"instructions": 'Always answer "The config changed."'},
        )  # fmt: skip
        await control(redis, keys, "c1", type="text", text="And now?")
        evs = await wait_for_event(redis, keys, "c1", "response.done", within=60, count=2)
        await control(redis, keys, "c1", type="session.end", reason="test over")
        evs = await wait_for_event(redis, keys, "c1", "vlpipe.session.ended", within=30)
    assert_in_order(evs)
    updated = [e for e in evs if e.type == "session.updated"]
    assert updated[-1].event["session"]["instructions"] == 'Always answer "The config changed."'
    texts = [e.event["text"] for e in evs if e.type == "response.text.done"]
    assert texts[-1] == "The config changed."
    assert evs[-1].event["reason"] == "control: test over"


async def test_input_that_ends_mid_utterance_still_gets_its_answer(
    redis_url: str, redis: aioredis.Redis, keys: StreamKeys, speech_wav: Path
) -> None:
    # A long silence duration: the recording ends before the VAD would call the turn over.
    async with (
        running_engine(model="local", output_pace=0) as engine,
        running_broker(redis_url, keys, engine.endpoint),
    ):
        await start_session(
            redis, keys, "e1", turn_detection={"type": "server_vad", "silence_duration_ms": 3000}
        )
        frames = FrameWriter(redis, keys, "e1")
        await frames.write(read_wav(speech_wav))
        await frames.finish()
        evs = await wait_for_event(redis, keys, "e1", "vlpipe.session.ended", within=60)
    kinds = types(evs)
    # The broker gives the VAD the silence it needs to end the turn itself: no client
    # commit racing the VAD's own, so no response request runs into an active one.
    assert kinds.index("input_audio_buffer.speech_stopped") < kinds.index(
        "input_audio_buffer.committed") < kinds.index("response.done")  # fmt: skip
    assert "error" not in kinds
    said = transcripts(evs)
    assert len(said) == 1 and said[0].startswith("You said: Ever tried")
    assert evs[-1].event["reason"] == "input_ended"


async def test_a_session_whose_outputs_the_broker_made_is_finished_for_egress_too(
    redis_url: str, redis: aioredis.Redis, keys: StreamKeys
) -> None:
    # No egress runs at all (as when egress's let-go was lost in a Redis failover, or egress
    # was down): the broker's last write marks the session done for egress as well, so an
    # egress that claims it later has nothing to do, and nothing waits on it.
    async with (
        running_engine(model="echo", output_pace=0) as engine,
        running_broker(redis_url, keys, engine.endpoint, outputs_by="broker"),
    ):
        await start_session(redis, keys, "d1")
        frames = FrameWriter(redis, keys, "d1")
        await frames.write(b"\0" * 3200)
        await frames.finish()
        await wait_for_event(redis, keys, "d1", "vlpipe.session.ended")

        async def released() -> bool:
            return await redis.hget(keys.session_state("d1"), "broker.done") == b"1"

        await wait_until(released)
        state = await redis.hgetall(keys.session_state("d1"))
    assert state[b"egress.done"] == b"1"
    assert b"egress.epoch" not in state  # (egress never claimed it)
    ends = [st for st in await statuses(redis, keys, "d1") if st.message == "ended"]
    assert [(st.kind, st.service) for st in ends] == [("state", "broker")]
