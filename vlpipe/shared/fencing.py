"""Fenced writes: a session's outputs, checkpoint and trims as one server-side script call.

Each claim of a session by a service raises the session's epoch for that service
(`<service>.epoch` in `vl:session:{sid}`, incremented by the claim itself). Everything the
owner writes for the session (output entries, its checkpoint, the trim of its input
stream, the session's status entries) is queued on a `SessionWrite` and applied by
`_APPLY`, a Lua script that first checks that the caller still holds the epoch. A replica
that stalled past the claim time (a GC pause, SIGSTOP, a partition) and lost the session
can still read, but its next write is refused (`Fenced`) and changes nothing.

Writes are also numbered (`<service>.written`, the number of the owner's last applied
write), which makes a retry exact: a write whose reply was lost with the connection is
sent again unchanged with the same number, and the script recognises it as applied
instead of writing its entries twice. A stored number *below* the owner's last applied
write means Redis lost writes it had acknowledged (restarted from an AOF that missed the
last second, or a replica promoted before it had them): `Regressed`, and the session is
resumed from what Redis still has.

Every key a write touches is named in KEYS, and a session's keys share a hash tag, so the
script stays within one Redis Cluster slot (so a shared stream is written through the
session's outbox there, `vlpipe.shared.outbox`). On a cluster the `Writer` sends each
master the writes of its slots, in one round trip per master.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import Connection
from redis.crc import key_slot
from redis.exceptions import NoScriptError

from vlpipe.shared.routing import REDIRECTED, relearn_slots, send_pipelined, send_to_slot

log = logging.getLogger("vlpipe.fencing")

# KEYS[1]: the session's state hash; KEYS[2..]: the other keys the write touches.
# ARGV[1]: epoch field, ARGV[2]: the caller's epoch, ARGV[3]: write-number field,
# ARGV[4]: this write's number; then the operations: command, key index, argc, args...
_APPLY = """
local epoch = redis.call('HGET', KEYS[1], ARGV[1])
if epoch ~= ARGV[2] then
  return {'fenced', epoch or ''}
end
local n = tonumber(ARGV[4])
local done = tonumber(redis.call('HGET', KEYS[1], ARGV[3]) or '0')
if done >= n then
  return {'applied-before', tostring(done)}
end
if done < n - 1 then
  return {'regressed', tostring(done)}
end
local out = {'ok', ARGV[4]}
local i = 5
while i <= #ARGV do
  local command, argc = ARGV[i], tonumber(ARGV[i + 2])
  local key = KEYS[tonumber(ARGV[i + 1])]
  if string.byte(command, 1) == 63 then  -- '?': a read whose reply the caller wants
    local reply = redis.call(string.sub(command, 2), key, unpack(ARGV, i + 3, i + 2 + argc))
    table.insert(out, reply or false)
  else
    redis.call(command, key, unpack(ARGV, i + 3, i + 2 + argc))
  end
  i = i + 3 + argc
