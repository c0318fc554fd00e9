"""The local Redis Cluster the cluster tests run on: real redis-server processes joined with
redis-py alone, whose view of slots and masters matches what a cluster client sees."""

from __future__ import annotations

from redis.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import MovedError

from vlpipe.shared.keys import StreamKeys
from vlpipe.shared.redis_cluster import SLOTS, LocalCluster, session_id_on, split_slots


def test_split_slots_covers_every_slot_once() -> None:
    for masters in (1, 3, 5, 7):
        ranges = split_slots(masters)
        covered = [s for lo, hi in ranges for s in range(lo, hi + 1)]
        assert covered == list(range(SLOTS))


def test_session_id_on_picks_ids_whose_hash_tag_lands_in_the_range() -> None:
    keys = StreamKeys("vl")
    for lo, hi in split_slots(3):
        sid = session_id_on(range(lo, hi + 1), prefix="call-")
        assert sid.startswith("call-")
        assert lo <= key_slot(keys.frames(sid).encode()) <= hi
        assert key_slot(keys.events(sid).encode()) == key_slot(keys.frames(sid).encode())


def test_three_masters_with_a_replica_each_own_every_slot_and_take_writes(
    redis_cluster: LocalCluster,
) -> None:
    shards = redis_cluster.shards()
    assert len(shards) == 3
    assert all(len(s.replicas) == 1 for s in shards)
    owned = sorted(slot for s in shards for lo, hi in s.slots for slot in range(lo, hi + 1))
    assert owned == list(range(SLOTS))

    keys = StreamKeys("lc")
    client = RedisCluster.from_url(redis_cluster.url)
    try:
        for n, shard in enumerate(shards):
            sid = session_id_on(shard, prefix=f"lc{n}-")
            client.xadd(keys.frames(sid), {"n": n})
            # The entry is on that master, as the cluster's own view says, and nowhere else.
            for node in redis_cluster.nodes:
                if node in shard.replicas:
                    continue
                with redis_cluster.client(node) as plain:
                    try:
                        here = plain.execute_command("XLEN", keys.frames(sid))
                    except MovedError:  # a node that does not own the slot
                        here = 0
                assert here == (1 if node is shard.master else 0)
            assert redis_cluster.master_of_key(keys.frames(sid)) is shard.master
    finally:
        client.close()


def test_a_killed_master_is_replaced_by_its_replica_and_rejoins_as_a_replica(
    redis_cluster: LocalCluster,
) -> None:
    shard = redis_cluster.shards()[1]
    old, replica = shard.master, shard.replicas[0]
    sid = session_id_on(shard, prefix="failover-")
    key = StreamKeys("lc").ctl(sid)
    with redis_cluster.client(old) as plain:
        plain.xadd(key, {"before": "kill"})
        assert plain.execute_command("WAIT", 1, 5000) == 1  # replicated before the crash

    redis_cluster.kill(old)
    redis_cluster.wait_ok(timeout=30)
    assert redis_cluster.master_of_key(key) is replica
    with redis_cluster.client(replica) as plain:
        assert plain.xlen(key) == 1

    redis_cluster.restart(old)
    redis_cluster.wait_ok(timeout=30)
    assert old in redis_cluster.replicas_of(replica)
    assert len(redis_cluster.masters()) == 3
