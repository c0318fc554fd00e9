"""A rolling change of the broker's `VLPIPE_OUTPUTS_BY`, on one redis-server.

The broker that starts a session decides which service makes its outputs (it says so in
the session's first event and in its checkpoint). Here the session's broker, with one
setting, is SIGKILLed in the middle of the call and a broker with the other setting takes
the session over: it must keep the session's choice. The history then shows every output
once, numbered without a gap, made by the one service the first broker chose.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from tests.broker.engine_proc import EngineProcess
from tests.chaos.harness import ChaosRedis, Replica, replicas, speak
from tests.chaos.history import ended_everywhere
from tests.waiting import wait_until
from vlpipe.shared.keys import StreamKeys
from vlpipe.shared.redis_server import RedisServer

MID_CALL_S = 6.0


@pytest.mark.parametrize("first", ["broker", "egress"])
async def test_a_broker_with_the_other_setting_that_takes_a_session_over_keeps_its_choice(
    first: str, chaos_redis: RedisServer, keys: StreamKeys, speech_wav: Path, tmp_path: Path
) -> None:
    store = ChaosRedis(server=chaos_redis)
    other = "egress" if first == "broker" else "broker"
    redis = store.client()
    engine = EngineProcess(model="local").start()
    sid = "switch"
    try:
        async with replicas(store.url, keys.prefix, tmp_path, engine.endpoint,
                            {"ingest": 1, "egress": 1}) as procs:  # fmt: skip
            endpoint = {"VLPIPE_BROKER_ENDPOINT": engine.endpoint}
            brokers = [
                Replica("broker", f"broker-{setting}", store.url, keys.prefix, tmp_path,
                        {**endpoint, "VLPIPE_OUTPUTS_BY": setting})
                for setting in (first, other)
            ]  # fmt: skip
            brokers[0].start()
            try:
                talking = asyncio.create_task(speak(store.url, keys, sid, speech_wav))
                await asyncio.sleep(MID_CALL_S)
                assert await redis.hget(keys.session_state(sid), "broker.owner") == (
                    brokers[0].name.encode()
                )
                brokers[1].start()
                brokers[0].signal(signal.SIGKILL)
                await talking

                async def over() -> bool:
                    return await ended_everywhere(redis, keys, sid)

                await wait_until(over, within=90)
            finally:
                for broker in brokers:
                    broker.stop()
            assert procs  # (ingest and egress ran throughout)
        history = store.history(keys)
        history.check(sid)
        assert history.speakers(sid) == {"user", "assistant"}
        # The second broker took the session over: a second upstream connection.
        kinds = [kind for _, kind in history.sessions[sid].events]
        assert kinds.count("vlpipe.upstream.connected") == 2, kinds
        state = await redis.hgetall(keys.session_state(sid))
        if first == "broker":
            assert b"broker.out.seqs" in state and b"egress.seqs" not in state
            assert state[b"egress.outputs_by"] == b"broker"
        else:
            assert b"egress.seqs" in state and b"broker.out.seqs" not in state
    finally:
        await redis.aclose()
        engine.stop()
