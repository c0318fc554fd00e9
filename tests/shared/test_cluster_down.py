"""A cluster that is down for a while (CLUSTERDOWN: a slot no master serves, as while a
failed master is not yet replaced) is an outage like any other: a group consumer waits and
carries on, it does not stop.

redis-py raises `ClusterDownError` for a CLUSTERDOWN reply, with the reply's prefix cut off
("The cluster is down"): a check of the message for "CLUSTERDOWN" never matches it."""

from __future__ import annotations

import asyncio
from pathlib import Path

from redis.crc import key_slot

from tests.waiting import wait_until
from vlpipe.shared.keys import StreamKeys
from vlpipe.shared.redis_cluster import LocalCluster
from vlpipe.shared.streams import DeadLetters, Disposition, Entry, GroupConsumer, connect


async def test_a_group_consumer_outlives_a_cluster_that_is_down_for_a_while(
    tmp_path: Path,
) -> None:
    cluster = LocalCluster(tmp_path / "cluster", replicas_per_master=0)
    await asyncio.to_thread(cluster.start)
    # vl:sessions on the second master; the third one dies. (Not the first: redis-py's
    # cluster client sends COMMAND GETKEYS for every XREADGROUP to its default node, the
    # first master, so its death fails every read as a connection error instead.)
    second, third = cluster.shards()[1:]
    keys = next(k for k in (StreamKeys(f"cd{n}") for n in range(1000))
                if key_slot(k.sessions.encode()) in second)  # fmt: skip
    redis = connect(cluster.url, timeout_s=2, cluster=True)
    handled: list[bytes] = []

    async def handler(entry: Entry) -> Disposition:
        handled.append(entry.fields[b"n"])
        return Disposition.ACK

    consumer = GroupConsumer(redis, streams=[keys.sessions], group="g", consumer="c",
                             handler=handler, dead=DeadLetters(redis, keys, "test"),
                             block_ms=200)  # fmt: skip
    stop = asyncio.Event()
    running = asyncio.create_task(consumer.run(stop))
    try:
        await redis.xadd(keys.sessions, {"n": 1})
        await wait_until(lambda: asyncio.sleep(0, len(handled) == 1), within=15)
        # Another master dies, with no replica to replace it: once its peers fail it,
        # every node answers CLUSTERDOWN until it is back.
        other = third.master
        cluster.kill(other)
        await asyncio.sleep(5)  # the failure is agreed on within 2 s; the client gives up
        assert not running.done(), running.exception()
        await asyncio.to_thread(cluster.restart, other)
        await asyncio.to_thread(cluster.wait_ok, 30)
        await redis.xadd(keys.sessions, {"n": 2})
        await wait_until(lambda: asyncio.sleep(0, len(handled) == 2), within=30)
    finally:
        stop.set()
        await asyncio.gather(running, return_exceptions=True)
        await redis.aclose()
        await asyncio.to_thread(cluster.stop)
