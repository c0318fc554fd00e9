"""The history checker on a cluster is sound: it sees exactly the writes a failover lost,
and it follows a slot from the source of a migration to its target.

The cluster fault tests trust `lost_entries` to say what Redis lost and `History.read`
over the masters' AOFs to say what it kept; these tests make both fail if they are wrong.
"""

from __future__ import annotations

from redis.cluster import RedisCluster
from redis.crc import key_slot

from tests.chaos.harness import ChaosRedis
from tests.chaos.history import lost_entries
from tests.chaos.test_cluster_faults import cut_off, migrate_slot
from vlpipe.shared.audio import AudioFormat
from vlpipe.shared.contracts import Frame, encode
from vlpipe.shared.keys import StreamKeys
from vlpipe.shared.redis_cluster import LocalCluster, session_id_on


def frame(sid: str, seq: int) -> dict[str, bytes | str | int | float]:
    return dict(encode(Frame(session=sid, seq=seq, format=AudioFormat.PCM16, audio=b"\0" * 8)))


def test_lost_entries_are_exactly_what_the_master_acknowledged_and_its_heir_never_got(
    chaos_cluster: LocalCluster,
) -> None:
    cluster = chaos_cluster
    store = ChaosRedis(cluster=cluster)
    keys = StreamKeys("h")
    shard = cluster.shards()[2]
    sid = session_id_on(shard, "lost-")
    key = keys.frames(sid)
    old, heir = shard.master, shard.replicas[0]
    with cluster.client(old) as plain:
        kept = [plain.xadd(key, frame(sid, n)) for n in range(10)]  # type: ignore[arg-type]
        assert plain.execute_command("WAIT", 1, 5000) == 1
    cut_off(cluster, old, heir)
    with cluster.client(old) as plain:
        gone = [plain.xadd(key, frame(sid, n)) for n in range(10, 15)]  # type: ignore[arg-type]
    cluster.kill(old)
    cluster.resume(heir)
    cluster.wait_ok(30)
    client = RedisCluster.from_url(cluster.url)
    try:
        again = [client.xadd(key, frame(sid, n)) for n in range(10, 13)]  # type: ignore[arg-type]
    finally:
        client.close()

    masters = [m.server.data_dir for m in cluster.masters()]
    assert lost_entries(old.server.data_dir, masters, keys.prefix) == {key: gone}
    # Frames 10-12 are back under new ids (as a retry of a write whose reply was cut off
    # adds them): counted as kept, 13 and 14 are what is lost.
    assert lost_entries(old.server.data_dir, masters, keys.prefix, retried_kept=True) == {
        key: gone[3:]
    }
    history = store.history(keys)
    assert history.sessions[sid].frames == [*range(10), *range(10, 13)]
    assert len(kept) + len(again) == 13


def test_the_history_of_a_migrated_slot_runs_from_its_source_into_its_target(
    chaos_cluster: LocalCluster,
) -> None:
    cluster = chaos_cluster
    store = ChaosRedis(cluster=cluster)
    keys = StreamKeys("m")
    source, target, third = cluster.shards()
    sid = session_id_on(source, "moved-")
    client = RedisCluster.from_url(cluster.url)
    try:
        for n in range(5):
            client.xadd(keys.frames(sid), frame(sid, n))  # type: ignore[arg-type]
            client.hset(keys.session_state(sid), "ingest.next_seq", n + 1)
        slot = key_slot(keys.frames(sid).encode())
        assert migrate_slot(cluster, slot, source.master, target.master, 0.0) == 2
        for n in range(5, 9):
            client.xadd(keys.frames(sid), frame(sid, n))  # type: ignore[arg-type]
            client.hset(keys.session_state(sid), "ingest.next_seq", n + 1)
    finally:
        client.close()
    assert cluster.master_of_key(keys.frames(sid)) is target.master

    dirs = [n.server.data_dir for n in (source.master, target.master, third.master)]
    history = store.history(keys, dirs)
    assert history.sessions[sid].frames == list(range(9))
    assert history.sessions[sid].checkpoints["ingest"] == list(range(1, 10))
    # Read the wrong way round, the checker sees the checkpoint move back.
    backwards = store.history(keys, dirs[::-1])
    assert backwards.sessions[sid].checkpoints["ingest"] != list(range(1, 10))
