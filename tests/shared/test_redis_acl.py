"""The Redis ACL file: one user per role from one table, hashes and never passwords.

Whether the roles are right is proven by running the whole pipeline under them
(tests/integration/test_redis_security.py); that a cluster client can run under them, by a
real node in cluster mode below."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis as SyncRedis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoPermissionError

from tests.shared.procs import ROOT
from vlpipe.shared.keys import StreamKeys
from vlpipe.shared.redis_acl import AclTable
from vlpipe.shared.redis_server import RedisServer

ROLES = ("ingest", "broker", "egress", "producer", "consumer", "monitor")


def passwords() -> dict[str, str]:
    return {f"VLPIPE_REDIS_PASSWORD_{r.upper()}": f"{r}-secret-password" for r in ROLES}


def test_every_role_is_a_user_with_the_hash_of_its_password_and_the_default_user_only_pings() -> (
    None
):
    text = AclTable(StreamKeys("vl")).render(passwords())
    lines = text.splitlines()
    assert lines[0] == "user default on nopass resetkeys resetchannels -@all +ping"
    assert [line.split()[1] for line in lines[1:]] == list(ROLES)
    for line in lines[1:]:
        assert line.split()[3].startswith("#") and len(line.split()[3]) == 65  # SHA-256
        assert "-@all" in line and "~*" not in line and "+@all" not in line
    assert "secret-password" not in text


def test_keys_carry_the_deployments_prefix() -> None:
    text = AclTable(StreamKeys("acme")).render(passwords())
    assert "~acme:sessions" in text and "vl:" not in text


def test_a_missing_password_is_named() -> None:
    partial = passwords()
    del partial["VLPIPE_REDIS_PASSWORD_BROKER"], partial["VLPIPE_REDIS_PASSWORD_MONITOR"]
    with pytest.raises(
        ValueError, match="VLPIPE_REDIS_PASSWORD_BROKER, VLPIPE_REDIS_PASSWORD_MONITOR"
    ):
        AclTable().render(partial)


def test_the_command_prints_or_writes_the_file(tmp_path: Path) -> None:
    env = {**os.environ, **passwords(), "VLPIPE_STREAM_PREFIX": "vl"}
    run = [sys.executable, "-m", "vlpipe", "redis-acl"]
    printed = subprocess.run(run, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert printed.stdout == AclTable().render(passwords())
    subprocess.run([*run, "--out", str(tmp_path / "users.acl"), "--prefix", "x"], cwd=ROOT,
                   env=env, check=True)  # fmt: skip
    assert (tmp_path / "users.acl").read_text().count(" ~x:sessions ") == 3  # the services
    env.pop("VLPIPE_REDIS_PASSWORD_INGEST")
    missing = subprocess.run(run, cwd=ROOT, env=env, capture_output=True, text=True)
    assert missing.returncode == 2 and "VLPIPE_REDIS_PASSWORD_INGEST" in missing.stderr


# ---------------------------------------------------------------- on a cluster


@pytest.fixture
def cluster_node(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server in cluster mode serving every slot, its users from the generated
    ACL file plus a test administrator (the roles may not assign slots)."""
    acl = tmp_path / "users.acl"
    acl.write_text(AclTable().render(passwords()) + f"user {ADMIN} on >{ADMIN} ~* &* +@all\n")
    server = RedisServer(
        tmp_path / "node",
        extra_args=("--cluster-enabled", "yes", "--cluster-node-timeout", "2000",
                    "--cluster-config-file", str(tmp_path / "node" / "nodes.conf")),
        acl_file=acl,
    )  # fmt: skip
    server.start()
    try:
        admin = SyncRedis(host=server.host, port=server.port, username=ADMIN, password=ADMIN)
        admin.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        for _ in range(500):  # the node declares the cluster ok once it serves every slot
            if b"cluster_state:ok" in admin.execute_command("CLUSTER", "INFO"):
                break
            time.sleep(0.01)
        keys = StreamKeys("vl")
        admin.xgroup_create(keys.sessions, "ingest", id="0", mkstream=True)
        admin.xadd(keys.sessions, {"type": "start", "session": "s1"})
        admin.close()
        yield server
    finally:
        server.stop()


ADMIN = "test-admin"


def cluster_client(node: RedisServer, role: str) -> RedisCluster:
    return RedisCluster(host=node.host, port=node.port, username=role,
                        password=passwords()[f"VLPIPE_REDIS_PASSWORD_{role.upper()}"])  # fmt: skip


async def test_each_user_can_run_a_cluster_clients_topology_discovery_and_its_own_commands(
    cluster_node: RedisServer,
) -> None:
    keys = StreamKeys("vl")
    for role in ROLES:
        client = cluster_client(cluster_node, role)
        try:
            await client.initialize()  # COMMAND, then CLUSTER SLOTS: the client's discovery
            node = client.get_default_node()
            for command in ("CLUSTER SHARDS", "CLUSTER NODES", "CLUSTER INFO", "CLUSTER MYID",
                            "READONLY", "READWRITE", "ASKING"):  # fmt: skip
                await client.execute_command(command, target_nodes=node)
            if role == "producer":
                await client.xadd(keys.audio("s1"), {"audio": b"\0\0"})
            elif role == "monitor":  # what KEDA's redis-cluster-streams scaler reads
                [group] = await client.xinfo_groups(keys.sessions)
                assert group["name"] == b"ingest" and group["lag"] == 1
                await client.xpending(keys.sessions, "ingest")
            else:  # XREAD's keys are movable: the client asks the node (COMMAND GETKEYS)
                stream = keys.transcript("s1") if role == "consumer" else keys.status("s1")
                await client.xread({stream: "0"}, count=1)
            # Topology changes stay the operator's.
            with pytest.raises(NoPermissionError):
                await client.execute_command("CLUSTER SETSLOT", 0, "STABLE", target_nodes=node)
        finally:
            await client.aclose()
