"""Sessions whose producer vanished end by themselves; refused announcements are reported
on the session's own status stream, where its producer looks. On one redis-server and on a
Redis Cluster (`store`)."""

from __future__ import annotations

from pathlib import Path

from tests.chaos.conftest import Store
from tests.chaos.harness import replicas
from tests.chaos.history import ended_everywhere
from tests.waiting import wait_until
from vlpipe.services.engine.server import running_engine
from vlpipe.shared.contracts import Event, SessionEnd, SessionStart, Status, decode, encode
from vlpipe.shared.keys import StreamKeys

COUNTS = {"ingest": 1, "broker": 1, "egress": 1}


async def test_a_session_without_input_for_the_idle_time_ends_as_idle_and_its_keys_expire(
    store: Store, keys: StreamKeys, tmp_path: Path
) -> None:
    redis = store.redis
    async with (
        running_engine(model="echo", output_pace=0) as engine,
        replicas(
            store.url,
            keys.prefix,
            tmp_path,
            engine.endpoint,
            COUNTS,
            VLPIPE_SESSION_IDLE_S="2",
            **store.env,
        ),  # fmt: skip
    ):
        # A producer (or a gateway pod) that announced a call, sent a little audio and died.
        await redis.xadd(keys.sessions, encode(SessionStart(session="gone")))  # type: ignore[arg-type]
        await redis.xadd(keys.audio("gone"), {"format": "pcm16", "rate": 16000, "seq": 0,
                                              "audio": b"\0" * 6400})  # fmt: skip

        async def ended() -> bool:
            return await ended_everywhere(redis, keys, "gone")

        await wait_until(ended, within=30)
        state = await redis.hgetall(keys.session_state("gone"))
        assert state[b"end_reason"] == b"idle"
        last = decode(Event, (await redis.xrevrange(keys.events("gone"), count=1))[0][1])
        assert last.type == "vlpipe.session.ended" and last.event["reason"] == "idle"
        for key in keys.session_streams("gone"):
            if await redis.exists(key):
                assert 0 < await redis.ttl(key) <= 3600, key


async def test_refused_starts_and_ends_are_reported_on_the_sessions_status_stream(
    store: Store, keys: StreamKeys, tmp_path: Path
) -> None:
    redis = store.redis
    async with (
        running_engine(model="echo", output_pace=0) as engine,
        replicas(store.url, keys.prefix, tmp_path, engine.endpoint, COUNTS, **store.env),
    ):
        await redis.xadd(keys.sessions, encode(SessionStart(session="live")))  # type: ignore[arg-type]

        async def started() -> bool:
            return await redis.hget(keys.session_state("live"), "broker.owner") is not None

        await wait_until(started)
        # A producer retrying its start; an end whose reason breaks the contract.
        await redis.xadd(keys.sessions, encode(SessionStart(session="live")))  # type: ignore[arg-type]
        await redis.xadd(keys.sessions, {"type": "end", "session": "live", "reason": "x" * 300})

        async def reported() -> list[Status]:
            statuses = [decode(Status, f) for _, f in await redis.xrange(keys.status("live"))]
            return [s for s in statuses if s.kind == "error" and "refused" in s.message]

        async def reported_by_every_service() -> bool:
            refused = await reported()
            starts = {s.service for s in refused if "already started" in s.message}
            ends = {s.service for s in refused if "end refused" in s.message}
            return starts == ends == {"ingest", "broker", "egress"}

        await wait_until(reported_by_every_service)
        ends = [s for s in await reported() if "end refused" in s.message]
        assert all("reason" in s.message for s in ends), ends
        await redis.xadd(keys.sessions, encode(SessionEnd(session="live")))  # type: ignore[arg-type]

        async def ended() -> bool:
            return await ended_everywhere(redis, keys, "live")

        await wait_until(ended, within=30)  # the good end still ends it
