"""Tool calls on a real Redis Cluster: the broker writes each call in the session's
fenced write, into its outbox (the session's slot), and relays it to `vl:tool-calls` (its
own slot, on another master here), where a raw Redis worker answers it."""

from __future__ import annotations

import redis.asyncio as aioredis

from tests.broker.helpers import control, running_broker, start_session, wait_for_event
from tests.broker.test_tools import WEATHER, tool_worker
from vlpipe.services.engine.server import running_engine
from vlpipe.shared.keys import StreamKeys
from vlpipe.shared.redis_cluster import LocalCluster, session_id_on


async def test_a_tool_call_reaches_the_shared_stream_once_and_is_answered(
    redis_cluster: LocalCluster, cluster_redis: aioredis.Redis, keys: StreamKeys
) -> None:
    home = redis_cluster.master_of_key(keys.tool_calls)
    shard = next(s for s in redis_cluster.shards() if s.master is not home)
    sid = session_id_on(shard, prefix="tool-")
    async with (
        running_engine(model="local", output_pace=0) as engine,
        running_broker(redis_cluster.url, keys, engine.endpoint, redis_cluster=True) as broker,
    ):
        await start_session(cluster_redis, keys, sid, modalities=["text"], tools=[WEATHER])
        await control(cluster_redis, keys, sid, type="text", text="What is the weather in Paris?")
        call = await tool_worker(cluster_redis, keys)
        evs = await wait_for_event(cluster_redis, keys, sid, "response.done", within=60, count=2)
        assert broker.tool_call_outbox.relayed == 1
    assert call[b"session"] == sid.encode() and call[b"name"] == b"get_weather"
    assert len(await cluster_redis.xrange(keys.tool_calls)) == 1
    assert await cluster_redis.xlen(keys.outbox("tool-calls", sid)) == 0
    answer = [e.event["text"] for e in evs if e.type == "response.text.done"][-1]
    assert "temperature is 21" in answer
