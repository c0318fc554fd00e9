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
    types,
    wait_for_event,
)
from vlpipe.services.engine.server import running_engine
from vlpipe.shared.keys import StreamKeys


async def test_server_vad_session_start_to_end(
    redis_url: str, redis: aioredis.Redis, keys: StreamKeys, speech_wav: Path
) -> None:
    async with running_engine(model="echo", output_pace=0) as engine, running_broker(
        redis_url, keys, engine.endpoint
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
