"""The CLI on a real Redis Cluster (VLPIPE_REDIS_CLUSTER=true, VLPIPE_REDIS_URL any node):
`vlpipe sessions`, `vlpipe tail` and `vlpipe doctor` read what they read on one Redis."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from vlpipe.services.broker.settings import BrokerSettings
from vlpipe.shared.contracts import SessionStart, Status, TranscriptPiece, encode
from vlpipe.shared.keys import StreamKeys
from vlpipe.shared.redis_cluster import LocalCluster, session_id_on
from vlpipe.tools.doctor import OK, check_redis
from vlpipe.tools.sessions import live_sessions
from vlpipe.tools.tail import tail


@pytest.fixture
def cluster_env(redis_cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("VLPIPE_REDIS_CLUSTER", "true")
    monkeypatch.setenv("VLPIPE_REDIS_URL", redis_cluster.url)
    return redis_cluster.url


async def test_sessions_tail_and_doctor_work_on_a_cluster(
    redis_cluster: LocalCluster,
    cluster_redis: aioredis.Redis,
    keys: StreamKeys,
    cluster_env: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sid = session_id_on(redis_cluster.shards()[2], prefix="cli-")
    await cluster_redis.xadd(keys.sessions, encode(SessionStart(session=sid)))  # type: ignore[arg-type]
    await cluster_redis.xgroup_create(keys.sessions, "ingest", id="0")
    await cluster_redis.xreadgroup("ingest", "ingest-7", {keys.sessions: ">"})
    await cluster_redis.xadd(keys.audio(sid), {"seq": 0})
    rows = await live_sessions(cluster_env, keys)
    assert [(r["session"], r["owners"]["ingest"]) for r in rows] == [(sid, "ingest-7")]
    assert rows[0]["lag"]["ingest_audio_entries"] == 1

    piece = TranscriptPiece(session=sid, speaker="user", text="hello there", final=True, seq=0)
    await cluster_redis.xadd(keys.transcript(sid), encode(piece))  # type: ignore[arg-type]
    ended = Status(session=sid, service="egress", kind="state", message="ended")
    await cluster_redis.xadd(keys.status(sid), encode(ended))  # type: ignore[arg-type]
    await tail(cluster_env, keys, sid, as_json=True, follow=False, from_start=True)
    assert "hello there" in capsys.readouterr().out

    level, message = await check_redis(BrokerSettings())
    assert level == OK, message
