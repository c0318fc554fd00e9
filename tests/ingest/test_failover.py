"""Two ingest replicas; the owner of a session is killed; the frames stay continuous and,
for WAV and compressed streams too, nothing in flight is lost."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import wave

import numpy as np
import redis.asyncio as aioredis

from tests.ingest.test_service import wait_for_final_frame
from tests.shared.procs import ROOT
from tests.waiting import wait_until
from vlpipe.services.ingest.normalize import Normalizer
from vlpipe.shared.audio import AudioFormat
from vlpipe.shared.contracts import Frame, RawAudio, decode
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
        # The owner died before the end, so the survivor finished and released the session
        # (the release is the write after the final frame's).
        await wait_until(lambda: _done(redis, keys, sid))
        assert replicas[owner].returncode == -signal.SIGKILL
        # 6 s of audio in; a takeover may lose at most the dead owner's partial frame.
        assert abs(len(frames) - 1 - 300) <= 2
    finally:
        for proc in replicas.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(20)


def _wav(seconds: float) -> bytes:
    """A 16 kHz stereo WAV of a tone over noise (stereo: a sample is 4 bytes to keep whole)."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as wav:
        wav.setnchannels(2)
        wav.setsampwidth(2)
        wav.setframerate(16000)
        t = np.arange(int(16000 * seconds)) / 16000
        mono = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.02 * np.random.default_rng(1).standard_normal(
            len(t)
        )
        wav.writeframes((np.repeat(mono, 2) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


async def test_wav_and_ogg_opus_streams_taken_over_mid_stream_lose_nothing(
    redis: aioredis.Redis, redis_url: str, keys: StreamKeys
) -> None:
    # Before snapshots were checkpointed, every WAV chunk after a takeover was refused
    # ("WAV data before any WAV header") and an Ogg stream's rest was undecodable.
    from tests.ingest.test_normalize import compressed

    streams = {
        "takeover-wav": ("wav", _wav(6.0), 3001),  # odd chunks: samples cut in two
        "takeover-ogg": ("ogg", compressed(_tone_pcm(48000, 6.0), 48000, "ogg", "libopus"), 997),
    }
    chunks = {
        sid: [data[i : i + size] for i in range(0, len(data), size)]
        for sid, (_, data, size) in streams.items()
    }
    replicas = {"A": start_replica("A", redis_url, keys.prefix)}
    try:
        await asyncio.sleep(1.0)
        for sid in streams:
            await redis.xadd(keys.sessions, {"type": "start", "session": sid})

        async def feed(sid: str, part: slice) -> None:
            fmt = streams[sid][0]
            for chunk in chunks[sid][part]:
                await redis.xadd(keys.audio(sid), {"audio": chunk, "format": fmt})
                await asyncio.sleep(0.01)

        halves = {sid: len(c) // 2 for sid, c in chunks.items()}
        await asyncio.gather(*(feed(sid, slice(0, halves[sid])) for sid in streams))

        async def both_framed() -> bool:
            return all([await redis.xlen(keys.frames(sid)) > 0 for sid in streams])

        await wait_until(both_framed)
        replicas["B"] = start_replica("B", redis_url, keys.prefix)
        await asyncio.sleep(1.0)  # B is up, and cannot take what A holds
        feeding = asyncio.gather(*(feed(sid, slice(halves[sid], None)) for sid in streams))
        await asyncio.sleep(0.1)
        replicas["A"].kill()  # mid-stream: chunks are still arriving
        replicas["A"].wait(10)
        await feeding
        for sid in streams:
            await redis.xadd(keys.sessions, {"type": "end", "session": sid})

        for sid, (fmt, _, _) in streams.items():
            await wait_for_final_frame(redis, keys, sid)
            await wait_until(lambda s=sid: _done(redis, keys, s))  # the write after the final's
            owner = await redis.hget(keys.session_state(sid), "ingest.owner")
            assert owner is None, "B finished and released it"
            frames = [decode(Frame, f) for _, f in await redis.xrange(keys.frames(sid))]
            assert [f.seq for f in frames] == list(range(len(frames))), "continuous"
            got = np.frombuffer(b"".join(f.audio for f in frames), dtype="<i2").astype(int)
            # What one normalizer that saw every chunk makes: the same number of frames
            # exactly (nothing in flight was lost), the same audio but for the new
            # decoder's warm-up (see test_takeover.py): one stretch of at most 170 ms.
            norm = Normalizer(AudioFormat.PCM16)
            expected_frames = [
                f for c in chunks[sid] for f in norm.push(RawAudio(audio=c, format=fmt))
            ] + norm.flush()
            assert len(frames) == len(expected_frames) + 1, f"{sid}: no audio lost or repeated"
            expected = np.frombuffer(b"".join(expected_frames), dtype="<i2").astype(int)
            off = np.nonzero(np.abs(got - expected) > 6)[0]
            assert len(off) == 0 or off[-1] - off[0] <= 24 * 170, f"{sid}: only the warm-up"
        assert await redis.xlen(keys.dead) == 0, "no chunk dead-lettered"
        for sid in streams:
            statuses = [f[b"kind"] for _, f in await redis.xrange(keys.status(sid))]
            assert b"error" not in statuses
        assert replicas["A"].returncode == -signal.SIGKILL
    finally:
        for proc in replicas.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(20)


def _tone_pcm(rate: int, seconds: float) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    return (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2").tobytes()


async def _done(redis: aioredis.Redis, keys: StreamKeys, sid: str) -> bool:
    return await redis.hget(keys.session_state(sid), "ingest.done") == b"1"
