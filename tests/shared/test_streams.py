"""The stream runtime's promises, each against a real redis-server."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable
from typing import Any

import hiredis
import pytest
import redis.asyncio as aioredis

from tests.shared.procs import start_worker
from tests.shared.worker import apply_once
from tests.waiting import wait_until
from vlpipe.shared.fencing import SessionLost
from vlpipe.shared.keys import StreamKeys
from vlpipe.shared.redis_server import RedisServer
from vlpipe.shared.streams import (
    DeadLetters,
    Entry,
    GroupConsumer,
    SessionStreamReader,
    connect,
    packed_args,
    packed_xread,
)


async def _fill(redis: aioredis.Redis, stream: str, n: int, session: str = "s1") -> None:
    async with redis.pipeline(transaction=False) as pipe:
        for seq in range(n):
            pipe.xadd(stream, {"session": session, "seq": str(seq)})
        await pipe.execute()


async def test_killed_consumer_entries_are_finished_by_another_without_loss_or_double_effect(
    redis: aioredis.Redis, redis_url: str, keys: StreamKeys
) -> None:
    stream = f"{keys.prefix}:work"
    await redis.xgroup_create(stream, "g", id="0", mkstream=True)
    await _fill(redis, stream, 60)
    victim = start_worker("consume", redis_url, keys.prefix, stream, "g", "victim", "0.05")
    # Let the victim take a batch and handle part of it, then kill it mid-batch.
    await wait_until(lambda: _llen(redis, f"{keys.prefix}:log:victim", 3))
    victim.kill()
    victim.wait(10)
    pending = await redis.xpending(stream, "g")
    assert pending["pending"] > 0, "the victim should die holding un-acked entries"

    handled: list[bytes] = []

    async def handle(entry: Entry) -> None:
        key = entry.fields[b"session"] + b":" + entry.fields[b"seq"]
        handled.append(key)
        await apply_once(redis, keys.prefix, key)

    stop = asyncio.Event()
    rescuer = GroupConsumer(
        redis, streams=[stream], group="g", consumer="rescuer", handler=handle,
        dead=DeadLetters(redis, keys, "test"), block_ms=100, claim_idle_ms=300,
    )  # fmt: skip
    task = asyncio.create_task(rescuer.run(stop))
    await wait_until(lambda: _scard(redis, f"{keys.prefix}:handled", 60))
    await wait_until(lambda: _no_pending(redis, stream, "g"))
    stop.set()
    await task
    assert await redis.scard(f"{keys.prefix}:handled") == 60
    assert int(await redis.get(f"{keys.prefix}:effects")) == 60, "an effect happened twice"
    # The rescuer handled what the victim had not, and claimed the victim's in-flight ones.
    victim_done = {x for x in await redis.lrange(f"{keys.prefix}:log:victim", 0, -1)}
    assert set(handled) | victim_done == {f"s1:{i}".encode() for i in range(60)}


async def test_poison_entry_is_dead_lettered_after_n_tries_while_good_ones_flow(
    redis: aioredis.Redis, keys: StreamKeys
) -> None:
    stream = f"{keys.prefix}:work"
    attempts: dict[str, int] = {}
    good: list[str] = []

    async def handle(entry: Entry) -> None:
        attempts[entry.id] = attempts.get(entry.id, 0) + 1
        if entry.fields.get(b"poison"):
            raise ValueError("cannot digest this")
        good.append(entry.fields[b"seq"].decode())

    await _fill(redis, stream, 5)
    poison_id = (await redis.xadd(stream, {"poison": "1", "seq": "x"})).decode()
    await redis.xadd(stream, {"session": "s1", "seq": "5"})
    stop = asyncio.Event()
    consumer = GroupConsumer(
        redis, streams=[stream], group="g", consumer="c", handler=handle,
        dead=DeadLetters(redis, keys, "test"), block_ms=100, max_deliveries=3,
    )  # fmt: skip
    task = asyncio.create_task(consumer.run(stop))
    await wait_until(lambda: _xlen(redis, keys.dead, 1))
    await wait_until(lambda: _true(len(good) == 6))
    stop.set()
    await task
    assert attempts[poison_id] == 3
    assert good == ["0", "1", "2", "3", "4", "5"], "order kept, nothing lost"
    [(_, dead)] = await redis.xrange(keys.dead)
    assert dead[b"stream"] == stream.encode()
    assert dead[b"id"] == poison_id.encode()
    assert b"cannot digest this" in dead[b"reason"]
    assert dead[b"deliveries"] == b"3"
    assert dead[b"orig.poison"] == b"1"
    assert (await redis.xpending(stream, "g"))["pending"] == 0


async def test_entry_breaking_its_contract_goes_to_dead_letters_at_once_with_the_field_named(
    redis: aioredis.Redis, keys: StreamKeys
) -> None:
    from vlpipe.shared.contracts import RawAudio, decode

    stream = f"{keys.prefix}:audio"
    seen: list[int] = []

    async def handle(entry: Entry) -> None:
        seen.append(decode(RawAudio, entry.fields).rate or 0)

    await redis.xadd(stream, {"audio": b"\x00\x01", "format": "pcm16", "rate": "fast"})
    await redis.xadd(stream, {"audio": b"\x00\x01", "format": "pcm16", "rate": "16000"})
    stop = asyncio.Event()
    consumer = GroupConsumer(
        redis, streams=[stream], group="g", consumer="c", handler=handle,
        dead=DeadLetters(redis, keys, "test"), block_ms=100,
    )  # fmt: skip
    task = asyncio.create_task(consumer.run(stop))
    await wait_until(lambda: _true(seen == [16000]))
    stop.set()
    await task
    [(_, dead)] = await redis.xrange(keys.dead)
    assert b"'rate'" in dead[b"reason"] and b"integer" in dead[b"reason"]
    assert dead[b"deliveries"] == b"1"


async def test_consumers_reconnect_and_continue_when_redis_is_killed_and_restarted(
    fresh_redis_server: RedisServer, keys: StreamKeys
) -> None:
    redis = connect(fresh_redis_server.url)
    stream = f"{keys.prefix}:work"
    seen: set[bytes] = set()

    async def handle(entry: Entry) -> None:
        seen.add(entry.fields[b"seq"])

    stop = asyncio.Event()
    consumer = GroupConsumer(
        redis, streams=[stream], group="g", consumer="c", handler=handle,
        dead=DeadLetters(redis, keys, "test"), block_ms=100,
    )  # fmt: skip
    task = asyncio.create_task(consumer.run(stop))
    await _fill(redis, stream, 20)
    await wait_until(lambda: _true(len(seen) == 20))
    fresh_redis_server.kill()
    await asyncio.sleep(0.5)  # the consumer sees Redis gone and backs off
    fresh_redis_server.start()
    producer = connect(fresh_redis_server.url)
    async with producer.pipeline(transaction=False) as pipe:
        for seq in range(20, 40):
            pipe.xadd(stream, {"session": "s1", "seq": str(seq)})
        await pipe.execute()
    await wait_until(lambda: _true(len(seen) == 40), within=20)
    await wait_until(lambda: _no_pending(producer, stream, "g"))
    stop.set()
    await task
    assert seen == {str(i).encode() for i in range(40)}
    await producer.aclose()
    await redis.aclose()


async def test_sigterm_finishes_the_batch_in_hand_acks_it_and_exits(
    redis: aioredis.Redis, redis_url: str, keys: StreamKeys
) -> None:
    stream = f"{keys.prefix}:work"
    await redis.xgroup_create(stream, "g", id="0", mkstream=True)
    await _fill(redis, stream, 40)
    worker = start_worker("consume", redis_url, keys.prefix, stream, "g", "w", "0.05")
    await wait_until(lambda: _llen(redis, f"{keys.prefix}:log:w", 2))
    worker.send_signal(signal.SIGTERM)
    code = worker.wait(15)
    assert code == 0
    handled = await redis.llen(f"{keys.prefix}:log:w")
    assert 2 <= handled < 40, "stopped mid-stream, after finishing a batch"
    assert handled % 10 == 0, "the batch in hand (10 entries) was finished"
    info = await redis.xinfo_groups(stream)
    assert info[0]["pending"] == 0, "everything handled was acked"


async def test_session_reader_follows_streams_from_checkpoints_and_wakes_for_new_ones(
    redis: aioredis.Redis, keys: StreamKeys
) -> None:
    got: dict[str, list[bytes]] = {}

    async def handle(key: str, entries: list[Entry]) -> None:
        got.setdefault(key, []).extend(e.fields[b"seq"] for e in entries)

    a, b = keys.frames("a"), keys.frames("b")
    await _fill(redis, a, 5, "a")
    checkpoint = (await redis.xrange(a))[1][0].decode()  # resume after the 2nd entry
    reader, stop, task = _running_reader(redis, keys, block_ms=60_000)
    await asyncio.sleep(0.1)
    reader.add(a, checkpoint, handle)
    await wait_until(lambda: _true(got.get(a) == [b"2", b"3", b"4"]), within=2)
    # The reader now blocks for up to 60 s; adding a stream must interrupt that read.
    reader.add(b, "0-0", handle)
    await _fill(redis, b, 3, "b")
    await wait_until(lambda: _true(got.get(b) == [b"0", b"1", b"2"]), within=10)
    stop.set()
    reader.add(keys.frames("c"), "0-0", handle)  # wakes the blocking read so run() sees stop
    await task


async def test_chunks_of_calls_whose_clocks_are_not_aligned_share_a_read_within_the_interval(
    fresh_redis_server: RedisServer, keys: StreamKeys
) -> None:
    """Ten calls each send a chunk 10 ms after the one before, as calls that began at
    unrelated moments do. Each chunk would wake the blocking read (a read of every stream
    per chunk); with a floor on the interval between reads, they wait for the next read
    and share it. The reads are counted by the server, a private one."""
    redis = connect(fresh_redis_server.url)
    got: dict[str, int] = {}

    def handle(key: str, entries: list[Entry]) -> None:
        got[key] = got.get(key, 0) + len(entries)

    calls = [keys.audio(f"c{i}") for i in range(10)]
    reader, stop, task = _running_reader(redis, keys, block_ms=60_000, min_interval_s=2.0)
    for key in calls:
        reader.add(key, "0-0", handle)
    await redis.xadd(calls[0], {"seq": "0"})
    await wait_until(lambda: _true(got.get(calls[0]) == 1), within=10)
    before = await _xread_calls(redis)
    for key in calls:  # well within the 2 s since the read that had the first chunk began
        await redis.xadd(key, {"seq": "1"})
        await asyncio.sleep(0.01)
    await wait_until(lambda: _true(sum(got.values()) == 11), within=10)
    assert await _xread_calls(redis) - before <= 2, "the ten chunks shared one read"
    stop.set()
    reader.wake()
    await task
    await redis.aclose()


@pytest.mark.parametrize("backlog", [False, True], ids=["keeping-up", "behind"])
async def test_a_long_delivery_lets_other_work_run_between_streams_unless_the_reader_is_behind(
    backlog: bool, fresh_redis_server: RedisServer, keys: StreamKeys
) -> None:
    """Thirty calls' chunks come in one read, as on a shared 20 ms tick, and handing each
    over takes 0.5 ms of CPU. Work that became ready meanwhile (an answer's audio from the
    upstream, a write's reply) runs between them, not after all thirty. A stream with a
    backlog (the reader is behind) goes over at once, with the rest of its read."""
    redis = connect(fresh_redis_server.url)
    calls = [keys.frames(f"s{i}") for i in range(30)]
    order: list[str] = []

    def handle(key: str, entries: list[Entry]) -> None:
        if not order:  # work that becomes ready while the read is handed over
            asyncio.get_running_loop().call_soon(order.append, "other")
        order.append(key)
        busy_until = time.perf_counter() + 0.0005
        while time.perf_counter() < busy_until:
            pass

    for key in calls:
        await redis.xadd(key, {"seq": "0"})
    if backlog:
        await redis.xadd(calls[-1], {"seq": "1"})
    reader, stop, task = _running_reader(redis, keys, block_ms=60_000)
    for key in calls:  # (no await between them: the first read names them all)
        reader.add(key, "0-0", handle)
    await wait_until(lambda: _true(len(order) == len(calls) + 1), within=10)
    assert sorted(order) == sorted([*calls, "other"]), "each call's chunk went over once"
    if backlog:
        assert order[-1] == "other", order
    else:
        assert 0 < order.index("other") < len(calls), order
    stop.set()
    reader.wake()
    await task
    await redis.aclose()


async def test_a_stream_followed_again_during_a_read_gets_its_entries_from_its_new_position(
    fresh_redis_server: RedisServer, keys: StreamKeys
) -> None:
    """A session lost and claimed again by the same process (a failover that lost its
    writes: it resumes from the checkpoint Redis still has) is dropped and followed again
    while a read from its old position is in flight. The new follower starts where the
    new checkpoint says: what that read brought from the old position is not its."""
    redis = connect(fresh_redis_server.url)
    other, session = keys.frames("other"), keys.frames("s1")
    await redis.xadd(other, {"seq": "0"})
    ids = [await redis.xadd(session, {"seq": str(seq)}) for seq in range(3)]
    resumed: list[bytes] = []

    def resume(key: str, entries: list[Entry]) -> None:
        resumed.extend(e.fields[b"seq"] for e in entries)

    def handle_other(key: str, entries: list[Entry]) -> None:
        # Runs in the read that also brought the session's entries after its old position.
        reader.remove(session)
        reader.add(session, "0-0", resume)  # the checkpoint Redis has: from the start

    def old_owner(key: str, entries: list[Entry]) -> None:
        raise AssertionError("delivered to the session's old follower")

    reader, stop, task = _running_reader(redis, keys, block_ms=60_000)
    reader.add(other, "0-0", handle_other)  # (no await between: one read names both)
    reader.add(session, ids[1].decode(), old_owner)
    await wait_until(lambda: _true(len(resumed) >= 3), within=10)
    await asyncio.sleep(0.2)
    assert resumed == [b"0", b"1", b"2"]
    assert reader.position(session) == ids[2].decode()
    stop.set()
    reader.wake()
    await task
    await redis.aclose()


async def _xread_calls(redis: aioredis.Redis) -> int:
    stats: Any = await redis.info("commandstats")
    return int(stats.get("cmdstat_xread", {}).get("calls", 0))


def _running_reader(
    redis: aioredis.Redis, keys: StreamKeys, **options: Any
) -> tuple[SessionStreamReader, asyncio.Event, asyncio.Task[None]]:
    """A session reader running until the returned event is set."""
    reader = SessionStreamReader(redis, wake_key=f"{keys.prefix}:wake:t",
                                 dead=DeadLetters(redis, keys, "t"), **options)  # fmt: skip
    stop = asyncio.Event()
    return reader, stop, asyncio.create_task(reader.run(stop))


async def _llen(redis: aioredis.Redis, key: str, n: int) -> bool:
    return int(await redis.llen(key)) >= n


async def _scard(redis: aioredis.Redis, key: str, n: int) -> bool:
    return int(await redis.scard(key)) >= n


async def _xlen(redis: aioredis.Redis, key: str, n: int) -> bool:
    return int(await redis.xlen(key)) >= n


async def _no_pending(redis: aioredis.Redis, stream: str, group: str) -> bool:
    return int((await redis.xpending(stream, group))["pending"]) == 0


async def _true(value: bool) -> bool:
    return value


async def test_session_reader_retries_a_failing_handler_then_dead_letters_the_entry(
    redis: aioredis.Redis, keys: StreamKeys
) -> None:
    calls: list[list[bytes]] = []
    healthy: list[bytes] = []

    async def flaky(key: str, entries: list[Entry]) -> None:
        calls.append([e.fields[b"seq"] for e in entries])
        if entries[0].fields[b"seq"] == b"0":
            raise RuntimeError("cannot handle the first entry")

    async def fine(key: str, entries: list[Entry]) -> None:
        healthy.extend(e.fields[b"seq"] for e in entries)

    bad, good = keys.frames("bad"), keys.frames("good")
    await _fill(redis, bad, 3, "bad")
    reader, stop, task = _running_reader(redis, keys, block_ms=200, max_deliveries=3)
    reader.add(bad, "0-0", flaky)
    reader.add(good, "0-0", fine)
    await _fill(redis, good, 3, "good")
    await wait_until(lambda: _xlen(redis, keys.dead, 1))
    await wait_until(lambda: _true(calls[-1] == [b"1", b"2"]))
    await wait_until(lambda: _true(healthy == [b"0", b"1", b"2"]))
    stop.set()
    await task
    assert calls[:3] == [[b"0", b"1", b"2"]] * 3, "the same batch retried, in order"
    [(_, dead)] = await redis.xrange(keys.dead)
    assert dead[b"stream"] == bad.encode() and dead[b"orig.seq"] == b"0"
    assert b"cannot handle the first entry" in dead[b"reason"]


async def test_session_reader_takes_plain_handlers_retrying_awaiting_and_dropping_them_like_async_ones(
    redis: aioredis.Redis, keys: StreamKeys
) -> None:
    """A plain function runs inline (no Task); what it returns, if anything, is awaited;
    its failures are retried then dead-lettered, and `SessionLost` ends the following."""
    calls: list[list[bytes]] = []
    healthy: list[bytes] = []
    awaited: list[bytes] = []

    def flaky(key: str, entries: list[Entry]) -> None:
        calls.append([e.fields[b"seq"] for e in entries])
        if entries[0].fields[b"seq"] == b"0":
            raise RuntimeError("cannot handle the first entry")

    def fine(key: str, entries: list[Entry]) -> Awaitable[None] | None:
        healthy.extend(e.fields[b"seq"] for e in entries)
        if entries[-1].fields[b"seq"] != b"2":
            return None

        async def later() -> None:
            await asyncio.sleep(0)
            awaited.append(entries[-1].fields[b"seq"])

        return later()

    def lost(key: str, entries: list[Entry]) -> None:
        raise SessionLost("another replica owns it")

    bad, good, gone = keys.frames("bad"), keys.frames("good"), keys.frames("gone")
    await _fill(redis, bad, 3, "bad")
    await _fill(redis, gone, 1, "gone")
    reader, stop, task = _running_reader(redis, keys, block_ms=200, max_deliveries=3)
    reader.add(bad, "0-0", flaky)
    reader.add(good, "0-0", fine)
    reader.add(gone, "0-0", lost)
    await _fill(redis, good, 3, "good")
    await wait_until(lambda: _xlen(redis, keys.dead, 1))
    await wait_until(lambda: _true(calls[-1] == [b"1", b"2"]))
    await wait_until(lambda: _true(awaited == [b"2"]))
    stop.set()
    await task
    assert calls[:3] == [[b"0", b"1", b"2"]] * 3, "the same batch retried, in order"
    assert healthy == [b"0", b"1", b"2"]
    assert reader.position(good) == (await redis.xrange(good))[-1][0].decode()
    assert gone not in reader and reader.position(gone) is None
    [(_, dead)] = await redis.xrange(keys.dead)
    assert dead[b"stream"] == bad.encode() and dead[b"orig.seq"] == b"0"


def test_an_xread_packed_from_keys_packed_beforehand_is_the_command_hiredis_packs() -> None:
    keys, ids = ["vl:frames:{a}", "vl:frames:{é}", "wake"], ["1-0", "1700000000000-12", "$"]
    whole = ("XREAD", "COUNT", 64, "BLOCK", 1000, "STREAMS", *keys, *ids)
    packed_keys = hiredis.pack_command(tuple(keys)).split(b"\r\n", 1)[1]
    assert packed_args(*keys) == packed_keys
    assert packed_xread(64, 1000, packed_keys, ids) == hiredis.pack_command(whole)
    # Positions as a reply gave them (bytes) pack the same.
    as_bytes = [i.encode() for i in ids]
    assert packed_xread(64, 1000, packed_keys, as_bytes) == hiredis.pack_command(whole)
