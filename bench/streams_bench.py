"""Cost of one hop through the stream runtime: XADD by a producer, GroupConsumer to ack.

Prints, for a few batch sizes: messages/s through one consumer, and the consumer
process's CPU time per message (user+sys of this process, which runs the consumer; the
producer pipelines its XADDs from a second connection in the same loop, so its share is
reported separately by timing a produce-only pass first).

    .venv/bin/python bench/streams_bench.py [--messages 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis

from vlpipe.shared.audio import AudioFormat
from vlpipe.shared.contracts import Fields, Frame, decode, encode
from vlpipe.shared.keys import StreamKeys
from vlpipe.shared.redis_server import RedisServer
from vlpipe.shared.streams import DeadLetters, Entry, GroupConsumer, connect


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def produce(redis: aioredis.Redis, key: str, n: int, fields: Fields) -> None:
    for start in range(0, n, 500):
        async with redis.pipeline(transaction=False) as pipe:
            for _ in range(min(500, n - start)):
                pipe.xadd(key, fields)  # type: ignore[arg-type]  # (stub: keys invariant)
            await pipe.execute()


async def one_run(url: str, n: int, batch: int) -> tuple[float, float, float]:
    redis = connect(url)
    keys = StreamKeys(f"bench{batch}")
    frame = Frame(session="s1", seq=1, format=AudioFormat.PCM16, audio=b"\x01" * 960)
    fields = encode(frame)
    c0 = cpu_s()
    await produce(redis, keys.frames("s1"), n, fields)
    produce_cpu = cpu_s() - c0
    done = asyncio.Event()
    count = 0

    async def handle(entry: Entry) -> None:
        nonlocal count
        decode(Frame, entry.fields)  # the validation every real handler pays
        count += 1
        if count == n:
            done.set()

    consumer = GroupConsumer(
        redis, streams=[keys.frames("s1")], group="g", consumer="c", handler=handle,
        dead=DeadLetters(redis, keys, "bench"), batch=batch, block_ms=100,
    )  # fmt: skip
    stop = asyncio.Event()
    c1, t1 = cpu_s(), time.perf_counter()
    task = asyncio.create_task(consumer.run(stop))
    await done.wait()
    wall = time.perf_counter() - t1
    cpu = cpu_s() - c1
    stop.set()
    await task
    await redis.aclose()
    return n / wall, cpu / n * 1e6, produce_cpu / n * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=20_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp))
        server.start()
        try:
            print(
                f"one hop, {args.messages} frames of 20 ms PCM16 24 kHz (960 B), redis on loopback"
            )
            print(
                f"{'batch':>6} {'msgs/s':>10} {'consumer CPU us/msg':>20} {'producer CPU us/msg':>20}"
            )
            for batch in (1, 16, 64, 256):
                rate, cons, prod = await one_run(server.url, args.messages, batch)
                print(f"{batch:>6} {rate:>10.0f} {cons:>20.1f} {prod:>20.1f}")
        finally:
            server.stop()


if __name__ == "__main__":
    asyncio.run(main())
