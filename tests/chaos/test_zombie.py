"""A zombie owner: a replica stopped past the claim time, taken over, then resumed; on one
redis-server and on a Redis Cluster (`chaos_store`)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from tests.broker.engine_proc import EngineProcess
from tests.chaos.harness import ChaosRedis, replicas, speak
from tests.chaos.history import ended_everywhere
from tests.waiting import wait_until
from vlpipe.shared.keys import StreamKeys


@pytest.mark.parametrize("service", ["ingest", "broker", "egress"])
async def test_a_stalled_owner_that_was_taken_over_writes_nothing_and_lets_go(
    service: str, chaos_store: ChaosRedis, keys: StreamKeys, speech_wav: Path, tmp_path: Path
) -> None:
    store = chaos_store
    engine = EngineProcess(model="local").start()
    redis = store.client()
    counts = {"ingest": 1, "broker": 1, "egress": 1, service: 2}
    # Egress stalled while it makes the outputs (the broker makes them by default).
    env = {**store.env, "VLPIPE_OUTPUTS_BY": "egress" if service == "egress" else "broker"}
    sids = ["z1", "z2"]
    try:
        async with replicas(store.url, keys.prefix, tmp_path, engine.endpoint,
                            counts, **env) as procs:  # fmt: skip
            talking = [asyncio.create_task(speak(store.url, keys, s, speech_wav,
                                                 cluster=store.is_cluster))
                       for s in sids]  # fmt: skip
            state = keys.session_state("z1")

            async def mid_call() -> bool:
                written = await redis.hget(state, f"{service}.written")
                return int(written or 0) >= 10

            await wait_until(mid_call, within=60)
            owner_name = (await redis.hget(state, f"{service}.owner")).decode()
            owner = next(r for r in procs[service] if r.name == owner_name)
            owner.signal(signal.SIGSTOP)  # a GC pause, a partition: longer than the claim time

            async def taken_over() -> bool:
                now = await redis.hget(state, f"{service}.owner")
                return now is not None and now.decode() != owner_name

            await wait_until(taken_over, within=30)
            epoch = int(await redis.hget(state, f"{service}.epoch"))
            await asyncio.sleep(1.0)  # the new owner writes on
            owner.signal(signal.SIGCONT)  # the zombie wakes up with writes in hand

            await asyncio.gather(*talking)

            async def all_ended() -> bool:
                return all([await ended_everywhere(redis, keys, s) for s in sids])

            await wait_until(all_ended, within=120)
            assert int(await redis.hget(state, f"{service}.epoch")) == epoch  # no steal-back
            history = store.history(keys)
            for sid in sids:
                history.check(sid)
                assert history.speakers(sid) == {"user", "assistant"}, sid
        log = owner.log()
        assert '"msg": "session lost to another replica"' in log, log[-3000:]
        assert '"session": "z1"' in log
        assert owner.proc is not None and owner.proc.returncode == 0  # it went on serving
    finally:
        await redis.aclose()
        engine.stop()
