"""Session ownership across replicas, with no coordinator but Redis.

Each service reads `vl:sessions` through its own consumer group. The replica that gets a
session's start entry owns the session and leaves the entry pending while it does:

* **claim**: the start entry is delivered to one consumer of the group; it becomes the
  owner, raises the session's epoch for its service (`<service>.epoch` in
  `vl:session:{sid}`) and loads the checkpoint, in one MULTI;
* **write**: everything the owner writes for the session goes through `commit()`, one
  fenced script call (`vlpipe.shared.fencing`) that refuses a replica whose epoch is no
  longer current; a refused replica stops the session at once;
* **heartbeat**: every `heartbeat_ms` the owner resets the idle time of its entries
  (`XCLAIM ... JUSTID`, only for entries still pending to itself, in one Lua call), and
  learns which of its sessions the producer has ended;
* **checkpoint**: the service records how far it has read the session's input stream
  (and what else it needs to resume) as `<service>.<name>` fields of the state hash, in
  the same fenced write as the output it wrote;
* **take over**: entries of a dead owner go idle; after `claim_idle_ms` another replica
  claims them (`XAUTOCLAIM`, following its cursor through the whole pending list), loads
  the checkpoint and resumes;
* **release**: when the service has finished a session it marks it done and acks the
  start entry; SIGTERM hands sessions over by making their entries claimable at once;
* **recheck**: for `RECHECK_RELEASED_S` after a release, each heartbeat checks that Redis
  still has the done mark. A failover that lost it (asynchronous replication: the mark
  was acknowledged, never replicated, while the ack of the start entry, on another
  shard, was kept) would leave the session unfinished for good, its last events lost
  unreported: the replica reports the loss and finishes the session again from the
  checkpoint Redis has;
* **housekeeping**: every few heartbeats, the shared streams are trimmed behind their
  slowest group (`vlpipe.shared.retention`) and consumers of replicas long gone removed.

A replica that finds on heartbeat that an entry is no longer pending to it, or whose write
is refused, sets `lost` and cancels the session's task: the new owner carries on from the
checkpoint.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from opentelemetry import metrics
from opentelemetry.metrics import Observation

from vlpipe.shared.contracts import (
    ContractError,
    SessionAnnouncement,
    SessionEnd,
    SessionStart,
    Status,
    decode,
    encode,
)
from vlpipe.shared.fencing import (
    Fence,
    Fenced,
    Regressed,
    SessionLost,
    SessionWrite,
    Wait,
    Writer,
    done_field,
    epoch_field,
)
from vlpipe.shared.keys import StreamKeys, check_session_id
from vlpipe.shared.progress import LoopProgress
from vlpipe.shared.retention import (
    Retention,
    remove_idle_consumers,
    trim_behind_groups,
    trim_sessions,
)
from vlpipe.shared.streams import (
    Backoff,
    DeadLetters,
    Disposition,
    Entry,
    GroupConsumer,
    _redis_down,
    _sleep_or_stop,
    entry_ms,
    through_outages,
)

log = logging.getLogger("vlpipe.ownership")

LOST_END = (
    "Redis lost writes it had acknowledged (a failover): this service's end of the session "
    "and what it wrote last; it finishes the session again from the checkpoint Redis has"
)

# Set the idle time (ARGV[3], ms) of the entries still pending to this consumer: 0 on a
# heartbeat, the claim time on a hand-over; return the ids no longer pending to it.
_REFRESH = """
local lost = {}
for i = 4, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'IDLE', ARGV[3], 'JUSTID')
  else
    table.insert(lost, ARGV[i])
  end
