"""Waiting for a condition in tests, with a deadline (never asserting on durations)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


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
