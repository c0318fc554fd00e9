"""Fenced writes on a real Redis Cluster (3 masters, 3 replicas): each write lands on its
session's master, writes to every master share one round trip per master, each is checked
alone, and a write the cluster redirects (a slot moved or moving) is applied exactly once."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from tests.shared.test_fencing import _claim, _frames_write
from vlpipe.shared.fencing import Fenced, Regressed, Writer
from vlpipe.shared.keys import StreamKeys
from vlpipe.shared.redis_cluster import LocalCluster, session_id_on
from vlpipe.shared.streams import _redis_down, is_cluster


def _sessions_on_every_master(cluster: LocalCluster, per_master: int, tag: str) -> list[str]:
    sids = []
    for n, shard in enumerate(cluster.shards()):
        start = 0
        for _ in range(per_master):
            sid = session_id_on(shard, prefix=f"{tag}{n}-", start=start)
            start = int(sid.rsplit("-", 1)[1]) + 1
            sids.append(sid)
    return sids


async def test_writes_to_every_master_share_round_trips_and_each_is_checked_alone(
    redis_cluster: LocalCluster, cluster_redis: aioredis.Redis, keys: StreamKeys
) -> None:
    assert is_cluster(cluster_redis)
    writer = Writer(cluster_redis)
    sids = _sessions_on_every_master(redis_cluster, 10, "w")
    fences = {sid: await _claim(cluster_redis, keys, sid) for sid in sids}
    # One write is fenced and one regressed, on different masters.
    fenced, regressed = sids[3], sids[25]
    await writer.apply(_frames_write(keys, regressed, 0, 1), fences[regressed])
    await writer.apply(_frames_write(keys, regressed, 1, 1), fences[regressed])
    await cluster_redis.hset(keys.session_state(regressed), "svc.written", 0)  # lost writes
    await _claim(cluster_redis, keys, fenced)  # taken over elsewhere
    trips_before = writer.round_trips
    results = await asyncio.gather(
        *(writer.apply(_frames_write(keys, sid, 2 if sid == regressed else 0, 2), fences[sid])
          for sid in sids),
        return_exceptions=True,
    )  # fmt: skip
    assert writer.round_trips - trips_before < 5
    by_sid = dict(zip(sids, results, strict=True))
    assert isinstance(by_sid.pop(fenced), Fenced)
    assert isinstance(by_sid.pop(regressed), Regressed)
    assert all(r == [2] for r in by_sid.values()), by_sid
    # Each session's entries are on its own master, which the cluster's view names.
    for sid in sids:
        master = redis_cluster.master_of_key(keys.frames(sid))
        with redis_cluster.client(master) as plain:
            expected = {fenced: 0, regressed: 2}.get(sid, 2)
            assert plain.xlen(keys.frames(sid)) == expected


async def test_a_retry_of_an_applied_write_on_a_cluster_writes_nothing_twice(
    redis_cluster: LocalCluster, cluster_redis: aioredis.Redis, keys: StreamKeys
) -> None:
    writer = Writer(cluster_redis)
    sids = _sessions_on_every_master(redis_cluster, 1, "r")
    fences = {sid: await _claim(cluster_redis, keys, sid) for sid in sids}
    writes = {sid: _frames_write(keys, sid, 0, 3) for sid in sids}
    await asyncio.gather(*(writer.apply(writes[sid], fences[sid]) for sid in sids))
    for fence in fences.values():
        fence.written -= 1  # as if the replies had been lost with the connections
    again = await asyncio.gather(*(writer.apply(writes[sid], fences[sid]) for sid in sids))
    assert again == [None] * len(sids)  # each recognised as applied, on its own master
    assert [await cluster_redis.xlen(keys.frames(sid)) for sid in sids] == [3] * len(sids)


@pytest.mark.parametrize("stage", ["moved", "asking"])
async def test_a_write_to_a_slot_that_moved_or_is_moving_is_applied_exactly_once(
    redis_cluster: LocalCluster, cluster_redis: aioredis.Redis, keys: StreamKeys, stage: str
) -> None:
    writer = Writer(cluster_redis)
    shards = redis_cluster.shards()
    sid = session_id_on(shards[0], prefix=f"m{stage}-")
    fence = await _claim(cluster_redis, keys, sid)
    await writer.apply(_frames_write(keys, sid, 0, 2), fence)  # the client knows the slot
    slot = cluster_redis.keyslot(keys.frames(sid))
    target = shards[1].master
    source = redis_cluster.begin_migration(slot, target)
    try:
        redis_cluster.move_keys(slot, source, target)
        if stage == "moved":
            redis_cluster.finish_migration(slot, source, target)
        # The writer's map still names the old master: MOVED, or ASK while it migrates.
        assert await writer.apply(_frames_write(keys, sid, 2, 3), fence) == [5]
        assert fence.written == 2
        with redis_cluster.client(target) as plain:
            plain.execute_command("ASKING")  # for the next command only
            assert plain.xlen(keys.frames(sid)) == 5
            plain.execute_command("ASKING")
            assert plain.hget(keys.session_state(sid), "svc.written") == b"2"
    finally:
        if stage == "asking":
            redis_cluster.finish_migration(slot, source, target)
        redis_cluster.migrate_slot(slot, source)  # put it back for the other tests
        redis_cluster.wait_ok()


async def test_masters_that_lost_their_scripts_get_them_again(
    redis_cluster: LocalCluster, cluster_redis: aioredis.Redis, keys: StreamKeys
) -> None:
    writer = Writer(cluster_redis)
    sids = _sessions_on_every_master(redis_cluster, 2, "n")
    fences = {sid: await _claim(cluster_redis, keys, sid) for sid in sids}
    await asyncio.gather(*(writer.apply(_frames_write(keys, s, 0, 1), fences[s]) for s in sids))
    for master in redis_cluster.masters():  # as after restarts without the scripts
        with redis_cluster.client(master) as plain:
            plain.script_flush()
    again = await asyncio.gather(
        *(writer.apply(_frames_write(keys, s, 1, 1), fences[s]) for s in sids)
    )
    assert again == [[2]] * len(sids)


async def test_writes_go_on_after_their_master_is_killed_and_none_is_applied_twice(
    redis_cluster: LocalCluster, cluster_redis: aioredis.Redis, keys: StreamKeys
) -> None:
    writer = Writer(cluster_redis)
    shard = redis_cluster.shards()[0]
    sid, other = session_id_on(shard, prefix="kill-"), session_id_on(
        redis_cluster.shards()[2], prefix="calm-")  # fmt: skip
    fences = {s: await _claim(cluster_redis, keys, s) for s in (sid, other)}
    errors: list[str] = []

    async def write_on(s: str, n: int) -> None:
        """As `SessionOwnership.commit` does: the same write until it is applied."""
        write = _frames_write(keys, s, n, 1)
        while True:
            try:
                await writer.apply(write, fences[s])
                return
            except Regressed:
                raise
            except Exception as exc:  # the master is down or failing over
                if not _redis_down(exc):
                    raise
                errors.append(type(exc).__name__)
                await asyncio.sleep(0.1)

    for n in range(5):
        await asyncio.gather(write_on(sid, n), write_on(other, n))
    redis_cluster.kill(shard.master)
    try:
        for n in range(5, 15):
            await asyncio.gather(write_on(sid, n), write_on(other, n))
    except Regressed:
        pytest.skip("the replica was promoted without a write it had acknowledged")
    finally:
        redis_cluster.restart(shard.master)
        redis_cluster.wait_ok()
    assert errors  # the writes did meet the dead master
    for s in (sid, other):
        state = await cluster_redis.hget(keys.session_state(s), "svc.written")
        assert int(state) == fences[s].written == 15
        # Each numbered write added its one entry exactly once.
        assert await cluster_redis.xlen(keys.frames(s)) == 15
