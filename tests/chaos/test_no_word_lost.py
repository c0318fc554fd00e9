"""No word lost: a replica killed, or the upstream socket dropped, in the middle of an
utterance. The sentence being spoken is still heard, transcribed and answered.

Each test first runs an untouched session through the same pipeline, then the same
recording as a second session and, 8.4 s into it (in the middle of its last phrase, "Fail
better", before the VAD could end that turn), SIGKILLs the replica of one service that
owns it, or closes the engine's socket with 1011. The second session's user transcript
must match the first's within Whisper's own variance (WER <= 0.05), the phrase in flight
must be answered ("You said: Fail better."; the earlier answers are cut short by the next
phrase, as a caller who speaks on would), and the history must show nothing lost and
nothing twice. Each runs on one redis-server and on a Redis Cluster (`chaos_store`).
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from pathlib import Path

import jiwer
import pytest

from tests.chaos.harness import ChaosRedis, replicas, speak
from tests.chaos.history import ended_everywhere
from tests.waiting import wait_until
from vlpipe.services.engine.server import running_engine
from vlpipe.shared.keys import StreamKeys

MID_UTTERANCE_S = 8.4
IN_FLIGHT = "fail better"


def words(text: str) -> str:
    return " ".join(re.findall(r"[a-z']+", text.lower()))


@pytest.mark.parametrize("fault", ["broker", "ingest", "egress", "upstream", "direct broker"])
async def test_the_utterance_in_flight_survives(
    fault: str, chaos_store: ChaosRedis, keys: StreamKeys, speech_wav: Path, tmp_path: Path
) -> None:
    store = chaos_store
    redis = store.client()
    counts = {"ingest": 1, "broker": 1, "egress": 1}
    # "direct broker": sessions announce audio_in, so the broker reads the producer's chunks.
    direct = fault.startswith("direct")
    fault = fault.removeprefix("direct ")
    # The broker makes the outputs (its default), so the broker killed held their numbering
    # too; with egress killed, egress makes them (VLPIPE_OUTPUTS_BY=egress).
    env = {**store.env, "VLPIPE_OUTPUTS_BY": "egress" if fault == "egress" else "broker"}
    if fault != "upstream":
        counts[fault] = 2
    try:
        async with (
            running_engine(model="local", output_pace=0) as engine,
            replicas(
                store.url, keys.prefix, tmp_path, engine.endpoint, counts, **env
            ) as procs,  # fmt: skip
        ):
            cluster = store.is_cluster
            await speak(store.url, keys, "untouched", speech_wav, cluster=cluster, direct=direct)

            async def untouched_ended() -> bool:
                return await ended_everywhere(redis, keys, "untouched")

            await wait_until(untouched_ended, within=60)

            began = time.monotonic()
            talking = asyncio.create_task(
                speak(store.url, keys, "victim", speech_wav, cluster=cluster, direct=direct)
            )
            await asyncio.sleep(MID_UTTERANCE_S - (time.monotonic() - began))
            if fault == "upstream":
                assert engine._server is not None
                dropped = list(engine._server.connections)
                assert len(dropped) == 1  # the victim's: the untouched session is over
                await dropped[0].close(1011, "internal error")
            else:
                owner = await redis.hget(keys.session_state("victim"), f"{fault}.owner")
                killed = next(r for r in procs[fault] if r.name == owner.decode())
                killed.signal(signal.SIGKILL)
            await talking

            async def victim_ended() -> bool:
                return await ended_everywhere(redis, keys, "victim")

            await wait_until(victim_ended, within=90)
        history = store.history(keys)
        said: dict[str, str] = {}
        for sid in ("untouched", "victim"):
            history.check(sid, direct=direct)
            finals = [p for p in history.sessions[sid].transcript if p.final]
            user = [words(p.text) for p in finals if p.speaker == "user"]
            replies = {words(p.text) for p in finals if p.speaker == "assistant"}
            assert user[-1] == IN_FLIGHT and f"you said {IN_FLIGHT}" in replies, (sid, finals)
            said[sid] = " ".join(user)
        assert jiwer.wer(said["untouched"], said["victim"]) <= 0.05, said
        if fault == "broker":
            events = history.sessions["victim"].events
            assert sum(kind == "vlpipe.upstream.connected" for _, kind in events) == 2
        if fault == "upstream":
            codes = [kind for _, kind in history.sessions["victim"].events]
            assert codes.count("vlpipe.upstream.reconnecting") == 1
    finally:
        await redis.aclose()
