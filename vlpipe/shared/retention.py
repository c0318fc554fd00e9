"""How long streams are, and trimming that never drops what a reader has not read.

* Per-session input streams (audio, frames, events, ctl) have exactly one reader, the
  session's owner in the next service, which trims them behind its checkpoint inside its
  fenced write: unread data of a live session is never trimmed. (When the broker makes
  the outputs, its default `VLPIPE_OUTPUTS_BY`, the events stream has no reader and keeps
  its last `events_s`.)
* Per-session output streams (transcript, audio-out, status) are capped by length for late
  subscribers and expire `session_ttl_s` after the session ends.
* Shared streams read by consumer groups (`vl:sessions`, `vl:transcripts`,
  `vl:tool-calls`) are trimmed behind the slowest group: its last-delivered entry and its
  oldest pending entry (`trim_behind_groups`). Only a stream's memory budget
  (`cap`, in entries) may force a trim past entries a group has not read, and then it is
  reported: a metric, a dead letter naming the group and the count, and a warning.
* `vl:dead` is for operators: capped at its budget on every write.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from opentelemetry import metrics
from redis.exceptions import ResponseError

from vlpipe.shared.streams import entry_key

log = logging.getLogger("vlpipe.retention")

_OVERFLOW = metrics.get_meter("vlpipe.retention").create_counter(
    "vlpipe.stream.overflow",
    description="Entries a consumer group had not read, trimmed because a stream reached "
    "its memory budget",
)


@dataclass(frozen=True, slots=True)
class Retention:
    """Stream lengths, in entries."""

    transcript: int = 10_000
    events_s: int = 60
    """A session's events stream when the broker makes the outputs itself, in seconds:
    no service reads it then, and it keeps this much for those who tap the raw events
    (a count would keep minutes of audio deltas, megabytes a call)."""
    audio_out: int = 6_000
    status: int = 2_000
    transcripts_cap: int = 200_000
    """Budget of `vl:transcripts`; reaching it trims unread entries (reported)."""
    tool_calls_cap: int = 50_000
    """Budget of `vl:tool-calls`; reaching it trims unread entries (reported)."""
    no_group_keep: int = 10_000
    """A shared stream no group reads keeps this many entries for plain XREAD readers."""
    dead: int = 10_000
    session_ttl_s: int = 3600


def _id(raw: Any) -> tuple[int, int]:
    return entry_key(raw.decode() if isinstance(raw, bytes) else str(raw))


def _text(point: tuple[int, int]) -> str:
    return f"{point[0]}-{point[1]}"


@dataclass(frozen=True, slots=True)
class GroupPosition:
    """How far one consumer group has got in a stream."""

    name: str
    floor: tuple[int, int]
    """Entries older than this were delivered to the group and acked."""
    entries_read: int | None
    """Entries delivered to the group in the stream's life (Redis 7+)."""


async def group_positions(redis: aioredis.Redis, key: str) -> list[GroupPosition]:
    """Every group of `key` with its floor: the older of its last-delivered entry and its
    oldest pending entry. Empty if the stream or its groups do not exist."""
    try:
        groups: Any = await redis.xinfo_groups(key)
    except ResponseError:  # no such key
        return []
    out = []
    for group in groups:
        floor = _id(group["last-delivered-id"])
        pending = False
        if group["pending"]:
            summary: Any = await redis.xpending(key, group["name"])
            if summary["min"] is not None:  # else acked since XINFO answered
                floor = min(floor, _id(summary["min"]))
                pending = True
        # last-delivered-id is itself delivered: what is older than the next id is read.
        floor = floor if pending else (floor[0], floor[1] + 1)
        read = group.get("entries-read")
        name = group["name"].decode() if isinstance(group["name"], bytes) else group["name"]
        out.append(GroupPosition(name, floor, int(read) if read is not None else None))
    return out


