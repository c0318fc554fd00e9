"""A local Redis Cluster of private `redis-server` child processes: for the test harness
and for `vlpipe up --redis-cluster`.

Each node is a `RedisServer` (AOF on, see `vlpipe.shared.redis_server`) started with
`cluster-enabled yes`; the cluster is joined through redis-py alone, the way an operator
would do it by hand: `CLUSTER SET-CONFIG-EPOCH` on each fresh node, `CLUSTER MEET`,
`CLUSTER ADDSLOTSRANGE` (the 16384 slots split evenly over the masters), then
`CLUSTER REPLICATE` on each replica. No redis-cli, no ruby: the redis-server binary the
tests already use is enough.

A node's `nodes.conf` lives in its data directory, so a killed node restarted with
`restart()` rejoins with its identity (as a replica of whoever was promoted meanwhile).
The node timeout is short (1 s by default) so a killed master's replica is promoted within a
few seconds, and replicas may always fail over (`cluster-replica-validity-factor 0`), as a
test killing a master at any moment needs.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from redis.crc import key_slot

from vlpipe.shared.redis_server import RedisServer, ServerTLS, free_port

SLOTS = 16384


@dataclass(eq=False)
class ClusterNode:
    """One redis-server of the cluster. `node_id` is its cluster id (stable across
    restarts: it is kept in the node's nodes.conf)."""

    server: RedisServer
    bus_port: int
    node_id: str = ""

    @property
    def host(self) -> str:
        return self.server.host

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def alive(self) -> bool:
        return self.server.proc is not None and self.server.proc.poll() is None

    def __repr__(self) -> str:
        return f"ClusterNode({self.host}:{self.port} {self.node_id[:8]})"


@dataclass(frozen=True)
class Shard:
    """A master as the cluster sees it now: its slot ranges (inclusive) and replicas.
    `slot in shard` says whether the master owns the slot."""

    master: ClusterNode
    slots: tuple[tuple[int, int], ...]
    replicas: tuple[ClusterNode, ...] = field(default=())

    def __contains__(self, slot: object) -> bool:
        return isinstance(slot, int) and any(lo <= slot <= hi for lo, hi in self.slots)


def session_id_on(slots: Container[int], prefix: str = "s", start: int = 0) -> str:
    """The first session id `f"{prefix}{n}"` (n >= start) whose hash tag `{sid}` lands on a
    slot in `slots` (a `range`, a `Shard`, a set): per-session keys of that id live there."""
    n = start
    while True:
        sid = f"{prefix}{n}"
        if key_slot(f"{{{sid}}}".encode()) in slots:
            return sid
        n += 1


def split_slots(masters: int) -> list[tuple[int, int]]:
    """The 16384 slots split into `masters` contiguous, inclusive ranges of near-equal size."""
    bounds = [SLOTS * i // masters for i in range(masters + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(masters)]


class LocalCluster:
    """`masters` masters with `replicas_per_master` replicas each, on loopback ports under
    `base_dir` (one data directory per node). Optionally TLS only (`tls`, with the cluster
    bus and replication over TLS too) and ACL users from `acl_file`; `username`/`password`
    are then what this module itself, and replicas toward their master, authenticate as.
    `bound_to_parent`: each node dies with the thread that started it (`RedisServer`)."""

    def __init__(
        self,
        base_dir: Path,
        masters: int = 3,
        replicas_per_master: int = 1,
        node_timeout_ms: int = 1000,
        *,
        host: str = "127.0.0.1",
        tls: ServerTLS | None = None,
        acl_file: Path | None = None,
        username: str | None = None,
        password: str | None = None,
        extra_args: tuple[str, ...] = (),
        bound_to_parent: bool = False,
    ) -> None:
        if masters < 1 or replicas_per_master < 0:
            raise ValueError("a cluster needs at least one master and no negative replicas")
        self.base_dir = Path(base_dir)
        self.master_count = masters
        self.replicas_per_master = replicas_per_master
        self.node_timeout_ms = node_timeout_ms
        self.tls = tls
        self.username = username
        self.password = password
        args = [
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",  # relative to the node's --dir
            "--cluster-node-timeout", str(node_timeout_ms),
            "--cluster-replica-validity-factor", "0",
            # A replica's first full sync starts at once, not 5 s later (the default delay
            # waits for more replicas to share one transfer).
            "--repl-diskless-sync-delay", "0",
        ]  # fmt: skip
        if tls is not None:
            args += ["--tls-cluster", "yes", "--tls-replication", "yes"]
            if tls.client_cert_file and tls.client_key_file:
                # What a node presents to its peers (bus, replication) as their client.
                args += ["--tls-client-cert-file", str(tls.client_cert_file),
                         "--tls-client-key-file", str(tls.client_key_file)]  # fmt: skip
        if password is not None:
            args += ["--masterauth", password]
            if username is not None:
                args += ["--masteruser", username]
        args += list(extra_args)
        self.nodes: list[ClusterNode] = []
        for i in range(masters * (1 + replicas_per_master)):
            # The bus port is chosen too: the default (port + 10000) may be taken, or past
            # 65535 for a high ephemeral port.
            bus_port = free_port(host)
            server = RedisServer(
                self.base_dir / f"node{i}",
                host=host,
                extra_args=(*args, "--cluster-port", str(bus_port)),
                tls=tls,
                acl_file=acl_file,
                bound_to_parent=bound_to_parent,
            )
            self.nodes.append(ClusterNode(server, bus_port))

    @property
    def url(self) -> str:
        """A seed node's URL (the first node that is alive), for a cluster client."""
        node = next((n for n in self.nodes if n.alive), self.nodes[0])
        return node.url

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    # -- lifecycle -----------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Start every node, join them into one cluster, and wait until it is ok (if it
        does not get there, the nodes are stopped: no process is left behind)."""
        try:
            for node in self.nodes:
                node.server.start()
            for node in self.nodes:
                node.node_id = self._call(node, "CLUSTER", "MYID").decode()
            if not self._already_joined():
                self._join(timeout)
            self.wait_ok(timeout)
        except BaseException:
            self.stop()
            raise

    def _already_joined(self) -> bool:
        # Restarted from the same directories: nodes.conf remembers the cluster.
        info = self._call(self.nodes[0], "CLUSTER", "INFO").decode()
        return "cluster_known_nodes:1\r" not in info

    def _join(self, timeout: float) -> None:
        for epoch, node in enumerate(self.nodes, start=1):
            self._call(node, "CLUSTER", "SET-CONFIG-EPOCH", epoch)
        seed = self.nodes[0]
        for node in self.nodes[1:]:
            self._call(seed, "CLUSTER", "MEET", node.host, node.port, node.bus_port)
        masters = self.nodes[: self.master_count]
        for node, (lo, hi) in zip(masters, split_slots(self.master_count), strict=True):
            self._call(node, "CLUSTER", "ADDSLOTSRANGE", lo, hi)
        self._wait(self._everyone_knows_everyone, timeout, "the nodes to meet")
        replicas = self.nodes[self.master_count :]
        for i, replica in enumerate(replicas):
            master = masters[i % self.master_count]
            self._call(replica, "CLUSTER", "REPLICATE", master.node_id)

    def stop(self) -> None:
        for node in self.nodes:
            node.server.stop()

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- faults --------------------------------------------------------------------------

    def kill(self, node: ClusterNode) -> None:
        """SIGKILL the node (a crash; AOF keeps what it acknowledged)."""
        node.server.kill()

    def restart(self, node: ClusterNode) -> None:
        """Start the node again (killing it first if it runs); it rejoins from nodes.conf."""
        node.server.restart()

    def pause(self, node: ClusterNode) -> None:
        """SIGSTOP: the node hangs (its peers time it out) without closing its sockets."""
        if node.server.proc is not None:
            node.server.proc.send_signal(signal.SIGSTOP)

    def resume(self, node: ClusterNode) -> None:
        if node.server.proc is not None:
            node.server.proc.send_signal(signal.SIGCONT)

    # -- resharding ----------------------------------------------------------------------

    def begin_migration(self, slot: int, target: ClusterNode) -> ClusterNode:
        """Mark `slot` IMPORTING on `target` and MIGRATING on its master (returned): from
        now on the master answers ASK for keys of the slot it no longer has."""
        source = self.master_of_slot(slot)
        if source is target:
            raise ValueError(f"slot {slot} is already on {target}")
        self._call(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
        self._call(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id)
        return source

    def move_keys(self, slot: int, source: ClusterNode, target: ClusterNode) -> int:
        """MIGRATE every key of `slot` from `source` to `target`; how many moved."""
        auth: list[str | int] = []
        if self.password is not None:
            auth = ["AUTH2", self.username or "default", self.password]
        moved = 0
        while True:
            with self.client(source) as c:
                keys = c.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100)
                if not keys:
                    return moved
                c.execute_command(
                    "MIGRATE", target.host, target.port, "", 0, 10_000, *auth, "KEYS", *keys
                )
            moved += len(keys)

    def finish_migration(self, slot: int, source: ClusterNode, target: ClusterNode) -> None:
        """Give `slot` to `target` (CLUSTER SETSLOT NODE on the target, the source, then the
        other masters: the order the Redis manual gives)."""
        others = [n for n in self.masters() if n is not source and n is not target]
        for node in (target, source, *others):
            self._call(node, "CLUSTER", "SETSLOT", slot, "NODE", target.node_id)

    def migrate_slot(self, slot: int, target: ClusterNode) -> None:
        """Move `slot` and its keys to the master `target`, as an operator resharding does."""
        source = self.begin_migration(slot, target)
        self.move_keys(slot, source, target)
        self.finish_migration(slot, source, target)

    # -- the cluster's own view ----------------------------------------------------------

    def shards(self) -> list[Shard]:
        """The masters that own slots now, as a live node reports them (CLUSTER NODES); a
        master that failed keeps its slots here until its replica is promoted."""
        lines = self._call(self._live_node(), "CLUSTER", "NODES").decode().splitlines()
        by_id = {n.node_id: n for n in self.nodes}
        masters: dict[str, list[tuple[int, int]]] = {}
        replicas: dict[str, list[ClusterNode]] = {}
        for line in lines:
            parts = line.split()
            if len(parts) < 8 or parts[0] not in by_id:
                continue
            node_id, flags, master_id = parts[0], parts[2].split(","), parts[3]
            if "noaddr" in flags or "handshake" in flags:
                continue
            if "master" in flags:
                ranges = masters.setdefault(node_id, [])
                for slot in parts[8:]:
                    if slot.startswith("["):  # importing/migrating marker, not an owned slot
                        continue
                    ranges.append(_parse_range(slot))
            elif "slave" in flags and master_id in by_id:
                replicas.setdefault(master_id, []).append(by_id[node_id])
        return [
            Shard(by_id[nid], tuple(sorted(ranges)), tuple(replicas.get(nid, ())))
            for nid, ranges in sorted(masters.items(), key=lambda kv: min(kv[1], default=(0, 0)))
            if ranges
        ]

    def masters(self) -> list[ClusterNode]:
        """The masters that own slots now (by asking the cluster), in slot order."""
        return [s.master for s in self.shards()]

    def replicas_of(self, master: ClusterNode) -> list[ClusterNode]:
        return next((list(s.replicas) for s in self.shards() if s.master is master), [])

    def master_of_slot(self, slot: int) -> ClusterNode:
        for shard in self.shards():
            if slot in shard:
                return shard.master
        raise LookupError(f"no master owns slot {slot}")

    def master_of_key(self, key: str | bytes) -> ClusterNode:
        return self.master_of_slot(key_slot(key.encode() if isinstance(key, str) else key))

    def client(self, node: ClusterNode) -> redis.Redis:
        """A plain (non-cluster) client of one node, bytes in and out; close it after use."""
        return redis.Redis(
            host=node.host,
            port=node.port,
            username=self.username,
            password=self.password,
            ssl=self.tls is not None,
            ssl_ca_certs=str(self.tls.ca_file) if self.tls else None,
            ssl_certfile=str(self.tls.client_cert_file)
            if self.tls and self.tls.client_cert_file
            else None,
            ssl_keyfile=str(self.tls.client_key_file)
            if self.tls and self.tls.client_key_file
            else None,
            socket_timeout=5,
            socket_connect_timeout=2,
        )

    # -- waiting -------------------------------------------------------------------------

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Wait until every live node says cluster_state:ok and agrees on who owns every
        slot, every owner is a running node, and every live replica's link to its master
        is up."""
        self._wait(self._is_ok, timeout, "cluster_state:ok with every replica linked")

    def _is_ok(self) -> bool:
        live = [n for n in self.nodes if n.alive]
        views: set[_View] = set()
        for node in live:
            try:
                info = self._call(node, "CLUSTER", "INFO").decode()
                if "cluster_state:ok" not in info:
                    return False
                with self.client(node) as c:
                    repl: dict[str, Any] = c.info("replication")
                if repl.get("role") == "slave" and (
                    repl.get("master_link_status") != "up" or repl.get("master_sync_in_progress")
                ):
                    return False
                views.add(self._view(node))
            except redis.RedisError:
                return False
        if len(views) != 1:
            return False
        # Every running node is seen as healthy: a master owning slots or a replica (a
        # restarted old master is a slotless master until it learns it was replaced); every
        # slot is owned by a running node (a killed master keeps its slots until its peers
        # time it out and its replica is promoted).
        view = {node_id: (role, failing, slots) for node_id, role, failing, slots in views.pop()}
        alive_ids = {n.node_id for n in live}
        for nid in alive_ids:
            if nid not in view or view[nid][1] or view[nid][0::2] == ("master", ()):
                return False
        owned = 0
        for nid, (_, _, slots) in view.items():
            if slots and nid not in alive_ids:
                return False
            owned += sum(hi - lo + 1 for lo, hi in slots)
        return owned == SLOTS

    def _view(self, node: ClusterNode) -> _View:
        """What `node` thinks: (id, role, whether it flags it failing, owned slot ranges) of
        each node it knows."""
        seen: list[tuple[str, str, bool, tuple[tuple[int, int], ...]]] = []
        for line in self._call(node, "CLUSTER", "NODES").decode().splitlines():
            parts = line.split()
            if len(parts) < 8:
                continue
            role = "master" if "master" in parts[2] else "slave"
            slots = tuple(_parse_range(s) for s in parts[8:] if not s.startswith("["))
            seen.append((parts[0], role, "fail" in parts[2] or "handshake" in parts[2], slots))
        return tuple(sorted(seen))

    def _everyone_knows_everyone(self) -> bool:
        for node in self.nodes:
            lines = self._call(node, "CLUSTER", "NODES").decode().splitlines()
            if len(lines) != len(self.nodes) or any("handshake" in ln for ln in lines):
                return False
        return True

    @staticmethod
    def _wait(check: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.05)
        raise TimeoutError(f"the local cluster did not reach {what} within {timeout}s")

    def _live_node(self) -> ClusterNode:
        for node in (n for n in self.nodes if n.alive):
            try:
                self._call(node, "PING")
                return node
            except redis.RedisError:
                continue
        raise RuntimeError("no node of the local cluster answers")

    def _call(self, node: ClusterNode, *args: str | int) -> bytes:
        with self.client(node) as c:
            reply = c.execute_command(*args)
        if isinstance(reply, bytes):
            return reply
        if reply is True:  # redis-py turns +OK into True for some commands
            return b"OK"
        return str(reply).encode()


_View = tuple[tuple[str, str, bool, tuple[tuple[int, int], ...]], ...]


def _parse_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    return int(lo), int(hi or lo)
