"""A service whose claims loop died of an error it does not retry does not live on as an
empty shell: /healthz fails at once, naming the loop, and the process exits non-zero (so
it is restarted), also when its drain is cut short.

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
        deadline = time.monotonic() + 60
        healthy: int | None = 200
        assert ingest.proc is not None
        while time.monotonic() < deadline:
            if ingest.proc.poll() is not None:
                break
            healthy = ingest.health("/healthz")
            if healthy == 503:
                break
            time.sleep(0.5)
        exited = ingest.proc.poll()
        assert exited is not None or healthy == 503, (
            "the claims loop is dead but the process lives on and says it is healthy: "
            + ingest.log()[-2000:]
        )
        assert ingest.proc.wait(timeout=60) != 0, ingest.log()[-2000:]
        assert "the claims loop died" in ingest.log()
    finally:
        ingest.stop()
