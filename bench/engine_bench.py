"""Benchmark of the local engine: turn latency and CPU per session-minute.

Starts `python -m vlpipe.services.engine` as a subprocess (so that its CPU is measured
alone, with psutil), then for each concurrency level runs that many sessions at once. Each
session streams, at real-time pace, turns of "Ever tried." (1.4 s of the test recording)
followed by 3 s of silence, as 24 kHz PCM16 in 40 ms appends. Session starts are spread
over one turn so that turns do not all end at the same instant.

Printed per model and concurrency:
- turn latency: client-side time from `input_audio_buffer.speech_stopped` to the first
  `response.audio.delta` of the answer, p50 and p95 (ms);
- engine CPU seconds per session-minute of streamed audio (100 = one full core).

    .venv/bin/python bench/engine_bench.py --models local,echo --sessions 1,10,50
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request
import wave
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import soxr
from websockets.asyncio.client import connect

ROOT = Path(__file__).resolve().parents[1]
SPEECH = ROOT / "samples" / "speech-16k-beckett.wav"
RATE = 24000
FRAME_MS = 40
PHRASE_MS = 1400  # "Ever tried."
PAUSE_MS = 3000


@dataclass
class SessionResult:
    latencies_ms: list[float] = field(default_factory=list)
    turns: int = 0
    streamed_s: float = 0.0


def load_turn() -> bytes:
    """One turn of input: the phrase then silence, PCM16 mono 24 kHz."""
    with wave.open(str(SPEECH)) as wav:
        pcm = wav.readframes(wav.getnframes())
    phrase = np.frombuffer(pcm, dtype="<i2")[: 16 * PHRASE_MS]
    audio: bytes = soxr.resample(phrase, 16000, RATE).astype("<i2").tobytes()
    return audio + b"\0\0" * (RATE * PAUSE_MS // 1000)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_engine(model: str, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "VLPIPE_LOG_LEVEL": "WARNING"}
    command = [sys.executable, "-m", "vlpipe.services.engine", "--port", str(port)]
    engine = subprocess.Popen([*command, "--model", model], cwd=ROOT, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as reply:
                if reply.status == 200:
                    return engine
        except OSError:
            time.sleep(0.2)
    engine.kill()
    raise RuntimeError("engine did not become ready")


async def run_session(url: str, turn: bytes, turns: int, delay_s: float) -> SessionResult:
    result = SessionResult()
    await asyncio.sleep(delay_s)
    async with connect(url, max_size=None) as ws:
        last_stop: float | None = None
        answered: set[str] = set()

        async def receive() -> None:
            nonlocal last_stop
            async for message in ws:
                event = json.loads(message)
                kind = event["type"]
                if kind == "input_audio_buffer.speech_stopped":
                    last_stop = time.perf_counter()
                elif kind == "response.audio.delta" and event["response_id"] not in answered:
                    answered.add(event["response_id"])
                    if last_stop is not None:
                        result.latencies_ms.append((time.perf_counter() - last_stop) * 1000)
                        last_stop = None

        receiver = asyncio.create_task(receive())
        step = RATE * 2 * FRAME_MS // 1000
        began = time.perf_counter()
        frames = 0
        for _ in range(turns):
            for start in range(0, len(turn), step):
                audio = base64.b64encode(turn[start : start + step]).decode()
                await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))
                frames += 1
                await asyncio.sleep(
                    max(0.0, began + frames * FRAME_MS / 1000 - time.perf_counter())
                )
            result.turns += 1
        result.streamed_s = time.perf_counter() - began
        await asyncio.sleep(2.0)  # let the last answer start
        receiver.cancel()
    return result


async def run_level(url: str, sessions: int, turns: int) -> list[SessionResult]:
    turn = load_turn()
    spread_s = len(turn) / (RATE * 2)
    rng = random.Random(sessions)
    return await asyncio.gather(
        *(run_session(url, turn, turns, rng.uniform(0, spread_s)) for _ in range(sessions))
    )


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="local,echo")
    parser.add_argument("--sessions", default="1,10,50", help="concurrency levels")
    parser.add_argument("--turns", type=int, default=3, help="turns per session (2 at >= 50)")
    args = parser.parse_args()
    print(
        f"{'model':<6} {'sessions':>8} {'turns':>6} {'answered':>8} {'p50 ms':>8} "
        f"{'p95 ms':>8} {'CPU s/session-min':>18}"
    )
    for model in args.models.split(","):
        port = free_port()
        engine = start_engine(model, port)
        process = psutil.Process(engine.pid)
        url = f"ws://127.0.0.1:{port}/voice-live/realtime?api-version=2025-10-01&model={model}"
        try:
            for level in (int(n) for n in args.sessions.split(",")):
                turns = min(args.turns, 2) if level >= 50 else args.turns
                before = process.cpu_times()
                results = asyncio.run(run_level(url, level, turns))
                after = process.cpu_times()
                cpu_s = (after.user - before.user) + (after.system - before.system)
                session_min = sum(r.streamed_s for r in results) / 60
                latencies = [ms for r in results for ms in r.latencies_ms]
                total_turns = sum(r.turns for r in results)
                print(
                    f"{model:<6} {level:>8} {total_turns:>6} {len(latencies):>8} "
                    f"{percentile(latencies, 0.5):>8.0f} {percentile(latencies, 0.95):>8.0f} "
                    f"{cpu_s / session_min:>18.2f}",
                    flush=True,
                )
        finally:
            engine.terminate()
            engine.wait(timeout=15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
