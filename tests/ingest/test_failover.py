"""Two ingest replicas; the owner of a session is killed; the frames stay continuous."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import numpy as np
import redis.asyncio as aioredis

from tests.ingest.test_service import wait_for_final_frame
from tests.shared.procs import ROOT
from tests.waiting import wait_until
from vlpipe.shared.contracts import Frame, decode
from vlpipe.shared.keys import StreamKeys


def start_replica(name: str, redis_url: str, prefix: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "VLPIPE_REDIS_URL": redis_url,
        "VLPIPE_STREAM_PREFIX": prefix,
        "VLPIPE_REPLICA_NAME": name,
        "VLPIPE_HTTP_PORT": "0",
        "VLPIPE_HTTP_HOST": "127.0.0.1",
        "VLPIPE_HEARTBEAT_MS": "100",
        "VLPIPE_CLAIM_IDLE_MS": "800",
        "VLPIPE_BLOCK_MS": "200",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "vlpipe.services.ingest"], cwd=ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


async def test_killing_the_owner_mid_session_leaves_a_continuous_frame_sequence(
    redis: aioredis.Redis, redis_url: str, keys: StreamKeys
) -> None:
    replicas = {n: start_replica(n, redis_url, keys.prefix) for n in ("A", "B")}
    sid = "failover-1"
    chunk = (
        (0.2 * np.sin(np.arange(2400) / 24000 * 2 * np.pi * 300) * 32767).astype("<i2").tobytes()
    )
    try:
        await asyncio.sleep(1.0)
        await redis.xadd(keys.sessions, {"type": "start", "session": sid})

        async def feed(count: int) -> None:
            for _ in range(count):  # 100 ms chunks at 10x real time
                await redis.xadd(
                    keys.audio(sid), {"audio": chunk, "format": "pcm16", "rate": "24000"}
                )
                await asyncio.sleep(0.01)

        await feed(20)

        async def owned() -> bool:
            return await redis.hget(keys.session_state(sid), "ingest.owner") is not None

        await wait_until(owned)
        owner = (await redis.hget(keys.session_state(sid), "ingest.owner")).decode()
        feeding = asyncio.create_task(feed(40))
        await asyncio.sleep(0.1)
        replicas[owner].kill()
        replicas[owner].wait(10)
        await feeding
        await redis.xadd(keys.sessions, {"type": "end", "session": sid})

        await wait_for_final_frame(redis, keys, sid)
        frames = [decode(Frame, f) for _, f in await redis.xrange(keys.frames(sid))]
        seqs = [f.seq for f in frames]
        assert seqs == list(range(len(seqs))), "no frame lost, none duplicated"
        # The owner died before the end, so the survivor finished and released the session.
        assert await redis.hget(keys.session_state(sid), "ingest.done") == b"1"
        assert replicas[owner].returncode == -signal.SIGKILL
        # 6 s of audio in; a takeover may lose at most the dead owner's partial frame.
        assert abs(len(frames) - 1 - 300) <= 2
    finally:
        for proc in replicas.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(20)
