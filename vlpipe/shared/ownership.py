"""Session ownership across replicas, with no coordinator but Redis.

Each service reads `vl:sessions` through its own consumer group. The replica that gets a
session's start entry owns the session and leaves the entry pending while it does:

* **claim**: the start entry is delivered to one consumer of the group; it becomes the
  owner and records itself in the session's state hash (`vl:session:{sid}`);
* **heartbeat**: every `heartbeat_ms` the owner resets the idle time of its entries
  (`XCLAIM ... JUSTID`, only for entries still pending to itself, in one Lua call), and
  learns which of its sessions the producer has ended;
* **checkpoint**: the service records how far it has read the session's input stream
  (and what else it needs to resume) as `<service>.<name>` fields of the state hash,
  ideally in the same MULTI as the output it wrote (`checkpoint_into`);
* **take over**: entries of a dead owner go idle; after `claim_idle_ms` another replica
  claims them (`XAUTOCLAIM`), loads the checkpoint and resumes;
* **release**: when the service has finished a session it marks it done and acks the
  start entry; SIGTERM hands sessions over by making their entries claimable at once.

A replica that finds on heartbeat that an entry is no longer pending to it (it stalled
longer than `claim_idle_ms` and was taken over) sets `lost` and cancels the session's
task: the new owner carries on from the checkpoint.
"""

from __future__ import annotations

import asyncio
import logging
import time
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
    decode,
)
from vlpipe.shared.keys import StreamKeys
from vlpipe.shared.streams import (
    REDIS_DOWN,
    Backoff,
    DeadLetters,
    Disposition,
    Entry,
    GroupConsumer,
    _sleep_or_stop,
    entry_ms,
)

log = logging.getLogger("vlpipe.ownership")

# Keep the idle time of entries still pending to this consumer low; return the ids that
# are no longer pending to it.
_HEARTBEAT = """
local lost = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  else
    table.insert(lost, ARGV[i])
  end
end
return lost
"""


TRIM_EVERY_BEATS = 30
STALE_START_S = 3600
"""A start entry this old for a session with no state is stale (a consumer group created
later replaying history, or callers long gone): it is refused, not started."""


async def trim_sessions(redis: aioredis.Redis, key: str) -> str | None:
    """Trim the sessions stream behind every group's oldest pending or undelivered entry.

    Start entries of live sessions stay pending, so they are never trimmed; ended
    sessions' entries go once every group has read and acked them. Returns the MINID used,
    or None when nothing may be trimmed (no groups yet).
    """
    groups: Any = await redis.xinfo_groups(key)
    if not groups:
        return None
    floor: tuple[int, int] | None = None
    for group in groups:
        candidates = [group["last-delivered-id"]]
        if group["pending"]:
            summary: Any = await redis.xpending(key, group["name"])
            candidates.append(summary["min"])
        for raw in candidates:
            text = raw.decode() if isinstance(raw, bytes) else str(raw)
            ms, _, seq = text.partition("-")
            point = (int(ms), int(seq or 0))
            floor = point if floor is None or point < floor else floor
    if floor is None or floor == (0, 0):
        return None
    minid = f"{floor[0]}-{floor[1]}"
    await redis.xtrim(key, minid=minid, approximate=True)
    return minid


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
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the producer ended the session (no more input will come)."""
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when another replica took the session over: write nothing more."""
    task: asyncio.Task[None] | None = None


SessionRunner = Callable[[OwnedSession], Awaitable[None]]


