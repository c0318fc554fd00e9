"""`VLPIPE_REDIS_WAIT_REPLICAS`: each batch of fenced writes is followed by Redis's WAIT on
its own connection, so a write is acknowledged to its session only once a replica has it;
one a replica does not confirm in time still stands, and is counted and logged."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.shared.test_fencing import _claim, _frames_write
from tests.shared.test_fencing_cluster import _sessions_on_every_master
from tests.waiting import wait_until
from vlpipe.shared.fencing import Wait, Writer
from vlpipe.shared.keys import StreamKeys
from vlpipe.shared.redis_cluster import LocalCluster
from vlpipe.shared.redis_server import RedisServer
from vlpipe.shared.streams import connect


@pytest.fixture
def primary_and_replica(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer]]:
    primary = RedisServer(tmp_path / "primary")
    primary.start()
    replica = RedisServer(
        tmp_path / "replica", extra_args=("--replicaof", primary.host, str(primary.port))
    )
    replica.start()
    try:
        yield primary, replica
    finally:
        replica.stop()
        primary.stop()


async def test_a_write_returns_once_a_replica_has_it_and_an_unconfirmed_one_is_counted(
    primary_and_replica: tuple[RedisServer, RedisServer], keys: StreamKeys
) -> None:
    primary, replica = primary_and_replica
    redis, on_replica = connect(primary.url), connect(replica.url)

    async def linked() -> bool:
        info = await on_replica.info("replication")
        return bool(info.get("master_link_status") == "up")

    await wait_until(linked, within=30)
    writer = Writer(redis, Wait(replicas=1, timeout_ms=2000))
    fence = await _claim(redis, keys, "w1")
    await writer.apply(_frames_write(keys, "w1", 0, 3), fence)
    # Acknowledged only once the replica had it: readable there at once.
    assert await on_replica.xlen(keys.frames("w1")) == 3
    assert writer.unconfirmed == 0

    # A replica that stops answering: the write waits its timeout, stands, and is counted.
    assert replica.proc is not None
    os.kill(replica.proc.pid, signal.SIGSTOP)
    try:
        writer.wait = Wait(replicas=1, timeout_ms=200)
        assert await writer.apply(_frames_write(keys, "w1", 3, 2), fence) == [5]
        assert writer.unconfirmed == 1
        assert await redis.xlen(keys.frames("w1")) == 5
    finally:
        os.kill(replica.proc.pid, signal.SIGCONT)

    async def caught_up() -> bool:
        return await on_replica.xlen(keys.frames("w1")) == 5

    await wait_until(caught_up, within=30)
    await asyncio.gather(redis.aclose(), on_replica.aclose())


async def test_on_a_cluster_each_master_waits_for_its_own_replica(
    redis_cluster: LocalCluster, cluster_redis: aioredis.Redis, keys: StreamKeys
) -> None:
    writer = Writer(cluster_redis, Wait(replicas=1, timeout_ms=2000))
    sids = _sessions_on_every_master(redis_cluster, 2, "wait")
    fences = {sid: await _claim(cluster_redis, keys, sid) for sid in sids}
    await asyncio.gather(
        *(writer.apply(_frames_write(keys, sid, 0, 2), fences[sid]) for sid in sids)
    )
    assert writer.unconfirmed == 0
    for sid in sids:
        master = redis_cluster.master_of_key(keys.frames(sid))
        (replica,) = redis_cluster.replicas_of(master)
        with redis_cluster.client(replica) as plain:
            plain.execute_command("READONLY")
            assert plain.xlen(keys.frames(sid)) == 2
    # One master's replica stops: the writes to that master go unconfirmed, the others'
    # masters still confirm theirs (each waits on its own connection for its own replica).
    stalled = redis_cluster.master_of_key(keys.frames(sids[0]))
    (stopped,) = redis_cluster.replicas_of(stalled)
    mine = [sid for sid in sids if redis_cluster.master_of_key(keys.frames(sid)) is stalled]
    others = [sid for sid in sids if sid not in mine]
    writer.wait = Wait(replicas=1, timeout_ms=300)
    redis_cluster.pause(stopped)
    try:
        await asyncio.gather(
            *(writer.apply(_frames_write(keys, sid, 2, 2), fences[sid]) for sid in others)
        )
        assert writer.unconfirmed == 0
        await writer.apply(_frames_write(keys, mine[0], 2, 2), fences[mine[0]])
        assert writer.unconfirmed == 1
    finally:
        redis_cluster.resume(stopped)
    await asyncio.to_thread(redis_cluster.wait_ok, 30)