end
return lost
"""


HOUSEKEEPING_EVERY_BEATS = 5
RECHECK_RELEASED_S = 30.0
"""How long after releasing a session a replica checks that Redis still has its done mark:
longer than a failover takes (a master's death noticed within the cluster's node timeout,
then its replica's election), so one after the release is seen."""
RECHECK_MOST = 10_000
"""The most released sessions rechecked (the oldest go first): one pipelined read of two
commands each per heartbeat."""
HAND_OVER_RESERVE_S = 1.5
"""Of the drain budget, what is kept for finishing the claims batch in hand and making the
session entries claimable once the session tasks had their time."""
STALE_START_S = 3600
"""A start entry this old for a session with no state is stale (a consumer group created
later replaying history, or callers long gone): it is refused, not started."""


@dataclass(slots=True)
class OwnedSession:
    """A session this replica owns, as its service's session task sees it."""

    sid: str
    start: SessionStart
    entry_id: str
    checkpoint: dict[str, str]
    """This service's checkpoint fields (without the `<service>.` prefix); empty if new."""
    taken_over: bool
    """True when another replica (or an earlier life of this one) owned it before."""
    fence: Fence
    """This owner's epoch and the number of its last write (see `vlpipe.shared.fencing`)."""
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the producer ended the session (no more input will come)."""
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when another replica took the session over: write nothing more."""
    acked: bool = False
    """Its start entry was acked already: finished once, and run again because a failover
    lost its end (`recheck_released`). Only the epoch guards it (no other replica can
    claim an acked entry), so the heartbeat does not look for it among the pending."""
    task: asyncio.Task[None] | None = None


SessionRunner = Callable[[OwnedSession], Awaitable[None]]


@dataclass(slots=True)
class _Released:
    """A session this replica finished, checked for `RECHECK_RELEASED_S` after."""

    sid: str
    start: SessionStart
    entry_id: str
    at: float
    """When it was released (monotonic s)."""


class SessionOwnership:
    """Claims, heartbeats, checkpoints, releases and takes over sessions for one service.

    `run_session(owned)` is the service's work for one session; it runs as its own task
    from claim until it returns (the session is then released) or the session is lost
    or handed over (the task is cancelled; it should leave a checkpoint behind). Every
    write for the session goes through `commit(owned, write)`. `shared_streams` are the
    shared streams this service writes, with their budgets, trimmed by housekeeping.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: StreamKeys,
        *,
        service: str,
        replica: str,
        run_session: SessionRunner,
        dead: DeadLetters,
        heartbeat_ms: int = 2000,
        claim_idle_ms: int = 15_000,
        max_failures: int = 5,
        block_ms: int = 1000,
        stale_start_s: float = STALE_START_S,
        retention: Retention | None = None,
        shared_streams: tuple[tuple[str, int], ...] = (),
        consumer_idle_ms: int = 3_600_000,
        progress: tuple[LoopProgress, LoopProgress] | None = None,
        wait: Wait | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.service = service
        self.replica = replica
        self.run_session = run_session
        self.dead = dead
        self.heartbeat_ms = heartbeat_ms
        self.claim_idle_ms = claim_idle_ms
        self.max_failures = max_failures
        self.stale_start_s = stale_start_s
        self.retention = retention or Retention()
        self.shared_streams = shared_streams
        self.consumer_idle_ms = consumer_idle_ms
        self.owned: dict[str, OwnedSession] = {}
        self.writer = Writer(redis, wait)
        self._stop: asyncio.Event | None = None
        self._reports: set[asyncio.Task[None]] = set()
        """Reports of lost writes still being written (`_resume_from_redis`)."""
        self._released: deque[_Released] = deque(maxlen=RECHECK_MOST)
        """Sessions released in the last `RECHECK_RELEASED_S`, oldest first."""
        self.takeovers = 0
        meter = metrics.get_meter("vlpipe.ownership")
        self._takeover_counter = meter.create_counter(
            "vlpipe.takeovers", description="Sessions taken over from another replica"
        )
        meter.create_observable_gauge(
            "vlpipe.sessions.owned",
            callbacks=[lambda _: [Observation(len(self.owned), {"service": self.service})]],
            description="Sessions this replica owns",
        )
        self._refresh = redis.register_script(_REFRESH)
        claims, self._beats = progress or (
            LoopProgress(f"{service} claims"),
            LoopProgress(f"{service} heartbeat"),
        )
        self.consumer = GroupConsumer(
            redis,
            streams=[keys.sessions],
            group=service,
            consumer=replica,
            handler=self._on_entry,
            dead=dead,
            batch=32,
            block_ms=min(block_ms, heartbeat_ms),
            claim_idle_ms=claim_idle_ms,
            claim_every_ms=heartbeat_ms,
            max_deliveries=max_failures,
            progress=claims,
        )

    # ---------------------------------------------------------------- lifecycle

    async def run(self, stop: asyncio.Event, *, drain_budget_s: float = 10.0) -> None:
        """Take sessions until `stop` is set; then hand the owned ones over and return,
        within `drain_budget_s` (the process's drain budget): past it the process cancels
        this, the entries would never be made claimable, and callers would wait a whole
        claim time. So the session tasks get the budget less `HAND_OVER_RESERVE_S`."""
        grace_s = max(0.5, drain_budget_s - HAND_OVER_RESERVE_S)
        self._stop = stop
        beat = asyncio.create_task(self._heartbeat_loop(stop), name=f"{self.service}-heartbeat")
        try:
            await self.consumer.run(stop)
        finally:
            await self.hand_over_all(grace_s)
            beat.cancel()
            await asyncio.gather(beat, return_exceptions=True)

    async def hand_over_all(self, grace_s: float) -> None:
        """Cancel every session task and make its entry claimable by another replica now.

        The tasks get `grace_s` to leave their checkpoint; the entries are made claimable
        after that whether or not they finished (a task still stuck, say closing a silent
        upstream, can write nothing once another replica claims the session)."""
        sessions = list(self.owned.values())
        tasks = [s.task for s in sessions if s.task is not None and not s.task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=grace_s)
        ids = [s.entry_id for s in sessions if self.owned.get(s.sid) is s]
        for s in sessions:
            self.owned.pop(s.sid, None)
        if ids:
            try:
                await self._set_idle(ids, self.claim_idle_ms)
            except Exception as exc:
                if not _redis_down(exc):
                    raise
                log.warning("could not hand sessions over; they go idle and are taken over")
                return
            log.info("handed sessions over", extra={"count": len(ids)})

    async def _set_idle(self, entry_ids: list[str], idle_ms: int) -> set[str]:
        """Set the idle time of those of `entry_ids` still pending to this replica; return
        the others (taken over by another replica, or acked)."""
        lost: Any = await self._refresh(
            keys=[self.keys.sessions], args=[self.service, self.replica, idle_ms, *entry_ids]
        )
        return {x.decode() if isinstance(x, bytes) else str(x) for x in lost}

    # ---------------------------------------------------------------- writes

    def _field(self, name: str) -> str:
        return f"{self.service}.{name}"

    def write(self, owned: OwnedSession) -> SessionWrite:
        """A new fenced write for `owned`; fill it, then `commit` it."""
        return SessionWrite(self.keys.session_state(owned.sid), self.service)

    async def commit(self, owned: OwnedSession, write: SessionWrite) -> list[Any] | None:
        """Apply `write` if this replica still holds `owned`, retrying the same write
        through Redis outages (a retry of a write that was applied is recognised).

        Raises `SessionLost` when this replica may no longer write for the session: another
        replica claimed it (the session is then stopped here), Redis lost acknowledged
        writes (the session is resumed from what Redis has), or it was handed over.
        Returns the replies of the write's reads (None when a retry found it applied).
        """
        backoff = Backoff(cap=2.0)
        while True:
            if owned.lost.is_set() or self.owned.get(owned.sid) is not owned:
                raise SessionLost(f"session {owned.sid} is no longer owned here")
            try:
                return await self.writer.apply(write, owned.fence)
            except Fenced as exc:
                self._lose(owned, f"write refused: {exc}")
                raise
            except Regressed as exc:
                await self._resume_from_redis(owned, str(exc))
                raise
            except Exception as exc:
                if not _redis_down(exc):
                    raise
                delay = backoff.next_delay()
                log.warning("write failed; retrying", extra={
                    "session": owned.sid, "error": str(exc), "retry_in_s": round(delay, 3)})  # fmt: skip
                await asyncio.sleep(delay)

    async def checkpoint(self, owned: OwnedSession, values: dict[str, str | int | float]) -> None:
        """Record how far this service got with the session (a fenced write of its own)."""
        write = self.write(owned)
        write.checkpoint(values)
        await self.commit(owned, write)

    def _own_fields(self, raw: dict[bytes, bytes]) -> dict[str, str]:
        prefix = self._field("")
        out: dict[str, str] = {}
        for k, v in raw.items():
            key = k.decode()
            if key.startswith(prefix):
                out[key[len(prefix) :]] = v.decode()
        return out

    async def release(self, owned: OwnedSession) -> None:
        """This service is done with the session: mark it done and ack the start entry."""
        write = self.write(owned)
        write.checkpoint({"done": 1})
        write.hdel(write.state_key, self._field("owner"))
        try:
            await self.commit(owned, write)
        except SessionLost:
            return
        self.owned.pop(owned.sid, None)
        backoff = Backoff(cap=2.0)
        while True:
            try:
                await self.redis.xack(self.keys.sessions, self.service, owned.entry_id)
                break
            except Exception as exc:
                if not _redis_down(exc):
                    raise
                # Unacked, the entry goes idle, is claimed, and is acked as done then.
                if self._stop is not None and self._stop.is_set():
                    return
                await asyncio.sleep(backoff.next_delay())
        self._released.append(_Released(owned.sid, owned.start, owned.entry_id,
                                        time.monotonic()))  # fmt: skip
        log.info("released session", extra={"session": owned.sid})

    async def recheck_released(self) -> None:
        """Finish again each session released in the last `RECHECK_RELEASED_S` whose done
        mark Redis no longer has although its state is there (see the module's recheck):
        report the loss on its status stream, then claim it again, its input known to have
        ended (this service had finished it)."""
        released = self._released
        horizon = time.monotonic() - RECHECK_RELEASED_S
        while released and released[0].at < horizon:
            released.popleft()
        if not released:
            return
        recent = list(released)
        async with self.redis.pipeline(transaction=False) as pipe:
            for r in recent:
                state_key = self.keys.session_state(r.sid)
                pipe.hmget(state_key, [done_field(self.service), self._field("entry")])
                pipe.exists(state_key)
            replies = await pipe.execute()
        for i, r in enumerate(recent):
            (done, entry_id), exists = replies[2 * i], replies[2 * i + 1]
            if done == b"1" or not exists or r.sid in self.owned:
                continue  # still done, expired since, or running again already
            if entry_id is not None and entry_id.decode() != r.entry_id:
                continue  # expired, and the id started again since: another session
            log.warning("Redis lost a finished session's end; finishing it again",
                        extra={"session": r.sid})  # fmt: skip
            await self._status(r.sid, "error", LOST_END, retry=True)
            released.remove(r)
            await self._run_again(r.sid, r.start, r.entry_id)

    async def _run_again(self, sid: str, start: SessionStart, entry_id: str) -> None:
        """Claim a session whose start entry is acked again, here (no other replica can):
        its input is known to have ended, as this service had finished it."""
        try:
            await self._announced(Entry(self.keys.sessions, entry_id, {}), start)
        except ContractError as exc:
            log.warning("could not finish a session again", extra={
                "session": sid, "error": str(exc)})  # fmt: skip
            return
        owned = self.owned.get(sid)
        if owned is not None:
            owned.acked = True
            owned.ended.set()

    def _lose(self, owned: OwnedSession, why: str) -> None:
        """Stop the session here at once: another replica owns it now."""
        log.warning("session lost to another replica", extra={"session": owned.sid,
                                                               "reason": why})  # fmt: skip
        owned.lost.set()
        if self.owned.get(owned.sid) is owned:
            del self.owned[owned.sid]
        if owned.task is not None:
            owned.task.cancel()

    async def _resume_from_redis(self, owned: OwnedSession, why: str) -> None:
        """Redis lost writes it acknowledged: stop the session here, report the loss on the
        session's status stream and let it be claimed again at once (by any replica) from
        the checkpoint Redis still has.

        The report and the release run in a task of their own, retried through outages:
        the session's teardown cancels the task this is called from (its writer), and
        right after a failover the first writes may still meet the outage's tail (a
        connection to the old master); a loss must not go unreported for either."""
        self._lose(owned, f"Redis lost acknowledged writes: {why}")
        report = asyncio.create_task(self._report_loss(owned, why))
        self._reports.add(report)
        report.add_done_callback(self._reports.discard)

    async def _report_loss(self, owned: OwnedSession, why: str) -> None:
        message = ("Redis lost writes it had acknowledged (a restart from an older AOF, or a "
                   f"failover); the session resumes from the checkpoint Redis has: {why}")  # fmt: skip
        try:
            await through_outages(
                lambda: self._status(owned.sid, "error", message, retry=True), "report lost writes"
            )
            if owned.acked:  # run again after a lost end: no pending entry to be claimed
                await through_outages(
                    lambda: self._run_again(owned.sid, owned.start, owned.entry_id),
                    "resume a session run again",
                )
            else:
                await self._set_idle([owned.entry_id], self.claim_idle_ms)
        except Exception as exc:  # it goes idle and is claimed all the same
            log.warning("could not report lost writes", extra={"session": owned.sid,
                                                               "error": repr(exc)})  # fmt: skip

    async def _status(self, sid: str, kind: str, message: str, *, retry: bool = False) -> None:
        """A note on the session's status stream (a service name the contract knows); when
        Redis is down it is dropped, or with `retry` the error is raised (to retry)."""
        try:
            service: Any = self.service
            status = Status(session=sid, service=service, kind=kind, message=message)
        except ValueError:
            return  # not one of the pipeline's services (a test worker)
        try:
            await self.redis.xadd(
                self.keys.status(sid), encode(status),  # type: ignore[arg-type]
                maxlen=self.retention.status, approximate=True,
            )  # fmt: skip
        except Exception as exc:
            if retry or not _redis_down(exc):
                raise

    # ---------------------------------------------------------------- internals

    async def _on_entry(self, entry: Entry) -> Disposition:
        try:
            msg: SessionStart | SessionEnd = decode(SessionAnnouncement, entry.fields)
        except ContractError as exc:
            await self._refused(entry, str(exc))
            raise
        try:
            return await self._announced(entry, msg)
        except ContractError as exc:
            await self._refused(entry, str(exc))
            raise

    async def _refused(self, entry: Entry, reason: str) -> None:
        """A refused announcement of a well-named session is reported on its status stream
        too (the dead-letter stream gets it from the consumer): producers watch that."""
        raw = entry.fields.get(b"session", b"").decode("utf-8", "replace")
        try:
            sid = check_session_id(raw)
        except ValueError:
            return
        kind = entry.fields.get(b"type", b"").decode("utf-8", "replace") or "announcement"
        await self._status(sid, "error", f"session {kind} refused: {reason}")

    async def _announced(self, entry: Entry, msg: SessionStart | SessionEnd) -> Disposition:
        state_key = self.keys.session_state(msg.session)
        if isinstance(msg, SessionEnd):
            # Its start was handled first (same stream), so a live session has state: an
            # end without any names a session that never started, or expired long ago.
            if not await self.redis.exists(state_key):
                raise ContractError(f"end of session {msg.session!r}, which was never started")
            await self.redis.hset(state_key, mapping={"ended": "1", "end_reason": msg.reason})
            owned = self.owned.get(msg.session)
            if owned is not None:
                owned.ended.set()
            return Disposition.ACK
        mine = self.owned.get(msg.session)
        if mine is not None and mine.entry_id == entry.id:
            return Disposition.KEEP  # our own pending entry, re-read after a reconnect
        state = await self.redis.hgetall(state_key)
        if state.get(done_field(self.service).encode()) == b"1":
            # Finished earlier (egress lets a session whose outputs the broker makes go at
            # once): the start it ran, whose ack was lost, is acked; another is refused.
            _second_start(msg.session, entry.id, state.get(self._field("entry").encode()))
            return Disposition.ACK
        age_s = max(0.0, time.time() - entry_ms(entry.id) / 1000)
        if not state and age_s > self.stale_start_s:
            raise ContractError(
                f"start of session {msg.session!r} is {age_s:.0f} s old and the session has "
                f"no state: stale (over {self.stale_start_s:.0f} s), not started"
            )
        # One start entry per session: the first one handled claims it (atomically, so two
        # replicas given two starts cannot both run it); a taken-over entry is that one.
        if not await self.redis.hsetnx(state_key, self._field("entry"), entry.id):
            started_by: Any = await self.redis.hget(state_key, self._field("entry"))
            _second_start(msg.session, entry.id, started_by)
        # The claim raises the epoch before the checkpoint is read: from then on a stalled
        # earlier owner's writes are refused, so the checkpoint cannot move under us.
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hincrby(state_key, epoch_field(self.service), 1)
            pipe.hset(state_key, self._field("owner"), self.replica)
            pipe.hgetall(state_key)
            epoch, _, raw = await pipe.execute()
        checkpoint = self._own_fields(raw)
        for name in ("entry", "owner", "epoch"):
            checkpoint.pop(name, None)
        fence = Fence(int(epoch), int(checkpoint.pop("written", "0")))
        previous: Any = state.get(self._field("owner").encode())
        taken_over = fence.epoch > 1 or previous is not None
        if taken_over:
            self.takeovers += 1
            self._takeover_counter.add(1, {"service": self.service})
            log.info("taking session over", extra={
                "session": msg.session, "epoch": fence.epoch,
                "previous_owner": previous.decode() if previous else None})  # fmt: skip
        owned = OwnedSession(
            sid=msg.session,
            start=msg,
            entry_id=entry.id,
            checkpoint=checkpoint,
            taken_over=taken_over,
            fence=fence,
        )
        if raw.get(b"ended") == b"1":
            owned.ended.set()
        self.owned[msg.session] = owned
        owned.task = asyncio.create_task(
            self._supervise(owned), name=f"{self.service}-{msg.session}"
        )
        return Disposition.KEEP

    async def _supervise(self, owned: OwnedSession) -> None:
        backoff = Backoff(base=0.2, cap=5.0)
        failures = int(owned.checkpoint.get("failures", "0"))
        while True:
            try:
                await self.run_session(owned)
            except asyncio.CancelledError:
                raise
            except SessionLost:
                return
            except Exception as exc:
                if owned.lost.is_set():
                    return
                if _redis_down(exc):
                    log.warning("session paused: Redis unavailable",
                                extra={"session": owned.sid, "error": str(exc)})  # fmt: skip
                else:
                    failures += 1
                    log.exception(
                        "session task failed", extra={"session": owned.sid, "failures": failures}
                    )
                    try:
                        await self.checkpoint(owned, {"failures": failures})
                        if failures >= self.max_failures:
                            entry = Entry(self.keys.sessions, owned.entry_id, {})
                            await self.dead.send(
                                entry,
                                f"session {owned.sid} failed {failures} times in {self.service}: "
                                f"{exc!r}",
                                group=self.service,
                                deliveries=failures,
                            )
                            await self.release(owned)
                            return
                    except SessionLost:
                        return
                await asyncio.sleep(backoff.next_delay())
                owned.checkpoint = await self._reload(owned)
                owned.taken_over = True
                continue
            if not owned.lost.is_set():
                await self.release(owned)
            return

    async def _reload(self, owned: OwnedSession) -> dict[str, str]:
        """The session's checkpoint as Redis has it now, waiting for Redis if need be."""
        backoff = Backoff(cap=2.0)
        while True:
            try:
                raw: Any = await self.redis.hgetall(self.keys.session_state(owned.sid))
                break
            except Exception as exc:
                if not _redis_down(exc):
                    raise
                await asyncio.sleep(backoff.next_delay())
        checkpoint = self._own_fields(raw)
        if checkpoint.get("epoch") != str(owned.fence.epoch):
            self._lose(owned, f"epoch moved on to {checkpoint.get('epoch')}")
            raise SessionLost(owned.sid)
        for name in ("entry", "owner", "epoch", "written"):
            checkpoint.pop(name, None)
        return checkpoint

    async def _heartbeat_loop(self, stop: asyncio.Event) -> None:
        beats = 0
        while not stop.is_set():
            await _sleep_or_stop(stop, self.heartbeat_ms / 1000)
            if stop.is_set():
                continue
            beats += 1
            try:
                with self._beats.turn():
                    if self.owned:
                        await self._beat()
                    if self._released:
                        await self.recheck_released()
                    if beats % HOUSEKEEPING_EVERY_BEATS == 0:
                        await self.housekeeping()
            except Exception as exc:
                # Never let the heartbeat die: without it every session is taken over.
                if _redis_down(exc):
                    log.warning("heartbeat failed", extra={"error": str(exc)})
                else:
                    log.exception("heartbeat or housekeeping failed")

    async def housekeeping(self) -> None:
        """Trim the shared streams behind their slowest group (reporting what a budget
        forced out unread) and remove consumers of replicas long gone."""
        await trim_sessions(self.redis, self.keys.sessions)
        await remove_idle_consumers(
            self.redis, self.keys.sessions, self.service,
            idle_ms=self.consumer_idle_ms, keep=self.replica,
        )  # fmt: skip
        for key, cap in self.shared_streams:
            overflows = await trim_behind_groups(
                self.redis, key, cap=cap, no_group_keep=self.retention.no_group_keep
            )
            for over in overflows:
                count = "an unknown number of" if over.unread_trimmed is None else str(
                    over.unread_trimmed)  # fmt: skip
                await self.dead.send(
                    Entry(key, over.first_kept, {}),
                    f"stream over its budget of {cap} entries: trimmed {count} entries group "
                    f"{over.group!r} had not read (the oldest kept is {over.first_kept})",
                    group=over.group,
                )

    async def _beat(self) -> None:
        sessions = list(self.owned.values())
        lost = await self._set_idle([s.entry_id for s in sessions if not s.acked], 0)
        async with self.redis.pipeline(transaction=False) as pipe:
            for s in sessions:
                pipe.hget(self.keys.session_state(s.sid), "ended")
            ended = await pipe.execute()
        for s, flag in zip(sessions, ended, strict=True):
            if self.owned.get(s.sid) is not s:
                continue  # released (acked) while the heartbeat ran: not lost
            if s.entry_id in lost:
                self._lose(s, "its start entry is pending to another replica")
            elif flag == b"1":
                s.ended.set()


def _second_start(sid: str, entry_id: str, started_by: bytes | str | None) -> None:
    """Refuse a start entry of a session another start entry (`started_by`) started."""
    if isinstance(started_by, bytes):
        started_by = started_by.decode()
    if started_by is not None and started_by != entry_id:
        raise ContractError(
            f"session {sid!r} was already started (entry {started_by}); a second start is refused"
        )
