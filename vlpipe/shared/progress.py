"""Is a replica wedged? Each loop that does the service's work marks its turns, and
`/healthz` fails when one turn has been in progress for too long while Redis answers.

A turn of a reader is one read and the handling of what it returned. While Redis is down
a turn may wait as long as the outage lasts (a write retried until it is applied): that
is not a wedge, and restarting the replica would not help, so the health check asks
Redis before it blames the replica (`/readyz` already reports the outage).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass(slots=True)
class LoopProgress:
    """One loop's turn in progress, if any (monotonic seconds since it began). Loops that
    run side by side under one name (the session reader's loop per slot on a Redis
    Cluster) may share it: `busy_since` is then when the oldest turn in progress began."""

    name: str
    busy_since: float | None = None
    _turns: dict[int, float] = field(default_factory=dict)
    _next: int = 0

    @contextmanager
    def turn(self) -> Iterator[None]:
        token, self._next = self._next, self._next + 1
        self._turns[token] = now = time.monotonic()
        if self.busy_since is None:
            self.busy_since = now
        try:
            yield
        finally:
            del self._turns[token]
            # Turns are kept in the order they began: the first is the oldest.
            self.busy_since = next(iter(self._turns.values()), None)


@dataclass(slots=True)
class Watchdog:
    """The work loops of one process."""

    loops: list[LoopProgress] = field(default_factory=list)

    def loop(self, name: str) -> LoopProgress:
        progress = LoopProgress(name)
        self.loops.append(progress)
        return progress

    def stalled(self, limit_s: float) -> list[tuple[str, float]]:
        """Loops whose current turn began more than `limit_s` ago, with its age in s."""
        now = time.monotonic()
        return [
            (loop.name, now - loop.busy_since)
            for loop in self.loops
            if loop.busy_since is not None and now - loop.busy_since > limit_s
        ]
