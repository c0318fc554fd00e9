"""Redis killed mid-session and restarted from its AOF on the same port."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from tests.broker.engine_proc import EngineProcess
from tests.chaos.harness import replicas, speak
from tests.chaos.history import History, ended_everywhere
from tests.waiting import wait_until
from vlpipe.shared.keys import StreamKeys
from vlpipe.shared.redis_server import RedisServer
from vlpipe.shared.streams import connect

OUTAGE_S = 4.0
CPU_SHARE_WHILE_DOWN = 0.25
"""At most a quarter of a core while Redis is down: backing off, not spinning (a hot
loop burns a whole core). The broker still talks to the upstream meanwhile."""


async def test_a_redis_restart_mid_call_loses_nothing_and_every_session_ends(
    chaos_redis: RedisServer, keys: StreamKeys, speech_wav: Path, tmp_path: Path
) -> None:
    server = chaos_redis
    engine = EngineProcess(model="local").start()
    redis = connect(server.url, timeout_s=2)
    counts = {"ingest": 1, "broker": 1, "egress": 1}
    try:
        async with replicas(server.url, keys.prefix, tmp_path, engine.endpoint, counts) as procs:
            everyone = [r for group in procs.values() for r in group]
            sids = ["before-1", "before-2", "before-3"]
            talking = [asyncio.create_task(speak(server.url, keys, s, speech_wav)) for s in sids]

            async def mid_call() -> bool:
                positions = [await redis.hget(keys.session_state(s), "ingest.next_seq")
                             for s in sids]  # fmt: skip
                return all(int(p or 0) >= 150 for p in positions)

            await wait_until(mid_call, within=60)
            assert all(r.health("/readyz") == 200 for r in everyone)

            server.kill()
            before = {r.name: r.cpu_seconds() for r in everyone}
            began = time.monotonic()
            await asyncio.sleep(1.5)
            ready_while_down = {r.name: r.health("/readyz") for r in everyone}
            alive_while_down = {r.name: r.health("/healthz") for r in everyone}
            await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - began)))
            window = time.monotonic() - began
            burned = {r.name: (r.cpu_seconds() - before[r.name]) / window for r in everyone}
            server.start()  # the same port, from the AOF
            await redis.aclose()
            redis = connect(server.url, timeout_s=2)  # the old connections died with it

            assert set(ready_while_down.values()) == {503}, ready_while_down
            assert set(alive_while_down.values()) == {200}, alive_while_down
            assert max(burned.values()) < CPU_SHARE_WHILE_DOWN, burned

            async def ready_again() -> bool:
                return all(r.health("/readyz") == 200 for r in everyone)

            await wait_until(ready_again, within=30)
            # A session announced after the restart is picked up and served.
            talking.append(asyncio.create_task(speak(server.url, keys, "after", speech_wav)))
            await asyncio.gather(*talking)

            async def all_ended() -> bool:
                ended = [await ended_everywhere(redis, keys, s) for s in [*sids, "after"]]
                return all(ended)

            await wait_until(all_ended, within=120)
            history = History.read(server.data_dir, keys)
            for sid in [*sids, "after"]:
                history.check(sid)
                assert history.speakers(sid) == {"user", "assistant"}, sid
            for replica in everyone:
                assert "Traceback" not in replica.log(), replica.name
        assert all(r.proc is not None and r.proc.returncode == 0 for r in everyone)
    finally:
        await redis.aclose()
        engine.stop()
