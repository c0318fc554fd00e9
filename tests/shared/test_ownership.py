"""The session-ownership helper: one owner per session, takeover from a dead owner."""

from __future__ import annotations

import asyncio
import signal
import time

import redis.asyncio as aioredis

from tests.shared.procs import start_worker
from tests.waiting import consuming, wait_until
from vlpipe.shared.contracts import SessionEnd, SessionStart, Status, decode
from vlpipe.shared.keys import StreamKeys
from vlpipe.shared.ownership import OwnedSession, SessionOwnership
from vlpipe.shared.streams import DeadLetters, connect, publish

HEARTBEAT_MS = "100"
CLAIM_IDLE_MS = "600"


async def _claims(redis: aioredis.Redis, keys: StreamKeys) -> list[list[str]]:
    return [c.decode().split(":") for c in await redis.lrange(f"{keys.prefix}:claims", 0, -1)]


async def _pos(redis: aioredis.Redis, keys: StreamKeys, sid: str) -> int:
    return int(await redis.hget(keys.session_state(sid), "worker.pos") or 0)


async def test_two_replicas_one_session_exactly_one_owner(
    redis: aioredis.Redis, redis_url: str, keys: StreamKeys
) -> None:
    a = start_worker("own", redis_url, keys.prefix, "A", HEARTBEAT_MS, CLAIM_IDLE_MS)
    b = start_worker("own", redis_url, keys.prefix, "B", HEARTBEAT_MS, CLAIM_IDLE_MS)
    try:
        await consuming(redis, keys.sessions, "worker", "A", "B")
        for sid in ("s1", "s2", "s3", "s4"):
            await publish(redis, keys.sessions, SessionStart(session=sid))

        async def all_claimed() -> bool:
            return len(await _claims(redis, keys)) >= 4

        await wait_until(all_claimed)
        await asyncio.sleep(3 * int(CLAIM_IDLE_MS) / 1000)  # heartbeats keep them owned
        claims = await _claims(redis, keys)
        assert sorted(c[1] for c in claims) == ["s1", "s2", "s3", "s4"], claims
        owners = {
            sid: (await redis.hget(keys.session_state(sid), "worker.owner")).decode()
            for sid in ("s1", "s2", "s3", "s4")
        }
        assert set(owners.values()) <= {"A", "B"}
        pending = await redis.xpending_range(keys.sessions, "worker", "-", "+", 10)
        assert {p["consumer"].decode() for p in pending} == set(owners.values())
        assert len(pending) == 4

        for sid in ("s1", "s2", "s3", "s4"):
            await publish(redis, keys.sessions, SessionEnd(session=sid))

        async def released() -> bool:
            return int((await redis.xpending(keys.sessions, "worker"))["pending"]) == 0

        await wait_until(released)
    finally:
        for p in (a, b):
            p.send_signal(signal.SIGTERM)
        for p in (a, b):
            assert p.wait(15) == 0


async def test_owner_dies_and_the_other_replica_takes_over_from_the_checkpoint(
    redis: aioredis.Redis, redis_url: str, keys: StreamKeys
) -> None:
    a = start_worker("own", redis_url, keys.prefix, "A", HEARTBEAT_MS, CLAIM_IDLE_MS)
    await consuming(redis, keys.sessions, "worker", "A")
    await publish(redis, keys.sessions, SessionStart(session="call-1"))

    async def progressed() -> bool:
        return await _pos(redis, keys, "call-1") >= 10

    await wait_until(progressed)
    b = start_worker("own", redis_url, keys.prefix, "B", HEARTBEAT_MS, CLAIM_IDLE_MS)
    try:
        await consuming(redis, keys.sessions, "worker", "B")
        a.kill()
        a.wait(10)
        at_death = await _pos(redis, keys, "call-1")

        async def taken_over() -> bool:
            return len(await _claims(redis, keys)) >= 2

        await wait_until(taken_over, within=10)
        first, second = await _claims(redis, keys)
        assert first[:2] == ["A", "call-1"] and first[3] == "0"
        assert second[:2] == ["B", "call-1"]
        assert second[3] == "1", "the new owner knows it took over"
        assert int(second[2]) == at_death, "resumed from the checkpoint the dead owner left"
        assert (await redis.hget(keys.session_state("call-1"), "worker.owner")) == b"B"
    finally:
        b.send_signal(signal.SIGTERM)
        assert b.wait(15) == 0


