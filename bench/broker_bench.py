"""Broker cost and latency at 1, 100 and 500 sessions, and memory over a long session.

    .venv/bin/python bench/broker_bench.py [--sessions 1 100 500] [--seconds 20]
    .venv/bin/python bench/broker_bench.py --soak 120 [--sessions 20]

Latency mode: the broker runs in this process; a private redis-server, the local engine
(`echo` model) and a producer run as other processes. The producer writes a 20 ms frame
for every session every 20 ms (real-time pace) straight to the frames streams. Sessions
use manual turns and clear their input buffer every 5 s, so the engine only buffers the
audio and the figures are the broker's. Printed per session count: the broker's CPU
microseconds per frame (process CPU time over frames sent) and the added latency from a
frame's arrival on its frames stream (its entry id's time) to its append on the upstream
socket, p50 and p99 (of one batch in ten per session, as the broker samples them).

Soak mode: `--sessions` sessions with server VAD talk to the echo engine for `--soak`
seconds (the sample recording, looped, at real-time pace), and the broker's resident
memory is printed every 10 s: it should stay flat.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import wave
from collections.abc import Callable
from pathlib import Path

import msgpack
import psutil

from vlpipe.services.broker.service import BrokerService
from vlpipe.services.broker.settings import BrokerSettings
from vlpipe.shared import telemetry
from vlpipe.shared.audio import AudioFormat
from vlpipe.shared.contracts import Frame, encode
from vlpipe.shared.keys import StreamKeys
from vlpipe.shared.redis_server import RedisServer, free_port
from vlpipe.shared.service import ServiceContext
from vlpipe.shared.streams import DeadLetters, connect

ROOT = Path(__file__).resolve().parents[1]
FORMAT = AudioFormat.PCM16_16K
FRAME_BYTES = FORMAT.bytes_for_ms(20)


def start_engine() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlpipe.services.engine", "--port", str(port), "--model", "echo"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"{endpoint}/readyz", timeout=1):
                return proc, endpoint
        except OSError:
            time.sleep(0.1)
    raise SystemExit("engine did not start")


def produce(url: str, prefix: str, sids: list[str], seconds: float, audio: bytes) -> None:
    """Producer process: one frame per session every 20 ms, on a real-time schedule."""

    async def run() -> None:
        keys = StreamKeys(prefix)
        redis = connect(url)
        n_frames = int(seconds * 50)
        start = time.monotonic()
        for seq in range(n_frames):
            offset = seq * FRAME_BYTES % max(FRAME_BYTES, len(audio) - FRAME_BYTES)
            chunk = audio[offset : offset + FRAME_BYTES] if audio else b"\0" * FRAME_BYTES
            async with redis.pipeline(transaction=False) as pipe:
                for sid in sids:
                    # The Frame contract's msgpack envelope, packed directly: the producer
                    # shares the CPUs with the broker, so it should cost little.
                    body = {"v": 1, "session": sid, "seq": seq, "format": FORMAT.value,
                            "audio": chunk, "ts": time.time() * 1000}  # fmt: skip
                    pipe.xadd(keys.frames(sid), {"m": msgpack.packb(body)})
                    if seq % 250 == 249 and not audio:
                        pipe.xadd(keys.ctl(sid), {"type": "input_audio_buffer.clear"})
                await pipe.execute()
            delay = start + (seq + 1) * 0.02 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        async with redis.pipeline(transaction=False) as pipe:
            for sid in sids:
                final = Frame(session=sid, seq=n_frames, format=FORMAT, audio=b"", final=True)
                pipe.xadd(keys.frames(sid), encode(final))  # type: ignore[arg-type]
            await pipe.execute()
        await redis.aclose()

    asyncio.run(run())


async def with_broker(
    url: str, keys: StreamKeys, endpoint: str
) -> tuple[BrokerService, asyncio.Event, asyncio.Task[None]]:
    settings = BrokerSettings(
        redis_url=url, stream_prefix=keys.prefix, endpoint=endpoint, read_batch=256,
        block_ms=200, drain_quiet_s=0.2,
    )  # fmt: skip
    redis = connect(url)
    stop = asyncio.Event()
    ctx = ServiceContext(
        name="broker", settings=settings, redis=redis, keys=keys, replica="bench",
        dead=DeadLetters(redis, keys, "broker"), stop=stop,
    )  # fmt: skip
    service = BrokerService(ctx, settings)
    return service, stop, asyncio.create_task(service.run())


async def announce(url: str, keys: StreamKeys, sids: list[str], manual: bool) -> None:
    redis = connect(url)
    config: dict[str, object] = {"input_audio_format": FORMAT.value}
    if manual:
        config["turn_detection"] = None
    async with redis.pipeline(transaction=False) as pipe:
        for sid in sids:
            pipe.xadd(
                keys.sessions, {"type": "start", "session": sid, "config": json.dumps(config)}
            )
        await pipe.execute()
    await redis.aclose()


async def poll(done: Callable[[], bool]) -> None:
    """Wait (without a deadline: a benchmark may be slow) until `done()`."""
    while True:
        if done():
            return
        await asyncio.sleep(0.05)


def percentile(values: list[float], q: int) -> float:
    return (
        statistics.quantiles(values, n=100, method="inclusive")[q - 1]
        if len(values) > 1
        else values[0]
    )


async def latency_run(url: str, endpoint: str, n: int, seconds: float) -> None:
    keys = StreamKeys(f"b{n}x{int(time.time())}")
    sids = [f"s{i}" for i in range(n)]
    service, stop, task = await with_broker(url, keys, endpoint)
    await announce(url, keys, sids, manual=True)
    await poll(lambda: sum(1 for s in service.sessions.values() if s.ws is not None) == n)
    producer = multiprocessing.get_context("spawn").Process(
        target=produce, args=(url, keys.prefix, sids, seconds, b"")
    )
    cpu0 = time.process_time()
    frames0 = service.totals["frames"]
    service.sampled_latency_ms.clear()
    producer.start()
    await asyncio.to_thread(producer.join)
    await poll(lambda: service.totals["frames"] - frames0 >= n * int(seconds * 50))
    cpu = time.process_time() - cpu0
    frames = service.totals["frames"] - frames0
    latencies = list(service.sampled_latency_ms)
    await poll(lambda: not service.sessions)
    stop.set()
    await task
    await service.redis.aclose()
    print(
        f"{n:>4} sessions  {frames:>7} frames  {service.totals['appends']:>7} appends  "
        f"CPU {cpu / frames * 1e6:6.1f} us/frame  latency p50 {percentile(latencies, 50):6.2f} ms  "
        f"p99 {percentile(latencies, 99):7.2f} ms  (of {len(latencies)} sampled batches)",
        flush=True,
    )


def speech() -> bytes:
    with wave.open(str(ROOT / "samples" / "speech-16k-beckett.wav")) as w:
        pcm: bytes = w.readframes(w.getnframes())
    return pcm + b"\0" * 32000 * 2


async def soak_run(url: str, endpoint: str, n: int, seconds: float) -> None:
    keys = StreamKeys(f"soak{int(time.time())}")
    sids = [f"s{i}" for i in range(n)]
    service, stop, task = await with_broker(url, keys, endpoint)
    await announce(url, keys, sids, manual=False)
    producer = multiprocessing.get_context("spawn").Process(
        target=produce, args=(url, keys.prefix, sids, seconds, speech())
    )
    producer.start()
    me = psutil.Process(os.getpid())
    start = time.monotonic()
    print(f"soak: {n} sessions with server VAD for {seconds:.0f} s; broker RSS:", flush=True)
    while producer.is_alive():
        await asyncio.sleep(10)
        gc.collect()
        events = sum(s.core.seq for s in service.sessions.values())
        items = sum(len(s.core.conv.items) for s in service.sessions.values())
        print(
            f"  t={time.monotonic() - start:5.0f} s  RSS {me.memory_info().rss / 2**20:7.1f} MiB  "
            f"events {events:>7}  remembered items {items:>5}  frames {service.totals['frames']:>8}",
            flush=True,
        )
    await poll(lambda: not service.sessions)
    stop.set()
    await task
    await service.redis.aclose()


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sessions", type=int, nargs="+", default=None)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--soak", type=float, default=0.0, help="soak for this many seconds")
    parser.add_argument(
        "--telemetry", choices=["on", "off"], default="on",
        help="on: the OpenTelemetry SDK as the services configure it (metrics served for "
        "Prometheus, spans recorded); off: as with OTEL_SDK_DISABLED=true",
    )  # fmt: skip
    args = parser.parse_args()
    if args.telemetry == "on":
        telemetry.configure("broker")
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp))
        server.start()
        engine, endpoint = start_engine()
        try:
            if args.soak:
                await soak_run(server.url, endpoint, (args.sessions or [20])[0], args.soak)
            else:
                print(
                    f"{psutil.cpu_count()} CPUs; {args.seconds:.0f} s of audio per session; "
                    f"telemetry {args.telemetry}",
                    flush=True,
                )
                for n in args.sessions or [1, 100, 500]:
                    await latency_run(server.url, endpoint, n, args.seconds)
        finally:
            engine.terminate()
            engine.wait()
            server.stop()


if __name__ == "__main__":
    asyncio.run(main())
