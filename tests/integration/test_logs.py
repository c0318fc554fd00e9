"""Logs: JSON lines with the service, level and session; never audio, keys or tokens."""

from __future__ import annotations

import json
import re
import wave
from pathlib import Path

import redis.asyncio as aioredis

from tests.integration.pipeline import TOKEN, outputs_done, running_pipeline, send_paced
from tests.waiting import wait_until
from vlpipe.services.engine.server import running_engine
from vlpipe.shared.keys import StreamKeys

ENGINE_KEY = "engine-key-1b2c3d4e5f"
BASE64_RUN = re.compile(r"[A-Za-z0-9+/]{80,}={0,2}")


async def test_debug_logs_are_json_with_sessions_and_hold_no_audio_or_secrets(
    redis_url: str, redis: aioredis.Redis, keys: StreamKeys, speech_wav: Path, tmp_path: Path
) -> None:
    with wave.open(str(speech_wav)) as w:
        pcm = w.readframes(w.getnframes()) + b"\0\0" * 16000 * 2
    env = {"VLPIPE_LOG_LEVEL": "DEBUG", "VLPIPE_BROKER_API_KEY": ENGINE_KEY}
    async with (
        running_engine(model="local", output_pace=0, api_key=ENGINE_KEY) as engine,
        running_pipeline(redis_url, keys.prefix, engine.endpoint, logs=tmp_path, **env) as pipeline,
    ):
        async with pipeline.connect("/v1/call?session=log1&input=pcm16&rate=16000") as call:
            await call.recv()
            chunks = [pcm[start : start + 3200] for start in range(0, len(pcm), 3200)]
            await send_paced(call, chunks, len(pcm) / 32000)
            await call.send(json.dumps({"type": "end"}))

            async def ended() -> bool:
                return await outputs_done(redis, keys, "log1")

            await wait_until(ended, within=90)
    seen_sessions = set()
    for service in ("ingest", "broker", "egress"):
        raw = (tmp_path / f"{service}.log").read_bytes()
        text = raw.decode("utf-8")  # no raw audio bytes: all of it is text
        lines = text.splitlines()
        assert lines, f"{service} logged nothing"
        for line in lines:
            record = json.loads(line)  # every line is one JSON object
            assert {"ts", "level", "msg", "service"} <= set(record), line
            assert ENGINE_KEY not in line and TOKEN not in line, f"{service} logged a secret"
            assert not BASE64_RUN.search(line), (
                f"{service} logged something like audio: {line[:200]}"
            )
            if record.get("session"):
                seen_sessions.add((service, record["session"]))
    assert {("ingest", "log1"), ("broker", "log1"), ("egress", "log1")} <= seen_sessions
