"""Cost of following per-session streams at real-time pace: one SessionStreamReader.

    .venv/bin/python bench/reader_bench.py [--sessions 25 250] [--seconds 10]
        [--handler async|plain]

For each session count N: a producer process adds one 20 ms frame (960 B of audio, as a
`Frame` contract, about 1 KB) to each of N streams every 20 ms, all N in one pipeline per
tick (as N live callers would, not a bulk load). This process runs one
`SessionStreamReader` over the N streams with a trivial handler (it counts entries), and
prints, over `--seconds` after a warm-up:

* reader CPU us/entry: user+sys of this process (the producer is another process) per
  entry delivered to a handler;
* redis CPU us/entry: the redis-server process's user+sys per entry (its share of the
  producer's XADDs included);
* XREADs/tick: how many reads the reader needed per 20 ms tick (from `INFO commandstats`);
* lag p50/p99 ms: from an entry's id (the server's clock at XADD) to its handler.

The redis-server is private (`RedisServer`, AOF as in production) and on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import redis as sync_redis

from vlpipe.shared.audio import AudioFormat
from vlpipe.shared.contracts import Frame, encode
from vlpipe.shared.keys import StreamKeys
from vlpipe.shared.redis_server import RedisServer
from vlpipe.shared.streams import DeadLetters, Entry, SessionStreamReader, connect, entry_ms

TICK_S = 0.020


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def stream_keys(n: int) -> list[str]:
    keys = StreamKeys("bench")
    return [keys.frames(f"s{i}") for i in range(n)]


def produce(url: str, n: int, seconds: float) -> None:
    """The producer process: one entry per stream per tick, one pipeline per tick."""
    client = sync_redis.Redis.from_url(url)
    fields: Any = encode(Frame(session="s", seq=1, format=AudioFormat.PCM16, audio=b"\x01" * 960))
    keys = stream_keys(n)
    start = time.monotonic()
    late = 0
    tick = 0
    while (now := time.monotonic()) - start < seconds:
        due = start + tick * TICK_S
        if due > now:
            time.sleep(due - now)
        elif now - due > TICK_S:
            late += 1
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.xadd(key, fields, maxlen=500, approximate=True)
        pipe.execute()
        tick += 1
    if late:
        print(f"  (producer: {late} of {tick} ticks more than one tick late)", file=sys.stderr)


def xread_calls(client: sync_redis.Redis) -> int:
    stats: Any = client.info("commandstats")
    return int(stats.get("cmdstat_xread", {}).get("calls", 0))


async def one_run(
    server: RedisServer, n: int, seconds: float, warmup: float, plain: bool
) -> tuple[float, float, float, float, float, int]:
    url = server.url
    redis = connect(url)
    admin = sync_redis.Redis.from_url(url)
    admin.flushall()
    keys = stream_keys(n)
    lags: list[float] = []
    delivered = 0
    sample = keys[0]

    def count(key: str, entries: list[Entry]) -> None:
        nonlocal delivered
        delivered += len(entries)
        if key == sample:
            lags.append(time.time() * 1000 - entry_ms(entries[-1].id))

    async def count_async(key: str, entries: list[Entry]) -> None:
        count(key, entries)

    reader = SessionStreamReader(
        redis, wake_key="bench:wake", dead=DeadLetters(redis, StreamKeys("bench"), "bench"),
        count=64, block_ms=1000,
    )  # fmt: skip
    handler: Any = count if plain else count_async
    for key in keys:
        reader.add(key, "0-0", handler)
    stop = asyncio.Event()
    reading = asyncio.create_task(reader.run(stop))
    producer = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--produce", url, str(n), str(seconds + warmup + 1)
    )
    assert server.proc is not None  # started
    redis_proc = psutil.Process(server.proc.pid)
    try:
        await asyncio.sleep(warmup)
        c0, d0, x0 = cpu_s(), delivered, xread_calls(admin)
        r0, t0 = sum(redis_proc.cpu_times()[:2]), time.monotonic()
        lags.clear()
        await asyncio.sleep(seconds)
        cpu, got = cpu_s() - c0, delivered - d0
        redis_cpu = sum(redis_proc.cpu_times()[:2]) - r0
        ticks = (time.monotonic() - t0) / TICK_S
        reads = xread_calls(admin) - x0
    finally:
        await producer.wait()
        stop.set()
        reader.wake()
        await reading
        await redis.aclose()
        admin.close()
    lags.sort()
    p50 = statistics.median(lags) if lags else float("nan")
    p99 = lags[int(len(lags) * 0.99)] if lags else float("nan")
    return cpu / got * 1e6, redis_cpu / got * 1e6, reads / ticks, p50, p99, got


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, nargs="+", default=[25, 250])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--handler", choices=["async", "plain"], default="async")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp))
        server.start()
        try:
            print(
                f"one SessionStreamReader, one ~1 KB entry per session every 20 ms, "
                f"{args.handler} handler, {args.seconds:.0f} s measured"
            )
            print(
                f"{'sessions':>8} {'entries':>8} {'reader CPU us/entry':>20} "
                f"{'redis CPU us/entry':>19} {'XREADs/tick':>12} {'lag p50/p99 ms':>15}"
            )
            for n in args.sessions:
                reader, redis_cpu, reads, p50, p99, got = await one_run(
                    server, n, args.seconds, args.warmup, args.handler == "plain"
                )
                print(
                    f"{n:>8} {got:>8} {reader:>20.1f} {redis_cpu:>19.1f} {reads:>12.2f} "
                    f"{f'{p50:.1f}/{p99:.1f}':>15}"
                )
        finally:
            server.stop()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--produce":
        produce(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
    else:
        asyncio.run(main())
