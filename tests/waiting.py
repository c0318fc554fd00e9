"""Waiting for a condition in tests, with a deadline (never asserting on durations)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import ResponseError


async def wait_until(
    predicate: Callable[[], Awaitable[bool]], within: float = 15.0, step: float = 0.05
) -> None:
    """Poll `predicate` until it is true; fail if it is still false after `within` s."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(step)
    raise AssertionError(f"condition not met within {within} s")


async def consuming(redis: Any, stream: str, group: str, *names: str, within: float = 60) -> None:
    """Until each of `names` is a consumer of `group` on `stream` (a replica's process
    takes a second or more to start reading on a busy machine); `redis` is a client of one
    server or of a cluster."""
    wanted = {name.encode() for name in names}

    async def all_reading() -> bool:
        try:
            consumers = await redis.xinfo_consumers(stream, group)
        except ResponseError:  # no stream or group yet
            return False
        return wanted <= {c["name"] for c in consumers}

    await wait_until(all_reading, within=within)
