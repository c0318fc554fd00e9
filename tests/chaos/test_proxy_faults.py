"""Connection resets and a black hole between every service and Redis (a TCP proxy)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.broker.engine_proc import EngineProcess
from tests.chaos.harness import TcpProxy, replicas, speak
from tests.chaos.history import History, ended_everywhere
from tests.waiting import wait_until
from vlpipe.shared.keys import StreamKeys
from vlpipe.shared.redis_server import RedisServer
from vlpipe.shared.streams import connect

BLACK_HOLE_S = 5.0


async def test_resets_every_few_seconds_and_a_black_hole_lose_and_repeat_nothing(
    chaos_redis: RedisServer, keys: StreamKeys, speech_wav: Path, tmp_path: Path
) -> None:
    engine = EngineProcess(model="local").start()
    redis = connect(chaos_redis.url, timeout_s=2)
    counts = {"ingest": 1, "broker": 1, "egress": 1}
    sids = ["p1", "p2", "p3"]
    try:
        async with (
            TcpProxy(chaos_redis.port) as proxy,
            replicas(proxy.url, keys.prefix, tmp_path, engine.endpoint, counts) as procs,
        ):
            everyone = [r for group in procs.values() for r in group]
            talking = [asyncio.create_task(speak(chaos_redis.url, keys, s, speech_wav))
                       for s in sids]  # fmt: skip
            dropped = 0
            for _ in range(3):  # drop every connection every 1.5 s, mid-call
                await asyncio.sleep(1.5)
                dropped += proxy.drop_all()
            assert dropped >= 3 * len(everyone)

            proxy.black_hole()  # Redis stops answering; nothing is refused
            await asyncio.sleep(BLACK_HOLE_S / 2)
            ready_in_hole = {r.name: r.health("/readyz") for r in everyone}
            alive_in_hole = {r.name: r.health("/healthz") for r in everyone}
            await asyncio.sleep(BLACK_HOLE_S / 2)
            proxy.restore()
            assert set(ready_in_hole.values()) == {503}, ready_in_hole
            assert set(alive_in_hole.values()) == {200}, alive_in_hole

            await asyncio.gather(*talking)

            async def all_ended() -> bool:
                return all([await ended_everywhere(redis, keys, s) for s in sids])

            await wait_until(all_ended, within=120)
            history = History.read(chaos_redis.data_dir, keys)
            for sid in sids:
                history.check(sid)
                assert history.speakers(sid) == {"user", "assistant"}, sid
        assert all(r.proc is not None and r.proc.returncode == 0 for r in everyone)
    finally:
        await redis.aclose()
        engine.stop()
