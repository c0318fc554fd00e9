"""The ingest service as a black box: raw Redis commands in, frames out."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis

from tests.shared.procs import ROOT
from tests.shared.refusing import refuse_writes_until_one_is_refused
from tests.waiting import wait_until
from vlpipe.shared.audio import pcm16_to_ulaw
from vlpipe.shared.contracts import Frame, Status, decode
from vlpipe.shared.keys import StreamKeys
from vlpipe.shared.redis_server import RedisServer
from vlpipe.shared.streams import connect


def start_ingest(
    redis_url: str, prefix: str, *, stderr: Any = subprocess.DEVNULL, **extra: str
) -> subprocess.Popen[bytes]:
    """One ingest replica as a real process, with short timings for tests."""
    env = {
        **os.environ,
        "VLPIPE_REDIS_URL": redis_url,
        "VLPIPE_STREAM_PREFIX": prefix,
        "VLPIPE_HTTP_PORT": "0",
        "VLPIPE_HTTP_HOST": "127.0.0.1",
        "VLPIPE_HEARTBEAT_MS": "200",
        "VLPIPE_BLOCK_MS": "200",
        **extra,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "vlpipe.services.ingest"], cwd=ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=stderr,
    )  # fmt: skip


@pytest.fixture
def ingest(redis_url: str, keys: StreamKeys) -> Iterator[subprocess.Popen[bytes]]:
    proc = start_ingest(redis_url, keys.prefix, VLPIPE_INGEST_REORDER_WINDOW="3")
    yield proc
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0


def tone(rate: int, seconds: float, hz: float = 440.0) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    return (0.3 * np.sin(2 * np.pi * hz * t) * 32767).astype("<i2").tobytes()


async def wait_for_final_frame(redis: aioredis.Redis, keys: StreamKeys, sid: str) -> None:
    async def final_written() -> bool:
        last = await redis.xrevrange(keys.frames(sid), count=1)
        return bool(last) and decode(Frame, last[0][1]).final

    await wait_until(final_written, within=30)


async def frames_of(redis: aioredis.Redis, keys: StreamKeys, sid: str) -> list[Frame]:
    return [decode(Frame, fields) for _, fields in await redis.xrange(keys.frames(sid))]


async def test_a_session_published_with_raw_commands_becomes_numbered_20ms_frames(
    redis: aioredis.Redis, keys: StreamKeys, ingest: subprocess.Popen[bytes]
) -> None:
    sid = "call-1"
    await redis.xadd(keys.sessions, {"type": "start", "session": sid,
                                     "config": '{"input_audio_format": "pcm16_16000hz"}'})  # fmt: skip
    audio = tone(8000, 1.0)
    for i in range(0, len(audio), 1600):  # 100 ms chunks of 8 kHz PCM16
        await redis.xadd(keys.audio(sid), {"audio": audio[i : i + 1600], "format": "pcm16",
                                           "rate": "8000", "seq": str(i // 1600)})  # fmt: skip
    mulaw = pcm16_to_ulaw(tone(8000, 0.5))
    await redis.xadd(keys.audio(sid), {"audio": mulaw, "format": "mulaw"})
    await redis.xadd(keys.sessions, {"type": "end", "session": sid})

    await wait_for_final_frame(redis, keys, sid)
    frames = await frames_of(redis, keys, sid)
    assert [f.seq for f in frames] == list(range(len(frames))), "numbered from 0, no gaps"
    audio_frames = frames[:-1]
    assert {len(f.audio) for f in audio_frames} == {640}, "20 ms of 16 kHz PCM16"
    assert {f.format.value for f in frames} == {"pcm16_16000hz"}
    assert abs(len(audio_frames) * 0.020 - 1.5) <= 0.020, "1.5 s in, 1.5 s out"
    assert await redis.xlen(keys.audio(sid)) <= 1, "the audio stream is trimmed behind ingest"


async def test_a_bad_chunk_is_dead_lettered_and_reported_while_the_session_goes_on(
    redis: aioredis.Redis, keys: StreamKeys, ingest: subprocess.Popen[bytes]
) -> None:
    sid = "call-2"
    await redis.xadd(keys.sessions, {"type": "start", "session": sid})
    await redis.xadd(
        keys.audio(sid), {"audio": tone(24000, 0.1), "format": "pcm16", "rate": "24000"}
    )
    await redis.xadd(
        keys.audio(sid), {"audio": b"\x01\x02\x03", "format": "pcm16", "rate": "24000"}
    )
    await redis.xadd(keys.audio(sid), {"audio": b"\x00\x00", "format": "aiff"})
    await redis.xadd(
        keys.audio(sid), {"audio": tone(24000, 0.1), "format": "pcm16", "rate": "24000"}
    )
    await redis.xadd(keys.sessions, {"type": "end", "session": sid})

    await wait_for_final_frame(redis, keys, sid)
    assert len(await frames_of(redis, keys, sid)) == 11, "200 ms of good audio and the marker"
    dead = [fields for _, fields in await redis.xrange(keys.dead)]
    reasons = sorted(d[b"reason"].decode() for d in dead)
    assert len(reasons) == 2
    assert "multiple of 2 bytes" in reasons[1] and "'format'" in reasons[0]
    status = [fields for _, fields in await redis.xrange(keys.status(sid))]
    assert [s[b"kind"] for s in status] == [b"error", b"error"]


async def test_producer_sequence_numbers_reorder_drop_duplicates_and_report_gaps(
    redis: aioredis.Redis, keys: StreamKeys, ingest: subprocess.Popen[bytes]
) -> None:
    sid = "call-3"
    await redis.xadd(keys.sessions, {"type": "start", "session": sid})
    for seq in (0, 2, 1, 1, 3, 6, 7, 8, 9):  # 1 twice, 4 and 5 never come
        level = np.full(480, seq * 100, dtype="<i2").tobytes()  # one 20 ms frame at 24 kHz
        await redis.xadd(keys.audio(sid), {"audio": level, "format": "pcm16", "rate": "24000",
                                           "seq": str(seq)})  # fmt: skip
    await redis.xadd(keys.sessions, {"type": "end", "session": sid})

    await wait_for_final_frame(redis, keys, sid)
    frames = (await frames_of(redis, keys, sid))[:-1]
    levels = [int(np.frombuffer(f.audio, dtype="<i2")[240]) for f in frames]
    assert levels == [0, 100, 200, 300, 600, 700, 800, 900]
    status = [fields for _, fields in await redis.xrange(keys.status(sid))]
    kinds = [s[b"kind"] for s in status]
    assert kinds == [b"stale", b"gap"]
    assert b"seq 4-5" in status[1][b"message"]


def _wav_bytes(rate: int, seconds: float) -> bytes:
    import io
    import wave

    buf = io.BytesIO()
    with wave.open(buf, "wb") as wav:
        wav.setnchannels(2)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        mono = np.frombuffer(tone(rate, seconds, hz=440), dtype="<i2")
        wav.writeframes(np.column_stack([mono, mono]).reshape(-1).astype("<i2").tobytes())
    return buf.getvalue()


def _published(fmt: str) -> tuple[bytes, dict[str, str]]:
    """One second of a 440 Hz tone in `fmt`, and the plain fields that describe it."""
    from tests.ingest.test_normalize import encoded
    from vlpipe.shared.audio import pcm16_to_alaw

    if fmt == "f32":
        t = np.arange(44100) / 44100
        return (0.3 * np.sin(2 * np.pi * 440 * t)).astype("<f4").tobytes(), {"rate": "44100"}
    if fmt == "alaw":
        return pcm16_to_alaw(tone(8000, 1.0)), {}
    if fmt == "wav":
        return _wav_bytes(48000, 1.0), {}
    if fmt == "ogg":
        return encoded("ogg", "libopus", 48000, 1.0, hz=440), {}
    if fmt == "webm":
        return encoded("webm", "libopus", 48000, 1.0, hz=440), {}
    return encoded("mp3", "libmp3lame", 44100, 1.0, hz=440), {}


@pytest.mark.parametrize("fmt", ["f32", "alaw", "wav", "ogg", "webm", "mp3"])
async def test_every_input_format_published_with_raw_commands_keeps_its_tone_and_length(
    redis: aioredis.Redis, keys: StreamKeys, ingest: subprocess.Popen[bytes], fmt: str
) -> None:
    sid = f"fmt-{fmt}"
    data, extra = _published(fmt)
    await redis.xadd(keys.sessions, {"type": "start", "session": sid})
    for i in range(0, len(data), 4000):
        await redis.xadd(keys.audio(sid), {"audio": data[i : i + 4000], "format": fmt, **extra})
    await redis.xadd(keys.sessions, {"type": "end", "session": sid})
    await wait_for_final_frame(redis, keys, sid)
    frames = (await frames_of(redis, keys, sid))[:-1]
    assert {len(f.audio) for f in frames} == {960}
    assert abs(len(frames) * 0.020 - 1.0) <= 0.1, "encoder padding at most 100 ms"
    pcm = np.frombuffer(b"".join(f.audio for f in frames), dtype="<i2")[2400:21600] / 32767
    peak_hz = np.argmax(np.abs(np.fft.rfft(pcm * np.hanning(len(pcm))))) * 24000 / len(pcm)
    assert abs(peak_hz - 440) < 5
    assert await redis.xlen(keys.dead) == 0


async def test_when_the_broker_falls_behind_ingest_pauses_instead_of_piling_up_frames(
    redis: aioredis.Redis, redis_url: str, keys: StreamKeys
) -> None:
    proc = start_ingest(
        redis_url, keys.prefix, VLPIPE_READ_BATCH="2", VLPIPE_INGEST_MAX_BACKLOG_FRAMES="20"
    )
    sid = "slow-broker"
    try:
        await redis.xadd(keys.sessions, {"type": "start", "session": sid})
        audio = tone(24000, 2.0)
        for i in range(0, len(audio), 4800):  # 100 ms chunks: 5 frames each
            await redis.xadd(
                keys.audio(sid), {"audio": audio[i : i + 4800], "format": "pcm16", "rate": "24000"}
            )
        await redis.xadd(keys.sessions, {"type": "end", "session": sid})

        async def stalled() -> bool:
            return int(await redis.xlen(keys.frames(sid))) >= 20

        await wait_until(stalled)
        await asyncio.sleep(1.0)  # nobody reads: ingest must hold still
        backlog = int(await redis.xlen(keys.frames(sid)))
        assert 20 <= backlog <= 30, "paused at the limit (plus at most one batch)"
        assert await redis.xlen(keys.audio(sid)) > 0, "the rest waits in Redis, not in memory"
        seen: list[Frame] = []
        while not (seen and seen[-1].final):  # now the "broker" reads and trims
            entries = await redis.xrange(keys.frames(sid))
            if entries:
                seen += [decode(Frame, f) for _, f in entries]
                await redis.xdel(keys.frames(sid), *[i for i, _ in entries])
            await asyncio.sleep(0.05)
        assert [f.seq for f in seen] == list(range(101)), "100 frames and the marker, in order"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


async def test_the_speech_recording_as_wav_chunks_keeps_its_duration_within_one_frame(
    redis: aioredis.Redis, keys: StreamKeys, ingest: subprocess.Popen[bytes], speech_wav: Path
) -> None:
    import wave

    sid = "speech"
    data = await asyncio.to_thread(speech_wav.read_bytes)
    await redis.xadd(keys.sessions, {"type": "start", "session": sid})
    for i in range(0, len(data), 6400):  # the first chunk carries the RIFF header
        await redis.xadd(keys.audio(sid), {"audio": data[i : i + 6400], "format": "wav"})
    await redis.xadd(keys.sessions, {"type": "end", "session": sid})
    await wait_for_final_frame(redis, keys, sid)
    frames = (await frames_of(redis, keys, sid))[:-1]
    with wave.open(str(speech_wav)) as wav:
        seconds = wav.getnframes() / wav.getframerate()
    assert abs(len(frames) * 0.020 - seconds) <= 0.020
    assert {len(f.audio) for f in frames} == {960}


async def test_audio_of_a_session_never_announced_waits_untouched_until_it_is_announced(
    redis: aioredis.Redis, keys: StreamKeys, ingest: subprocess.Popen[bytes]
) -> None:
    sid = "early-bird"
    await redis.xadd(
        keys.audio(sid), {"audio": tone(24000, 0.2), "format": "pcm16", "rate": "24000"}
    )
    await asyncio.sleep(1.0)  # ingest is running but the session is not announced
    assert await redis.xlen(keys.frames(sid)) == 0
    assert await redis.xlen(keys.audio(sid)) == 1, "not consumed, not trimmed"
    await redis.xadd(keys.sessions, {"type": "start", "session": sid})
    await redis.xadd(keys.sessions, {"type": "end", "session": sid})
    await wait_for_final_frame(redis, keys, sid)
    assert len(await frames_of(redis, keys, sid)) == 11, "200 ms and the marker"


async def test_decoder_threads_end_with_their_session_however_it_ends(
    redis: aioredis.Redis, redis_url: str, keys: StreamKeys, tmp_path: Path
) -> None:
    # Compressed streams used to be decoded on a thread per stream that blocked forever on
    # its input when the session was lost, retried or switched format. Here sessions end in
    # each of those ways, round after round; the replica's threads must not grow with them
    # (beyond the event loop's worker pool, which `asyncio.to_thread` fills up to its size).
    import psutil

    from tests.ingest.test_normalize import encoded

    ogg = encoded("ogg", "libopus", 48000, 2.0, hz=440)
    webm = encoded("webm", "libopus", 48000, 2.0, hz=440)
    mp3 = encoded("mp3", "libmp3lame", 44100, 2.0, hz=440)
    log_path = tmp_path / "ingest.log"
    with log_path.open("wb") as log_file:
        proc = start_ingest(redis_url, keys.prefix, stderr=log_file, VLPIPE_MAX_DELIVERIES="2")
    pool = min(32, (os.cpu_count() or 1) + 4)  # ThreadPoolExecutor's default size

    async def send(sid: str, data: bytes, fmt: str) -> bytes:
        """Publish `data` in chunks; the last entry's id."""
        for i in range(0, len(data), 2000):
            last = await redis.xadd(keys.audio(sid), {"audio": data[i : i + 2000], "format": fmt})
        return bytes(last)

    async def lost(sid: str) -> None:
        entry = await redis.hget(keys.session_state(sid), "ingest.entry")
        await send(sid, ogg[: len(ogg) // 2], "ogg")
        await wait_until(lambda: _has_frames(redis, keys, sid))
        await redis.xclaim(keys.sessions, "ingest", "someone-else", 0, [entry])
        await wait_until(lambda: _logged(log_path, "session lost", sid))
        await redis.xack(keys.sessions, "ingest", entry)  # and the thief finished it

    async def retried(sid: str) -> None:
        # Once the audio is decoded, the frames' key is made to hold a string, so the final
        # write fails: the session task fails and is retried (from its checkpoint, with a
        # new normalizer) until it is given up.
        last = await send(sid, webm[: len(webm) // 2], "webm")
        await wait_until(lambda: _checkpointed(redis, keys, sid, last))
        await redis.delete(keys.frames(sid))
        await redis.set(keys.frames(sid), "not a stream")
        await redis.xadd(keys.sessions, {"type": "end", "session": sid})
        await wait_until(lambda: _logged(log_path, "session task failed", sid))
        await wait_until(lambda: _done(redis, keys, sid), within=30)

    async def switched(sid: str) -> None:
        await send(sid, ogg[: len(ogg) // 2], "ogg")
        await send(sid, webm[: len(webm) // 2], "webm")
        await send(sid, mp3[: len(mp3) // 2], "mp3")
        await send(sid, tone(24000, 0.2), "pcm16")
        await redis.xadd(keys.sessions, {"type": "end", "session": sid})
        await wait_for_final_frame(redis, keys, sid)

    async def ended(sid: str) -> None:
        await send(sid, mp3, "mp3")
        await redis.xadd(keys.sessions, {"type": "end", "session": sid})
        await wait_for_final_frame(redis, keys, sid)

    async def round_of(name: str, sessions: int) -> None:
        for way in (lost, retried, switched, ended):
            sids = [f"{name}-{way.__name__}-{i}" for i in range(sessions)]
            for sid in sids:
                await redis.xadd(keys.sessions, {"type": "start", "session": sid})
            await wait_until(lambda: _all_owned(redis, keys, sids))  # noqa: B023
            await asyncio.gather(*(way(sid) for sid in sids))

    try:
        await round_of("warm-up", 1)
        threads = psutil.Process(proc.pid).num_threads()
        for n in range(3):
            await round_of(f"round{n}", 3)
        assert psutil.Process(proc.pid).num_threads() <= threads + pool
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


async def _has_frames(redis: aioredis.Redis, keys: StreamKeys, sid: str) -> bool:
    return bool(await redis.xlen(keys.frames(sid)))


async def _checkpointed(redis: aioredis.Redis, keys: StreamKeys, sid: str, entry: bytes) -> bool:
    return await redis.hget(keys.session_state(sid), "ingest.audio_id") == entry


async def _done(redis: aioredis.Redis, keys: StreamKeys, sid: str) -> bool:
    return await redis.hget(keys.session_state(sid), "ingest.done") == b"1"


async def _all_owned(redis: aioredis.Redis, keys: StreamKeys, sids: list[str]) -> bool:
    owners = [await redis.hget(keys.session_state(sid), "ingest.owner") for sid in sids]
    return all(owners)


async def _logged(path: Path, message: str, sid: str) -> bool:
    text = await asyncio.to_thread(path.read_text)
    return any(message in line and f'"{sid}"' in line for line in text.splitlines())


async def test_a_write_refused_by_redis_is_retried_with_its_frames_not_dropped(
    fresh_redis_server: RedisServer, keys: StreamKeys
) -> None:
    """A fenced write that fails with an error other than Redis being down (here OOM: the
    server is over `maxmemory`) fails the batch; its retry must write the same frames, not
    drop the chunks as stale."""
    redis = connect(fresh_redis_server.url)
    proc = start_ingest(fresh_redis_server.url, keys.prefix)
    sid = "oom-1"
    try:
        await redis.xadd(keys.sessions, {"type": "start", "session": sid,
                                         "config": '{"input_audio_format": "pcm16_16000hz"}'})  # fmt: skip
        audio = tone(16000, 1.0)
        chunks = [audio[i : i + 3200] for i in range(0, len(audio), 3200)]  # 100 ms each
        await redis.xadd(keys.audio(sid), {"audio": chunks[0], "format": "pcm16",
                                           "rate": "16000", "seq": "0"})  # fmt: skip

        async def started() -> bool:
            return await redis.xlen(keys.frames(sid)) == 5

        await wait_until(started, within=30)
        proc.send_signal(signal.SIGSTOP)  # the next chunks wait for it, then meet a full Redis
        for n, chunk in enumerate(chunks[1:], start=1):
            await redis.xadd(keys.audio(sid), {"audio": chunk, "format": "pcm16",
                                               "rate": "16000", "seq": str(n)})  # fmt: skip
        await redis.xadd(keys.sessions, {"type": "end", "session": sid})
        await refuse_writes_until_one_is_refused(redis, proc)
        await wait_for_final_frame(redis, keys, sid)
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    frames = await frames_of(redis, keys, sid)
    assert [f.seq for f in frames] == list(range(len(frames)))
    assert b"".join(f.audio for f in frames) == audio
    kinds = [decode(Status, f).kind for _, f in await redis.xrange(keys.status(sid))]
    assert "stale" not in kinds and "gap" not in kinds
    assert await redis.xlen(keys.dead) == 0
    await redis.aclose()
