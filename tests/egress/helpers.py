"""Feeding egress with event sequences (raw XADDs), reading its outputs, and its gateway."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import redis.asyncio as aioredis
import websockets
from websockets.asyncio.client import connect

from tests.shared.procs import ROOT
from tests.waiting import wait_until
from vlpipe.shared.contracts import AudioOut, Status, TranscriptPiece, decode
from vlpipe.shared.keys import StreamKeys
from vlpipe.shared.redis_server import free_port

TOKEN = "gw-token-1"
"""The gateway's static operator token (admin scope)."""
SIGNING_KEY = "gateway-test-signing-key-0123456789"

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


class GatewayProc:
    """An egress process serving the gateway, with a static operator token and a signing key
    unless `env` says otherwise, and its metrics at `metrics()`."""

    def __init__(self, redis_url: str, prefix: str, **env: str) -> None:
        self.port = free_port()
        self.http_port = free_port()
        settings = {"VLPIPE_GATEWAY": "1", "VLPIPE_GATEWAY_PORT": str(self.port),
                    "VLPIPE_HTTP_PORT": str(self.http_port), "VLPIPE_GATEWAY_TOKENS": TOKEN,
                    "VLPIPE_GATEWAY_SIGNING_KEY": SIGNING_KEY, **env}  # fmt: skip
        self.proc = start_egress(redis_url, prefix, **{k: v for k, v in settings.items() if v})

    def url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def connect(self, path: str, token: str | None = TOKEN, **options: Any) -> connect:
        """A client socket to `path`, its token in the Authorization header."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return websockets.connect(self.url(path), additional_headers=headers, **options)

    async def ready(self) -> None:
        async def listening() -> bool:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                return False
            writer.close()
            return True

        await wait_until(listening, within=30)

    async def metric(self, name: str, **labels: str) -> float:
        return await prometheus_value(self.http_port, name, **labels)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(20) == 0


async def prometheus_value(port: int, name: str, **labels: str) -> float:
    """A Prometheus metric of the process serving /metrics on `port`, summed over the
    samples with these labels (0 when there is none)."""

    def fetch() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            text: str = reply.read().decode()
            return text

    total = 0.0
    for sample, raw_labels, value in re.findall(
        r"^([a-z_]+)(?:\{([^}]*)\})? ([0-9.e+-]+)$", await asyncio.to_thread(fetch), re.M
    ):
        found = dict(re.findall(r'([a-z_]+)="([^"]*)"', raw_labels))
        if sample == name and all(found.get(k) == v for k, v in labels.items()):
            total += float(value)
    return total
