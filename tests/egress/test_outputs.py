"""Egress as a black box: events in with raw XADDs, transcript, audio and status out."""

from __future__ import annotations

import base64
import signal
import subprocess
from collections.abc import Iterator

import numpy as np
import pytest
import redis.asyncio as aioredis

from tests.egress.helpers import (
    EventFeed,
    announce,
    audio_out,
    recorded_turn,
    response_events,
    start_egress,
    status,
    tone_deltas,
    transcript,
)
from tests.shared.refusing import refuse_writes_until_one_is_refused
from tests.waiting import wait_until
from vlpipe.shared.audio import ulaw_to_pcm16
from vlpipe.shared.keys import StreamKeys
from vlpipe.shared.redis_server import RedisServer
from vlpipe.shared.streams import connect


@pytest.fixture
def egress(redis_url: str, keys: StreamKeys) -> Iterator[subprocess.Popen[bytes]]:
    proc = start_egress(redis_url, keys.prefix)
    yield proc
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0


async def finished(redis: aioredis.Redis, keys: StreamKeys, sid: str) -> None:
    async def done() -> bool:
        return await redis.hget(keys.session_state(sid), "egress.done") == b"1"

    await wait_until(done, within=30)


async def test_a_recorded_turn_becomes_transcripts_audio_and_playback(
    redis: aioredis.Redis, keys: StreamKeys, egress: subprocess.Popen[bytes]
) -> None:
    events = recorded_turn()
    await announce(redis, keys, "r1")
    feed = EventFeed(redis, keys, "r1")
    await feed.start()
    for event in events:
        await feed.send(event)
    await feed.end()
    await finished(redis, keys, "r1")

    pieces = await transcript(redis, keys, "r1")
    assert [p.seq for p in pieces] == list(range(len(pieces)))
    user_final = next(e["transcript"] for e in events
                      if e["type"] == "conversation.item.input_audio_transcription.completed")  # fmt: skip
    said_final = next(
        e["transcript"] for e in events if e["type"] == "response.audio_transcript.done"
    )
    finals = [p for p in pieces if p.final]
    assert [(p.speaker, p.text) for p in finals] == [
        ("user", user_final.strip()),
        ("assistant", said_final),
    ]
    user = finals[0]
    assert (user.start_ms, user.end_ms) == (52, 10400)  # from speech_started / speech_stopped
    # Partials are coalesced (fewer than the deltas), each the text so far, before the final.
    deltas = [e for e in events if e["type"] == "response.audio_transcript.delta"]
    partials = [p for p in pieces if p.speaker == "assistant" and not p.final]
    assert 0 < len(partials) < len(deltas)
    assert all(said_final.startswith(p.text) for p in partials)
    assert pieces.index(finals[1]) > max(pieces.index(p) for p in partials)
    everywhere = [f for _, f in await redis.xrange(keys.transcripts)]
    assert [f[b"text"].decode() for f in everywhere] == [user_final.strip(), said_final]

    chunks = await audio_out(redis, keys, "r1")
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    audio = [c for c in chunks if c.kind == "audio"]
    sent = sum(len(base64.b64decode(e["delta"])) for e in events
               if e["type"] == "response.audio.delta")  # fmt: skip
    assert sum(len(c.audio) for c in audio) == sent  # pcm16 24 kHz both sides: unchanged
    assert [c.offset_ms for c in audio] == sorted(c.offset_ms for c in audio)
    assert chunks[-1].kind == "end" and chunks[-1].offset_ms == pytest.approx(sent / 48)
    # The first chunk says when the user stopped speaking (the event's arrival at the broker).
    stopped = feed.received_at("input_audio_buffer.speech_stopped")
    assert audio[0].speech_end == stopped and all(c.speech_end is None for c in audio[1:])
    playback = await redis.hgetall(keys.playback("r1"))
    assert float(playback[b"delivered_ms"]) == pytest.approx(sent / 48, abs=0.1)
    assert playback[b"response_id"].decode() == audio[0].response_id
    states = [s.message for s in await status(redis, keys, "r1") if s.kind == "state"]
    assert states == ["started", "ended"]
    assert any(s.kind == "latency" for s in await status(redis, keys, "r1"))
    assert 0 < await redis.ttl(keys.transcript("r1")) <= 3600