async def test_sigterm_hands_sessions_over_to_another_replica_at_once(
    redis: aioredis.Redis, redis_url: str, keys: StreamKeys
) -> None:
    # A long claim time: only the hand-over (not idleness) can move the session quickly.
    a = start_worker("own", redis_url, keys.prefix, "A", HEARTBEAT_MS, "60000")
    b = start_worker("own", redis_url, keys.prefix, "B", HEARTBEAT_MS, "60000")
    try:
        await consuming(redis, keys.sessions, "worker", "A", "B")
        await publish(redis, keys.sessions, SessionStart(session="call-2"))

        async def claimed() -> bool:
            return len(await _claims(redis, keys)) >= 1

        await wait_until(claimed)
        [[owner, *_]] = await _claims(redis, keys)
        leaving = a if owner == "A" else b
        leaving.send_signal(signal.SIGTERM)
        assert leaving.wait(15) == 0

        async def moved() -> bool:
            return len(await _claims(redis, keys)) >= 2

        # The handed-over entry is made idle for the full claim time, so the staying
        # replica's next XAUTOCLAIM (every heartbeat) takes it, long before 60 s.
        await wait_until(moved, within=10)
        second = (await _claims(redis, keys))[1]
        assert second[0] != owner and second[1] == "call-2" and second[3] == "1"
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(15)


async def test_sessions_stream_is_trimmed_only_behind_every_groups_oldest_unfinished_entry(
    redis: aioredis.Redis, keys: StreamKeys
) -> None:
    from vlpipe.shared.retention import trim_sessions

    ids = [await publish(redis, keys.sessions, SessionStart(session=f"s{i}")) for i in range(300)]
    await redis.xgroup_create(keys.sessions, "ingest", id="0")
    await redis.xgroup_create(keys.sessions, "broker", id="0")
    # ingest read everything and still owns s120; broker has read only up to s200.
    await redis.xreadgroup("ingest", "r1", {keys.sessions: ">"}, count=300)
    await redis.xack(keys.sessions, "ingest", *[i for n, i in enumerate(ids) if n != 120])
    await redis.xreadgroup("broker", "r1", {keys.sessions: ">"}, count=201)
    await redis.xack(keys.sessions, "broker", *ids[:201])
    minid = await trim_sessions(redis, keys.sessions)
    assert minid == ids[120]
    left = [e[0].decode() for e in await redis.xrange(keys.sessions)]
    assert ids[120] in left, "the start entry of a live session is never trimmed"
    assert left[-1] == ids[-1] and len(left) < 300


