"""Frames to appends: one at a time when caught up, coalesced (bounded) when behind."""

from __future__ import annotations

import redis.asyncio as aioredis

from tests.broker.helpers import (
    FrameWriter,
    running_broker,
    silence,
    start_session,
    wait_for_event,
)
from tests.waiting import wait_until
from vlpipe.services.engine.server import running_engine
from vlpipe.shared.keys import StreamKeys


async def test_a_backlog_is_coalesced_into_bounded_appends(
    redis_url: str, redis: aioredis.Redis, keys: StreamKeys
) -> None:
    frames = FrameWriter(redis, keys, "a1")
    await frames.write(silence(20 * 400))  # 8 s of audio waiting before the broker starts
    await start_session(redis, keys, "a1")
    async with (
        running_engine(model="echo") as engine,
        running_broker(
            redis_url,
            keys,
            engine.endpoint,
            max_append_ms=200,
            read_batch=100,
            max_pending_frames=50,
        ) as broker,
    ):

        async def sent_all() -> bool:
            return broker.totals["frames"] == 400

        await wait_until(sent_all, within=30)
        backlog_appends = broker.totals["appends"]
        assert backlog_appends < 400 / 4  # coalesced
        assert broker.totals["largest_append_bytes"] <= 200 * 32  # never above 200 ms
        # Caught up: frames arriving in real time go out one by one, not held back.
        await frames.write(silence(20 * 25), pace=1.0)

        async def sent_paced() -> bool:
            return broker.totals["frames"] == 425

        await wait_until(sent_paced, within=30)
        assert broker.totals["appends"] - backlog_appends > 25 / 2
        await frames.finish()
        await wait_for_event(redis, keys, "a1", "vlpipe.session.ended")
    assert await redis.xlen(keys.frames("a1")) <= 1
