"""Shared streams on a real Redis Cluster: entries a session's fenced write puts in its
outbox reach the shared stream exactly once, however the relay is interrupted or doubled."""

from __future__ import annotations

import asyncio
import contextlib

import redis.asyncio as aioredis
from redis.crc import key_slot

from tests.shared.test_fencing import _claim
from tests.waiting import wait_until
from vlpipe.shared.fencing import Fence, SessionWrite, Writer
from vlpipe.shared.keys import StreamKeys
from vlpipe.shared.outbox import SharedOutbox
from vlpipe.shared.redis_cluster import LocalCluster, session_id_on
from vlpipe.shared.streams import connect


async def _write_finals(
    writer: Writer, outbox: SharedOutbox, keys: StreamKeys, sid: str, fence: Fence, texts: list[str]
) -> SessionWrite:
    write = SessionWrite(keys.session_state(sid), "svc")
    for text in texts:
        write.xadd(keys.transcript(sid), {"text": text})
        outbox.add(write, sid, {"session": sid, "text": text})
    await writer.apply(write, fence)
    return write


async def _shared_texts(redis: aioredis.Redis, key: str, sid: str) -> list[str]:
    entries = await redis.xrange(key)
    return [f[b"text"].decode() for _, f in entries if f[b"session"] == sid.encode()]


def _session_away_from(cluster: LocalCluster, key: str, prefix: str) -> str:
    """A session on another master than `key` (so the relay crosses masters)."""
    home = cluster.master_of_key(key)
    shard = next(s for s in cluster.shards() if s.master is not home)
    return session_id_on(shard, prefix=prefix)


async def test_outbox_entries_reach_the_shared_stream_once_and_the_outbox_is_emptied(
    redis_cluster: LocalCluster, cluster_redis: aioredis.Redis, keys: StreamKeys
) -> None:
    outbox = SharedOutbox(cluster_redis, keys, keys.transcripts)
    assert outbox.cluster
    assert key_slot(outbox.marker("x").encode()) == key_slot(keys.transcripts.encode())
    sid = _session_away_from(redis_cluster, keys.transcripts, "ob-")
    writer, fence = Writer(cluster_redis), await _claim(cluster_redis, keys, sid)
    write = await _write_finals(writer, outbox, keys, sid, fence, ["one", "two"])
    assert outbox.pending_in(write, sid)
    assert await _shared_texts(cluster_redis, keys.transcripts, sid) == []  # not relayed yet
    assert await outbox.relay(sid) == 2
    await _write_finals(writer, outbox, keys, sid, fence, ["three"])
    assert await outbox.relay(sid) == 1
    assert await outbox.relay(sid) == 0
    assert await _shared_texts(cluster_redis, keys.transcripts, sid) == ["one", "two", "three"]
    assert await cluster_redis.xlen(outbox.outbox(sid)) == 0


async def test_a_relay_interrupted_after_its_script_or_doubled_by_a_zombie_adds_nothing_twice(
    redis_cluster: LocalCluster, cluster_redis: aioredis.Redis, keys: StreamKeys
) -> None:
    outbox = SharedOutbox(cluster_redis, keys, keys.transcripts)
    sid = _session_away_from(redis_cluster, keys.transcripts, "oz-")
    writer, fence = Writer(cluster_redis), await _claim(cluster_redis, keys, sid)
    await _write_finals(writer, outbox, keys, sid, fence, ["a", "b", "c"])
    # The owner died after the relay script ran but before it trimmed the outbox: the
    # entries are still there for the replica that takes over.
    entries = await cluster_redis.xrange(outbox.outbox(sid))
    args: list[object] = [60]
    for entry_id, fields in entries[:2]:
        flat = [x for pair in fields.items() for x in pair]
        args += [entry_id, len(flat), *flat]
    await outbox._relay(keys=[outbox.shared, outbox.marker(sid)], args=args)
    assert await cluster_redis.xlen(outbox.outbox(sid)) == 3
    # The new owner and the old one (a zombie) both relay, at once: "c" goes once.
    zombie = SharedOutbox(cluster_redis, keys, keys.transcripts)
    added = await asyncio.gather(outbox.relay(sid), zombie.relay(sid))
    assert sum(added) == 1
    await _write_finals(writer, outbox, keys, sid, fence, ["d"])
    assert await outbox.relay(sid) == 1
    assert await _shared_texts(cluster_redis, keys.transcripts, sid) == ["a", "b", "c", "d"]


