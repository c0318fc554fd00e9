"""Upstream drops, dead sockets, rollovers and broker replicas killed mid-session."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.broker.engine_proc import EngineProcess
from tests.broker.helpers import (
    FrameWriter,
    assert_in_order,
    control,
    events,
    read_wav,
    running_broker,
    silence,
    start_broker,
    start_session,
    statuses,
    types,
    wait_for_event,
)
from tests.waiting import wait_until
from vlpipe.services.engine.server import running_engine
from vlpipe.shared.contracts import Event
from vlpipe.shared.keys import StreamKeys


@pytest.fixture
def engine() -> Iterator[EngineProcess]:
    proc = EngineProcess(model="local", VLPIPE_ENGINE_OUTPUT_PACE="0").start()
    yield proc
    proc.stop()


def texts(evs: list[Event]) -> list[str]:
    return [e.event["text"] for e in evs if e.type == "response.text.done"]


def created_items(evs: list[Event]) -> list[str]:
    return [e.event["item"]["id"] for e in evs if e.type == "conversation.item.created"]


async def test_upstream_killed_and_restarted_mid_conversation(
    redis_url: str, redis: aioredis.Redis, keys: StreamKeys, engine: EngineProcess
) -> None:
    async with running_broker(redis_url, keys, engine.endpoint):
        await start_session(redis, keys, "u1", modalities=["text"])
        await control(redis, keys, "u1", type="text", text="My name is Ada.")
        before = await wait_for_event(redis, keys, "u1", "response.done", within=60)
        engine.kill()
        await wait_for_event(redis, keys, "u1", "vlpipe.upstream.reconnecting")
        engine.start()
        await wait_for_event(redis, keys, "u1", "vlpipe.upstream.connected", count=2, within=60)
        await control(redis, keys, "u1", type="text", text="Do you remember me?")
        await wait_for_event(redis, keys, "u1", "response.done", within=60, count=2)
        await control(redis, keys, "u1", type="session.end")
        evs = await wait_for_event(redis, keys, "u1", "vlpipe.session.ended")
    assert_in_order(evs)  # nothing lost or reordered across the drop
    assert evs[: len(before)] == before
    kinds = types(evs)
    reconnected = kinds.index(
        "vlpipe.upstream.connected", kinds.index("vlpipe.upstream.reconnecting")
    )
    # The new upstream session was given the conversation so far, as text, with its ids.
    replayed = created_items(evs[reconnected:])
    assert set(created_items(before)) <= set(replayed)
    assert texts(evs) == ["You said: My name is Ada.", "You said: Do you remember me?"]
    assert any("upstream closed the socket" in s.message for s in await statuses(redis, keys, "u1"))


async def test_a_silent_upstream_is_noticed_by_ping_and_reconnected(
    redis_url: str, redis: aioredis.Redis, keys: StreamKeys, engine: EngineProcess
) -> None:
    async with running_broker(
        redis_url, keys, engine.endpoint, ping_interval_s=0.5, ping_timeout_s=1.0
    ):
        await start_session(redis, keys, "p1", modalities=["text"])
        await wait_for_event(redis, keys, "p1", "session.updated")
        engine.pause()  # the socket stays open, but nothing answers: dead air
        try:
            evs = await wait_for_event(redis, keys, "p1", "vlpipe.upstream.reconnecting", within=20)
        finally:
            engine.resume()
        dropped = next(e for e in evs if e.type == "vlpipe.upstream.reconnecting")
        assert dropped.event["code"] == 1011  # keepalive ping timeout
        await wait_for_event(redis, keys, "p1", "vlpipe.upstream.connected", count=2, within=60)
        await control(redis, keys, "p1", type="text", text="I am still here.")
        evs = await wait_for_event(redis, keys, "p1", "response.done", within=60)
    assert texts(evs) == ["You said: I am still here."]


async def test_a_long_session_rolls_over_to_a_new_upstream_session(
    redis_url: str, redis: aioredis.Redis, keys: StreamKeys
) -> None:
    async with (
        running_engine(model="local", output_pace=0) as engine,
        running_broker(redis_url, keys, engine.endpoint, max_upstream_s=1.5),
    ):
        await start_session(redis, keys, "r1", modalities=["text"])
        await control(redis, keys, "r1", type="text", text="Remember the number seven.")
        first = await wait_for_event(redis, keys, "r1", "response.done", within=60)
        evs = await wait_for_event(redis, keys, "r1", "vlpipe.upstream.connected", count=2)
        await control(redis, keys, "r1", type="session.end")
        evs = await wait_for_event(redis, keys, "r1", "vlpipe.session.ended")
    rollover = next(e for e in evs if e.type == "vlpipe.upstream.reconnecting")
    assert rollover.event["reason"] == "rollover"
    after = evs[evs.index(rollover) :]
    assert set(created_items(first)) <= set(created_items(after))
    assert not [s for s in await statuses(redis, keys, "r1") if s.kind == "error"]


@pytest.mark.parametrize(
    "stop",
    [
        pytest.param(signal.SIGKILL, id="killed"),
        # A drain (a rolling update): the replica hands its session over and exits cleanly.
        pytest.param(signal.SIGTERM, id="terminated"),
    ],
)
async def test_a_broker_replica_killed_mid_session_is_taken_over(
    redis_url: str, redis: aioredis.Redis, keys: StreamKeys, speech_wav: Path, stop: signal.Signals
) -> None:
    async with running_engine(model="echo", output_pace=0) as engine:
        brokers = [start_broker(redis_url, keys.prefix, engine.endpoint) for _ in range(2)]
        try:
            await start_session(redis, keys, "k1")
            frames = FrameWriter(redis, keys, "k1")
            speech = read_wav(speech_wav)
            half = len(speech) // 2 // 640 * 640
            await frames.write(speech[:half], pace=2.0)
            await wait_for_event(redis, keys, "k1", "response.done")

            async def owner() -> bytes | None:
                return await redis.hget(keys.session_state("k1"), "broker.owner")

            owner_name = await owner()
            assert owner_name is not None
            pid = int(owner_name.decode().rsplit("-", 1)[1])
            victim = next(b for b in brokers if b.pid == pid)
            victim.send_signal(stop)
            stopped = victim.wait(30)
            await frames.write(speech[half:] + silence(1200), pace=2.0)
            await frames.finish()
            evs = await wait_for_event(redis, keys, "k1", "vlpipe.session.ended", within=90)

            async def released() -> bool:
                return await redis.hget(keys.session_state("k1"), "broker.done") == b"1"

            await wait_until(released)
        finally:
            for proc in brokers:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            survivors = [proc.wait(20) for proc in brokers if proc.returncode is None]
    assert survivors == [0]
    assert stopped == (0 if stop == signal.SIGTERM else -signal.SIGKILL)
    assert_in_order(evs)  # the new owner continued the numbering: none lost, none twice
    takeover = [e for e in evs if e.type == "vlpipe.upstream.connected" and e.event["takeover"]]
    assert len(takeover) == 1
    after = evs[evs.index(takeover[0]) :]
    assert "response.done" in types(after), "the conversation went on after the takeover"
    # Every frame reached an upstream: the frames stream is trimmed behind the checkpoint.
    left = await redis.xrange(keys.frames("k1"))
    state = await redis.hgetall(keys.session_state("k1"))
    assert len(left) <= 1, ([i for i, _ in left], state.get(b"broker.frames_id"))
    assert (await events(redis, keys, "k1"))[-1].type == "vlpipe.session.ended"
