"""Driving the broker in tests: sessions, frames and controls as stream entries, events out."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import wave
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from tests.shared.procs import ROOT
from tests.waiting import wait_until
from vlpipe.services.broker.service import BrokerService
from vlpipe.services.broker.settings import BrokerSettings
from vlpipe.shared.audio import AudioFormat
from vlpipe.shared.contracts import Event, Frame, Status, decode, encode
from vlpipe.shared.keys import StreamKeys
from vlpipe.shared.service import ServiceContext
from vlpipe.shared.streams import DeadLetters, connect

FAST = {
    "heartbeat_ms": 200,
    "block_ms": 200,
    "claim_idle_ms": 1500,
    "drain_quiet_s": 0.5,
}


def broker_env(redis_url: str, prefix: str, endpoint: str, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "VLPIPE_REDIS_URL": redis_url,
        "VLPIPE_STREAM_PREFIX": prefix,
        "VLPIPE_HTTP_PORT": "0",
        "VLPIPE_HTTP_HOST": "127.0.0.1",
        "VLPIPE_BROKER_ENDPOINT": endpoint,
        **{f"VLPIPE_{k.upper()}": str(v) for k, v in FAST.items() if k != "drain_quiet_s"},
        "VLPIPE_BROKER_DRAIN_QUIET_S": "0.5",
        **extra,
    }


def start_broker(
    redis_url: str, prefix: str, endpoint: str, *, stderr: Any = subprocess.DEVNULL, **extra: str
) -> subprocess.Popen[bytes]:
    """One broker replica as a real process."""
    return subprocess.Popen(
        [sys.executable, "-m", "vlpipe.services.broker"],
        cwd=ROOT,
        env=broker_env(redis_url, prefix, endpoint, **extra),
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )


@asynccontextmanager
async def running_broker(
    redis_url: str, keys: StreamKeys, endpoint: str, credential: Any = None, **settings: Any
) -> AsyncIterator[BrokerService]:
    """A broker inside the test's event loop (for a credential object of the test's own)."""
    config = BrokerSettings(
        redis_url=redis_url, stream_prefix=keys.prefix, endpoint=endpoint,
        **{**FAST, **settings},
    )  # fmt: skip
    redis = connect(redis_url, cluster=config.redis_cluster)
    stop = asyncio.Event()
    ctx = ServiceContext(
        name="broker", settings=config, redis=redis, keys=keys, replica="broker-test",
        dead=DeadLetters(redis, keys, "broker"), stop=stop,
    )  # fmt: skip
    service = BrokerService(ctx, config, credential=credential)
    task = asyncio.create_task(service.run())
    try:
        yield service
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
        await redis.aclose()


async def start_session(redis: aioredis.Redis, keys: StreamKeys, sid: str, **config: Any) -> None:
    config.setdefault("input_audio_format", "pcm16_16000hz")
    await redis.xadd(keys.sessions, {"type": "start", "session": sid, "config": json.dumps(config)})


def read_wav(path: Path) -> bytes:
    with wave.open(str(path)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
        return w.readframes(w.getnframes())


def silence(ms: int, rate: int = 16000) -> bytes:
    return b"\0\0" * (rate * ms // 1000)


class FrameWriter:
    """Writes frames as ingest does: 20 ms each, numbered from 0, then the final marker."""

    def __init__(self, redis: aioredis.Redis, keys: StreamKeys, sid: str,
                 fmt: AudioFormat = AudioFormat.PCM16_16K) -> None:  # fmt: skip
        self.redis, self.keys, self.sid, self.fmt = redis, keys, sid, fmt
        self.seq = 0

    async def write(self, pcm: bytes, pace: float = 0.0) -> None:
        size = self.fmt.bytes_for_ms(20)
        for start in range(0, len(pcm) - size + 1, size):
            frame = Frame(
                session=self.sid, seq=self.seq, format=self.fmt, audio=pcm[start : start + size]
            )
            await self.redis.xadd(self.keys.frames(self.sid), encode(frame))  # type: ignore[arg-type]
            self.seq += 1
            if pace:
                await asyncio.sleep(0.02 / pace)

    async def finish(self) -> None:
        frame = Frame(session=self.sid, seq=self.seq, format=self.fmt, audio=b"", final=True)
        await self.redis.xadd(self.keys.frames(self.sid), encode(frame))  # type: ignore[arg-type]


async def control(redis: aioredis.Redis, keys: StreamKeys, sid: str, **fields: Any) -> None:
    """A control message written as any producer would: plain fields."""
    await redis.xadd(
        keys.ctl(sid),
        {k: json.dumps(v) if isinstance(v, dict | list) else str(v) for k, v in fields.items()},
    )


async def events(redis: aioredis.Redis, keys: StreamKeys, sid: str) -> list[Event]:
    return [decode(Event, f) for _, f in await redis.xrange(keys.events(sid))]


async def statuses(redis: aioredis.Redis, keys: StreamKeys, sid: str) -> list[Status]:
    return [decode(Status, f) for _, f in await redis.xrange(keys.status(sid))]


async def wait_for_event(
    redis: aioredis.Redis, keys: StreamKeys, sid: str,
    match: str | Callable[[Event], bool], within: float = 30, count: int = 1,
) -> list[Event]:  # fmt: skip
    """Wait until `count` events match (a type, or a predicate); returns every event."""
    test = (lambda e: e.type == match) if isinstance(match, str) else match
    seen: list[Event] = []

    async def arrived() -> bool:
        nonlocal seen
        seen = await events(redis, keys, sid)
        return sum(1 for e in seen if test(e)) >= count

    await wait_until(arrived, within=within, step=0.1)
    return seen


def types(evs: list[Event]) -> list[str]:
    return [e.type for e in evs]


def assert_in_order(evs: list[Event]) -> None:
    """Per-session numbering: from 0, no gap, no repeat."""
    assert [e.seq for e in evs] == list(range(len(evs)))
