"""What every per-session service (ingest, broker, egress) builds the same way: the one
reader for its sessions' streams, the ownership of sessions through its consumer group,
the loop that runs both until SIGTERM, and the refusal of a bad entry."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from opentelemetry import metrics
from opentelemetry.metrics import Observation

from vlpipe.shared.config import ServiceSettings
from vlpipe.shared.contracts import Status
from vlpipe.shared.fencing import Wait
from vlpipe.shared.ownership import SessionOwnership, SessionRunner
from vlpipe.shared.service import ServiceContext
from vlpipe.shared.streams import Entry, SessionStreamReader, publish

log = logging.getLogger("vlpipe.sessions")


def session_reader(
    ctx: ServiceContext, settings: ServiceSettings, purpose: str = ""
) -> SessionStreamReader:
    """One shared XREAD for every session stream this process follows (for `purpose`)."""
    wake = f"{ctx.keys.prefix}:wake:{ctx.replica}" + (f":{purpose}" if purpose else "")
    return SessionStreamReader(
        ctx.redis, wake_key=wake, dead=ctx.dead, count=settings.read_batch,
        block_ms=settings.block_ms, max_deliveries=settings.max_deliveries,
        min_interval_s=settings.read_interval_ms / 1000,
        progress=ctx.watchdog.loop(f"{purpose or 'session'} reader"),
    )  # fmt: skip


def session_ownership(
    ctx: ServiceContext,
    settings: ServiceSettings,
    run_session: SessionRunner,
    shared_streams: tuple[tuple[str, int], ...] = (),
) -> SessionOwnership:
    """Sessions claimed through the consumer group named after the service.
    `shared_streams`: the shared streams (key, budget in entries) the service writes."""
    return SessionOwnership(
        ctx.redis, ctx.keys, service=ctx.name, replica=ctx.replica, run_session=run_session,
        dead=ctx.dead, heartbeat_ms=settings.heartbeat_ms, claim_idle_ms=settings.claim_idle_ms,
        max_failures=settings.max_deliveries, retention=ctx.retention,
        shared_streams=shared_streams, consumer_idle_ms=int(settings.consumer_idle_s * 1000),
        progress=(ctx.watchdog.loop("claims"), ctx.watchdog.loop("heartbeat")),
        wait=Wait(settings.redis_wait_replicas, settings.redis_wait_ms)
        if settings.redis_wait_replicas else None,
    )  # fmt: skip


async def run_sessions(
    ctx: ServiceContext,
    settings: ServiceSettings,
    reader: SessionStreamReader,
    ownership: SessionOwnership,
    *more_readers: SessionStreamReader,
) -> None:
    """Take sessions until SIGTERM, then hand the owned ones over; the readers stop last.

    If the claims loop or a reader dies of an error no retry fixes, the whole service
    stops (hands its sessions over and fails, so that it is restarted) instead of living
    on as a shell that takes nothing and reads nothing."""
    readers = (reader, *more_readers)
    reading = [asyncio.create_task(r.run(ctx.stop)) for r in readers]

    def reader_ended(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            # A reader died: hand the sessions over, then fail.
            ctx.fail(f"a session reader died: {task.exception()!r}")

    for task in reading:
        task.add_done_callback(reader_ended)
    watching = asyncio.create_task(_watch_group(ctx, ownership.service))
    try:
        await ownership.run(ctx.stop, drain_budget_s=settings.shutdown_grace_s)
    except Exception as exc:
        ctx.fail(f"the claims loop died: {exc!r}")
        raise
    finally:
        ctx.stop.set()  # whatever ended the claims, SIGTERM or a failure, ends the reader
        watching.cancel()
        for r in readers:
            r.wake()
        for task in reading:
            await task
        await asyncio.gather(watching, return_exceptions=True)


_GROUPS: dict[str, tuple[int, int]] = {}


def _observe_groups(_: Any) -> list[Observation]:
    return [Observation(lag, {"group": g}) for g, (lag, _p) in _GROUPS.items()]


def _observe_pending(_: Any) -> list[Observation]:
    return [Observation(pending, {"group": g}) for g, (_l, pending) in _GROUPS.items()]


_meter = metrics.get_meter("vlpipe.sessions")
_meter.create_observable_gauge(
    "vlpipe.group.lag", callbacks=[_observe_groups],
    description="Sessions announced that the service's consumer group has not claimed yet",
)  # fmt: skip
_meter.create_observable_gauge(
    "vlpipe.group.pending", callbacks=[_observe_pending],
    description="Sessions the service's consumer group holds (claimed, not finished)",
)  # fmt: skip


async def _watch_group(ctx: ServiceContext, group: str, every_s: float = 10.0) -> None:
    """Read the group's lag and pending count on `vl:sessions` for the gauges."""
    while True:
        try:
            groups: Any = await ctx.redis.xinfo_groups(ctx.keys.sessions)
            for info in groups:
                if info["name"].decode() == group:
                    _GROUPS[group] = (int(info.get("lag") or 0), int(info.get("pending") or 0))
        except Exception as exc:  # no stream yet, Redis down: the gauges keep their values
            log.debug("could not read the consumer group", extra={"error": str(exc)})
        await asyncio.sleep(every_s)


async def refuse(ctx: ServiceContext, sid: str, entry: Entry, reason: str) -> None:
    """A bad entry: to the dead-letter stream and the session's status; the session goes on."""
    await ctx.dead.send(entry, reason)
    service: Any = ctx.name
    status = Status(
        session=sid, service=service, kind="error", message=reason,
        detail={"stream": entry.stream, "id": entry.id},
    )  # fmt: skip
    await publish(ctx.redis, ctx.keys.status(sid), status, maxlen=ctx.retention.status)
    log.warning("refused an entry", extra={"session": sid, "reason": reason[:300]})