async def test_a_tone_keeps_its_frequency_from_24k_pcm_to_8k_mulaw(
    redis: aioredis.Redis, keys: StreamKeys, egress: subprocess.Popen[bytes]
) -> None:
    await announce(redis, keys, "t1", audio_out="g711_ulaw")
    feed = EventFeed(redis, keys, "t1")
    await feed.start()
    for delta in tone_deltas("resp_1", "item_1", hz=440, seconds=2.0):
        await feed.send(delta)
    await feed.send(response_events("resp_1", "item_1"))
    await feed.end()
    await finished(redis, keys, "t1")
    chunks = await audio_out(redis, keys, "t1")
    assert all(c.format.value == "g711_ulaw" for c in chunks)
    mulaw = b"".join(c.audio for c in chunks if c.kind == "audio")
    pcm = np.frombuffer(ulaw_to_pcm16(mulaw), dtype="<i2").astype(np.float64)
    assert len(pcm) == pytest.approx(16000, abs=80)  # 2 s at 8 kHz
    spectrum = np.abs(np.fft.rfft(pcm * np.hanning(len(pcm))))
    freqs = np.fft.rfftfreq(len(pcm), 1 / 8000)
    assert freqs[np.argmax(spectrum)] == pytest.approx(440, abs=2)
    near = spectrum[np.abs(freqs - 440) < 20].sum() ** 2
    assert near / (spectrum**2).sum() > 0.95  # no clicks at chunk boundaries: no spread


async def test_cancellation_and_barge_in_clear_and_stop_the_audio(
    redis: aioredis.Redis, keys: StreamKeys, egress: subprocess.Popen[bytes]
) -> None:
    await announce(redis, keys, "c1")
    feed = EventFeed(redis, keys, "c1")
    await feed.start()
    deltas = list(tone_deltas("resp_a", "item_a", hz=300, seconds=1.0))
    for delta in deltas[:4]:
        await feed.send(delta)
    await feed.send({"type": "vlpipe.barge_in", "response_id": "resp_a", "item_id": "item_a"})
    for delta in deltas[4:]:  # the upstream was still sending: none of it goes out
        await feed.send(delta)
    await feed.send(response_events("resp_a", "item_a", status="cancelled"))
    more = list(tone_deltas("resp_b", "item_b", hz=300, seconds=0.3))
    for delta in more[:2]:
        await feed.send(delta)
    await feed.send(response_events("resp_b", "item_b", status="cancelled"))
    await feed.end()
    await finished(redis, keys, "c1")
    chunks = await audio_out(redis, keys, "c1")
    kinds = [(c.response_id, c.kind) for c in chunks]
    assert kinds == [("resp_a", "audio")] * 4 + [("resp_a", "clear")] + [
        ("resp_b", "audio")
    ] * 2 + [("resp_b", "clear")]
    assert chunks[4].offset_ms == pytest.approx(400)
    interrupted = [s for s in await status(redis, keys, "c1") if s.kind == "interrupted"]
    assert [s.detail["response_id"] for s in interrupted] == ["resp_a", "resp_b"]


async def test_tool_calls_and_upstream_changes_reach_the_status_stream(
    redis: aioredis.Redis, keys: StreamKeys, egress: subprocess.Popen[bytes]
) -> None:
    await announce(redis, keys, "s1")
    feed = EventFeed(redis, keys, "s1")
    await feed.start()
    await feed.send({"type": "response.function_call_arguments.done", "call_id": "call_1",
                     "name": "get_weather", "arguments": '{"city":"Oslo"}', "response_id": "r"})  # fmt: skip
    await feed.send({"type": "conversation.item.created", "item": {
        "id": "i2", "type": "function_call_output", "call_id": "call_1", "output": '{"t":3}'}})  # fmt: skip
    await feed.send({"type": "vlpipe.upstream.reconnecting", "code": 1006, "reason": "lost"})
    await feed.send({"type": "vlpipe.upstream.connected", "resumed": True})
    await redis.xadd(keys.events("s1"), {"m": b"\x93garbage"})
    await feed.end()
    await finished(redis, keys, "s1")
    seen = [(s.kind, s.message) for s in await status(redis, keys, "s1")]
    assert ("tool_call", "tool call get_weather") in seen
    assert ("tool_result", "tool result") in seen
    assert ("state", "reconnecting") in seen and ("state", "connected") in seen
    assert any(kind == "error" and "invalid Event" in message for kind, message in seen)
    assert seen[-1] == ("state", "ended")
    assert any(b"invalid Event" in f[b"reason"] for _, f in await redis.xrange(keys.dead))