async def trim_sessions(redis: aioredis.Redis, key: str) -> str | None:
    """Trim the sessions stream behind every group's oldest pending or undelivered entry.

    Start entries of live sessions stay pending, so they are never trimmed; ended
    sessions' entries go once every group has read and acked them. Returns the MINID used,
    or None when nothing may be trimmed (no groups yet).
    """
    groups = await group_positions(redis, key)
    if not groups:
        return None
    floor = min(g.floor for g in groups)
    if floor <= (0, 1):
        return None
    await redis.xtrim(key, minid=_text(floor), approximate=True)
    return _text(floor)


@dataclass(frozen=True, slots=True)
class Overflow:
    """Entries of `stream` that `group` had not read, trimmed to keep the budget."""

    stream: str
    group: str
    first_kept: str
    unread_trimmed: int | None
    """How many entries the group had not read (delivered and acked) went; None when
    Redis cannot tell (before 7.0)."""


async def trim_behind_groups(
    redis: aioredis.Redis, key: str, *, cap: int, no_group_keep: int
) -> list[Overflow]:
    """Trim a shared stream behind its slowest group, and to `cap` entries at most.

    Without groups the stream keeps its newest `no_group_keep` entries. Returns what the
    cap forced out before a group had read it (empty when nothing unread was lost).
    """
    groups = await group_positions(redis, key)
    if not groups:
        await redis.xtrim(key, maxlen=min(no_group_keep, cap), approximate=True)
        return []
    floor = min(g.floor for g in groups)
    if floor > (0, 1):
        # `~` trims only whole radix-tree nodes, so it never goes past the floor.
        await redis.xtrim(key, minid=_text(floor), approximate=True)
    if await redis.xlen(key) <= cap:
        return []
    await redis.xtrim(key, maxlen=cap, approximate=False)
    info: Any = await redis.xinfo_stream(key)
    first = _id(info["first-entry"][0]) if info.get("first-entry") else (0, 0)
    added = info.get("entries-added")
    first_position = int(added) - int(info["length"]) if added is not None else None
    out = []
    for g in groups:
        if g.floor >= first:
            continue
        lost = None
        if first_position is not None and g.entries_read is not None:
            # Never delivered, plus delivered but not yet acked (in a reader's hands).
            held: Any = await redis.xpending_range(
                key, g.name, min="-", max=f"({_text(first)}", count=cap
            )
            lost = max(0, first_position - g.entries_read) + len(held)
        out.append(Overflow(key, g.name, _text(first), lost))
        _OVERFLOW.add(lost if lost is not None else 1, {"stream": _kind(key), "group": g.name})
        log.warning(
            "stream over its budget: trimmed entries a group had not read",
            extra={"stream": key, "group": g.name, "cap": cap, "unread_trimmed": lost},
        )
    return out


def _kind(key: str) -> str:
    """`vl:transcripts` -> `transcripts`: a label with few values."""
    return key.rsplit(":", 1)[-1]


async def remove_idle_consumers(
    redis: aioredis.Redis, key: str, group: str, *, idle_ms: int, keep: str
) -> list[str]:
    """Delete the group's consumers that hold no pending entry and have been idle for
    `idle_ms` (replicas long gone); never `keep` (the caller). Returns their names."""
    try:
        consumers: Any = await redis.xinfo_consumers(key, group)
    except ResponseError:  # no stream or group yet
        return []
    removed = []
    for consumer in consumers:
        name = consumer["name"]
        name = name.decode() if isinstance(name, bytes) else str(name)
        # Redis 7.2 counts `inactive` from the last successful read; before, `idle` only.
        idle = consumer.get("inactive", consumer.get("idle", 0))
        if name == keep or int(consumer["pending"]) or int(idle) < idle_ms:
            continue
        await redis.xgroup_delconsumer(key, group, name)
        removed.append(name)
    if removed:
        log.info("removed idle consumers", extra={"stream": key, "group": group,
                                                  "consumers": removed})  # fmt: skip
    return removed
