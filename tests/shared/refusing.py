"""A redis-server that refuses writes for a moment, as one over `maxmemory` does."""

from __future__ import annotations

import signal
import subprocess
from typing import Any

import redis.asyncio as aioredis

from tests.waiting import wait_until


async def refuse_writes_until_one_is_refused(
    redis: aioredis.Redis, stopped: subprocess.Popen[bytes]
) -> None:
    """Put the server over `maxmemory` (OOM for every write), resume `stopped` (a service
    held with SIGSTOP while its input queued up), wait until Redis has refused a write,
    then take writes again."""
    await redis.config_set("maxmemory-policy", "noeviction")
    await redis.config_set("maxmemory", "1")
    try:
        stopped.send_signal(signal.SIGCONT)

        async def refused() -> bool:
            stats: Any = await redis.info("errorstats")
            return int(stats.get("errorstat_OOM", {}).get("count", 0)) > 0

        await wait_until(refused, within=30)
    finally:
        await redis.config_set("maxmemory", "0")
