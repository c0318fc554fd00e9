"""Tool calls: out on the tool-calls stream, answered by a worker with raw Redis commands."""

from __future__ import annotations

import json

import redis.asyncio as aioredis

from tests.broker.helpers import (
    assert_in_order,
    control,
    running_broker,
    start_session,
    statuses,
    wait_for_event,
)
from tests.waiting import wait_until
from vlpipe.services.engine.server import running_engine
from vlpipe.shared.keys import StreamKeys

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}


async def tool_worker(redis: aioredis.Redis, keys: StreamKeys) -> dict[bytes, bytes]:
    """A tool worker as one would write it in any language: XREADGROUP, XADD, XACK."""
    await redis.execute_command("XGROUP", "CREATE", keys.tool_calls, "weather", "0", "MKSTREAM")
    while True:
        reply = await redis.execute_command(
            "XREADGROUP", "GROUP", "weather", "w1", "COUNT", "1", "BLOCK", "5000",
            "STREAMS", keys.tool_calls, ">",
        )  # fmt: skip
        if not reply:
            continue
        _, entries = reply[0]
        entry_id, flat = entries[0]
        # redis-py parses the reply into a dict; a raw client sees a flat list.
        call = flat if isinstance(flat, dict) else dict(zip(flat[::2], flat[1::2], strict=True))
        result = json.dumps({"temperature": 21, "sky": "sunny"})
        await redis.execute_command(
            "XADD", keys.ctl(call[b"session"].decode()), "*",
            "type", "tool.result", "call_id", call[b"call_id"], "output", result,
        )  # fmt: skip
        await redis.execute_command("XACK", keys.tool_calls, "weather", entry_id)
        return call


async def test_a_tool_call_answered_by_a_raw_redis_worker(
    redis_url: str, redis: aioredis.Redis, keys: StreamKeys
) -> None:
    async with (
        running_engine(model="local", output_pace=0) as engine,
        running_broker(redis_url, keys, engine.endpoint),
    ):
        await start_session(redis, keys, "t1", modalities=["text"], tools=[WEATHER])
        await control(redis, keys, "t1", type="text", text="What is the weather in Paris?")
        call = await tool_worker(redis, keys)
        evs = await wait_for_event(redis, keys, "t1", "response.done", within=60, count=2)
    assert call[b"name"] == b"get_weather"
    assert call[b"session"] == b"t1"
    assert float(call[b"deadline"]) > 0
    assert_in_order(evs)
    outputs = [
        e.event["item"] for e in evs
        if e.type == "conversation.item.created" and e.event["item"]["type"] == "function_call_output"
    ]  # fmt: skip
    assert outputs and outputs[0]["call_id"] == call[b"call_id"].decode()
    answer = [e.event["text"] for e in evs if e.type == "response.text.done"][-1]
    assert "temperature is 21" in answer and "sunny" in answer


async def test_a_tool_that_does_not_answer_gets_the_timeout_result(
    redis_url: str, redis: aioredis.Redis, keys: StreamKeys
) -> None:
    async with (
        running_engine(model="local", output_pace=0) as engine,
        running_broker(redis_url, keys, engine.endpoint, tool_timeout_s=1.0),
    ):
        await start_session(redis, keys, "t2", modalities=["text"], tools=[WEATHER])
        await control(redis, keys, "t2", type="text", text="What is the weather in Oslo?")
        evs = await wait_for_event(redis, keys, "t2", "response.done", within=60, count=2)
        calls = await redis.xrange(keys.tool_calls)
        call_id = calls[0][1][b"call_id"].decode()
        # The worker answers too late: refused with a clear status, the session goes on.
        await control(redis, keys, "t2", type="tool.result", call_id=call_id, output="{}")

        async def reported_late() -> bool:
            return any("after its timeout" in s.message for s in await statuses(redis, keys, "t2"))

        await wait_until(reported_late, within=10)
        status = await statuses(redis, keys, "t2")
    outputs = [
        e.event["item"]["output"] for e in evs
        if e.type == "conversation.item.created" and e.event["item"]["type"] == "function_call_output"
    ]  # fmt: skip
    assert json.loads(outputs[0])["error"] == "timeout"
    assert any(s.kind == "tool_timeout" and s.detail["call_id"] == call_id for s in status)
    dead = await redis.xrange(keys.dead)
    assert any(b"after its timeout" in f[b"reason"] for _, f in dead)
