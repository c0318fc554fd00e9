"""The stream runtime: the one place that talks to Redis Streams.

Three readers cover every hop of the pipeline:

* `GroupConsumer` reads a stream through a consumer group (`vl:sessions`,
  `vl:tool-calls`, `vl:transcripts`): batched `XREADGROUP`, `XACK` after the handler
  succeeded, `XAUTOCLAIM` of entries a dead consumer left pending, dead-lettering after
  `max_deliveries` failures, reconnect with backoff, and a stop that finishes the batch
  in hand.
* `SessionStreamReader` follows many per-session streams from their checkpoints with one
  blocking `XREAD` per process (not one connection per session; one per slot in use on a
  Redis Cluster, which refuses a read across slots), and hands each stream's new entries
  to that session's handler in order.
* `DeadLetters` writes what could not be handled to `vl:dead`, with the reason, the
  original stream and id, and the original fields as `orig.<name>`.

Writers call `publish()`; trimming rules live in `vlpipe.shared.retention`. Session
outputs go through fenced writes (`vlpipe.shared.fencing`).

Every Redis call has a deadline (the client's socket timeout), so a server that stops
answering is noticed like one that went away: the loops back off and retry, and each turn
of a loop is reported to the process's watchdog (`LoopProgress`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeVar, cast

import hiredis
import redis
import redis.asyncio as aioredis
from opentelemetry import metrics
from pydantic import BaseModel
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import (
    ClusterError,
    ReadOnlyError,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from vlpipe.shared.contracts import ContractError, DeadLetter, encode
from vlpipe.shared.fencing import SessionLost
from vlpipe.shared.keys import StreamKeys
from vlpipe.shared.progress import LoopProgress
from vlpipe.shared.redis_tls import RedisTLS
from vlpipe.shared.routing import send_to_slot

log = logging.getLogger("vlpipe.streams")

#: Errors after which the runtime waits and tries the same command again: the server is
#: gone, silent, still loading its data (`BusyLoadingError` is a ConnectionError) or a
#: replica that was not promoted yet (`READONLY`); on a cluster also a slot no master
#: serves yet (a failover in progress) and redirections that did not settle (a slot
#: migrating): `ClusterError`, `SlotNotCoveredError`.
REDIS_DOWN = (
    RedisConnectionError, RedisTimeoutError, ConnectionError, OSError, ReadOnlyError,
    ClusterError, SlotNotCoveredError,
)  # fmt: skip

_TRANSIENT = ("LOADING", "READONLY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "NOREPLICAS")
_TRANSIENT_CLASSES = (ClusterError, TryAgainError, ReadOnlyError)


def transient(exc: ResponseError) -> bool:
    """A reply that means "not now" (failover, loading), not "never": retry later.

    redis-py raises its own class for some replies and cuts the code off the message
    (CLUSTERDOWN -> `ClusterDownError("The cluster is down")`, TRYAGAIN, MASTERDOWN,
    READONLY), so those are known by class."""
    return isinstance(exc, _TRANSIENT_CLASSES) or str(exc).startswith(_TRANSIENT)


def connect(
    url: str,
    *,
    name: str = "vlpipe",
    max_connections: int = 64,
    timeout_s: float = 5.0,
    tls: RedisTLS | None = None,
    cluster: bool = False,
) -> aioredis.Redis:
    """An asyncio Redis client for `url` (redis://, rediss://, with ACL user:password); a
    `rediss://` URL verifies the server with `tls.ca_file` (else the system's CAs) and
    presents `tls.cert_file` when given. The one factory of Redis clients.

    Responses stay bytes: audio travels as raw field values. The pool blocks when all
    `max_connections` are busy (hundreds of sessions writing at once wait their turn for
    a connection instead of failing). A reply that takes longer than `timeout_s` fails
    the call (a server that stopped answering, a black-holed network): blocking reads
    must block for less than that.

    With `cluster`, `url` names any node of a Redis Cluster and the client is redis-py's
    `RedisCluster`: it learns the slots from that node, sends each command to the master
    of its key's slot, follows MOVED and ASK, and relearns the slots after a connection
    error. It has the command methods of `Redis`, so it is typed as one here; the few
    places where a cluster must be handled differently (multi-key reads, the fenced
    writer's pipelining, scripts) ask `is_cluster()`. Its per-node pools do not block when
    full but fail (`MaxConnectionsError`, a connection error the loops retry), so each
    node gets `CLUSTER_CONNECTIONS_FACTOR` times `max_connections`.
    """
    if cluster:
        client = RedisCluster.from_url(
            url,
            **(tls or RedisTLS()).client_options(url),
            max_connections=max_connections * CLUSTER_CONNECTIONS_FACTOR,
            decode_responses=False,
            health_check_interval=10,
            socket_keepalive=True,
            socket_connect_timeout=timeout_s,
            socket_timeout=timeout_s,
            client_name=name,
            # Slots a failed master held stay listed until its replica is promoted; a
            # slot nobody serves fails only the commands on it, not the whole client.
            require_full_coverage=False,
            # The client retries a failed command at once, relearning the slots each time
            # (it has no backoff): one retry covers a connection a failover left stale;
            # past that the runtime's loops retry, backing off, so an outage costs little.
            retry=Retry(NoBackoff(), CLUSTER_RETRIES),
        )
        return cast(aioredis.Redis, client)
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        **(tls or RedisTLS()).client_options(url),
        max_connections=max_connections,
        timeout=timeout_s * 2,
        decode_responses=False,
        health_check_interval=10,
        socket_keepalive=True,
        socket_connect_timeout=timeout_s,
        socket_timeout=timeout_s,
        client_name=name,
    )
    return aioredis.Redis.from_pool(pool)


CLUSTER_CONNECTIONS_FACTOR = 4
CLUSTER_RETRIES = 1


def is_cluster(redis: aioredis.Redis) -> bool:
    """Whether `redis` (from `connect`) is a Redis Cluster client."""
    return isinstance(redis, RedisCluster)


@dataclass(slots=True)
class Backoff:
    """Exponential backoff with full jitter, in seconds."""

    base: float = 0.05
    cap: float = 2.0
    attempt: int = 0

    def next_delay(self) -> float:
        delay = min(self.cap, self.base * (2**self.attempt))
        self.attempt += 1
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self.attempt = 0


@dataclass(frozen=True, slots=True)
class Entry:
    """One stream entry: its stream key, its id, its raw fields."""

    stream: str
    id: str
    fields: dict[bytes, bytes]


def entry_ms(entry_id: str) -> float:
    """When an entry was added: the millisecond part of its id (ms since the epoch)."""
    return float(entry_id.split("-", 1)[0])


def entry_key(entry_id: str) -> tuple[int, int]:
    """An entry id as a sortable pair (ids do not sort as strings: "9-0" > "10-0")."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class Disposition(Enum):
    """What a group handler wants done with an entry it handled without error."""

    ACK = "ack"
    KEEP = "keep"  # leave it pending: the handler owns it now (session ownership)


GroupHandler = Callable[[Entry], Awaitable[Disposition | None]]
SessionHandler = Callable[[str, list[Entry]], Awaitable[None] | None]
"""`handler(key, entries)` of a `SessionStreamReader`: an `async def`, or a plain function
that returns None when it is done (run inline: no Task) or an awaitable when it has
something left to await (a refusal to write, say), which the reader then awaits."""


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _entries(stream: str, raw: Iterable[Any]) -> list[Entry]:
    out = []
    for entry_id, fields in raw:
        if fields is None:  # deleted while pending
            continue
        out.append(Entry(stream, _s(entry_id), dict(fields)))
    return out


async def publish(
    redis: aioredis.Redis,
    key: str,
    msg: BaseModel | Mapping[str, Any],
    *,
    maxlen: int | None = None,
) -> str:
    """XADD a message (a contract model, or raw fields) and return its entry id."""
    fields = encode(msg) if isinstance(msg, BaseModel) else dict(msg)
    entry_id = await redis.xadd(key, fields, maxlen=maxlen, approximate=True)  # type: ignore[arg-type]
    return _s(entry_id)


_DEAD_LETTERS = metrics.get_meter("vlpipe.streams").create_counter(
    "vlpipe.dead_letters", description="Entries written to the dead-letter stream, by reason"
)


def _stream_kind(stream: str, dead_key: str) -> str:
    """`vl:frames:{sid}` -> `frames`: a label with few values, not one per session."""
    prefix = dead_key.rsplit(":", 1)[0] + ":"
    return stream.removeprefix(prefix).split(":", 1)[0] or stream


def _reason_kind(reason: str) -> str:
    """contract (a message that breaks its contract), handler (a failure N times), other."""
    if reason.startswith(("invalid ", "unknown ", "field ")) or "not UTF-8" in reason:
        return "contract"
    if "failed" in reason and "times" in reason:
        return "handler"
    return "other"


DEAD_FIELD_BYTES = 64 * 1024
"""The most of one original field a dead letter copies; a longer value is cut to this and
its whole size recorded as `orig.<name>.bytes`."""


class DeadLetters:
    """Writes unhandled entries to `vl:dead` with their reason. Never raises on bad input."""

    def __init__(self, redis: aioredis.Redis, keys: StreamKeys, service: str, maxlen: int = 10_000):
        self.redis = redis
        self.key = keys.dead
        self.service = service
        self.maxlen = maxlen

    async def send(
        self,
        entry: Entry,
        reason: str,
        *,
        group: str | None = None,
        deliveries: int = 0,
    ) -> None:
        head = encode(
            DeadLetter(
                stream=entry.stream,
                id=entry.id,
                reason=reason[:2000],
                service=self.service,
                group=group,
                deliveries=deliveries,
            )
        )
        fields: dict[Any, Any] = dict(head)
        for name, value in entry.fields.items():
            # Enough to see what was wrong, not a second copy of a huge payload.
            fields[b"orig." + name] = value[:DEAD_FIELD_BYTES]
            if len(value) > DEAD_FIELD_BYTES:
                fields[b"orig." + name + b".bytes"] = len(value)
        await self.redis.xadd(self.key, fields, maxlen=self.maxlen, approximate=True)
        _DEAD_LETTERS.add(
            1,
            {"service": self.service, "stream": _stream_kind(entry.stream, self.key),
             "reason": _reason_kind(reason)},
        )  # fmt: skip
        log.warning(
            "dead-lettered entry",
            extra={"stream": entry.stream, "entry_id": entry.id, "reason": reason[:500]},
        )


class GroupConsumer:
    """One consumer of a consumer group over one or more streams.

    Guarantees, each tested against a real Redis:
    * at-least-once: an entry is acked only after `handler` returned (and the handler did
      not ask to keep it pending);
    * entries left pending by a consumer idle for `claim_idle_ms` are claimed and handled;
    * an entry whose handler raised `max_deliveries` times, or that does not match its
      contract (`ContractError`, which no retry can fix), goes to the dead-letter stream
      and is acked; the consumer keeps going;
    * when Redis goes away it retries with backoff; un-acked entries are simply handled
      again, so nothing is lost and nothing is acked twice;
    * `run()` returns after `stop` is set, once the batch in hand is handled and acked.
    Entries of one stream are handled in order: after a failure or a reconnect the
    consumer goes once through its own pending entries (handed to the handler again,
    oldest first, with a cursor: entries a handler keeps pending stay there by design)
    before reading new ones. Takeover follows the `XAUTOCLAIM` cursor through the whole
    pending list, so old live entries never hide a dead consumer's newer ones.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        streams: list[str],
        group: str,
        consumer: str,
        handler: GroupHandler,
        dead: DeadLetters,
        batch: int = 64,
        block_ms: int = 1000,
        claim_idle_ms: int = 15_000,
        max_deliveries: int = 5,
        start_id: str = "0",
        claim_every_ms: int | None = None,
        progress: LoopProgress | None = None,
    ) -> None:
        if is_cluster(redis) and len({key_slot(s.encode()) for s in streams}) > 1:
            # One XREADGROUP names every stream: a cluster refuses keys of several slots.
            raise ValueError(
                f"on a Redis Cluster a consumer's streams must share a slot: {streams}"
            )
        self.redis = redis
        self.streams = streams
        self.group = group
        self.consumer = consumer
        self.handler = handler
        self.dead = dead
        self.batch = batch
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        self.max_deliveries = max_deliveries
        self.start_id = start_id
        self.claim_every_ms = claim_every_ms or claim_idle_ms // 2
        self.handled = 0
        self.progress = progress or LoopProgress(f"group {group}")
        # Where the pass through this consumer's own pending entries stands (None: done).
        # On start, first finish what this consumer left pending.
        self._pending_after: dict[str, str] | None = None
        self._rescan_pending()
        self._claim_cursor = {stream: "0-0" for stream in streams}
        self._next_claim = 0.0

    def _rescan_pending(self) -> None:
        self._pending_after = {stream: "0-0" for stream in self.streams}

    async def ensure_groups(self) -> None:
        """Create the group on every stream (and the stream) if missing."""
        for stream in self.streams:
            try:
                await self.redis.xgroup_create(stream, self.group, id=self.start_id, mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def run(self, stop: asyncio.Event) -> None:
        backoff = Backoff()
        groups_ready = False
        while not stop.is_set():
            try:
                with self.progress.turn():
                    if not groups_ready:
                        await self.ensure_groups()
                        groups_ready = True
                    entries = await self._next_batch()
                    if entries:
                        await self._handle_batch(entries)
                backoff.reset()
            except Exception as exc:
                if not _redis_down(exc):
                    if not isinstance(exc, ResponseError) or "NOGROUP" not in str(exc):
                        raise
                    groups_ready = False  # stream deleted, or Redis restarted without data
                delay = backoff.next_delay()
                log.warning(
                    "redis unavailable, retrying",
                    extra={"group": self.group, "error": str(exc), "retry_in_s": round(delay, 3)},
                )
                self._rescan_pending()
                await _sleep_or_stop(stop, delay)

    async def _next_batch(self) -> list[Entry]:
        now = time.monotonic()
        if now >= self._next_claim:
            self._next_claim = now + self.claim_every_ms / 1000
            claimed = await self._claim_idle()
            if claimed:
                return claimed
        if self._pending_after is not None:
            pending = await self._read(self._pending_after, block=None)
            if pending:
                for entry in pending:
                    self._pending_after[entry.stream] = entry.id
                return pending
            self._pending_after = None
        return await self._read({s: ">" for s in self.streams}, block=self.block_ms)

    async def _read(self, ids: dict[str, str], block: int | None) -> list[Entry]:
        streams: Any = ids
        reply: Any = await self.redis.xreadgroup(
            self.group, self.consumer, streams, count=self.batch, block=block
        )
        out: list[Entry] = []
        for stream, raw in reply or []:
            out.extend(_entries(_s(stream), raw))
        return out

    async def _claim_idle(self) -> list[Entry]:
        """Idle entries of other consumers, scanning on from where the last call stopped:
        `XAUTOCLAIM` looks at no more than 10 x COUNT entries per call, so a scan always
        from the start would never reach past the oldest live sessions."""
        out: list[Entry] = []
        for stream in self.streams:
            cursor = self._claim_cursor[stream]
            while True:
                reply = await self.redis.xautoclaim(
                    stream, self.group, self.consumer, self.claim_idle_ms, cursor,
                    count=self.batch,
                )  # fmt: skip
                cursor = _s(reply[0])
                claimed = _entries(stream, reply[1])
                if claimed:
                    log.info(
                        "claimed idle entries",
                        extra={"stream": stream, "group": self.group, "count": len(claimed)},
                    )
                out.extend(claimed)
                if cursor == "0-0" or len(out) >= self.batch:
                    break
            self._claim_cursor[stream] = cursor
        return out

    async def _handle_batch(self, entries: list[Entry]) -> None:
        acks: dict[str, list[str]] = {}
        for entry in entries:
            try:
                disposition = await self.handler(entry)
            except ContractError as exc:
                await self.dead.send(entry, str(exc), group=self.group, deliveries=1)
                disposition = Disposition.ACK
            except Exception as exc:  # the handler's failure, not the consumer's
                if _redis_down(exc):
                    await self._ack(acks)
                    raise
                deliveries = await self._deliveries(entry)
                if deliveries < self.max_deliveries:
                    log.warning(
                        "handler failed; will retry",
                        extra={
                            "stream": entry.stream,
                            "entry_id": entry.id,
                            "deliveries": deliveries,
                            "error": repr(exc)[:500],
                        },
                    )
                    self._rescan_pending()
                    await asyncio.sleep(min(0.05 * 2**deliveries, 1.0))
                    break  # keep the stream's order: retry this entry before later ones
                await self.dead.send(
                    entry,
                    f"handler failed {deliveries} times: {exc!r}",
                    group=self.group,
                    deliveries=deliveries,
                )
                disposition = Disposition.ACK
            self.handled += 1
            if disposition is not Disposition.KEEP:
                acks.setdefault(entry.stream, []).append(entry.id)
        await self._ack(acks)

    async def _ack(self, acks: dict[str, list[str]]) -> None:
        if not acks:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream, ids in acks.items():
                pipe.xack(stream, self.group, *ids)
            await pipe.execute()
        acks.clear()

    async def _deliveries(self, entry: Entry) -> int:
        info = await self.redis.xpending_range(
            entry.stream, self.group, min=entry.id, max=entry.id, count=1
        )
        return int(info[0]["times_delivered"]) if info else self.max_deliveries


def _redis_down(exc: BaseException) -> bool:
    return (
        isinstance(exc, REDIS_DOWN)
        or (isinstance(exc, ResponseError) and transient(exc))
        or _cut_off_mid_command(exc)
    )


def _cut_off_mid_command(exc: BaseException) -> bool:
    """redis-py's cluster client closes every connection it has when a node answers
    CLUSTERDOWN (a failover in progress), including those other tasks are using: a command
    caught half-way (connecting, or writing) then fails inside redis-py with an
    AttributeError (the connection's reader or writer is gone). That is the outage too."""
    if not isinstance(exc, AttributeError):
        return False
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and _REDIS_PY in tb.tb_frame.f_code.co_filename


_REDIS_PY = os.path.dirname(redis.__file__)


T = TypeVar("T")


async def through_outages(call: Callable[[], Awaitable[T]], what: str) -> T:
    """`call()`, retried with backoff for as long as Redis is down (a read a session
    cannot go on without; writes go through `SessionOwnership.commit`)."""
    backoff = Backoff(cap=2.0)
    while True:
        try:
            return await call()
        except Exception as exc:
            if not _redis_down(exc):
                raise
            delay = backoff.next_delay()
            log.warning("redis unavailable, retrying",
                        extra={"call": what, "error": str(exc), "retry_in_s": round(delay, 3)})  # fmt: skip
            await asyncio.sleep(delay)


@dataclass(slots=True)
class _Followed:
    last_id: str
    handler: SessionHandler
    since_read: int = 0
    """The reader's count of reads begun when the stream was followed: a read begun
    before it brings entries after the position of an earlier follower of the key."""
    failures: int = 0
    retry_at: float = 0.0  # monotonic time before which a failing stream is not read


@dataclass(frozen=True, slots=True)
class _PackedKeys:
    """The keys of a standalone XREAD, in RESP (the followed streams, the wake-up stream
    last), and the followed streams in that order, whose positions go after them."""

    generation: int
    followed: list[_Followed]
    packed: bytes

    @classmethod
    def of(cls, generation: int, followed: dict[str, _Followed], wake_key: str) -> _PackedKeys:
        return cls(generation, list(followed.values()), packed_args(*followed, wake_key))


def packed_xread(
    count: int, block_ms: int, packed_keys: bytes, ids: Sequence[str | bytes]
) -> bytes:
    """`XREAD COUNT count BLOCK block_ms STREAMS <keys> <ids>` in RESP, the same bytes as
    `hiredis.pack_command` makes, from keys already packed (`packed_args`, `len(ids)` of
    them)."""
    head = packed_args("XREAD", "COUNT", count, "BLOCK", block_ms, "STREAMS")
    return b"*%d\r\n%s%s%s" % (6 + 2 * len(ids), head, packed_keys, packed_args(*ids))


def packed_args(*args: str | bytes | int) -> bytes:
    """`args` as RESP bulk strings, without the array header of a command."""
    packed: bytes = hiredis.pack_command(args)  # type: ignore[arg-type]  # (stub: a 1-tuple)
    return packed[packed.index(b"\r\n") + 2 :]


DELIVER_SLICE_S = 0.001
"""The longest a reader hands one read's entries to their handlers before it lets the
event loop run what else is ready, then goes on (see `SessionStreamReader._read_once`)."""


@dataclass(slots=True)
class SessionStreamReader:
    """Follows many per-session streams with one blocking XREAD (one per slot in use on a
    Redis Cluster).

    `add(key, last_id, handler)` starts following `key` after `last_id` (a checkpoint,
    or "0-0" for a new session); `handler(key, entries)` gets each batch in order and
    should not block for long: the next read waits for every handler of this one (the
    handlers of different streams run concurrently). A handler that has nothing to await
    (most of the time) is better a plain function (`SessionHandler`): it runs inline,
    where an `async def` costs a Task per stream per read. A wake-up stream
    private to this reader (expiring `WAKE_TTL_S` after its last use) interrupts the
    blocking read when streams are added, so a new session starts at once. A handler that
    raises is retried with the same entries; after `max_deliveries` failures the first
    entry is dead-lettered and skipped. A handler that raises `SessionLost` is no longer
    followed. Reads begin at most once per `min_interval_s` (`_paced`).

    On a Redis Cluster one XREAD may only name keys of one slot (CROSSSLOT otherwise, even
    when two slots sit on one node), so a read per node cannot be: the followed keys are
    grouped by slot (a session's keys share one, through their hash tag) and each slot in
    use has its own loop, with its own blocking XREAD and its own wake-up stream (a key
    whose hash tag hashes to that slot), all running at once. A key's slot never changes:
    when the slot moves to another master (resharding, failover), the cluster client
    follows MOVED and ASK and the next read goes to the new master, and a read refused
    meanwhile (TRYAGAIN while the slot's keys are split between two masters) is retried;
    each stream's position is its own (`position(key)`), so nothing is skipped or read
    twice. The cost: one connection per slot in use while its read blocks.
    """

    redis: aioredis.Redis
    wake_key: str
    dead: DeadLetters
    count: int = 64
    block_ms: int = 1000
    max_deliveries: int = 5
    min_interval_s: float = 0.0
    """Least time between the starts of two reads (of one slot, on a cluster)."""
    progress: LoopProgress = field(default_factory=lambda: LoopProgress("session reader"))
    _followed: dict[str, _Followed] = field(default_factory=dict)
    _wake_id: str = "$"
    # Cluster mode: the followed keys of each slot, and each slot's wake-up position.
    _by_slot: dict[int, set[str]] = field(default_factory=dict)
    _slot_wake_ids: dict[int, str] = field(default_factory=dict)
    _reading: set[int] = field(default_factory=set)
    _slots_changed: asyncio.Event = field(default_factory=asyncio.Event)
    _outage_logged_at: float = -1e9
    # Standalone: the connection the blocking read uses, kept from one read to the next.
    _connection: AbstractConnection | None = None
    # Standalone: the read's keys, packed; packed again when `_generation` moved on (a
    # stream added or dropped).
    _packed_keys: _PackedKeys | None = None
    _generation: int = 0
    _reads: int = 0
    """Reads begun so far (of every slot, on a cluster)."""

    def add(self, key: str, last_id: str, handler: SessionHandler) -> None:
        self._followed[key] = _Followed(last_id, handler, self._reads)
        self._generation += 1
        if not is_cluster(self.redis):
            self.wake()
            return
        slot = key_slot(key.encode())
        self._by_slot.setdefault(slot, set()).add(key)
        if slot in self._reading:
            self._wake_slots([slot])
        else:
            self._slots_changed.set()  # the slot's loop starts, reading the key at once

    def remove(self, key: str) -> None:
        self._followed.pop(key, None)
        self._unindex(key)

    def _unindex(self, key: str) -> None:
        """After `key` was dropped from the followed streams."""
        self._generation += 1
        if self._by_slot:
            slot = key_slot(key.encode())
            keys = self._by_slot.get(slot)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_slot[slot]

    def position(self, key: str) -> str | None:
        """The id of the last entry handed to `key`'s handler."""
        followed = self._followed.get(key)
        return followed.last_id if followed else None

    def __contains__(self, key: str) -> bool:
        return key in self._followed

    def __len__(self) -> int:
        """How many streams it follows."""
        return len(self._followed)

    def wake(self) -> None:
        """Interrupt the blocking read (after adding a stream, or to notice a stop)."""
        if is_cluster(self.redis):
            self._slots_changed.set()
            self._wake_slots(sorted(self._reading))
            return
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(
            self._wake([self.wake_key])
        )
        task.add_done_callback(_ignore_result)

    def _wake_slots(self, slots: list[int]) -> None:
        if slots:
            keys = [self._slot_wake_key(slot) for slot in slots]
            task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(self._wake(keys))
            task.add_done_callback(_ignore_result)

    async def _wake(self, keys: list[str]) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.xadd(key, {"w": "1"}, maxlen=16, approximate=False)
                pipe.expire(key, WAKE_TTL_S)
            await pipe.execute()

    def _slot_wake_key(self, slot: int) -> str:
        return f"{self.wake_key}:{{{slot_tag(slot)}}}"

    async def run(self, stop: asyncio.Event) -> None:
        if is_cluster(self.redis):
            await self._run_slots(stop)
            return
        backoff = Backoff()
        try:
            while not stop.is_set():
                try:
                    started = time.monotonic()
                    with self.progress.turn():
                        if self._wake_id == "$":
                            self._wake_id = await _last_id(self.redis, self.wake_key)
                        self._wake_id = await self._read_once(
                            self._followed, self.wake_key, self._wake_id
                        )
                    backoff.reset()
                    await self._paced(started)
                except Exception as exc:
                    if not _redis_down(exc):
                        raise
                    delay = backoff.next_delay()
                    log.warning(
                        "redis unavailable, retrying",
                        extra={"error": str(exc), "retry_in_s": round(delay, 3)},
                    )
                    await _sleep_or_stop(stop, delay)
        finally:
            await self._release_connection()

    async def _run_slots(self, stop: asyncio.Event) -> None:
        """Cluster mode: a loop per slot in use, started when a key of a new slot is added
        and ending when its slot has no key left; returns once every loop noticed `stop`."""
        loops: dict[int, asyncio.Task[None]] = {}
        try:
            while True:
                self._slots_changed.clear()
                for slot in self._by_slot.keys() - loops.keys():
                    if not stop.is_set():
                        self._reading.add(slot)
                        loops[slot] = asyncio.create_task(self._follow_slot(slot, stop))
                if not loops:
                    if stop.is_set():
                        return
                changed = asyncio.create_task(self._slots_changed.wait())
                stopping = asyncio.create_task(stop.wait())
                waiting: set[asyncio.Future[Any]] = {changed, stopping, *loops.values()}
                try:
                    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    changed.cancel()
                    stopping.cancel()
                if stop.is_set() and loops:
                    # Each loop returns once its read does (at most `block_ms`).
                    await asyncio.wait(loops.values())
                for slot, loop in list(loops.items()):
                    if loop.done():
                        del loops[slot]
                        self._reading.discard(slot)
                        loop.result()  # a failure that is not Redis being down
        finally:
            for loop in loops.values():
                loop.cancel()
            await asyncio.gather(*loops.values(), return_exceptions=True)
            self._reading.clear()

    async def _follow_slot(self, slot: int, stop: asyncio.Event) -> None:
        wake_key = self._slot_wake_key(slot)
        backoff = Backoff()
        refresh_at = 0.0
        while not stop.is_set():
            keys = self._by_slot.get(slot)
            if not keys:
                return
            try:
                started = time.monotonic()
                with self.progress.turn():
                    wake_id = self._slot_wake_ids.get(slot)
                    if wake_id is None or time.monotonic() >= refresh_at:
                        # The wake-up stream must exist: while a slot migrates, a read
                        # naming a key that does not is refused (TRYAGAIN) until it ends.
                        await self._wake([wake_key])
                        refresh_at = time.monotonic() + WAKE_TTL_S / 4
                        if wake_id is None:
                            wake_id = await _last_id(self.redis, wake_key)
                    followed = {k: f for k in keys if (f := self._followed.get(k)) is not None}
                    self._slot_wake_ids[slot] = await self._read_once(
                        followed, wake_key, wake_id, slot=slot
                    )
                backoff.reset()
                await self._paced(started)
            except Exception as exc:
                if not _redis_down(exc):
                    raise
                delay = backoff.next_delay()
                now = time.monotonic()
                if now - self._outage_logged_at >= 1.0:  # one line a second, not one a slot
                    self._outage_logged_at = now
                    log.warning(
                        "redis unavailable, retrying",
                        extra={"slot": slot, "error": str(exc), "retry_in_s": round(delay, 3)},
                    )
                await _sleep_or_stop(stop, delay)

    async def _paced(self, started: float) -> None:
        """Wait until `min_interval_s` after the read that began at `started`. A read names
        every followed stream, and Redis looks each one up whatever it holds (on 7.0 it
        also seeks each stream's last entry), so its cost grows with the sessions, not with
        what it returns. Calls whose 20 ms clocks are not aligned wake a blocking read for
        nearly every chunk; at most one read per interval lets the chunks that arrive
        within it go in one read (a read that blocked for longer goes on at once)."""
        wait = started + self.min_interval_s - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)

    async def _read_once(
        self, followed: dict[str, _Followed], wake_key: str, wake_id: str, slot: int | None = None
    ) -> str:
        """One blocking XREAD of `followed` (each from its position) and `wake_key`, and
        the delivery of what it returned; returns the wake-up stream's new position. With
        `slot` (a cluster), the read goes to that slot's master itself (`send_to_slot`:
        redis-py mishandles ASK while a slot migrates).

        Calls on a shared 20 ms clock make one read return a chunk of every session at
        once, and handing them all over is one long run of the loop (the broker at 25
        calls on a slow host: about 5 ms a tick, at 250 calls tens of ms). An answer's
        audio arriving from the upstream meanwhile, or the reply to a write of its
        events, waited for all of it, at each of its steps. So the delivery lets the loop
        run what else is ready every `DELIVER_SLICE_S` (between streams: a stream's
        entries go in order, in one call). What is still to deliver is this read's: a
        stream dropped meanwhile is skipped, one added is read next time.

        Only while the reader keeps up (no stream has more than one new entry): on an
        overloaded process every slice waits for a whole turn of everything else, and the
        input falls behind real time (the broker at 250 calls on that slow host: 72% of
        the audio in time with slices at every read, 97-99% without).

        A stream followed again since the read began (dropped and added back, as when a
        session is lost and claimed again here) gets nothing from it: the read brought
        entries after the old follower's position, and the new one is read from its own
        next time."""
        read = self._reads
        self._reads = read + 1
        raw: Any
        if slot is None:
            raw = await self._xread(self._packed_read(wake_id))
        else:
            command = self._read_command(followed, wake_key, wake_id)
            raw = await send_to_slot(cast(RedisCluster, self.redis), slot, command)
        deliveries: list[Awaitable[None]] = []
        errors: list[BaseException] = []
        streams = list(raw.items() if isinstance(raw, dict) else (raw or ()))
        # A stream with more than one new entry: the reader is behind, and handing its
        # backlog over at once keeps it from falling further behind.
        sliced = all(len(entries) <= 1 for _, entries in streams)
        slice_ends = time.monotonic() + DELIVER_SLICE_S
        for stream_raw, raw_entries in streams:
            if sliced and time.monotonic() >= slice_ends:
                await asyncio.sleep(0)
                slice_ends = time.monotonic() + DELIVER_SLICE_S
            key = _s(stream_raw)  # RESP3 (a map) or RESP2 (pairs); nothing (None) on timeout
            if key == wake_key:
                wake_id = _s(raw_entries[-1][0])
                continue
            current = self._followed.get(key)
            if current is None or current.since_read > read:
                continue
            entries = [
                Entry(key, _s(entry_id), _pairs(flat))
                for entry_id, flat in raw_entries
                if flat is not None
            ]
            if not entries:
                continue
            try:
                pending = self._deliver(key, current, entries)
            except Exception as exc:  # Redis is down: the other streams get theirs first
                errors.append(exc)
                continue
            if pending is not None:
                deliveries.append(pending)
        # Each stream appears once per reply, so its batches stay in order; different
        # sessions' handlers (each usually one Redis round trip) overlap instead of queueing.
        if len(deliveries) == 1 and not errors:
            await deliveries[0]
        elif deliveries:
            results = await asyncio.gather(*deliveries, return_exceptions=True)
            errors += [result for result in results if isinstance(result, BaseException)]
        if errors:
            raise errors[0]
        return wake_id

    def _read_command(
        self, followed: dict[str, _Followed], wake_key: str, wake_id: str
    ) -> tuple[Any, ...]:
        """The XREAD of `followed` from their positions and of `wake_key`; a stream that
        failed is left out until its retry time, and the read then blocks 100 ms at most."""
        now = time.monotonic()
        ids = {key: f.last_id for key, f in followed.items() if f.retry_at <= now}
        ids[wake_key] = wake_id
        block = self.block_ms if len(ids) == len(followed) + 1 else min(self.block_ms, 100)
        return ("XREAD", "COUNT", self.count, "BLOCK", block, "STREAMS", *ids, *ids.values())

    def _packed_read(self, wake_id: str) -> bytes:
        """The standalone XREAD, packed. The keys (most of its bytes) are packed once for
        each change of the followed streams; only the positions are packed for every read.
        While a stream waits out its retry delay the whole command is packed each time."""
        keys = self._packed_keys
        if keys is None or keys.generation != self._generation:
            keys = self._packed_keys = _PackedKeys.of(
                self._generation, self._followed, self.wake_key
            )
        now = time.monotonic()
        ids = [f.last_id for f in keys.followed if f.retry_at <= now]
        if len(ids) < len(keys.followed):
            command: bytes = hiredis.pack_command(
                self._read_command(self._followed, self.wake_key, wake_id)
            )
            return command
        ids.append(wake_id)
        return packed_xread(self.count, self.block_ms, keys.packed, ids)

    async def _xread(self, command: bytes) -> Any:
        """`command` (a packed XREAD) on the reader's own connection, its reply as the
        parser gives it: redis-py's `xread` packs and encodes each of the 2N+1 arguments in
        Python and wraps the call in layers (retries, telemetry), a large share of the
        reader's CPU at real-time pace. The connection stays the reader's between reads
        (taken from the pool once); one that failed goes back (redis-py disconnected it)."""
        connection = self._connection
        if connection is None:
            pool = self.redis.connection_pool
            connection = await pool.get_connection()  # type: ignore[no-untyped-call]
            self._connection = connection
        try:
            await connection.send_packed_command(command)
            return await connection.read_response()
        except ResponseError:
            raise  # a whole reply was read: the connection is still in step
        except BaseException:
            await self._release_connection()
            raise

    async def _release_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            await self.redis.connection_pool.release(connection)

    def _deliver(
        self, key: str, followed: _Followed, entries: list[Entry]
    ) -> Awaitable[None] | None:
        """Hands `entries` to `key`'s handler. Returns what is left to await (the handler's
        awaitable, or a dead letter to write), or None when the delivery is over."""
        try:
            pending = followed.handler(key, entries)
        except Exception as exc:
            return self._failed(key, followed, entries, exc)
        if pending is None:
            self._handled(followed, entries)
            return None
        return self._finish(key, followed, entries, pending)

    async def _finish(
        self, key: str, followed: _Followed, entries: list[Entry], pending: Awaitable[None]
    ) -> None:
        try:
            await pending
        except Exception as exc:
            dead_letter = self._failed(key, followed, entries, exc)
            if dead_letter is not None:
                await dead_letter
            return
        self._handled(followed, entries)

    @staticmethod
    def _handled(followed: _Followed, entries: list[Entry]) -> None:
        followed.failures = 0
        followed.last_id = entries[-1].id

    def _failed(
        self, key: str, followed: _Followed, entries: list[Entry], exc: Exception
    ) -> Awaitable[None] | None:
        """After the handler raised `exc`: stop following (`SessionLost`), raise it again
        (Redis is down), or count the failure; returns the dead letter to write after
        `max_deliveries` failures."""
        if isinstance(exc, SessionLost):
            if self._followed.get(key) is followed:
                del self._followed[key]
                self._unindex(key)
            return None
        if _redis_down(exc):
            raise exc
        followed.failures += 1
        followed.retry_at = time.monotonic() + min(0.05 * 2**followed.failures, 2.0)
        if followed.failures < self.max_deliveries:
            log.warning(
                "session handler failed; will retry",
                extra={"stream": key, "entry_id": entries[0].id, "error": repr(exc)[:500]},
            )
            return None
        followed.failures = 0
        return self._dead_letter(followed, entries[0], exc)

    async def _dead_letter(self, followed: _Followed, entry: Entry, exc: Exception) -> None:
        await self.dead.send(
            entry,
            f"handler failed {self.max_deliveries} times: {exc!r}",
            deliveries=self.max_deliveries,
        )
        followed.last_id = entry.id


def _pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    """An entry's fields as Redis sends them (name, value, name, value...), as a dict."""
    names = iter(flat)
    return dict(zip(names, names, strict=True))


_SLOT_TAGS: list[str] = []


def slot_tag(slot: int) -> str:
    """A short hash tag whose keys land on `slot` (`key_slot("{tag}") == slot`): found
    once for every slot, on first use (about 180 000 CRC16s: some 0.2 s, once a process)."""
    if not _SLOT_TAGS:
        tags: list[str | None] = [None] * 16384
        missing, n = 16384, 0
        while missing:
            tag = format(n, "x")
            slot_of = key_slot(tag.encode())
            if tags[slot_of] is None:
                tags[slot_of] = tag
                missing -= 1
            n += 1
        _SLOT_TAGS.extend(t for t in tags if t is not None)
    return _SLOT_TAGS[slot]


WAKE_TTL_S = 3600
"""A wake-up stream expires this long after its last use (its replica may be gone)."""


async def _last_id(redis: aioredis.Redis, key: str) -> str:
    reply: Any = await redis.xrevrange(key, count=1)
    return _s(reply[0][0]) if reply else "0-0"


def _ignore_result(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


async def _sleep_or_stop(stop: asyncio.Event, delay: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), timeout=delay)
    except TimeoutError:
        pass