async def test_a_relay_whose_reply_was_lost_is_retried_without_a_repeat(
    redis_cluster: LocalCluster, cluster_redis: aioredis.Redis, keys: StreamKeys
) -> None:
    sid = _session_away_from(redis_cluster, keys.tool_calls, "ot-")
    outbox = SharedOutbox(cluster_redis, keys, keys.tool_calls)
    writer, fence = Writer(cluster_redis), await _claim(cluster_redis, keys, sid)
    await _write_finals(writer, outbox, keys, sid, fence, ["x", "y"])
    impatient = connect(redis_cluster.url, cluster=True, timeout_s=0.2)
    slow = SharedOutbox(impatient, keys, keys.tool_calls)
    await impatient.xlen(keys.tool_calls)  # the client knows the slots
    shared_master = redis_cluster.master_of_key(keys.tool_calls)
    with redis_cluster.client(shared_master) as plain:
        plain.execute_command("CLIENT", "PAUSE", 700, "WRITE")  # the script waits to run
    try:
        with contextlib.suppress(Exception):  # the reply comes too late: a timeout
            await slow.relay(sid)
        await asyncio.sleep(0.8)  # the pause is over; the script ran (or not)
        await slow.relay(sid)  # the retry
        assert await _shared_texts(cluster_redis, keys.tool_calls, sid) == ["x", "y"]
        assert await cluster_redis.xlen(outbox.outbox(sid)) == 0
    finally:
        await impatient.aclose()


async def test_entries_numbered_by_the_session_are_recognised_when_written_again(
    redis_cluster: LocalCluster, cluster_redis: aioredis.Redis, keys: StreamKeys
) -> None:
    # Egress numbers its outputs (`seq`): after a failover lost acknowledged writes, the
    # owner resumes from an older checkpoint and writes the same finals again, into new
    # outbox entries. The relay knows them by their number.
    outbox = SharedOutbox(cluster_redis, keys, keys.transcripts, "seq")
    sid = _session_away_from(redis_cluster, keys.transcripts, "oq-")
    writer, fence = Writer(cluster_redis), await _claim(cluster_redis, keys, sid)

    async def finals(numbered: list[tuple[int, str]]) -> None:
        write = SessionWrite(keys.session_state(sid), "svc")
        for seq, text in numbered:
            outbox.add(write, sid, {"session": sid, "text": text, "seq": seq})
        await writer.apply(write, fence)

    await finals([(0, "zero"), (1, "one")])
    assert await outbox.relay(sid) == 2
    await finals([(1, "one"), (2, "two")])  # "one" again, as after the resume
    assert await outbox.relay(sid) == 1
    assert await _shared_texts(cluster_redis, keys.transcripts, sid) == ["zero", "one", "two"]


async def test_relayed_entries_the_shared_streams_master_lost_in_a_failover_are_relayed_again(
    redis_cluster: LocalCluster, cluster_redis: aioredis.Redis, keys: StreamKeys
) -> None:
    outbox = SharedOutbox(cluster_redis, keys, keys.transcripts, "seq")
    home = redis_cluster.master_of_key(keys.transcripts)
    shard = next(s for s in redis_cluster.shards() if s.master is home)
    old, heirs = shard.master, shard.replicas  # one, unless a failover left it two
    assert heirs
    # The client knows the heirs too (a view learned while an earlier test's old master
    # was rejoining as a replica would lack them).
    slot = key_slot(keys.transcripts.encode())
    await cluster_redis.initialize()

    async def client_knows_a_replica() -> bool:
        await cluster_redis.nodes_manager.initialize()
        return len(cluster_redis.nodes_manager.slots_cache[slot]) > 1

    await wait_until(client_knows_a_replica, within=20, step=0.2)
    sid = _session_away_from(redis_cluster, keys.transcripts, "olost-")
    writer, fence = Writer(cluster_redis), await _claim(cluster_redis, keys, sid)

    async def finals(numbered: list[tuple[int, str]]) -> None:
        write = SessionWrite(keys.session_state(sid), "svc")
        for seq, text in numbered:
            outbox.add(write, sid, {"session": sid, "text": text, "seq": seq})
        await writer.apply(write, fence)

    await finals([(0, "kept")])
    assert await outbox.relay(sid) == 1 and sid not in outbox.unsettled  # replicated
    # The heirs stop getting anything from the old master (paused, their links dropped).
    for heir in heirs:
        redis_cluster.pause(heir)
    with redis_cluster.client(old) as plain:
        assert plain.execute_command("CLIENT", "KILL", "TYPE", "replica") >= 1
    try:
        await finals([(1, "at risk")])
        assert await outbox.relay(sid) == 1  # on the old master, unconfirmed
        assert sid in outbox.unsettled
        assert await cluster_redis.xlen(outbox.outbox(sid)) >= 1  # so kept in the outbox
        redis_cluster.kill(old)
    finally:
        for heir in heirs:
            redis_cluster.resume(heir)
    try:
        await asyncio.to_thread(redis_cluster.wait_ok, 30)
        assert redis_cluster.master_of_key(keys.transcripts) in heirs
        assert await _shared_texts(cluster_redis, keys.transcripts, sid) == ["kept"]  # lost
        await finals([(2, "after")])
        await outbox.settle(sid)  # relays until the new master's replica confirms
        assert await _shared_texts(cluster_redis, keys.transcripts, sid) == [
            "kept", "at risk", "after"]  # fmt: skip
    finally:
        redis_cluster.restart(old)
        await asyncio.to_thread(redis_cluster.wait_ok, 30)