class SessionOwnership:
    """Claims, heartbeats, checkpoints, releases and takes over sessions for one service.

    `run_session(owned)` is the service's work for one session; it runs as its own task
    from claim until it returns (the session is then released) or the session is lost
    or handed over (the task is cancelled; it should leave a checkpoint behind).
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
        self.owned: dict[str, OwnedSession] = {}
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
        self._heartbeat = redis.register_script(_HEARTBEAT)
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
        )

    # ---------------------------------------------------------------- lifecycle

    async def run(self, stop: asyncio.Event, *, grace_s: float = 10.0) -> None:
        """Take sessions until `stop` is set; then hand the owned ones over and return."""
        beat = asyncio.create_task(self._heartbeat_loop(stop), name=f"{self.service}-heartbeat")
        try:
            await self.consumer.run(stop)
        finally:
            await self.hand_over_all(grace_s)
            beat.cancel()
            await asyncio.gather(beat, return_exceptions=True)

    async def hand_over_all(self, grace_s: float) -> None:
        """Cancel every session task and make its entry claimable by another replica now."""
        sessions = list(self.owned.values())
        tasks = [s.task for s in sessions if s.task is not None and not s.task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=grace_s)
        ids: list[Any] = [s.entry_id for s in sessions if s.sid in self.owned]
        if ids:
            try:
                await self.redis.xclaim(
                    self.keys.sessions,
                    self.service,
                    self.replica,
                    0,
                    ids,
                    idle=self.claim_idle_ms,
                    justid=True,
                )
            except REDIS_DOWN:
                log.warning("could not hand sessions over; they go idle and are taken over")
        for s in sessions:
            self.owned.pop(s.sid, None)
        if ids:
            log.info("handed sessions over", extra={"count": len(ids)})

    # ---------------------------------------------------------------- checkpoints

    def _field(self, name: str) -> str:
        return f"{self.service}.{name}"

    def checkpoint_into(self, pipe: Any, sid: str, values: dict[str, str | int | float]) -> None:
        """Queue a checkpoint on `pipe` (a MULTI pipeline holding the matching output)."""
        pipe.hset(
            self.keys.session_state(sid),
            mapping={self._field(k): v for k, v in values.items()},
        )

    async def checkpoint(self, sid: str, values: dict[str, str | int | float]) -> None:
        """Record how far this service got with `sid`."""
        await self.redis.hset(
            self.keys.session_state(sid),
            mapping={self._field(k): v for k, v in values.items()},
        )

    async def load_checkpoint(self, sid: str) -> dict[str, str]:
        raw: Any = await self.redis.hgetall(self.keys.session_state(sid))
        prefix = self._field("")
        out: dict[str, str] = {}
        for k, v in raw.items():
            key = k.decode()
            if key.startswith(prefix):
                out[key[len(prefix) :]] = v.decode()
        return out

    async def release(self, sid: str) -> None:
        """This service is done with `sid`: mark it done and ack the start entry."""
        owned = self.owned.pop(sid, None)
        if owned is None:
            return
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.session_state(sid), self._field("done"), "1")
            pipe.hdel(self.keys.session_state(sid), self._field("owner"))
            pipe.xack(self.keys.sessions, self.service, owned.entry_id)
            await pipe.execute()
        log.info("released session", extra={"session": sid})

    # ---------------------------------------------------------------- internals

    async def _on_entry(self, entry: Entry) -> Disposition:
        msg: SessionStart | SessionEnd = decode(SessionAnnouncement, entry.fields)
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
        assert isinstance(msg, SessionStart)
        mine = self.owned.get(msg.session)
        if mine is not None and mine.entry_id == entry.id:
            return Disposition.KEEP  # our own pending entry, re-read after a reconnect
        state = await self.redis.hgetall(state_key)
        if state.get(self._field("done").encode()) == b"1":
            return Disposition.ACK  # finished earlier; only the ack was lost
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
            if started_by is not None and started_by.decode() != entry.id:
                raise ContractError(
                    f"session {msg.session!r} was already started (entry "
                    f"{started_by.decode()}); a second start is refused"
                )
        checkpoint = await self.load_checkpoint(msg.session)
        checkpoint.pop("entry", None)
        previous = checkpoint.pop("owner", None)
        taken_over = previous is not None
        if taken_over:
            self.takeovers += 1
            self._takeover_counter.add(1, {"service": self.service})
            log.info(
                "taking session over",
                extra={"session": msg.session, "previous_owner": previous},
            )
        await self.redis.hset(
            self.keys.session_state(msg.session), self._field("owner"), self.replica
        )
        owned = OwnedSession(
            sid=msg.session,
            start=msg,
            entry_id=entry.id,
            checkpoint=checkpoint,
            taken_over=taken_over,
        )
        if state.get(b"ended") == b"1":
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
            except Exception as exc:
                if owned.lost.is_set():
                    return
                failures += 1
                log.exception(
                    "session task failed", extra={"session": owned.sid, "failures": failures}
                )
                try:
                    await self.checkpoint(owned.sid, {"failures": failures})
                    if failures >= self.max_failures:
                        entry = Entry(self.keys.sessions, owned.entry_id, {})
                        await self.dead.send(
                            entry,
                            f"session {owned.sid} failed {failures} times in {self.service}: {exc!r}",
                            group=self.service,
                            deliveries=failures,
                        )
                        await self.release(owned.sid)
                        return
                except REDIS_DOWN:
                    pass
                await asyncio.sleep(backoff.next_delay())
                owned.checkpoint = await self.load_checkpoint(owned.sid)
                owned.checkpoint.pop("owner", None)
                owned.taken_over = True
                continue
            if not owned.lost.is_set():
                await self.release(owned.sid)
            return

    async def _heartbeat_loop(self, stop: asyncio.Event) -> None:
        beats = 0
        while not stop.is_set():
            await _sleep_or_stop(stop, self.heartbeat_ms / 1000)
            if stop.is_set():
                continue
            beats += 1
            try:
                if self.owned:
                    await self._beat()
                if beats % TRIM_EVERY_BEATS == 0:
                    await trim_sessions(self.redis, self.keys.sessions)
            except REDIS_DOWN as exc:
                log.warning("heartbeat failed", extra={"error": str(exc)})

    async def _beat(self) -> None:
        sessions = list(self.owned.values())
        ids = [s.entry_id for s in sessions]
        lost_raw = await self._heartbeat(
            keys=[self.keys.sessions], args=[self.service, self.replica, *ids]
        )
        lost = {x.decode() if isinstance(x, bytes) else str(x) for x in lost_raw}
        async with self.redis.pipeline(transaction=False) as pipe:
            for s in sessions:
                pipe.hget(self.keys.session_state(s.sid), "ended")
            ended = await pipe.execute()
        for s, flag in zip(sessions, ended, strict=True):
            if self.owned.get(s.sid) is not s:
                continue  # released (acked) while the heartbeat ran: not lost
            if s.entry_id in lost:
                log.warning("session lost to another replica", extra={"session": s.sid})
                s.lost.set()
                self.owned.pop(s.sid, None)
                if s.task is not None:
                    s.task.cancel()
            elif flag == b"1":
                s.ended.set()