async def test_a_killed_replica_is_taken_over_with_continuous_outputs(
    redis_url: str, redis: aioredis.Redis, keys: StreamKeys
) -> None:
    replicas = [start_egress(redis_url, keys.prefix) for _ in range(2)]
    try:
        await announce(redis, keys, "f1", audio_out="pcm16_8000hz")
        feed = EventFeed(redis, keys, "f1")
        await feed.start()
        responses = [f"resp_{n}" for n in range(6)]
        for n, response in enumerate(responses):
            if n == 3:  # mid-session: kill whichever replica owns it

                async def written() -> bool:
                    return await redis.xlen(keys.audio_out("f1")) >= 12

                await wait_until(written, within=30)
                owner = await redis.hget(keys.session_state("f1"), "egress.owner")
                assert owner is not None
                pid = int(owner.decode().rsplit("-", 1)[1])
                victim = next(r for r in replicas if r.pid == pid)
                victim.send_signal(signal.SIGKILL)
                victim.wait()
            for delta in tone_deltas(response, f"item_{n}", hz=500, seconds=0.5):
                await feed.send(delta)
            await feed.send({"type": "response.audio_transcript.done", "response_id": response,
                             "item_id": f"item_{n}", "transcript": f"answer {n}"})  # fmt: skip
            await feed.send(response_events(response, f"item_{n}"))
        await feed.end()

        async def done() -> bool:
            return await redis.hget(keys.session_state("f1"), "egress.done") == b"1"

        await wait_until(done, within=60)
    finally:
        for proc in replicas:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(20) == 0
    chunks = await audio_out(redis, keys, "f1")
    assert [c.seq for c in chunks] == list(range(len(chunks)))  # none lost, none twice
    for response in responses:
        mine = [c for c in chunks if c.response_id == response]
        assert [c.kind for c in mine[:-1]] == ["audio"] * (len(mine) - 1) and mine[-1].kind == "end"
        assert sum(len(c.audio) for c in mine) == pytest.approx(8000, abs=64)  # 0.5 s at 8 kHz
    pieces = await transcript(redis, keys, "f1")
    assert [p.text for p in pieces] == [f"answer {n}" for n in range(6)]
    assert [p.seq for p in pieces] == list(range(6))


async def test_a_write_refused_by_redis_is_retried_with_its_outputs_not_dropped(
    fresh_redis_server: RedisServer, keys: StreamKeys
) -> None:
    """A fenced write that fails with an error other than Redis being down (here OOM: the
    server is over `maxmemory`) fails the batch; its retry must carry the same outputs,
    not skip the events as already handled."""
    redis = connect(fresh_redis_server.url)
    proc = start_egress(fresh_redis_server.url, keys.prefix)
    try:
        await announce(redis, keys, "m1")
        feed = EventFeed(redis, keys, "m1")
        await feed.start()

        async def started() -> bool:
            return await redis.hget(keys.session_state("m1"), "egress.events_id") is not None

        await wait_until(started, within=30)
        proc.send_signal(signal.SIGSTOP)  # the next events wait for it, then meet a full Redis
        for delta in tone_deltas("resp_0", "item_0", hz=500, seconds=0.5):
            await feed.send(delta)
        await feed.send({"type": "response.audio_transcript.done", "response_id": "resp_0",
                         "item_id": "item_0", "transcript": "answer 0"})  # fmt: skip
        await feed.send(response_events("resp_0", "item_0"))
        await feed.end()
        await refuse_writes_until_one_is_refused(redis, proc)

        async def done() -> bool:
            return await redis.hget(keys.session_state("m1"), "egress.done") == b"1"

        await wait_until(done, within=30)
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    pieces = await transcript(redis, keys, "m1")
    assert [(p.seq, p.text, p.final) for p in pieces if p.final] == [
        (len(pieces) - 1, "answer 0", True)
    ]
    assert [p.seq for p in pieces] == list(range(len(pieces)))
    chunks = await audio_out(redis, keys, "m1")
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert sum(len(c.audio) for c in chunks) == 0.5 * 24000 * 2
    assert [f[b"text"] for _, f in await redis.xrange(keys.transcripts)] == [b"answer 0"]
    assert await redis.xlen(keys.dead) == 0
    await redis.aclose()
