"""Feeding egress with event sequences (raw XADDs) and reading its outputs."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import redis.asyncio as aioredis

from tests.shared.procs import ROOT
from vlpipe.shared.contracts import AudioOut, Status, TranscriptPiece, decode
from vlpipe.shared.keys import StreamKeys

RECORDED = Path(__file__).parent / "data" / "turn.jsonl"


def start_egress(
    redis_url: str, prefix: str, *, stderr: Any = subprocess.DEVNULL, **extra: str
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "VLPIPE_REDIS_URL": redis_url,
        "VLPIPE_STREAM_PREFIX": prefix,
        "VLPIPE_HTTP_PORT": "0",
        "VLPIPE_HTTP_HOST": "127.0.0.1",
        "VLPIPE_HEARTBEAT_MS": "200",
        "VLPIPE_BLOCK_MS": "200",
        "VLPIPE_CLAIM_IDLE_MS": "1500",
        "VLPIPE_GATEWAY": "0",
        **extra,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "vlpipe.services.egress"], cwd=ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=stderr,
    )  # fmt: skip


def recorded_turn() -> list[dict[str, Any]]:
    return [json.loads(line) for line in RECORDED.read_text().splitlines()]


class EventFeed:
    """Writes events as the broker does: msgpack `Event` envelopes, numbered from 0."""

    def __init__(self, redis: aioredis.Redis, keys: StreamKeys, sid: str) -> None:
        self.redis, self.keys, self.sid = redis, keys, sid
        self.seq = 0
        self.clock = 1_700_000_000_000.0
        self.sent: list[tuple[str, float]] = []

    def received_at(self, kind: str) -> float:
        """The `received` time given to the first event of this type."""
        return next(at for k, at in self.sent if k == kind)

    async def send(self, event: dict[str, Any], gap_ms: float = 50) -> None:
        event = dict(event)
        audio = None
        if event["type"] == "response.audio.delta":
            audio = base64.b64decode(event.pop("delta"))
        self.clock += gap_ms
        self.sent.append((event["type"], self.clock))
        body = {"v": 1, "session": self.sid, "seq": self.seq, "received": self.clock,
                "type": event["type"], "event": event}  # fmt: skip
        if audio is not None:
            body["audio"] = audio
        await self.redis.execute_command(
            "XADD", self.keys.events(self.sid), "*", "m", msgpack.packb(body, use_bin_type=True)
        )
        self.seq += 1

    async def start(self) -> None:
        await self.send({"type": "vlpipe.session.started", "config": {}})

    async def end(self) -> None:
        await self.send({"type": "vlpipe.session.ended", "reason": "input_ended"})


async def announce(redis: aioredis.Redis, keys: StreamKeys, sid: str, audio_out: str = "pcm16",
                   **config: Any) -> None:  # fmt: skip
    await redis.xadd(keys.sessions, {"type": "start", "session": sid, "audio_out": audio_out,
                                     "config": json.dumps(config)})  # fmt: skip


async def transcript(redis: aioredis.Redis, keys: StreamKeys, sid: str) -> list[TranscriptPiece]:
    return [decode(TranscriptPiece, f) for _, f in await redis.xrange(keys.transcript(sid))]


async def audio_out(redis: aioredis.Redis, keys: StreamKeys, sid: str) -> list[AudioOut]:
    return [decode(AudioOut, f) for _, f in await redis.xrange(keys.audio_out(sid))]


async def status(redis: aioredis.Redis, keys: StreamKeys, sid: str) -> list[Status]:
    return [decode(Status, f) for _, f in await redis.xrange(keys.status(sid))]


def tone_deltas(response_id: str, item_id: str, hz: float, seconds: float,
                rate: int = 24000, chunk_ms: int = 100) -> Iterator[dict[str, Any]]:  # fmt: skip
    t = np.arange(int(rate * seconds)) / rate
    pcm = (0.4 * np.sin(2 * np.pi * hz * t) * 32767).astype("<i2").tobytes()
    step = rate * chunk_ms // 1000 * 2
    for start in range(0, len(pcm), step):
        yield {"type": "response.audio.delta", "response_id": response_id, "item_id": item_id,
               "output_index": 0, "content_index": 0,
               "delta": base64.b64encode(pcm[start : start + step]).decode()}  # fmt: skip


def response_events(response_id: str, item_id: str, status: str = "completed") -> dict[str, Any]:
    return {
        "type": "response.done",
        "response": {"id": response_id, "status": status, "output": []},
    }
