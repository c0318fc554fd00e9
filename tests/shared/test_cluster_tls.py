"""A Redis Cluster with TLS only (client certificates required; the cluster bus and
replication over TLS too), reached with `rediss://` and the TLS settings every service
reads: fenced writes, the session reader and the outbox relay work over it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.shared.test_fencing import _claim, _frames_write
from tests.tls_certs import make_certificates
from tests.waiting import wait_until
from vlpipe.shared.fencing import SessionWrite, Writer
from vlpipe.shared.keys import StreamKeys
from vlpipe.shared.outbox import SharedOutbox
from vlpipe.shared.redis_cluster import LocalCluster, session_id_on
from vlpipe.shared.redis_server import ServerTLS
from vlpipe.shared.redis_tls import RedisTLS
from vlpipe.shared.streams import DeadLetters, Entry, SessionStreamReader, connect


@pytest.fixture
def tls_cluster(tmp_path: Path) -> Iterator[tuple[LocalCluster, RedisTLS]]:
    certs = make_certificates(tmp_path / "certs")
    server_tls = ServerTLS(certs.server_cert, certs.server_key, certs.ca,
                           client_cert_file=certs.client_cert, client_key_file=certs.client_key)  # fmt: skip
    cluster = LocalCluster(tmp_path / "cluster", masters=3, replicas_per_master=1, tls=server_tls)
    cluster.start()
    yield cluster, RedisTLS(str(certs.ca), str(certs.client_cert), str(certs.client_key))
    cluster.stop()


async def test_writes_reads_and_relays_work_over_tls(
    tls_cluster: tuple[LocalCluster, RedisTLS], keys: StreamKeys
) -> None:
    cluster, tls = tls_cluster
    assert cluster.url.startswith("rediss://")
    redis = connect(cluster.url, cluster=True, tls=tls)
    try:
        sids = [session_id_on(shard, prefix=f"tls{n}-") for n, shard in enumerate(cluster.shards())]
        writer = Writer(redis)
        fences = {sid: await _claim(redis, keys, sid) for sid in sids}
        results = await asyncio.gather(
            *(writer.apply(_frames_write(keys, sid, 0, 2), fences[sid]) for sid in sids)
        )
        assert results == [[2]] * 3

        got: dict[str, int] = {}

        async def handle(key: str, entries: list[Entry]) -> None:
            got[key] = got.get(key, 0) + len(entries)

        reader = SessionStreamReader(redis, wake_key=f"{keys.prefix}:wake:tls",
                                     dead=DeadLetters(redis, keys, "t"), block_ms=1000)  # fmt: skip
        stop = asyncio.Event()
        task = asyncio.create_task(reader.run(stop))
        for sid in sids:
            reader.add(keys.frames(sid), "0-0", handle)

        async def all_read() -> bool:
            return all(got.get(keys.frames(sid)) == 2 for sid in sids)

        await wait_until(all_read, within=15)
        stop.set()
        reader.wake()
        await asyncio.wait_for(task, timeout=10)

        outbox = SharedOutbox(redis, keys, keys.transcripts)
        write = SessionWrite(keys.session_state(sids[0]), "svc")
        outbox.add(write, sids[0], {"session": sids[0], "text": "over tls"})
        await writer.apply(write, fences[sids[0]])
        assert await outbox.relay(sids[0]) == 1
        assert await redis.xlen(keys.transcripts) == 1
    finally:
        await redis.aclose()
