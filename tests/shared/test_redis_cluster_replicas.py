"""`LocalCluster.start()` returns with every replica in sync with its master, as its
`wait_ok` promises ("every live replica's link to its master is up"). A test that kills a
master right after start relies on it: a replica still waiting for its first sync (Redis
delays a diskless sync by `repl-diskless-sync-delay`, 5 s) has nothing to take over with."""

from __future__ import annotations

from pathlib import Path

from vlpipe.shared.redis_cluster import LocalCluster


def test_every_replica_is_linked_and_synced_when_start_returns(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path / "cluster")
    cluster.start()
    try:
        for shard in cluster.shards():
            for replica in shard.replicas:
                with cluster.client(replica) as plain:
                    info = plain.info("replication")
                assert info["role"] == "slave"
                assert info["master_link_status"] == "up", (replica, info)
                assert not info["master_sync_in_progress"], (replica, info)
    finally:
        cluster.stop()
