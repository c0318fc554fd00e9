"""Egress on a real Redis Cluster relays what a dead owner left in a session's outbox: the
owner wrote the session's last outputs (finals in the outbox, `ended` in its checkpoint)
and died before relaying them. The replica that takes the session over relays them to
`vl:transcripts` once, then releases the session."""

from __future__ import annotations

import signal

import redis.asyncio as aioredis

from tests.egress.helpers import start_egress
from tests.waiting import wait_until
from vlpipe.shared.contracts import SessionStart, TranscriptPiece, decode, encode
from vlpipe.shared.keys import StreamKeys
from vlpipe.shared.redis_cluster import LocalCluster, session_id_on


async def test_a_taken_over_session_s_unrelayed_finals_are_relayed_once(
    redis_cluster: LocalCluster, cluster_redis: aioredis.Redis, keys: StreamKeys
) -> None:
    sid = session_id_on(redis_cluster.shards()[0], prefix="left-")
    start_id = (await cluster_redis.xadd(keys.sessions, encode(SessionStart(session=sid)))).decode()  # type: ignore[arg-type]
    piece = TranscriptPiece(session=sid, speaker="assistant", text="left behind", final=True, seq=4)
    await cluster_redis.xadd(keys.outbox("transcripts", sid), encode(piece))  # type: ignore[arg-type]
    await cluster_redis.hset(keys.session_state(sid), mapping={
        "egress.entry": start_id, "egress.epoch": 1, "egress.owner": "egress-dead",
        "egress.written": 3, "egress.ended": 1,
    })  # fmt: skip
    proc = start_egress(redis_cluster.url, keys.prefix, VLPIPE_REDIS_CLUSTER="true")
    try:

        async def released() -> bool:
            return await cluster_redis.hget(keys.session_state(sid), "egress.done") == b"1"

        await wait_until(released, within=30)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    shared = [decode(TranscriptPiece, f) for _, f in await cluster_redis.xrange(keys.transcripts)]
    assert [(p.session, p.text) for p in shared] == [(sid, "left behind")]
    assert await cluster_redis.xlen(keys.outbox("transcripts", sid)) == 0