async def test_a_second_start_of_a_live_session_is_refused_and_never_runs_it_twice(
    redis: aioredis.Redis, redis_url: str, keys: StreamKeys
) -> None:
    a = start_worker("own", redis_url, keys.prefix, "A", HEARTBEAT_MS, CLAIM_IDLE_MS)
    b = start_worker("own", redis_url, keys.prefix, "B", HEARTBEAT_MS, CLAIM_IDLE_MS)
    try:
        await consuming(redis, keys.sessions, "worker", "A", "B")
        # A start from two hours ago (a group created later replays it), then a session
        # started twice (a producer retrying, two callers picking one id), and an end for
        # a session nobody started.
        stale = await redis.xadd(
            keys.sessions,
            {"type": "start", "session": "old"},
            id=f"{int((time.time() - 7200) * 1000)}-0",
        )
        first = await publish(redis, keys.sessions, SessionStart(session="dup"))
        second = await publish(redis, keys.sessions, SessionStart(session="dup"))
        third = await publish(redis, keys.sessions, SessionStart(session="dup"))
        stray_end = await publish(redis, keys.sessions, SessionEnd(session="nobody"))

        async def refused() -> dict[str, str]:
            dead = await redis.xrange(keys.dead)
            return {f[b"id"].decode(): f[b"reason"].decode() for _, f in dead}

        async def all_refused() -> bool:
            return len(await refused()) >= 4

        await wait_until(all_refused)
        # Longer than a claim: an unrefreshed duplicate would have been "taken over" by now.
        await asyncio.sleep(3 * int(CLAIM_IDLE_MS) / 1000)
        reasons = await refused()
        # Whichever start a worker handled first runs the session (the two workers take
        # them side by side); the others are refused, naming it.
        starts = (first, second, third)
        (winner,) = [entry_id for entry_id in starts if entry_id not in reasons]
        for entry_id in starts:
            if entry_id != winner:
                assert f"session 'dup' was already started (entry {winner})" in reasons[entry_id]
        assert "end of session 'nobody', which was never started" in reasons[stray_end]
        assert "stale" in reasons[stale.decode()]
        claims = await _claims(redis, keys)
        assert [c[1] for c in claims] == ["dup"], claims  # one owner, once
        pending = await redis.xpending_range(keys.sessions, "worker", "-", "+", 10)
        assert [p["message_id"].decode() for p in pending] == [winner]
        assert not await redis.exists(keys.session_state("nobody"))
        assert not await redis.exists(keys.session_state("old"))
    finally:
        for p in (a, b):
            p.send_signal(signal.SIGTERM)
        for p in (a, b):
            p.wait(20)


async def test_a_stopping_replica_hands_over_within_its_drain_budget_even_when_a_session_is_slow_to_stop(
    redis: aioredis.Redis, redis_url: str, keys: StreamKeys
) -> None:
    # Drain budget 2 s; a session task takes 5 s to stop (say, closing a silent upstream);
    # the claim time is a minute, so only the hand-over can move the session quickly.
    a = start_worker("own", redis_url, keys.prefix, "A", HEARTBEAT_MS, "60000", "0.05", "5")
    b = None
    try:
        await consuming(redis, keys.sessions, "worker", "A")
        await publish(redis, keys.sessions, SessionStart(session="slow"))

        async def claimed() -> bool:
            return len(await _claims(redis, keys)) >= 1

        await wait_until(claimed)
        b = start_worker("own", redis_url, keys.prefix, "B", HEARTBEAT_MS, "60000", "0.05")
        await consuming(redis, keys.sessions, "worker", "B")
        a.send_signal(signal.SIGTERM)
        assert a.wait(30) == 0

        async def moved() -> bool:
            return [c[0] for c in await _claims(redis, keys)] == ["A", "B"]

        await wait_until(moved, within=20)  # long before the claim time
    finally:
        for p in (a, b):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(30)


async def test_writes_redis_lost_are_reported_though_the_session_stops_at_once(
    redis_url: str, keys: StreamKeys
) -> None:
    """The owner's write finds its write numbers went back (Redis lost acknowledged
    writes), made from the very task that stopping the session cancels: the loss reaches
    the session's status stream and the session is claimed again and goes on. (This
    passes on the code before the report had a task of its own too: there the XADD was
    sent before the cancellation took effect. What that change mends, a report dropped on
    a connection error right after a failover, is covered by
    tests/chaos/test_cluster_faults.py.)"""
    redis = connect(redis_url)
    stop = asyncio.Event()
    steps: list[int] = []

    async def run_session(owned: OwnedSession) -> None:
        while True:  # a checkpoint every step, from the session's own task
            await ownership.checkpoint(owned, {"pos": len(steps)})
            steps.append(1)
            await asyncio.sleep(0.02)

    ownership = SessionOwnership(
        redis, keys, service="broker", replica="r1", run_session=run_session,
        dead=DeadLetters(redis, keys, "broker"), heartbeat_ms=200, claim_idle_ms=2000,
    )  # fmt: skip
    runner = asyncio.create_task(ownership.run(stop, drain_budget_s=2))
    try:
        await publish(redis, keys.sessions, SessionStart(session="lossy"))

        async def stepping() -> bool:
            return len(steps) >= 5

        await wait_until(stepping)
        await redis.hset(keys.session_state("lossy"), "broker.written", 1)  # writes lost

        async def reported() -> bool:
            seen = [decode(Status, f) for _, f in await redis.xrange(keys.status("lossy"))]
            return any(s.service == "broker" and "lost writes" in s.message for s in seen)

        await wait_until(reported, within=15)
        resumed_at = len(steps)

        async def resumed() -> bool:
            return ownership.takeovers >= 1 and len(steps) > resumed_at + 3

        await wait_until(resumed, within=15)
    finally:
        stop.set()
        await asyncio.wait_for(runner, 10)
        await redis.aclose()


