"""Redis refuses writes for a while (`OOM command not allowed when used memory >
'maxmemory'`: memory pressure under `noeviction`), then takes them again.

Not a connection error: writes fail with an error reply for `REFUSING_S` (reads still
work). The producers' audio is refused too, so to give a service something to write
meanwhile, egress is paused for a second first and resumed as the refusal starts: it reads
a second of events and its writes of their outputs are refused. What was refused is
retried once Redis takes writes again, or, after the retries run out, reported (a dead
letter); either way nothing is lost silently: the history shows nothing lost and nothing
twice for a session without a dead letter. On one redis-server and on a Redis Cluster
(every master refuses).
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

from tests.broker.engine_proc import EngineProcess
from tests.chaos.harness import ChaosRedis, replicas, speak
from tests.chaos.history import ended_everywhere
from tests.waiting import wait_until
from vlpipe.shared.contracts import DeadLetter, decode
from vlpipe.shared.keys import StreamKeys

REFUSING_S = 1.5


def set_maxmemory(store: ChaosRedis, value: str) -> None:
    """`CONFIG SET maxmemory` on the server, or on every master of the cluster."""
    if store.cluster is None:
        assert store.server is not None
        import redis

        with redis.Redis(host=store.server.host, port=store.server.port) as plain:
            plain.config_set("maxmemory", value)
        return
    for master in store.cluster.masters():
        with store.cluster.client(master) as plain:
            plain.config_set("maxmemory", value)


async def test_writes_refused_for_a_while_are_retried_or_reported_never_lost_silently(
    chaos_store: ChaosRedis, keys: StreamKeys, speech_wav: Path, tmp_path: Path
) -> None:
    store = chaos_store
    engine = EngineProcess(model="local").start()
    redis: Any = store.client()
    sids = ["oom-1", "oom-2"]
    try:
        async with replicas(store.url, keys.prefix, tmp_path, engine.endpoint,
                            {"ingest": 1, "broker": 1, "egress": 1}, **store.env) as procs:  # fmt: skip
            egress = procs["egress"][0]
            talking = [asyncio.create_task(speak(store.url, keys, s, speech_wav,
                                                 cluster=store.is_cluster))
                       for s in sids]  # fmt: skip

            async def mid_call() -> bool:
                positions = [await redis.hget(keys.session_state(s), "ingest.next_seq")
                             for s in sids]  # fmt: skip
                return all(int(p or 0) >= 200 for p in positions)

            await wait_until(mid_call, within=60)
            egress.signal(signal.SIGSTOP)  # under the claim time: it keeps its sessions
            await asyncio.sleep(1.0)
            await asyncio.to_thread(set_maxmemory, store, "1")  # below what it uses: refuse
            egress.signal(signal.SIGCONT)
            await asyncio.sleep(REFUSING_S)
            await asyncio.to_thread(set_maxmemory, store, "0")
            await asyncio.gather(*talking)

            async def all_ended() -> bool:
                return all([await ended_everywhere(redis, keys, s) for s in sids])

            await wait_until(all_ended, within=120)
            dead = [decode(DeadLetter, f) for _, f in await redis.xrange(keys.dead)]
            history = store.history(keys)
            for sid in sids:
                if any(f"{{{sid}}}" in d.stream for d in dead):
                    continue  # reported: what the dead letters name may be missing
                history.check(sid)
                assert history.speakers(sid) == {"user", "assistant"}, sid
    finally:
        await redis.aclose()
        engine.stop()
