"""The Redis ACL file: one user per role from one table, hashes and never passwords.

Whether the roles are right is proven by running the whole pipeline under them
(tests/integration/test_redis_security.py); that a cluster client can run under them, by a
real node in cluster mode below."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from redis import Redis as SyncRedis
from redis.asyncio.cluster import RedisCluster
from redis.cluster import LoadBalancingStrategy
from redis.exceptions import NoPermissionError

from tests.shared.procs import ROOT
from vlpipe.shared.keys import StreamKeys
from vlpipe.shared.redis_acl import AclTable
from vlpipe.shared.redis_server import RedisServer, free_port

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


def test_the_broker_and_egress_may_both_write_the_outputs_and_set_their_expiry() -> None:
    """Either makes a session's outputs (the broker's `outputs_by`, kept per session), so
    both during a rolling change of it."""
    rules = {r.name: r.rules() for r in AclTable().roles()}
    for role in ("broker", "egress"):
        for key in ("transcript:{*}", "audio-out:{*}", "playback:{*}", "transcripts "):
            assert f" ~vl:{key}" in rules[role], (role, key)
        assert "+expire)" in rules[role]


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

CLUSTER_ROLES = ("replica", "operator")


def cluster_passwords() -> dict[str, str]:
    return {f"VLPIPE_REDIS_PASSWORD_{r.upper()}": f"{r}-secret-password"
            for r in (*ROLES, *CLUSTER_ROLES)}  # fmt: skip


def test_a_self_run_cluster_adds_a_replication_user_and_an_operator_and_nothing_else() -> None:
    plain = AclTable().render(passwords())
    text = AclTable(cluster=True).render(cluster_passwords())
    assert text.startswith(plain)
    added = text.removeprefix(plain).splitlines()
    assert [line.split()[1] for line in added] == list(CLUSTER_ROLES)
    assert added[0].endswith("-@all +psync +replconf +ping")  # no keys, no other command
    with pytest.raises(ValueError, match="VLPIPE_REDIS_PASSWORD_OPERATOR"):
        AclTable(cluster=True).render(passwords())


def bus_port(directory: Path) -> int:
    """The node's cluster bus port, picked once: the default, its port + 10000, may pass 65535."""
    chosen = directory / "bus-port"
    if not chosen.exists():
        directory.mkdir(parents=True, exist_ok=True)
        chosen.write_text(str(free_port()))
    return int(chosen.read_text())


def start_node(directory: Path, acl: Path) -> RedisServer:
    """A redis-server in cluster mode with the ACL file; its replicas sync as `replica`."""
    server = RedisServer(
        directory,
        extra_args=("--cluster-enabled", "yes", "--cluster-node-timeout", "2000",
                    "--cluster-config-file", str(directory / "nodes.conf"),
                    "--cluster-port", str(bus_port(directory)),
                    "--masteruser", "replica",
                    "--masterauth", cluster_passwords()["VLPIPE_REDIS_PASSWORD_REPLICA"]),
        acl_file=acl,
    )  # fmt: skip
    server.start()
    return server


def as_role(node: RedisServer, role: str) -> SyncRedis:
    password = cluster_passwords()[f"VLPIPE_REDIS_PASSWORD_{role.upper()}"]
    return SyncRedis(host=node.host, port=node.port, username=role, password=password)


def wait_for(check: Callable[[], bool], what: str) -> None:
    for _ in range(1000):
        if check():
            return
        time.sleep(0.01)
    raise AssertionError(f"not within 10 s: {what}")


@pytest.fixture
def cluster_nodes(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer]]:
    """A master serving every slot and its replica, both loading the file of
    `vlpipe redis-acl --cluster`, built by the `operator` user as `redis-cli --cluster
    create` builds one (CLUSTER ADDSLOTSRANGE, MEET, REPLICATE)."""
    acl = tmp_path / "users.acl"
    acl.write_text(AclTable(cluster=True).render(cluster_passwords()))
    nodes: list[RedisServer] = []
    try:
        nodes += [start_node(tmp_path / "master", acl), start_node(tmp_path / "replica", acl)]
        master, replica = (as_role(node, "operator") for node in nodes)
        master.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        master.execute_command("CLUSTER", "MEET", nodes[1].host, nodes[1].port,
                               bus_port(nodes[1].data_dir))  # fmt: skip
        master_id = master.execute_command("CLUSTER", "MYID")
        wait_for(lambda: master_id in replica.execute_command("CLUSTER", "NODES"), "the MEET")
        replica.execute_command("CLUSTER", "REPLICATE", master_id)
        # The replica syncs from its master as the `replica` user.
        wait_for(lambda: replica.info("replication")["master_link_status"] == "up", "the sync")
        wait_for(lambda: b"cluster_state:ok" in replica.execute_command("CLUSTER", "INFO"),
                 "the cluster ok")  # fmt: skip
        # ... and its master lists it (once gossip brought the replica's offset), so clients
        # learn it from CLUSTER SLOTS.
        wait_for(lambda: len(master.execute_command("CLUSTER", "SLOTS")[0]) == 4,
                 "the replica in CLUSTER SLOTS")  # fmt: skip
        master.close()
        replica.close()
        yield nodes[0], nodes[1]
    finally:
        for node in nodes:
            node.stop()


def cluster_client(node: RedisServer, role: str) -> RedisCluster:
    password = cluster_passwords()[f"VLPIPE_REDIS_PASSWORD_{role.upper()}"]
    return RedisCluster(host=node.host, port=node.port, username=role, password=password,
                        load_balancing_strategy=LoadBalancingStrategy.ROUND_ROBIN)  # fmt: skip


async def test_each_user_can_run_a_cluster_clients_topology_discovery_and_its_own_commands(
    cluster_nodes: tuple[RedisServer, RedisServer],
) -> None:
    keys = StreamKeys("vl")
    operator = as_role(cluster_nodes[0], "operator")
    with pytest.raises(NoPermissionError):  # the operator changes the cluster, reads no data
        operator.xlen(keys.sessions)
    operator.close()
    producer = cluster_client(cluster_nodes[1], "producer")  # any node will do
    await producer.xadd(keys.sessions, {"type": "start", "session": "s1"})
    await producer.aclose()
    ingest = cluster_client(cluster_nodes[0], "ingest")
    await ingest.xgroup_create(keys.sessions, "ingest", id="0")
    await ingest.aclose()
    for role in ROLES:
        client = cluster_client(cluster_nodes[0], role)
        try:
            await client.initialize()  # COMMAND, then CLUSTER SLOTS: the client's discovery
            assert {n.server_type for n in client.get_nodes()} == {"primary", "replica"}
            for node in client.get_nodes():  # what other clients ask, READONLY on replicas
                for command in ("CLUSTER SHARDS", "CLUSTER NODES", "CLUSTER INFO",
                                "CLUSTER MYID", "READONLY", "READWRITE", "ASKING"):  # fmt: skip
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
                await client.execute_command("CLUSTER SETSLOT", 0, "STABLE",
                                             target_nodes=client.get_default_node())  # fmt: skip
        finally:
            await client.aclose()
