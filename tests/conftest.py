"""The test harness: a real redis-server (and, for cluster tests, a real Redis Cluster) for
the run, and per-test key prefixes."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from vlpipe.shared.keys import StreamKeys
from vlpipe.shared.redis_cluster import LocalCluster
from vlpipe.shared.redis_server import (
    FREE_PORTS_ENV,
    PRIVATE_PORTS_FROM,
    RedisServer,
    ephemeral_low,
)
from vlpipe.shared.streams import connect

SPEECH_WAV = Path(__file__).resolve().parents[1] / "samples" / "speech-16k-beckett.wav"
HEAVY_MODULES = frozenset({
    "tests/chaos/test_no_word_lost.py",
    "tests/chaos/test_cluster_faults.py",
    "tests/chaos/test_zombie.py",
    "tests/chaos/test_redis_refuses_writes.py",
    "tests/chaos/test_redis_restart.py",
    "tests/chaos/test_proxy_faults.py",
})  # fmt: skip
"""Test modules that run the whole pipeline and the local engine as processes, each test
for about half a core on a fast host and a whole core on one half as fast: they run on one
worker, one test at a time. Three at once starved Redis clients past their 1 s timeout;
two at once, on the slower host, starved the local engine until answers came after the
drain budget and the tests' waits. Every other module is a unit of its own."""
SPEECH_WORDS = "Ever tried. Ever failed. No matter. Try again. Fail again. Fail better."


def pytest_configure(config: pytest.Config) -> None:
    """Each parallel worker (and the processes it starts) picks ports from a range of its
    own: a cluster node another worker killed for a moment keeps its ports, and a port
    picked is free only until its server binds it."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1", ...
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if worker.startswith("gw") and count > 1:
        span = (ephemeral_low() - PRIVATE_PORTS_FROM) // count
        low = PRIVATE_PORTS_FROM + int(worker[2:]) * span
        os.environ[FREE_PORTS_ENV] = f"{low}-{low + span - 1}"


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """The run's pytest-xdist workers (`-n 3`, the README's command) take whole modules, in
    order (module fixtures are built once; some modules' last test checks what the ones
    before left); the `HEAVY_MODULES` all go to one worker, one after another."""
    from xdist.scheduler import LoadScopeScheduling

    class ModulesAndGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "chaos-heavy" if module in HEAVY_MODULES else module

    return ModulesAndGroups(config, log)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server (AOF on) for the whole run. Tests that kill it restart it."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One real Redis Cluster for the whole run: 3 masters, 3 replicas, 1 s node timeout.
    Tests that kill or move things leave it ok again (`wait_ok`); a test that must break it
    for good starts a `LocalCluster` of its own."""
    cluster = LocalCluster(tmp_path_factory.mktemp("redis-cluster"))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def fresh_redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, for fault tests that kill and restart it."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    if not redis_server.ping():  # an earlier fault test may have left it down
        redis_server.start()
    return redis_server.url


@pytest.fixture
def keys() -> StreamKeys:
    """Keys under a prefix of this test's own, so tests never see each other's data."""
    return StreamKeys(f"t{uuid.uuid4().hex[:10]}")


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = connect(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def cluster_redis(redis_cluster: LocalCluster) -> AsyncIterator[aioredis.Redis]:
    """A cluster client (`connect(..., cluster=True)`) of the run's Redis Cluster."""
    redis_cluster.wait_ok()  # an earlier test may have killed or moved something
    client = connect(redis_cluster.url, cluster=True)
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
def speech_wav() -> Path:
    assert SPEECH_WAV.exists(), f"test recording missing: {SPEECH_WAV}"
    return SPEECH_WAV
