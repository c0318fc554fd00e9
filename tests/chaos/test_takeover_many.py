"""Takeover behind hundreds of live sessions: the claim scan follows XAUTOCLAIM's cursor;
on one redis-server and on a Redis Cluster (the sessions' state spread over the masters)."""

from __future__ import annotations

import signal
from typing import Any

from tests.chaos.harness import ChaosRedis
from tests.shared.procs import start_worker
from tests.waiting import consuming, wait_until
from vlpipe.shared.contracts import SessionStart, encode
from vlpipe.shared.keys import StreamKeys

LIVE = 420
"""More than XAUTOCLAIM looks at in one call of the ownership's batch (10 x 32)."""


async def _claims(redis: Any, keys: StreamKeys) -> list[list[str]]:
    return [c.decode().split(":") for c in await redis.lrange(f"{keys.prefix}:claims", 0, -1)]


async def test_a_dead_replicas_newest_sessions_are_taken_over_behind_hundreds_of_live_ones(
    chaos_store: ChaosRedis, keys: StreamKeys
) -> None:
    redis_url, env = chaos_store.url, chaos_store.env
    redis = chaos_store.client()
    # A owns LIVE sessions and stays alive; B owns the five newest, then dies.
    a = start_worker("own", redis_url, keys.prefix, "A", "200", "3000", "1.0", env=env)
    b = None
    try:
        await consuming(redis, keys.sessions, "worker", "A")
        async with redis.pipeline(transaction=False) as pipe:
            for i in range(LIVE):
                pipe.xadd(keys.sessions, encode(SessionStart(session=f"live-{i}")))  # type: ignore[arg-type]
            await pipe.execute()

        async def a_owns_all() -> bool:
            return len(await _claims(redis, keys)) >= LIVE

        await wait_until(a_owns_all, within=60)
        b = start_worker("own", redis_url, keys.prefix, "B", "200", "3000", "1.0", env=env)

        await consuming(redis, keys.sessions, "worker", "B")
        a.send_signal(signal.SIGSTOP)  # briefly (under the claim time): B reads the new ones
        for i in range(5):
            await redis.xadd(keys.sessions, encode(SessionStart(session=f"new-{i}")))  # type: ignore[arg-type]

        async def b_owned() -> list[str]:
            return [c[1] for c in await _claims(redis, keys) if c[0] == "B"]

        async def b_owns_the_newest() -> bool:
            # A's blocked read, served by Redis while A is stopped, may still take one.
            return len(await b_owned()) >= 4

        try:
            await wait_until(b_owns_the_newest, within=2.5)
        finally:
            a.send_signal(signal.SIGCONT)
        newest = await b_owned()
        b.send_signal(signal.SIGKILL)
        b.wait(10)

        async def taken_over() -> bool:
            again = [c for c in await _claims(redis, keys) if c[1] in newest and c[0] == "A"]
            return {c[1] for c in again} == set(newest) and all(c[3] == "1" for c in again)

        await wait_until(taken_over, within=30)
        pending = await redis.xpending(keys.sessions, "worker")
        assert pending["pending"] == LIVE + 5
        assert {c["name"]: c["pending"] for c in pending["consumers"]}[b"A"] == LIVE + 5
    finally:
        for p in (a, b):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.send_signal(signal.SIGTERM)
                p.wait(30)
        await redis.aclose()