end
redis.call('HSET', KEYS[1], ARGV[3], ARGV[4])
return out
"""


class SessionLost(Exception):
    """This replica may no longer write for the session; it stops handling it."""


class Fenced(SessionLost):
    """Another replica claimed the session (the epoch moved on): nothing was written."""


class Regressed(SessionLost):
    """Redis no longer has writes it acknowledged: resume from what it has."""


@dataclass(slots=True)
class Fence:
    """What an owner holds for one session: its epoch and the number of its last write."""

    epoch: int
    written: int


def epoch_field(service: str) -> str:
    return f"{service}.epoch"


def written_field(service: str) -> str:
    return f"{service}.written"


def done_field(service: str) -> str:
    """The checkpoint field marking that `service` has finished the session."""
    return f"{service}.done"


@dataclass(slots=True)
class SessionWrite:
    """Operations on one session's keys, applied together or not at all by `apply_write`.

    Build it, then hand it to `SessionOwnership.commit`. Binary values (audio) travel
    as they are. A write is immutable once sent: a retry sends the same operations.
    """

    state_key: str
    service: str
    keys: list[str] = field(default_factory=list)
    ops: list[Any] = field(default_factory=list)
    _index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._key(self.state_key)

    def _key(self, key: str) -> int:
        index = self._index.get(key)
        if index is None:
            self.keys.append(key)
            index = self._index[key] = len(self.keys)
        return index

    def op(self, command: str, key: str, *args: Any) -> None:
        self.ops += [command, self._key(key), len(args), *args]

    def read(self, command: str, key: str, *args: Any) -> None:
        """A read done after the writes before it; its reply is returned by `apply`."""
        self.op("?" + command, key, *args)

    def xadd(self, key: str, fields: Mapping[str, Any], maxlen: int | None = None) -> None:
        head: list[Any] = ["MAXLEN", "~", maxlen, "*"] if maxlen is not None else ["*"]
        for name, value in fields.items():
            head += [name, value]
        self.op("XADD", key, *head)

    def hset(self, key: str, mapping: Mapping[str, Any]) -> None:
        flat: list[Any] = []
        for name, value in mapping.items():
            flat += [name, value]
        if flat:
            self.op("HSET", key, *flat)

    def hdel(self, key: str, *names: str) -> None:
        if names:
            self.op("HDEL", key, *names)

    def trim_before(self, key: str, min_id: str, *, approximate: bool = True) -> None:
        """Drop the entries of `key` older than `min_id` (`XTRIM MINID`)."""
        if min_id not in ("", "0", "0-0"):
            self.op("XTRIM", key, "MINID", "~" if approximate else "=", min_id)

    def expire(self, key: str, seconds: int) -> None:
        self.op("EXPIRE", key, seconds)

    def checkpoint(self, values: Mapping[str, str | int | float]) -> None:
        """This service's checkpoint fields (`<service>.<name>` in the state hash)."""
        self.hset(self.state_key, {f"{self.service}.{k}": v for k, v in values.items()})

    def __bool__(self) -> bool:
        return bool(self.ops)


@dataclass(frozen=True, slots=True)
class Wait:
    """Wait after each batch of writes until `replicas` replicas have it (Redis's `WAIT`,
    on the batch's own connection), at most `timeout_ms`. A batch a replica did not confirm
    in time still stands (Redis cannot take it back): it is counted (`Writer.unconfirmed`)
    and logged, and a failover may lose it, as without waiting."""

    replicas: int
    timeout_ms: int = 100