async def test_a_finished_sessions_end_redis_lost_is_reported_and_the_session_finished_again(
    redis_url: str, keys: StreamKeys
) -> None:
    """A released session's done mark goes missing with the producer's end flag: Redis
    lost the session's last writes but kept the ack of its start entry (a failover on a
    Redis Cluster, where `vl:sessions` is on another master: tests/chaos/test_cluster_faults.py
    has the real thing). The replica that released it reports the loss and runs the session
    again, its input known to have ended. A session whose keys expired since, or whose id
    was started again since, is left alone."""
    redis = connect(redis_url)
    stop = asyncio.Event()
    runs: list[tuple[str, bool]] = []

    async def run_session(owned: OwnedSession) -> None:
        runs.append((owned.sid, owned.ended.is_set()))
        await owned.ended.wait()  # then the service has finished the session

    ownership = SessionOwnership(
        redis, keys, service="broker", replica="r1", run_session=run_session,
        dead=DeadLetters(redis, keys, "broker"), heartbeat_ms=100, claim_idle_ms=2000,
    )  # fmt: skip
    runner = asyncio.create_task(ownership.run(stop, drain_budget_s=2))
    lost, expired, reused = "lost", "expired", "reused"
    try:
        for sid in (lost, expired, reused):
            await publish(redis, keys.sessions, SessionStart(session=sid))
        await wait_until(lambda: _true(len(runs) == 3))
        for sid in (lost, expired, reused):
            await publish(redis, keys.sessions, SessionEnd(session=sid))

        async def released() -> bool:
            marks = [await redis.hget(keys.session_state(s), "broker.done")
                     for s in (lost, expired, reused)]  # fmt: skip
            return marks == [b"1"] * 3 and not ownership.owned

        await wait_until(released)
        await redis.hdel(keys.session_state(lost), "broker.done", "ended")
        await redis.delete(keys.session_state(expired))
        await redis.delete(keys.session_state(reused))
        await redis.hset(keys.session_state(reused), "broker.entry", "1-1")  # another start

        async def finished_again() -> bool:
            return await redis.hget(keys.session_state(lost), "broker.done") == b"1"

        await wait_until(finished_again, within=10)
        assert runs.count((lost, True)) == 1, runs  # run again, its input known to have ended
        seen = [decode(Status, f) for _, f in await redis.xrange(keys.status(lost))]
        assert [s.kind for s in seen if "finishes the session again" in s.message] == ["error"]
        assert all("lost writes" in s.message for s in seen), seen
        await asyncio.sleep(1.0)  # ten heartbeats more: nothing else is run again
        assert sorted(runs) == sorted([(lost, False), (expired, False), (reused, False),
                                       (lost, True)])  # fmt: skip
        for sid in (expired, reused):
            assert not await redis.exists(keys.status(sid)), sid
        assert not await redis.exists(keys.session_state(expired))
    finally:
        stop.set()
        await asyncio.wait_for(runner, 10)
        await redis.aclose()


async def _true(value: bool) -> bool:
    return value
