"""The session reader on a real Redis Cluster: one blocking XREAD per slot in use (a
cluster refuses one XREAD across slots), woken per slot, and a stream's slot moved to
another master mid-read loses and repeats nothing."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
from redis.crc import key_slot

from tests.waiting import wait_until
from vlpipe.shared.keys import StreamKeys
from vlpipe.shared.redis_cluster import LocalCluster, session_id_on
from vlpipe.shared.streams import DeadLetters, Entry, SessionStreamReader, _redis_down, slot_tag


def test_slot_tags_hash_to_their_slot() -> None:
    for slot in (0, 1, 5460, 5461, 12_000, 16_383):
        assert key_slot(f"vl:wake:r1:{{{slot_tag(slot)}}}".encode()) == slot


def _reader(redis: aioredis.Redis, keys: StreamKeys) -> SessionStreamReader:
    return SessionStreamReader(
        redis, wake_key=f"{keys.prefix}:wake:t", dead=DeadLetters(redis, keys, "t"),
        block_ms=3000,
    )  # fmt: skip


async def _true(value: bool) -> bool:
    return value


async def test_reader_follows_sessions_on_every_master_and_wakes_each_slot(
    redis_cluster: LocalCluster, cluster_redis: aioredis.Redis, keys: StreamKeys
) -> None:
    got: dict[str, list[bytes]] = {}

    async def handle(key: str, entries: list[Entry]) -> None:
        got.setdefault(key, []).extend(e.fields[b"n"] for e in entries)

    shards = redis_cluster.shards()
    first = [keys.frames(session_id_on(shard, prefix=f"a{n}-")) for n, shard in enumerate(shards)]
    for key in first:
        for n in range(3):
            await cluster_redis.xadd(key, {"n": n})
    reader = _reader(cluster_redis, keys)
    stop = asyncio.Event()
    task = asyncio.create_task(reader.run(stop))
    checkpoint = (await cluster_redis.xrange(first[0]))[0][0].decode()
    reader.add(first[0], checkpoint, handle)  # resumes after its first entry
    for key in first[1:]:
        reader.add(key, "0-0", handle)
    await wait_until(lambda: _true(got == {first[0]: [b"1", b"2"], first[1]: [b"0", b"1", b"2"],
                                           first[2]: [b"0", b"1", b"2"]}), within=5)  # fmt: skip
    # A session's two streams share its slot and one read; each slot in use has one.
    ctl = keys.ctl(first[0].split("{")[1].rstrip("}"))
    reader.add(ctl, "0-0", handle)
    await cluster_redis.xadd(ctl, {"n": "c"})
    await wait_until(lambda: _true(got.get(ctl) == [b"c"]), within=5)
    assert reader._reading == {key_slot(k.encode()) for k in first}
    # Every read now blocks for 3 s: adding a stream on a slot already read wakes that
    # slot's read; a stream on a new slot gets a read of its own at once.
    later = [keys.frames(session_id_on(shard, prefix=f"b{n}-")) for n, shard in enumerate(shards)]
    same_slot = keys.audio(first[1].split("{")[1].rstrip("}"))
    for key in [*later, same_slot]:
        reader.add(key, "0-0", handle)
        await cluster_redis.xadd(key, {"n": "x"})
    await wait_until(lambda: _true(all(got.get(k) == [b"x"] for k in [*later, same_slot])),
                     within=2.5)  # fmt: skip
    # Streams removed: their slot's read ends with them.
    for key in [first[2], later[2]]:
        reader.remove(key)
    await wait_until(lambda: _true(key_slot(first[2].encode()) not in reader._reading), within=5)
    stop.set()
    reader.wake()
    await asyncio.wait_for(task, timeout=10)


async def test_a_followed_stream_whose_slot_moves_to_another_master_loses_and_repeats_nothing(
    redis_cluster: LocalCluster, cluster_redis: aioredis.Redis, keys: StreamKeys
) -> None:
    shards = redis_cluster.shards()
    sid = session_id_on(shards[0], prefix="mig-")
    key, other = keys.frames(sid), keys.frames(session_id_on(shards[2], prefix="stay-"))
    slot = key_slot(key.encode())
    got: dict[str, list[int]] = {key: [], other: []}

    async def handle(stream: str, entries: list[Entry]) -> None:
        got[stream].extend(int(e.fields[b"n"]) for e in entries)

    reader = _reader(cluster_redis, keys)
    stop = asyncio.Event()
    task = asyncio.create_task(reader.run(stop))
    reader.add(key, "0-0", handle)
    reader.add(other, "0-0", handle)
    written = 0
    producing = True

    async def produce() -> None:
        """As a producer does: each entry retried until added (redis-py's own XADD may
        give up on ASK while the slot migrates: "TTL exhausted")."""
        nonlocal written
        while producing:
            for stream in (key, other):
                while True:
                    try:
                        await cluster_redis.xadd(stream, {"n": written})
                        break
                    except Exception as exc:
                        if not _redis_down(exc):
                            raise
                        await asyncio.sleep(0.05)
            written += 1
            await asyncio.sleep(0.005)

    producer = asyncio.create_task(produce())
    try:
        await wait_until(lambda: _true(len(got[key]) > 20), within=15)
        target = shards[1].master
        source = await asyncio.to_thread(redis_cluster.begin_migration, slot, target)
        await wait_until(lambda: _true(len(got[key]) > 40), within=15)  # reads while MIGRATING
        await asyncio.to_thread(redis_cluster.move_keys, slot, source, target)
        await wait_until(lambda: _true(len(got[key]) > 60), within=15)  # ASK to the target
        await asyncio.to_thread(redis_cluster.finish_migration, slot, source, target)
        await wait_until(lambda: _true(len(got[key]) > 80), within=15)  # MOVED, then there
        assert redis_cluster.master_of_key(key) is target
    finally:
        producing = False
        await producer
    try:
        await wait_until(lambda: _true(len(got[key]) >= written and len(got[other]) >= written),
                         within=15)  # fmt: skip
    except AssertionError:
        pass  # the comparison below says what is missing
    assert got[key] == list(range(written))  # nothing lost, nothing twice, in order
    assert got[other] == list(range(written))
    stop.set()
    reader.wake()
    await asyncio.wait_for(task, timeout=10)
    await asyncio.to_thread(redis_cluster.migrate_slot, slot, source)  # as it was
    redis_cluster.wait_ok()


async def test_a_followed_stream_whose_master_is_killed_is_read_on_from_the_promoted_replica(
    redis_cluster: LocalCluster, cluster_redis: aioredis.Redis, keys: StreamKeys
) -> None:
    shard = redis_cluster.shards()[1]
    key = keys.frames(session_id_on(shard, prefix="fo-"))
    got: list[int] = []

    async def handle(stream: str, entries: list[Entry]) -> None:
        got.extend(int(e.fields[b"n"]) for e in entries)

    reader = SessionStreamReader(
        cluster_redis, wake_key=f"{keys.prefix}:wake:fo", dead=DeadLetters(cluster_redis, keys, "t"),
        block_ms=500,
    )  # fmt: skip
    stop = asyncio.Event()
    task = asyncio.create_task(reader.run(stop))
    reader.add(key, "0-0", handle)
    acknowledged = 0

    async def produce(until: int) -> None:
        nonlocal acknowledged
        while acknowledged < until:
            try:
                await cluster_redis.xadd(key, {"n": acknowledged})
                acknowledged += 1
            except Exception as exc:
                if not _redis_down(exc):
                    raise
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.01)

    await produce(30)
    await wait_until(lambda: _true(len(got) == 30), within=15)
    redis_cluster.kill(shard.master)
    try:
        await produce(60)  # through the failover
        await wait_until(lambda: _true(len(got) >= 60), within=30)
    finally:
        redis_cluster.restart(shard.master)
        redis_cluster.wait_ok()
    stop.set()
    reader.wake()
    await asyncio.wait_for(task, timeout=10)
    kept = [int(f[b"n"]) for _, f in await cluster_redis.xrange(key)]
    assert kept == list(range(60))  # the failover lost nothing acknowledged here
    assert got == kept  # every entry once, in order, across the failover
