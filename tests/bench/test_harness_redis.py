"""The benchmark's producer and consumer speak to a real redis-server through
`RespConnection` (hiredis packing and parsing, no redis-py): what they write and read must
be what the pipeline's contract says; nothing here times anything."""

from __future__ import annotations

import json
import struct
import time
import uuid

import hiredis
import pytest
import redis.asyncio as aioredis

from bench.pipeline_vs_direct import CHUNK, RATE, RespConnection, consumer_role, producer_role
from vlpipe.shared.contracts import Event, encode
from vlpipe.shared.keys import StreamKeys


async def test_pipelined_commands_get_their_replies_in_order_and_an_error_reply_is_named(
    redis_url: str,
) -> None:
    key = f"harness:{uuid.uuid4().hex}"
    connection = await RespConnection.open(redis_url)
    try:
        packed = b"".join(hiredis.pack_command(("XADD", key, "*", "n", i)) for i in range(3))
        ids = await connection.call(packed, 3)
        assert len(ids) == 3 and ids == sorted(ids)
        with pytest.raises(RuntimeError, match="WRONGTYPE"):
            await connection.call(hiredis.pack_command(("LPUSH", key, "x")))
        # The connection is still in step after the error reply.
        assert await connection.call(hiredis.pack_command(("XLEN", key))) == [3]
    finally:
        await connection.close()


async def test_the_producer_writes_each_begun_call_one_chunk_a_tick_as_a_pcm16_producer_would(
    redis_url: str, redis: aioredis.Redis
) -> None:
    prefix = f"h{uuid.uuid4().hex[:8]}"
    keys = StreamKeys(prefix)
    sids = ["a", "b", "c"]
    params = {"url": redis_url, "prefix": prefix, "sids": sids, "starts": [0, 0, 2],
              "phases": 1, "t0": time.time() + 0.05, "duration": 5 * 0.020}  # fmt: skip
    await producer_role(params)
    counts = [await redis.xlen(keys.audio(sid)) for sid in sids]
    assert counts == [5, 5, 3]
    (_, fields), *_ = await redis.xrange(keys.audio("c"))
    assert fields == {b"audio": CHUNK, b"format": b"pcm16", b"rate": str(RATE).encode()}


@pytest.mark.parametrize("follows", ["audio-out", "events"])
async def test_the_consumer_takes_each_answers_first_audio_from_every_session(
    redis_url: str, redis: aioredis.Redis, capsys: pytest.CaptureFixture[str], follows: str
) -> None:
    """From egress's audio-out streams, or (`--outputs events`) from the broker's events
    streams as the broker writes them: only answer audio counts."""
    prefix = f"h{uuid.uuid4().hex[:8]}"
    keys = StreamKeys(prefix)
    stamp = struct.pack("<d", 123.5)
    before = time.time()
    for seq, (sid, answer) in enumerate((("a", "resp_1"), ("b", "resp_2"), ("b", "resp_2"))):
        if follows == "audio-out":
            await redis.xadd(keys.audio_out(sid), {"kind": "audio", "response_id": answer,
                                                   "audio": stamp + b"\0" * 8})  # fmt: skip
        else:
            delta = Event(session=sid, seq=seq, received=time.time() * 1000,
                          type="response.audio.delta", audio=stamp + b"\0" * 8,
                          event={"type": "response.audio.delta", "response_id": answer})  # fmt: skip
            await redis.xadd(keys.events(sid), encode(delta))  # type: ignore[arg-type]
    if follows == "audio-out":
        await redis.xadd(keys.audio_out("a"), {"kind": "end", "response_id": "resp_1"})
    else:
        done = Event(session="a", seq=9, received=time.time() * 1000, type="response.done",
                     event={"type": "response.done", "response": {"id": "resp_1"}})  # fmt: skip
        await redis.xadd(keys.events("a"), encode(done))  # type: ignore[arg-type]
    params = {"url": redis_url, "prefix": prefix, "sids": ["a", "b"],
              "until": time.time() + 0.5, "follows": follows}  # fmt: skip
    await consumer_role(params)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    answers = sorted(lines[-1]["answers"])
    # (session, answer number, first seen, the server's stamp, bytes by `until`, when
    # Redis wrote the first audio's entry)
    assert [(s, m, stamp_, size) for s, m, _, stamp_, size, _ in answers] == [
        (0, 1, 123.5, 16), (1, 2, 123.5, 32),
    ]  # fmt: skip
    for _, _, seen, _, _, written in answers:
        assert before - 0.001 <= written <= seen  # (an id's time is in whole ms)
