"""A real process around the stream runtime, for tests that kill or SIGTERM it.

    python -m tests.shared.worker consume REDIS_URL PREFIX STREAM GROUP NAME DELAY_S
    python -m tests.shared.worker own REDIS_URL PREFIX NAME HEARTBEAT_MS CLAIM_IDLE_MS [STEP_S
        [SLOW_STOP_S]]
    python -m tests.shared.worker stubborn REDIS_URL PREFIX

`consume` handles entries idempotently by (session, seq): the effect (INCR of the
`effects` counter) happens only when (session, seq) is new, in one script with the
check (`apply_once`), so a SIGKILL cannot fall between the two. `own` runs the ownership
helper; each owned session counts up `pos` from its checkpoint, checkpointing each step
(every STEP_S, 0.02 s unless given); cancelled, a session task takes SLOW_STOP_S to end
(a session stuck closing its upstream). `stubborn` is a body with a bug: it swallows its
own cancellation and goes on waiting.
"""

from __future__ import annotations

import asyncio
import sys

import redis.asyncio as aioredis

from vlpipe.shared.config import ServiceSettings
from vlpipe.shared.keys import StreamKeys
from vlpipe.shared.ownership import OwnedSession, SessionOwnership
from vlpipe.shared.service import ServiceContext, run_service
from vlpipe.shared.streams import Entry, GroupConsumer

_ONCE = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 1 then redis.call('INCR', KEYS[2]) end
"""


async def apply_once(redis: aioredis.Redis, prefix: str, key: bytes) -> None:
    """The effect of the entry `key` ((session, seq)): `{prefix}:effects` counts up the
    first time `key` joins `{prefix}:handled`, atomically with it. (Two commands, the
    check and then the effect, lost the effect when the process died between them.)"""
    await redis.eval(_ONCE, 2, f"{prefix}:handled", f"{prefix}:effects", key)


async def consume(ctx: ServiceContext, stream: str, group: str, delay_s: float) -> None:
    async def handle(entry: Entry) -> None:
        await asyncio.sleep(delay_s)
        key = entry.fields[b"session"] + b":" + entry.fields[b"seq"]
        await apply_once(ctx.redis, ctx.keys.prefix, key)
        await ctx.redis.rpush(f"{ctx.keys.prefix}:log:{ctx.replica}", key)

    consumer = GroupConsumer(
        ctx.redis,
        streams=[stream],
        group=group,
        consumer=ctx.replica,
        handler=handle,
        dead=ctx.dead,
        batch=10,
        block_ms=100,
        claim_idle_ms=ctx.settings.claim_idle_ms,
    )
    await consumer.run(ctx.stop)


async def own(ctx: ServiceContext, step_s: float, slow_stop_s: float) -> None:
    keys: StreamKeys = ctx.keys

    async def run_session(owned: OwnedSession) -> None:
        pos = int(owned.checkpoint.get("pos", "0"))
        await ctx.redis.rpush(
            f"{keys.prefix}:claims", f"{ctx.replica}:{owned.sid}:{pos}:{int(owned.taken_over)}"
        )
        try:
            while not owned.ended.is_set():
                pos += 1
                await ownership.checkpoint(owned, {"pos": pos})
                await asyncio.sleep(step_s)
        except asyncio.CancelledError:
            if slow_stop_s:
                await asyncio.shield(asyncio.sleep(slow_stop_s))
            raise

    ownership = SessionOwnership(
        ctx.redis,
        keys,
        service="worker",
        replica=ctx.replica,
        run_session=run_session,
        dead=ctx.dead,
        heartbeat_ms=ctx.settings.heartbeat_ms,
        claim_idle_ms=ctx.settings.claim_idle_ms,
    )
    await ownership.run(ctx.stop, drain_budget_s=ctx.settings.shutdown_grace_s)


async def stubborn(ctx: ServiceContext) -> None:
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            continue  # the bug


def main(argv: list[str]) -> int:
    mode, url, prefix, *rest = argv
    if mode == "stubborn":
        settings = ServiceSettings(
            redis_url=url, stream_prefix=prefix, http_host="127.0.0.1", shutdown_grace_s=1
        )
        return asyncio.run(run_service("worker", settings, stubborn))
    if mode == "consume":
        stream, group, name, delay = rest
        settings = ServiceSettings(
            redis_url=url,
            stream_prefix=prefix,
            replica_name=name,
            claim_idle_ms=60_000,
            http_host="127.0.0.1",
        )
        return asyncio.run(
            run_service("worker", settings, lambda ctx: consume(ctx, stream, group, float(delay)))
        )
    name, heartbeat, idle, *more = rest
    settings = ServiceSettings(
        redis_url=url,
        stream_prefix=prefix,
        replica_name=name,
        heartbeat_ms=int(heartbeat),
        claim_idle_ms=int(idle),
        http_host="127.0.0.1",
        shutdown_grace_s=2,
    )
    step_s = float(more[0]) if more else 0.02
    slow_stop_s = float(more[1]) if len(more) > 1 else 0.0
    return asyncio.run(run_service("worker", settings, lambda ctx: own(ctx, step_s, slow_stop_s)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
