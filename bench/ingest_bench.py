"""Ingest cost: CPU per 20 ms frame for each input format, and frames/s through Redis.

    .venv/bin/python bench/ingest_bench.py [--seconds 60]

Part 1 runs the pure normalizer in this process (CPU time per output frame, 24 kHz PCM16
target), and the cost and size of the snapshot the service checkpoints with each write
(taken here after every chunk, as a replica writing one chunk per batch would). Part 2 starts one ingest replica as a subprocess against a private redis-server,
publishes `--seconds` of 16 kHz PCM16 as fast as possible, and reports frames/s from the
first frame to the final marker and the replica's CPU per frame.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from vlpipe.services.ingest.normalize import Normalizer
from vlpipe.shared.audio import AudioFormat, pcm16_to_alaw, pcm16_to_ulaw
from vlpipe.shared.contracts import Frame, InputFormat, RawAudio, decode
from vlpipe.shared.redis_server import RedisServer
from vlpipe.shared.streams import connect

ROOT = Path(__file__).resolve().parents[1]


def signal(rate: int, seconds: float) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return 0.3 * np.sin(2 * np.pi * 440 * t)


def chunks_for(fmt: str, seconds: float) -> list[RawAudio]:
    def pcm(rate: int) -> bytes:
        return (signal(rate, seconds) * 32767).astype("<i2").tobytes()

    if fmt == "pcm16 16k":
        data, step = pcm(16000), 3200
        return [RawAudio(audio=data[i : i + step], rate=16000) for i in range(0, len(data), step)]
    if fmt == "pcm16 48k stereo":
        mono = signal(48000, seconds)
        data = (np.column_stack([mono, mono]).reshape(-1) * 32767).astype("<i2").tobytes()
        return [
            RawAudio(audio=data[i : i + 19200], rate=48000, channels=2)
            for i in range(0, len(data), 19200)
        ]
    if fmt == "f32 44.1k":
        data = signal(44100, seconds).astype("<f4").tobytes()
        return [
            RawAudio(audio=data[i : i + 17640], format=InputFormat.F32, rate=44100)
            for i in range(0, len(data), 17640)
        ]
    if fmt in ("g711 ulaw", "g711 alaw"):
        encode = pcm16_to_ulaw if fmt == "g711 ulaw" else pcm16_to_alaw
        data = encode(pcm(8000))
        f = InputFormat.G711_ULAW if fmt == "g711 ulaw" else InputFormat.G711_ALAW
        return [RawAudio(audio=data[i : i + 160], format=f) for i in range(0, len(data), 160)]
    if fmt in ("ogg opus", "webm opus", "mp3"):
        import io

        import av

        container, codec, rate = {
            "ogg opus": ("ogg", "libopus", 48000),
            "webm opus": ("webm", "libopus", 48000),
            "mp3": ("mp3", "libmp3lame", 44100),
        }[fmt]
        buf = io.BytesIO()
        with av.open(buf, "w", format=container) as out:
            stream = out.add_stream(codec, rate=rate)
            stream.layout = "mono"  # type: ignore[union-attr]
            frame = av.AudioFrame.from_ndarray(
                (signal(rate, seconds) * 32767).astype("<i2").reshape(1, -1),
                format="s16",
                layout="mono",
            )
            frame.sample_rate = rate
            for packet in [*stream.encode(frame), *stream.encode(None)]:  # type: ignore[union-attr,arg-type]
                out.mux(packet)
        data = buf.getvalue()
        kind = InputFormat(container)
        return [RawAudio(audio=data[i : i + 2000], format=kind) for i in range(0, len(data), 2000)]
    raise ValueError(fmt)


def bench_normalizer(seconds: float) -> None:
    print(f"normalizer, {seconds:.0f} s of audio per format, target pcm16 24 kHz, 20 ms frames")
    print(f"{'input':<18} {'us CPU/frame':>13} {'us/snapshot':>12} {'carry bytes':>12}")
    for fmt in ("pcm16 16k", "pcm16 48k stereo", "f32 44.1k", "g711 ulaw", "g711 alaw",
                "ogg opus", "webm opus", "mp3"):  # fmt: skip
        chunks = chunks_for(fmt, seconds)
        norm = Normalizer(AudioFormat.PCM16)
        start = time.process_time()
        frames = sum(len(norm.push(c)) for c in chunks) + len(norm.flush())
        cpu = time.process_time() - start
        norm, snapshot_cpu, carry = Normalizer(AudioFormat.PCM16), 0.0, 0
        for c in chunks:
            norm.push(c)
            start = time.process_time()
            carry += len(norm.snapshot()["carry"])
            snapshot_cpu += time.process_time() - start
        print(f"{fmt:<18} {cpu / frames * 1e6:>13.1f} {snapshot_cpu / len(chunks) * 1e6:>12.1f}"
              f" {carry / len(chunks):>12.0f}")  # fmt: skip


async def bench_service(seconds: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp))
        server.start()
        env = {**os.environ, "VLPIPE_REDIS_URL": server.url, "VLPIPE_STREAM_PREFIX": "bench",
               "VLPIPE_HTTP_PORT": "0", "VLPIPE_HTTP_HOST": "127.0.0.1", "VLPIPE_LOG_LEVEL": "WARNING"}  # fmt: skip
        proc = subprocess.Popen(  # noqa: ASYNC220 - started once, before the measurement
            [sys.executable, "-m", "vlpipe.services.ingest"], cwd=ROOT, env=env
        )
        redis = connect(server.url)
        try:
            await asyncio.sleep(1.5)
            ps = psutil.Process(proc.pid)
            cpu0 = sum(ps.cpu_times()[:2])
            await redis.xadd("bench:sessions", {"type": "start", "session": "b1"})
            chunks = chunks_for("pcm16 16k", seconds)
            started = time.perf_counter()
            async with redis.pipeline(transaction=False) as pipe:
                for c in chunks:
                    pipe.xadd(
                        "bench:audio:{b1}", {"audio": c.audio, "format": "pcm16", "rate": "16000"}
                    )
                await pipe.execute()
            await redis.xadd("bench:sessions", {"type": "end", "session": "b1"})
            while True:
                last = await redis.xrevrange("bench:frames:{b1}", count=1)
                if last and decode(Frame, last[0][1] or {}).final:
                    break
                await asyncio.sleep(0.02)
            wall = time.perf_counter() - started
            frames = await redis.xlen("bench:frames:{b1}")
            cpu = sum(ps.cpu_times()[:2]) - cpu0
            print(
                f"\none ingest replica through Redis: {seconds:.0f} s of 16 kHz PCM16 in 100 ms chunks"
            )
            print(f"frames: {frames}, {frames / wall:.0f} frames/s ({frames / wall / 50:.0f}x real time "
                  f"for one session), replica CPU {cpu / frames * 1e6:.1f} us/frame")  # fmt: skip
        finally:
            proc.terminate()
            proc.wait(20)
            await redis.aclose()
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    bench_normalizer(args.seconds)
    asyncio.run(bench_service(args.seconds))


if __name__ == "__main__":
    main()
