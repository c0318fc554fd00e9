"""A service whose claims loop died of an error it does not retry does not live on as an
empty shell: it exits (so it is restarted) or at least stops answering /healthz.

The loop is made to die the simplest way: `vl:sessions` is not a stream (WRONGTYPE when the
consumer group is created), an error no retry can fix."""

from __future__ import annotations

import time
from pathlib import Path

import redis

from tests.chaos.harness import Replica
from vlpipe.shared.keys import StreamKeys


def test_a_service_whose_claims_loop_died_exits_or_reports_itself_unhealthy(
    redis_url: str, keys: StreamKeys, tmp_path: Path
) -> None:
    with redis.Redis.from_url(redis_url) as plain:
        plain.set(keys.sessions, "not a stream")
    ingest = Replica("ingest", "ingest-0", redis_url, keys.prefix, tmp_path,
                     {"VLPIPE_WATCHDOG_S": "2"}).start()  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        healthy: int | None = 200
        assert ingest.proc is not None
        while time.monotonic() < deadline:
            if ingest.proc.poll() is not None:
                break
            healthy = ingest.health("/healthz")
            if healthy != 200:
                break
            time.sleep(0.5)
        exited = ingest.proc.poll()
        assert exited not in (None, 0) or healthy != 200, (
            "the claims loop is dead but the process lives on and says it is healthy: "
            + ingest.log()[-2000:]
        )
    finally:
        ingest.stop()
