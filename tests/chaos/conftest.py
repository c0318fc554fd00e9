"""A redis-server of the test's own whose AOF keeps every command: the test's history."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from vlpipe.shared.redis_server import RedisServer


@pytest.fixture
def chaos_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """AOF with `appendfsync always` (every acknowledged write is in it) and no automatic
    rewrite (which would fold the history into a snapshot)."""
    server = RedisServer(tmp_path / "redis", extra_args=("--auto-aof-rewrite-percentage", "0"))
    server.start()
    yield server
    server.stop()