class Writer:
    """Applies `SessionWrite`s for one process, in batches: while one round trip is in
    flight, the writes of every other session queue up and go together in the next (the
    script calls pipelined on one connection), so hundreds of sessions cost a round trip
    per loop turn, not one each. Each write is still checked and applied on its own."""

    def __init__(self, redis: aioredis.Redis, wait: Wait | None = None) -> None:
        self.redis = redis
        self.wait = wait
        self.unconfirmed = 0
        """Batches (per master) that `wait.replicas` replicas did not confirm in time."""
        self._warned_at = 0.0
        self._sha = hashlib.sha1(_APPLY.encode()).hexdigest()
        self._queue: list[tuple[list[Any], asyncio.Future[Any]]] = []
        self._flushing: asyncio.Task[None] | None = None
        self._connection: Connection | None = None
        self.round_trips = 0
        self.writes = 0

    async def apply(self, write: SessionWrite, fence: Fence) -> list[Any] | None:
        """Apply `write` if `fence` still holds; the write becomes `fence.written + 1`.

        Returns the replies of the write's reads (None if it had been applied already, by
        an earlier try whose reply was lost). Raises `Fenced` or `Regressed` (nothing
        written), or a Redis connection error (then retry the same write: if it was
        applied, the retry is recognised).
        """
        number = fence.written + 1
        args = [
            len(write.keys), *write.keys,
            epoch_field(write.service), fence.epoch,
            written_field(write.service), number, *write.ops,
        ]  # fmt: skip
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((args, done))
        if self._flushing is None:
            self._flushing = asyncio.create_task(self._flush())
        reply = await done
        outcome = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
        stored = reply[1].decode() if isinstance(reply[1], bytes) else str(reply[1])
        if outcome == "fenced":
            if not stored or int(stored) < fence.epoch:
                # No later claim took the session: Redis went back to before this owner's
                # (a failover or an older AOF lost the claim itself, with what followed).
                raise Regressed(
                    f"Redis has epoch {stored or 'none'} of the session, this owner claimed "
                    f"epoch {fence.epoch}"
                )
            raise Fenced(f"epoch {fence.epoch} no longer holds (now {stored})")
        if outcome == "regressed":
            raise Regressed(
                f"Redis has write {stored} of this owner, which had written {fence.written}"
            )
        fence.written = number
        return list(reply[2:]) if outcome == "ok" else None

    async def _flush(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                try:
                    replies = await self._run(batch)
                except BaseException as exc:  # the round trip failed: every write of it did
                    for _, done in batch:
                        if not done.done():
                            done.set_exception(exc if isinstance(exc, Exception) else
                                               ConnectionError("write interrupted"))  # fmt: skip
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for (_, done), reply in zip(batch, replies, strict=True):
                    if done.done():
                        continue
                    if isinstance(reply, Exception):
                        done.set_exception(reply)
                    else:
                        done.set_result(reply)
        finally:
            self._flushing = None

    async def _run(self, batch: list[tuple[list[Any], asyncio.Future[Any]]]) -> list[Any]:
        """One round trip for the batch (two the first time after Redis lost its scripts)."""
        self.round_trips += 1
        self.writes += len(batch)
        commands = [("EVALSHA", self._sha, *args) for args, _ in batch]
        if isinstance(self.redis, RedisCluster):
            return await self._run_on_cluster(self.redis, commands)
        for attempt in range(2):
            replies = await self._send(commands)
            if attempt or not any(isinstance(r, NoScriptError) for r in replies):
                return replies
            # A restarted Redis has no scripts: load it and send the batch again (no write
            # of it was applied: each failed alike before running).
            await self.redis.script_load(_APPLY)
        raise AssertionError("unreachable")

    async def _run_on_cluster(
        self, cluster: RedisCluster, commands: list[tuple[Any, ...]]
    ) -> list[Any]:
        """The batch on a Redis Cluster: the writes grouped by the master of their slot
        (the state key's; a write's keys share it), one pipelined round trip per master,
        all masters at once. A master that fails its round trip fails only its writes
        (connection errors: the callers retry them, exactly) and makes the client relearn
        the slots; a write redirected (MOVED or ASK: a failover, a slot migrating) or told
        to try again is sent once more where the cluster says (`routing.send_to_slot`,
        ASKING on the same connection). Nothing is applied twice: a redirected write was
        not run."""
        await cluster.initialize()  # a no-op unless the client must (re)learn the slots
        by_node: dict[ClusterNode, list[int]] = {}
        for i, command in enumerate(commands):
            node = cluster.nodes_manager.get_node_from_slot(key_slot(_encode(command[3])))
            by_node.setdefault(node, []).append(i)
        replies: list[Any] = [None] * len(commands)
        sent = await asyncio.gather(
            *(self._send_to(node, [commands[i] for i in idx]) for node, idx in by_node.items()),
            return_exceptions=True,
        )
        relearn = False
        for idx, outcome in zip(by_node.values(), sent, strict=True):
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, Exception):
                    raise outcome
                relearn = True
                for i in idx:
                    replies[i] = outcome
                continue
            for i, reply in zip(idx, outcome, strict=True):
                replies[i] = reply
        redirected = [i for i, r in enumerate(replies) if isinstance(r, REDIRECTED)]
        if redirected:
            again = await asyncio.gather(
                *(self._send_routed(cluster, commands[i]) for i in redirected),
                return_exceptions=True,
            )
            for i, reply in zip(redirected, again, strict=True):
                replies[i] = reply
        if relearn:
            await relearn_slots(cluster)
        return replies

    async def _send_to(self, node: ClusterNode, commands: list[tuple[Any, ...]]) -> list[Any]:
        """The commands on one connection of one cluster node, as `_send` does on a
        standalone server; a node without the script loads it and gets those again."""
        connection = node.acquire_connection()
        try:
            replies = self._waited(await send_pipelined(connection, self._with_wait(commands)))
            missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
            if missing:
                await send_pipelined(connection, [("SCRIPT", "LOAD", _APPLY)])
                again = self._waited(await send_pipelined(
                    connection, self._with_wait([commands[i] for i in missing])
                ))  # fmt: skip
                for i, reply in zip(missing, again, strict=True):
                    replies[i] = reply
            return replies
        finally:
            node.release(connection)

    async def _send_routed(self, cluster: RedisCluster, command: tuple[Any, ...]) -> Any:
        """A write that was redirected, sent where the cluster says (MOVED, ASK)."""
        return await send_to_slot(cluster, key_slot(_encode(command[3])), command, script=_APPLY)

    async def _send(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """The commands on the writer's own connection, packed by hiredis; their replies in
        order, an error reply as its exception. redis-py's pipeline packs each argument in
        Python, and a write has about twenty: that cost more than the rest of the write.
        The connection is taken from the pool once and kept between batches (one batch is
        in flight at a time): taking it for each batch cost the pool's locks, its timeout
        and a read of the socket to check it was idle, about as much as the batch's own
        round trip at real-time pace. One that failed (its replies not all read) goes back
        to the pool, which redis-py disconnected, and the next batch takes another.

        Several writes go as one MULTI/EXEC: Redis serves a reader blocked on a stream
        after each command outside a transaction, so egress (following the events
        streams) and consumers (the outputs) would be woken by the batch's first write and
        read the rest on another round trip; in a transaction they are woken once, with
        all of it. Each write's outcome is still its own (a script's error is its reply
        in EXEC's)."""
        connection = self._connection
        if connection is None:
            pool = self.redis.connection_pool
            connection = await pool.get_connection()  # type: ignore[no-untyped-call]
            self._connection = connection
        try:
            if len(commands) == 1:
                return self._waited(await send_pipelined(connection, self._with_wait(commands)))
            sent = [("MULTI",), *commands, ("EXEC",)]
            executed = self._waited(await send_pipelined(connection, self._with_wait(sent)))[-1]
        except BaseException:
            self._connection = None
            await self.redis.connection_pool.release(connection)
            raise
        if isinstance(executed, Exception):  # EXECABORT: none of them ran
            return [executed] * len(commands)
        return list(executed)

    def _with_wait(self, commands: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """`commands`, then the WAIT for them on the same connection (pipelined: no extra
        round trip to the master, only the replicas' own)."""
        if self.wait is None:
            return commands
        return [*commands, ("WAIT", self.wait.replicas, self.wait.timeout_ms)]

    def _waited(self, replies: list[Any]) -> list[Any]:
        """The commands' replies, the WAIT's taken off and checked."""
        if self.wait is None:
            return replies
        confirmed = replies.pop()
        if isinstance(confirmed, int) and confirmed >= self.wait.replicas:
            return replies
        self.unconfirmed += 1
        now = time.monotonic()
        if now - self._warned_at >= 10:
            self._warned_at = now
            log.warning("writes not confirmed by replicas in time", extra={
                "wanted": self.wait.replicas, "confirmed": repr(confirmed),
                "timeout_ms": self.wait.timeout_ms, "unconfirmed_batches": self.unconfirmed,
            })  # fmt: skip
        return replies


def _encode(key: str | bytes) -> bytes:
    return key.encode() if isinstance(key, str) else key
