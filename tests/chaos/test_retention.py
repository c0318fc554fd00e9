"""Shared streams are trimmed behind their slowest group (on one redis-server and on a Redis
Cluster); leftovers of dead replicas go."""

from __future__ import annotations

from pathlib import Path

import redis.asyncio as aioredis

from tests.chaos.conftest import Store
from tests.chaos.harness import Replica
from tests.waiting import wait_until
from vlpipe.shared.contracts import DeadLetter, TranscriptPiece, decode, encode
from vlpipe.shared.keys import StreamKeys

CAP = 500


def _final(n: int) -> dict[str, object]:
    piece = TranscriptPiece(session="s", speaker="user", text=f"words {n}", final=True, seq=n)
    return dict(encode(piece))


async def test_a_slow_group_on_transcripts_loses_nothing_within_the_budget_and_overflow_is_reported(
    store: Store, keys: StreamKeys, tmp_path: Path
) -> None:
    redis, redis_url = store.redis, store.url
    stream = keys.transcripts
    await redis.xgroup_create(stream, "store", id="0", mkstream=True)  # slow: a DB that is down
    await redis.xgroup_create(stream, "search", id="0")  # keeps up
    env = {"VLPIPE_TRANSCRIPTS_MAX_ENTRIES": str(CAP), **store.env}
    egress = Replica("egress", "egress-0", redis_url, keys.prefix, tmp_path, env).start()
    try:
        ids = [await redis.xadd(stream, _final(n)) for n in range(400)]
        await redis.xreadgroup("store", "db-1", {stream: ">"}, count=300)
        await redis.xack(stream, "store", *ids[:250])  # 250 read and done, 50 in hand
        read = await redis.xreadgroup("search", "ix-1", {stream: ">"}, count=400)
        await redis.xack(stream, "search", *[i for i, _ in read[0][1]])

        async def trimmed_to_the_slowest_group() -> bool:
            first = await redis.xrange(stream, count=1)
            return bool(first) and first[0][0] != ids[0]

        await wait_until(trimmed_to_the_slowest_group, within=20)
        left = [i for i, _ in await redis.xrange(stream)]
        # Whole stream nodes (100 entries) go once every group is past them.
        assert ids[250] in left, "the oldest entry a group holds unacked is kept"
        assert left[-1] == ids[-1] and len(left) <= 200

        # The store stays down while 600 more finals come (the search index keeps up):
        # over the budget of 500. Egress is stopped meanwhile and started again after: a
        # housekeeping pass in the middle of the burst would trim and report at 600 entries
        # (and blame the search index, whose position it read just before a batch), and
        # the rest of the burst would leave the stream over its budget.
        assert egress.stop() == 0
        for first in range(400, 1000, 100):
            ids += [await redis.xadd(stream, _final(n)) for n in range(first, first + 100)]
            read = await redis.xreadgroup("search", "ix-1", {stream: ">"}, count=100)
            await redis.xack(stream, "search", *[i for i, _ in read[0][1]])
        egress = Replica("egress", "egress-0", redis_url, keys.prefix, tmp_path, env).start()

        async def overflow_reported() -> bool:
            return any(decode(DeadLetter, f).stream == stream for _, f in await redis.xrange(
                keys.dead))  # fmt: skip

        await wait_until(overflow_reported, within=20)
        assert await redis.xlen(stream) <= CAP
        dead = [decode(DeadLetter, f) for _, f in await redis.xrange(keys.dead)]
        reports = [d for d in dead if d.stream == stream]
        assert [d.group for d in reports] == ["store"]  # the search index lost nothing
        report = reports[0]
        assert "budget of 500 entries" in report.reason
        # 50 in the store's hands and 200 it never got: entries 250..499.
        assert "trimmed 250 entries group 'store' had not read" in report.reason, report.reason
        assert "stream over its budget" in egress.log()
        assert await redis.xlen(stream) == CAP  # the newest 500, none of them read by store
    finally:
        assert egress.stop() == 0


async def test_consumers_of_replicas_long_gone_are_removed_and_wake_streams_expire(
    redis: aioredis.Redis, redis_url: str, keys: StreamKeys, tmp_path: Path
) -> None:
    await redis.xgroup_create(keys.sessions, "ingest", id="0", mkstream=True)
    await redis.xgroup_createconsumer(keys.sessions, "ingest", "ingest-gone-1")
    await redis.xgroup_createconsumer(keys.sessions, "ingest", "ingest-busy")
    await redis.xadd(keys.sessions, {"type": "start", "session": "held"})
    # It holds one (a live replica, as far as a claim time of a minute can tell).
    await redis.xreadgroup("ingest", "ingest-busy", {keys.sessions: ">"})
    ingest = Replica("ingest", "ingest-0", redis_url, keys.prefix, tmp_path,
                     {"VLPIPE_CONSUMER_IDLE_S": "1",
                      "VLPIPE_CLAIM_IDLE_MS": "60000"}).start()  # fmt: skip
    try:
        await redis.xadd(keys.sessions, {"type": "start", "session": "w"})  # wakes its reader

        async def gone() -> bool:
            names = {c["name"] for c in await redis.xinfo_consumers(keys.sessions, "ingest")}
            return b"ingest-gone-1" not in names

        await wait_until(gone, within=20)
        names = {c["name"] for c in await redis.xinfo_consumers(keys.sessions, "ingest")}
        assert {b"ingest-busy", b"ingest-0"} <= names  # one with pending entries stays
        wake = f"{keys.prefix}:wake:ingest-0"
        assert 0 < await redis.ttl(wake) <= 3600
    finally:
        assert ingest.stop() == 0
