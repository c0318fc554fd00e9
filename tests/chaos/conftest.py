"""Redis for the chaos tests: a redis-server, or a Redis Cluster, of the test's own whose
AOFs keep every command: the test's history."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.chaos.harness import ChaosRedis
from vlpipe.shared.redis_cluster import LocalCluster
from vlpipe.shared.redis_server import RedisServer

NO_REWRITE = ("--auto-aof-rewrite-percentage", "0")


def started_cluster(base_dir: Path) -> LocalCluster:
    """A cluster whose replicas have had their first sync and finished the AOF rewrite that
    follows it (a replica restarts its AOF from the synced data, empty here): from then on
    the AOFs the history reads hold every write of the test. (`LocalCluster.wait_ok` does
    not wait for the replicas' sync yet: /work/notes/faults-to-core.md.) The diskless sync
    delay is off, so the first sync does not wait 5 s for more replicas."""
    cluster = LocalCluster(base_dir, extra_args=(*NO_REWRITE, "--repl-diskless-sync-delay", "0"))
    cluster.start()
    deadline = time.monotonic() + 30
    for node in cluster.nodes:
        while True:
            with cluster.client(node) as plain:
                info = {**plain.info("replication"), **plain.info("persistence")}
            synced = info["role"] == "master" or (
                info["master_link_status"] == "up" and not info["master_sync_in_progress"])  # fmt: skip
            if synced and not info["aof_rewrite_in_progress"] and not info["aof_rewrite_scheduled"]:
                break
            assert time.monotonic() < deadline, f"{node}: no sync or AOF rewrite never ended"
            time.sleep(0.05)
    return cluster


@pytest.fixture
def chaos_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """AOF with `appendfsync always` (every acknowledged write is in it) and no automatic
    rewrite (which would fold the history into a snapshot)."""
    server = RedisServer(tmp_path / "redis", extra_args=NO_REWRITE)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def chaos_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """3 masters and 3 replicas of the test's own (it may kill, pause and move anything),
    1 s node timeout, AOF as `chaos_redis`. A replica's AOF holds what it was replicated
    (it synced with its master before the test wrote anything)."""
    cluster = started_cluster(tmp_path / "cluster")
    try:
        yield cluster
    finally:
        for node in cluster.nodes:  # a paused node would not stop on SIGTERM
            cluster.resume(node)
        cluster.stop()


@pytest.fixture(params=["standalone", "cluster"])
def chaos_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ChaosRedis]:
    """A chaos test's Redis, once as one redis-server and once as a Redis Cluster."""
    if request.param == "standalone":
        server = RedisServer(tmp_path / "redis", extra_args=NO_REWRITE)
        server.start()
        try:
            yield ChaosRedis(server=server)
        finally:
            server.stop()
    else:
        cluster = started_cluster(tmp_path / "cluster")
        try:
            yield ChaosRedis(cluster=cluster)
        finally:
            for node in cluster.nodes:
                cluster.resume(node)
            cluster.stop()


@dataclass(frozen=True)
class Store:
    """A test's Redis as the services see it: a client, a URL, the services' extra env."""

    redis: aioredis.Redis
    url: str
    env: dict[str, str]


@pytest.fixture(params=["standalone", "cluster"])
def store(request: pytest.FixtureRequest) -> Store:
    """The run's redis-server, or the run's Redis Cluster (shared with other tests: for
    tests that kill and move nothing)."""
    if request.param == "standalone":
        return Store(request.getfixturevalue("redis"), request.getfixturevalue("redis_url"), {})
    cluster: LocalCluster = request.getfixturevalue("redis_cluster")
    client: aioredis.Redis = request.getfixturevalue("cluster_redis")
    return Store(client, cluster.url, {"VLPIPE_REDIS_CLUSTER": "true"})
