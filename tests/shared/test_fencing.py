"""Fenced writes against a real Redis: applied whole, refused whole, retried exactly once."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from redis.exceptions import TimeoutError as RedisTimeoutError

from vlpipe.shared.fencing import Fence, Fenced, Regressed, SessionWrite, Writer
from vlpipe.shared.keys import StreamKeys
from vlpipe.shared.streams import connect


async def _claim(redis: aioredis.Redis, keys: StreamKeys, sid: str) -> Fence:
    """What a claim does: raise the epoch, read the write number."""
    epoch = await redis.hincrby(keys.session_state(sid), "svc.epoch", 1)
    written = await redis.hget(keys.session_state(sid), "svc.written")
    return Fence(int(epoch), int(written or 0))


def _frames_write(keys: StreamKeys, sid: str, first: int, n: int) -> SessionWrite:
    write = SessionWrite(keys.session_state(sid), "svc")
    for seq in range(first, first + n):
        write.xadd(keys.frames(sid), {"seq": seq, "audio": b"\x00\xff" * 4})
    write.checkpoint({"next_seq": first + n})
    write.read("XLEN", keys.frames(sid))
    return write


async def test_a_write_applies_every_operation_and_returns_its_reads(
    redis: aioredis.Redis, keys: StreamKeys
) -> None:
    writer = Writer(redis)
    fence = await _claim(redis, keys, "s")
    assert await writer.apply(_frames_write(keys, "s", 0, 3), fence) == [3]
    assert fence.written == 1
    entries = await redis.xrange(keys.frames("s"))
    assert [e[1][b"seq"] for e in entries] == [b"0", b"1", b"2"]
    assert entries[0][1][b"audio"] == b"\x00\xff" * 4  # binary values travel as they are
    state = await redis.hgetall(keys.session_state("s"))
    assert state[b"svc.next_seq"] == b"3" and state[b"svc.written"] == b"1"


async def test_a_replica_that_lost_the_session_can_write_nothing(
    redis: aioredis.Redis, keys: StreamKeys
) -> None:
    writer = Writer(redis)
    stale = await _claim(redis, keys, "s")
    await writer.apply(_frames_write(keys, "s", 0, 2), stale)
    current = await _claim(redis, keys, "s")  # another replica took the session over
    with pytest.raises(Fenced):
        await writer.apply(_frames_write(keys, "s", 2, 5), stale)
    assert await redis.xlen(keys.frames("s")) == 2
    assert await redis.hget(keys.session_state("s"), "svc.next_seq") == b"2"
    await writer.apply(_frames_write(keys, "s", 2, 1), current)
    assert await redis.xlen(keys.frames("s")) == 3


async def test_a_retry_of_a_write_that_was_applied_writes_nothing_twice(
    redis: aioredis.Redis, keys: StreamKeys
) -> None:
    writer = Writer(redis)
    fence = await _claim(redis, keys, "s")
    write = _frames_write(keys, "s", 0, 4)
    await writer.apply(write, fence)
    fence.written -= 1  # as if the reply had been lost with the connection
    assert await writer.apply(write, fence) is None  # recognised as applied
    assert fence.written == 1
    assert await redis.xlen(keys.frames("s")) == 4


async def test_writes_redis_lost_after_acknowledging_them_are_detected(
    redis: aioredis.Redis, keys: StreamKeys
) -> None:
    writer = Writer(redis)
    fence = await _claim(redis, keys, "s")
    for first in (0, 2, 4):
        await writer.apply(_frames_write(keys, "s", first, 2), fence)
    # Redis restarted from an AOF that missed the last two writes (everysec) or a replica
    # was promoted before it had them.
    await redis.hset(keys.session_state("s"), "svc.written", 1)
    with pytest.raises(Regressed):
        await writer.apply(_frames_write(keys, "s", 6, 2), fence)
    assert await redis.xlen(keys.frames("s")) == 6


@pytest.mark.parametrize("stored", [None, "older"])
async def test_a_claim_redis_lost_is_a_loss_of_writes_not_another_owners_claim(
    stored: str | None, redis: aioredis.Redis, keys: StreamKeys
) -> None:
    # A replica promoted before it had the claim (or an older AOF): the session's epoch is
    # gone, or is an earlier owner's. No one claimed it after this owner, so nothing
    # fences it off: Redis lost what it acknowledged (the owner reports it and resumes).
    writer = Writer(redis)
    await _claim(redis, keys, "s")
    fence = await _claim(redis, keys, "s")
    await writer.apply(_frames_write(keys, "s", 0, 2), fence)
    if stored is None:
        await redis.delete(keys.session_state("s"))
    else:
        await redis.hset(keys.session_state("s"), "svc.epoch", fence.epoch - 1)
    with pytest.raises(Regressed, match="this owner claimed"):
        await writer.apply(_frames_write(keys, "s", 2, 2), fence)
    assert await redis.xlen(keys.frames("s")) == 2


async def test_trims_keep_what_the_reader_has_not_passed(
    redis: aioredis.Redis, keys: StreamKeys
) -> None:
    ids = [await redis.xadd(keys.audio("s"), {"n": n}) for n in range(5)]
    writer = Writer(redis)
    fence = await _claim(redis, keys, "s")
    write = SessionWrite(keys.session_state("s"), "svc")
    write.trim_before(keys.audio("s"), ids[3].decode(), approximate=False)
    write.trim_before(keys.ctl("s"), "0-0")  # nothing read yet: no trim at all
    await writer.apply(write, fence)
    assert [e[0] for e in await redis.xrange(keys.audio("s"))] == ids[3:]


async def test_writes_of_many_sessions_share_round_trips_and_each_is_checked_alone(
    redis: aioredis.Redis, keys: StreamKeys
) -> None:
    writer = Writer(redis)
    sids = [f"s{n}" for n in range(50)]
    fences = {sid: await _claim(redis, keys, sid) for sid in sids}
    await _claim(redis, keys, "s7")  # s7 was taken over: its old fence no longer holds
    results = await asyncio.gather(
        *(writer.apply(_frames_write(keys, sid, 0, 2), fences[sid]) for sid in sids),
        return_exceptions=True,
    )
    assert writer.writes == 50 and writer.round_trips < 5
    assert isinstance(results[7], Fenced)
    assert all(r == [2] for n, r in enumerate(results) if n != 7)
    assert await redis.xlen(keys.frames("s7")) == 0
    assert all([await redis.xlen(keys.frames(sid)) == 2 for sid in sids if sid != "s7"])


async def test_a_redis_that_lost_its_scripts_gets_them_again(
    redis: aioredis.Redis, keys: StreamKeys
) -> None:
    writer = Writer(redis)
    fence = await _claim(redis, keys, "s")
    await writer.apply(_frames_write(keys, "s", 0, 1), fence)
    await redis.script_flush()  # as after a restart without the scripts
    other = await _claim(redis, keys, "t")
    both = await asyncio.gather(writer.apply(_frames_write(keys, "s", 1, 1), fence),
                                writer.apply(_frames_write(keys, "t", 0, 1), other))  # fmt: skip
    assert both == [[2], [1]]


async def test_a_write_whose_reply_timed_out_leaves_no_connection_out_of_step(
    redis_url: str, keys: StreamKeys
) -> None:
    impatient = connect(redis_url, timeout_s=0.2)
    writer = Writer(impatient)
    fence = await _claim(impatient, keys, "s")
    await writer.apply(_frames_write(keys, "s", 0, 1), fence)  # the script is loaded
    admin = connect(redis_url)
    await admin.execute_command("CLIENT", "PAUSE", 500, "WRITE")  # scripts wait to run
    with pytest.raises(RedisTimeoutError):
        await writer.apply(_frames_write(keys, "s", 1, 2), fence)
    await asyncio.sleep(0.5)  # the pause is over; the timed-out write's reply was not read
    # Each later write gets its own reply, not one left behind: the retry of the timed-out
    # write (applied now, or recognised as applied then) and the next one read their XLEN.
    assert await writer.apply(_frames_write(keys, "s", 1, 2), fence) in ([3], None)
    assert await writer.apply(_frames_write(keys, "s", 3, 1), fence) == [4]
    assert await admin.xlen(keys.frames("s")) == 4
    await admin.aclose()
    await impatient.aclose()
