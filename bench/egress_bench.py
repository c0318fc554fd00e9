"""Egress cost and latency at 1, 100 and 500 sessions.

    .venv/bin/python bench/egress_bench.py [--sessions 1 100 500] [--seconds 20]

One egress replica (with its gateway) runs as a subprocess against a private
redis-server. A feeder process writes, for every session, a 100 ms `response.audio.delta`
event of 24 kHz PCM16 every 100 ms (real-time pace) to the events stream, as the broker
does; this process holds one subscriber WebSocket per session. Each chunk carries its
write time in its first 8 bytes (the session's audio_out is the upstream's format, so the
bytes arrive unchanged). Printed per session count: egress CPU per second of audio
delivered (the whole process: events to transcripts and audio-out, and the gateway's
fan-out), and the added latency from the event's write to the WebSocket client, p50 and
p99.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import signal
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack
import psutil
import websockets

from vlpipe.shared.keys import StreamKeys
from vlpipe.shared.redis_server import RedisServer, free_port
from vlpipe.shared.streams import connect

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 2400 * 2  # 100 ms of 24 kHz PCM16


def feed(url: str, prefix: str, sids: list[str], seconds: float) -> None:
    async def run() -> None:
        keys = StreamKeys(prefix)
        redis = connect(url)
        n = int(seconds * 10)
        start = time.monotonic()
        for k in range(n + 2):
            async with redis.pipeline(transaction=False) as pipe:
                for sid in sids:
                    now = time.time() * 1000
                    event: dict[str, Any]
                    if k == 0:
                        event = {"type": "vlpipe.session.started", "config": {}}
                        audio = None
                    elif k <= n:
                        event = {"type": "response.audio.delta", "response_id": "resp_1",
                                 "item_id": "item_1", "output_index": 0, "content_index": 0}  # fmt: skip
                        audio = struct.pack("<d", now) + bytes(CHUNK - 8)
                    else:
                        event = {"type": "vlpipe.session.ended", "reason": "bench"}
                        audio = None
                    body = {"v": 1, "session": sid, "seq": k, "received": now,
                            "type": event["type"], "event": event}  # fmt: skip
                    if audio is not None:
                        body["audio"] = audio
                    pipe.xadd(keys.events(sid), {"m": msgpack.packb(body, use_bin_type=True)})
                await pipe.execute()
            delay = start + (k + 1) * 0.1 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        await redis.aclose()

    asyncio.run(run())


async def client(port: int, sid: str, latencies: list[float], counts: dict[str, int]) -> None:
    url = f"ws://127.0.0.1:{port}/v1/subscribe?session={sid}&format=pcm16"
    async with websockets.connect(url, max_size=None) as ws:
        counts["connected"] += 1
        async for message in ws:
            if isinstance(message, bytes):
                sent = struct.unpack("<d", message[:8])[0]
                latencies.append(time.time() * 1000 - sent)
                counts["chunks"] += 1
            elif json.loads(message).get("message") == "ended":
                return


async def run(url: str, n: int, seconds: float) -> None:
    prefix = f"eb{n}x{int(time.time())}"
    keys = StreamKeys(prefix)
    port = free_port()
    env = {**os.environ, "VLPIPE_REDIS_URL": url, "VLPIPE_STREAM_PREFIX": prefix,
           "VLPIPE_HTTP_PORT": "0", "VLPIPE_GATEWAY_PORT": str(port), "VLPIPE_BLOCK_MS": "200",
           "VLPIPE_GATEWAY_CLIENT_BUFFER": "1000", "VLPIPE_LOG_LEVEL": "WARNING"}  # fmt: skip
    egress = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "vlpipe.services.egress", cwd=ROOT, env=env
    )
    redis = connect(url)
    sids = [f"s{i}" for i in range(n)]
    for _ in range(300):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            break
        except OSError:
            await asyncio.sleep(0.1)
    async with redis.pipeline(transaction=False) as pipe:
        for sid in sids:
            pipe.xadd(keys.sessions, {"type": "start", "session": sid, "audio_out": "pcm16"})
        await pipe.execute()
    latencies: list[float] = []
    counts = {"connected": 0, "chunks": 0}
    clients = [asyncio.create_task(client(port, sid, latencies, counts)) for sid in sids]
    while True:
        if counts["connected"] == n:
            break
        await asyncio.sleep(0.05)
    proc = psutil.Process(egress.pid)
    cpu0 = sum(proc.cpu_times()[:2])
    feeder = multiprocessing.get_context("spawn").Process(
        target=feed, args=(url, prefix, sids, seconds)
    )
    feeder.start()
    await asyncio.gather(*clients)
    cpu = sum(proc.cpu_times()[:2]) - cpu0
    await asyncio.to_thread(feeder.join)
    egress.send_signal(signal.SIGTERM)
    await egress.wait()
    await redis.aclose()
    audio_s = counts["chunks"] / 10
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    print(f"{n:>4} sessions  {audio_s:8.0f} audio-s delivered  CPU {cpu / audio_s * 1000:6.2f} ms per "
          f"audio-second  latency p50 {q[49]:7.2f} ms  p99 {q[98]:7.2f} ms", flush=True)  # fmt: skip


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 100, 500])
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp))
        server.start()
        try:
            print(
                f"{psutil.cpu_count()} CPUs; {args.seconds:.0f} s of audio per session", flush=True
            )
            for n in args.sessions:
                await run(server.url, n, args.seconds)
        finally:
            server.stop()


if __name__ == "__main__":
    asyncio.run(main())
