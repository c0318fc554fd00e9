"""The whole pipeline on a real Redis Cluster locked down by the generated ACL file (on
every node: Redis does not propagate ACLs), each service as its own user: the cluster
client's own commands (CLUSTER SLOTS, ASKING...), the outboxes and relay markers are
granted, and Redis's ACL LOG stays empty on every master."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.harness import Replica, speak
from tests.chaos.history import ended_everywhere
from tests.waiting import wait_until
from vlpipe.services.engine.server import running_engine
from vlpipe.shared.contracts import TranscriptPiece, decode
from vlpipe.shared.keys import StreamKeys
from vlpipe.shared.redis_acl import AclTable
from vlpipe.shared.redis_cluster import LocalCluster, session_id_on
from vlpipe.shared.streams import connect

ADMIN_PASSWORD = secrets.token_urlsafe(16)


@pytest.fixture
def acl_cluster(tmp_path: Path, keys: StreamKeys) -> Iterator[tuple[LocalCluster, dict[str, str]]]:
    table = AclTable(keys)
    passwords = {role.password_env: secrets.token_urlsafe(24) for role in table.roles()}
    acl = tmp_path / "users.acl"
    acl.write_text(table.render(passwords) + f"user admin on >{ADMIN_PASSWORD} ~* &* +@all\n")
    cluster = LocalCluster(
        tmp_path / "cluster", masters=3, replicas_per_master=0, acl_file=acl,
        username="admin", password=ADMIN_PASSWORD,
    )  # fmt: skip
    cluster.start()
    seed = cluster.nodes[0]
    urls = {role.name: f"redis://{role.name}:{passwords[role.password_env]}@"
            f"{seed.host}:{seed.port}/0" for role in table.roles()}  # fmt: skip
    urls["admin"] = f"redis://admin:{ADMIN_PASSWORD}@{seed.host}:{seed.port}/0"
    yield cluster, urls
    cluster.stop()


async def test_each_service_runs_on_the_cluster_as_its_own_user_with_nothing_refused(
    acl_cluster: tuple[LocalCluster, dict[str, str]],
    keys: StreamKeys,
    speech_wav: Path,
    tmp_path: Path,
) -> None:
    cluster, urls = acl_cluster
    admin = connect(urls["admin"], cluster=True)
    env = {"VLPIPE_REDIS_CLUSTER": "true"}
    sids = [session_id_on(shard, prefix=f"acl{n}-") for n, shard in enumerate(cluster.shards())]
    async with running_engine(model="local", output_pace=0) as engine:
        procs = [
            Replica(service, f"{service}-0", urls[service], keys.prefix, tmp_path / "logs",
                    {**env, **({"VLPIPE_BROKER_ENDPOINT": engine.endpoint}
                               if service == "broker" else {})}).start()
            for service in ("ingest", "broker", "egress")
        ]  # fmt: skip
        try:
            for sid in sids:
                await speak(urls["producer"], keys, sid, speech_wav, cluster=True, pace=2.0)

            async def all_ended() -> bool:
                return all([await ended_everywhere(admin, keys, sid) for sid in sids])

            await wait_until(all_ended, within=180)
        finally:
            codes = [p.stop() for p in procs]
    assert codes == [0, 0, 0], [p.log()[-3000:] for p in procs]
    consumer = connect(urls["consumer"], cluster=True)
    try:
        shared = [decode(TranscriptPiece, f) for _, f in await consumer.xrange(keys.transcripts)]
        for sid in sids:
            assert any(p.session == sid and p.speaker == "assistant" for p in shared), sid
    finally:
        await consumer.aclose()
    refused = []
    for node in cluster.masters():
        with cluster.client(node) as plain:
            refused += plain.execute_command("ACL", "LOG")
    assert refused == []
    await admin.aclose()
