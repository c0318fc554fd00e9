"""Faults of a Redis Cluster under live sessions: a master killed (replaced by its replica,
or crash-restarted at once), a failover that loses acknowledged writes of the sessions, of
`vl:transcripts`, or a producer's end announcement, and a slot migrated mid-session.

Each test runs the whole pipeline (ingest, broker, egress as real processes on the cluster
client, the local engine) with sessions placed on chosen masters (`session_id_on`), then
checks the history the masters' AOFs hold (`ChaosRedis.history`): per session nothing
twice, nothing lost but what Redis lost, every session ended everywhere. What a failover
lost is read from the dead master's own AOF (`lost_entries`): each loss must be reported
on the session's status stream, never silent.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import time
import uuid
from collections import Counter
from collections.abc import Container
from pathlib import Path
from typing import Any

import pytest
from redis.crc import key_slot

from tests.broker.engine_proc import EngineProcess
from tests.chaos.harness import ChaosRedis, Replica, replicas, speak, speech_chunks
from tests.chaos.history import ended_everywhere, lost_entries
from tests.waiting import wait_until
from vlpipe.shared.contracts import (
    DeadLetter,
    SessionEnd,
    SessionStart,
    Status,
    TranscriptPiece,
    decode,
    encode,
)
from vlpipe.shared.keys import StreamKeys
from vlpipe.shared.redis_cluster import ClusterNode, LocalCluster, session_id_on

COUNTS = {"ingest": 1, "broker": 1, "egress": 1}
CPU_SHARE_WHILE_DOWN = 0.25
"""At most a quarter of a core per service more than it burned just before, while a master
is down and not yet replaced: backing off, not spinning (a hot loop burns a whole core).
Sessions on the other masters go on meanwhile, so the figure is above that baseline."""
UNREPLICATED_S = 0.8
"""How long a master takes writes its replica never gets, before it dies: under the node
timeout (1 s), so the paused replica is not itself flagged as failing."""
LOST_BY = {"audio": "ingest", "frames": "ingest", "events": "broker",
           "transcript": "broker", "audio-out": "broker"}  # fmt: skip
"""Who must report the loss of a per-session stream's entries: ingest reports lost producer
audio as a gap; each service reports its own lost writes (the write numbers went back),
the broker those of the outputs it makes (its default `outputs_by`)."""


def keys_with_sessions_on(
    slots: Container[int], transcripts_on: Container[int] | None = None
) -> StreamKeys:
    """Keys under a fresh prefix whose `vl:sessions` stream lands on `slots` (a shard), and
    `vl:transcripts` on `transcripts_on` if given."""
    while True:
        keys = StreamKeys(f"t{uuid.uuid4().hex[:10]}")
        if key_slot(keys.sessions.encode()) in slots and (
            transcripts_on is None or key_slot(keys.transcripts.encode()) in transcripts_on
        ):
            return keys


def mid_call(redis: Any, keys: StreamKeys, sids: list[str], frames: int = 150) -> Any:
    async def check() -> bool:
        positions = [await redis.hget(keys.session_state(s), "ingest.next_seq") for s in sids]
        return all(int(p or 0) >= frames for p in positions)

    return check


async def statuses(redis: Any, keys: StreamKeys, sid: str) -> list[Status]:
    return [decode(Status, fields) for _, fields in await redis.xrange(keys.status(sid))]


async def unreported_losses(
    redis: Any, keys: StreamKeys, lost: dict[str, list[bytes]]
) -> list[str]:
    """The lost per-session entries whose loss the session's status stream does not report:
    lost producer audio needs an ingest `gap`; lost output of a service needs its `error`
    saying Redis lost writes it had acknowledged."""
    missing = []
    for key, ids in lost.items():
        kind, _, tag = key[len(keys.prefix) + 1 :].partition(":")
        service = LOST_BY.get(kind)
        if service is None:
            continue  # not a session's input or output (status, state, shared streams)
        sid = tag.strip("{}")
        seen = await statuses(redis, keys, sid)
        if kind == "audio":
            ok = any(s.service == "ingest" and s.kind == "gap" for s in seen)
        else:
            ok = any(s.service == service and s.kind == "error" and "lost writes" in s.message
                     for s in seen)  # fmt: skip
        if not ok:
            missing.append(f"{key}: {len(ids)} entries lost, not reported by {service}")
    return missing


async def ended(redis: Any, keys: StreamKeys, sids: list[str]) -> bool:
    return all([await ended_everywhere(redis, keys, s) for s in sids])


def check_logs(everyone: list[Replica]) -> None:
    for replica in everyone:
        assert "Traceback" not in replica.log(), (replica.name, replica.log()[-3000:])


@pytest.mark.parametrize("restart", ["after-failover", "at-once"])
async def test_a_master_killed_mid_session_is_replaced_and_every_session_ends(
    restart: str, chaos_cluster: LocalCluster, speech_wav: Path, tmp_path: Path
) -> None:
    """SIGKILL the master of two live sessions and of `vl:sessions` itself. After-failover:
    its replica is promoted (the services back off meanwhile: bounded CPU, alive), then the
    old master comes back as a replica. At-once: it is restarted from its AOF straight away
    (the crash-restart of the one-node chaos test), usually before its peers fail it over;
    either outcome must do. Then a session starts after it all."""
    store = ChaosRedis(cluster=chaos_cluster)
    cluster = chaos_cluster
    shards = cluster.shards()
    victim = shards[0]
    keys = keys_with_sessions_on(victim)
    on_victim = [session_id_on(victim, "kill-a"), session_id_on(victim, "kill-b")]
    elsewhere = [session_id_on(s, f"live{n}-") for n, s in enumerate(shards[1:])]
    sids = [*on_victim, *elsewhere]
    after = session_id_on(victim, "after-")
    engine = EngineProcess(model="local").start()
    redis = store.client()
    try:
        async with replicas(store.url, keys.prefix, tmp_path / "logs", engine.endpoint, COUNTS,
                            **store.env) as procs:  # fmt: skip
            everyone = [r for group in procs.values() for r in group]
            talking = [asyncio.create_task(speak(store.url, keys, s, speech_wav, cluster=True))
                       for s in sids]  # fmt: skip
            await wait_until(mid_call(redis, keys, sids), within=60)

            old, heir = victim.master, victim.replicas[0]
            baseline = await cpu_shares(everyone, 2.0)
            cluster.kill(old)
            crashed = tmp_path / "crashed"  # its AOF, before it rejoins and resyncs
            shutil.copytree(old.server.data_dir / "appendonlydir", crashed / "appendonlydir")
            if restart == "at-once":
                await asyncio.to_thread(cluster.restart, old)
                await asyncio.to_thread(cluster.wait_ok, 30)
                assert cluster.master_of_key(keys.frames(on_victim[0])) in (old, heir)
            else:
                await outage_then_failover(cluster, everyone, baseline)
                assert cluster.master_of_key(keys.frames(on_victim[0])) is heir
                assert cluster.master_of_key(keys.sessions) is heir
                await asyncio.to_thread(cluster.restart, old)
                await asyncio.to_thread(cluster.wait_ok, 30)
                assert old in cluster.replicas_of(heir)
            talking.append(asyncio.create_task(
                speak(store.url, keys, after, speech_wav, cluster=True)))  # fmt: skip
            await asyncio.gather(*talking)

            everything = [*sids, after]
            try:
                await wait_until(lambda: ended(redis, keys, everything), within=120)
            finally:
                masters = [m.server.data_dir for m in cluster.masters()]
                lost = lost_entries(crashed, masters, keys.prefix, retried_kept=True)
            assert not await unreported_losses(redis, keys, lost), lost
            history = store.history(keys)
            for sid in everything:
                history.check(sid)
                assert history.speakers(sid) == {"user", "assistant"}, sid
            check_logs(everyone)
        assert all(r.proc is not None and r.proc.returncode == 0 for r in everyone)
    finally:
        await redis.aclose()
        engine.stop()


async def cpu_shares(everyone: list[Replica], seconds: float) -> dict[str, float]:
    """Each replica's CPU over the next `seconds`, in cores."""
    before = {r.name: r.cpu_seconds() for r in everyone}
    await asyncio.sleep(seconds)
    return {r.name: (r.cpu_seconds() - before[r.name]) / seconds for r in everyone}


async def outage_then_failover(
    cluster: LocalCluster, everyone: list[Replica], baseline: dict[str, float]
) -> None:
    """From a master's death until its replica is promoted: every service stays alive
    (`/healthz`) and burns at most CPU_SHARE_WHILE_DOWN of a core above `baseline`."""
    before = {r.name: r.cpu_seconds() for r in everyone}
    began = time.monotonic()
    alive_while_down = {r.name: await asyncio.to_thread(r.health, "/healthz")
                        for r in everyone}  # fmt: skip
    await asyncio.to_thread(cluster.wait_ok, 30)  # the replica is promoted
    window = time.monotonic() - began
    extra = {r.name: (r.cpu_seconds() - before[r.name]) / window - baseline[r.name]
             for r in everyone}  # fmt: skip
    assert set(alive_while_down.values()) == {200}, alive_while_down
    assert max(extra.values()) < CPU_SHARE_WHILE_DOWN, (extra, baseline, window)


async def test_writes_a_failover_lost_are_reported_and_the_sessions_resume(
    chaos_cluster: LocalCluster, speech_wav: Path, tmp_path: Path
) -> None:
    """The replica is cut off (paused, its replication link killed) while its master takes
    writes for UNREPLICATED_S, then the master dies: the promoted replica misses writes the
    master acknowledged, as asynchronous replication allows. Each service finds its write
    numbers went back, reports it on the session's status stream and resumes from what the
    cluster has; ingest reports the producer's lost audio as a gap."""
    store = ChaosRedis(cluster=chaos_cluster)
    cluster = chaos_cluster
    shards = cluster.shards()
    victim = shards[1]
    keys = keys_with_sessions_on(shards[0])  # the announcements survive: this is per session
    on_victim = [session_id_on(victim, "lag-a"), session_id_on(victim, "lag-b")]
    sids = [*on_victim, session_id_on(shards[2], "calm-")]
    engine = EngineProcess(model="local").start()
    redis = store.client()
    try:
        async with replicas(store.url, keys.prefix, tmp_path / "logs", engine.endpoint, COUNTS,
                            **store.env) as procs:  # fmt: skip
            everyone = [r for group in procs.values() for r in group]
            talking = [asyncio.create_task(speak(store.url, keys, s, speech_wav, cluster=True))
                       for s in sids]  # fmt: skip
            await wait_until(mid_call(redis, keys, sids), within=60)

            old, heir = victim.master, victim.replicas[0]
            cut_off(cluster, old, heir)
            await asyncio.sleep(UNREPLICATED_S)  # acknowledged here, never replicated
            cluster.kill(old)
            cluster.resume(heir)
            await asyncio.to_thread(cluster.wait_ok, 30)
            assert cluster.master_of_key(keys.frames(on_victim[0])) is heir
            await asyncio.gather(*talking)

            try:
                await wait_until(lambda: ended(redis, keys, sids), within=120)
            finally:
                masters = [m.server.data_dir for m in cluster.masters()]
                lost = lost_entries(old.server.data_dir, masters, keys.prefix, retried_kept=True)
            per_session = {k: v for k, v in lost.items() if any(s in k for s in on_victim)}
            assert per_session, "the failover lost nothing: the test proved nothing"
            assert not await unreported_losses(redis, keys, lost), lost
            history = store.history(keys)
            for sid in sids:
                history.check(sid)
                assert history.speakers(sid) == {"user", "assistant"}, sid
            check_logs(everyone)
        assert all(r.proc is not None and r.proc.returncode == 0 for r in everyone)
    finally:
        await redis.aclose()
        engine.stop()


async def test_a_failover_of_the_shared_transcripts_master_loses_no_final_silently(
    chaos_cluster: LocalCluster, speech_wav: Path, tmp_path: Path
) -> None:
    """`vl:transcripts` alone on a master whose replica is cut off; the master dies once it
    has taken relayed finals its replica never got. The sessions live on the other masters
    and lose nothing of their own; every final of theirs must still be on `vl:transcripts`
    afterwards, or its loss reported (a dead letter or a status), never silently gone; and
    none twice."""
    store = ChaosRedis(cluster=chaos_cluster)
    cluster = chaos_cluster
    victim, *others = cluster.shards()
    keys = keys_with_sessions_on(others[0], transcripts_on=victim)
    sids = [session_id_on(others[0], "fin-a"), session_id_on(others[1], "fin-b")]
    engine = EngineProcess(model="local").start()
    redis = store.client()
    try:
        async with replicas(store.url, keys.prefix, tmp_path / "logs", engine.endpoint, COUNTS,
                            **store.env) as procs:  # fmt: skip
            everyone = [r for group in procs.values() for r in group]
            talking = [asyncio.create_task(speak(store.url, keys, s, speech_wav, cluster=True))
                       for s in sids]  # fmt: skip
            await wait_until(mid_call(redis, keys, sids, frames=100), within=60)

            old, heir = victim.master, victim.replicas[0]
            with cluster.client(old) as plain:
                before = plain.xlen(keys.transcripts)
                cut_off(cluster, old, heir)

                async def relayed_unreplicated() -> bool:
                    return bool(await asyncio.to_thread(plain.xlen, keys.transcripts) > before)

                try:  # the finals of a phrase come every 2 s or so (longer on a loaded host)
                    await wait_until(relayed_unreplicated, within=15, step=0.02)
                finally:
                    cluster.kill(old)
                    cluster.resume(heir)
            await asyncio.to_thread(cluster.wait_ok, 30)
            await asyncio.gather(*talking)
            await wait_until(lambda: ended(redis, keys, sids), within=120)

            masters = [m.server.data_dir for m in cluster.masters()]
            lost = lost_entries(old.server.data_dir, masters, keys.prefix)
            assert keys.transcripts in lost, "no relayed final was lost: the test proved nothing"
            history = store.history(keys)
            relayed = Counter((p.session, p.speaker, p.item_id) for p in [
                decode(TranscriptPiece, f) for _, f in await redis.xrange(keys.transcripts)])  # fmt: skip
            assert all(n == 1 for n in relayed.values()), f"relayed twice: {relayed}"
            shared = set(relayed)
            dead = [decode(DeadLetter, f) for _, f in await redis.xrange(keys.dead)]
            reported = [d for d in dead if d.stream == keys.transcripts] + [
                s for sid in sids for s in await statuses(redis, keys, sid)
                if "transcripts" in s.message]  # fmt: skip
            for sid in sids:
                history.check(sid)
                finals = {(sid, p.speaker, p.item_id)
                          for p in history.sessions[sid].transcript if p.final}  # fmt: skip
                missing = finals - shared
                assert not missing or reported, (
                    f"{sid}: finals gone from {keys.transcripts} unreported: {sorted(missing)}"
                )
            check_logs(everyone)
    finally:
        await redis.aclose()
        engine.stop()


async def test_an_end_announcement_a_failover_lost_still_ends_its_session(
    chaos_cluster: LocalCluster, speech_wav: Path, tmp_path: Path
) -> None:
    """`vl:sessions` on a master whose replica is cut off; a producer's end announcement
    reaches that master only (the services are paused and their connections to it closed,
    so none has read it: a blocked XREADGROUP would be served into a paused reader's socket
    and read on resume), then the master dies. The promoted replica never had the end: the session must still end (the
    broker ends a session without input for `VLPIPE_SESSION_IDLE_S`), with `idle` as its
    end reason for whoever looks, and nothing lost or twice in its history."""
    store = ChaosRedis(cluster=chaos_cluster)
    cluster = chaos_cluster
    victim, *others = cluster.shards()
    keys = keys_with_sessions_on(victim)
    quiet, live = session_id_on(others[0], "quiet-"), session_id_on(others[1], "live-")
    engine = EngineProcess(model="local").start()
    redis = store.client()
    try:
        async with replicas(store.url, keys.prefix, tmp_path / "logs", engine.endpoint, COUNTS,
                            VLPIPE_SESSION_IDLE_S="3", **store.env) as procs:  # fmt: skip
            everyone = [r for group in procs.values() for r in group]
            talking = asyncio.create_task(speak(store.url, keys, live, speech_wav, cluster=True))
            await redis.xadd(keys.sessions, dict(encode(SessionStart(session=quiet))))
            rate, chunks = speech_chunks(speech_wav)
            for seq, chunk in enumerate(chunks[:20]):  # 2 s of speech, then nothing
                fields = {"format": "pcm16", "rate": rate, "seq": seq, "audio": chunk}
                await redis.xadd(keys.audio(quiet), fields)
            await wait_until(mid_call(redis, keys, [quiet], frames=100), within=60)

            old, heir = victim.master, victim.replicas[0]
            for replica in everyone:
                replica.signal(signal.SIGSTOP)
            try:
                cut_off(cluster, old, heir)
                with cluster.client(old) as plain:
                    plain.execute_command("CLIENT", "KILL", "TYPE", "normal")  # not itself
                    end = plain.xadd(keys.sessions, dict(encode(SessionEnd(session=quiet))))  # type: ignore[arg-type]
                cluster.kill(old)
                cluster.resume(heir)
            finally:
                for replica in everyone:
                    replica.signal(signal.SIGCONT)
            await asyncio.to_thread(cluster.wait_ok, 30)
            lost = lost_entries(old.server.data_dir, [heir.server.data_dir], keys.prefix)
            assert end in lost.get(keys.sessions, []), lost

            await talking
            await wait_until(lambda: ended(redis, keys, [quiet, live]), within=120)
            assert await redis.hget(keys.session_state(quiet), "end_reason") == b"idle"
            history = store.history(keys)
            for sid in (quiet, live):
                history.check(sid)
            assert history.speakers(live) == {"user", "assistant"}
            check_logs(everyone)
    finally:
        await redis.aclose()
        engine.stop()


async def test_a_session_end_a_failover_lost_is_reported_and_the_session_finished_again(
    chaos_cluster: LocalCluster, speech_wav: Path, tmp_path: Path
) -> None:
    """A session ends while its master's replica is cut off: the services' last writes
    (the broker's last events, each service's done mark) reach that master only, while
    their acks of the start entry go to `vl:sessions` on another master, which keeps them.
    Then the master dies and the stale replica takes over. With the start entry acked, no
    replica would claim the session again: it would never end there, and the loss of its
    last events would go unreported. Each service that released it rechecks its done mark
    for a while: it reports the loss and finishes the session again from what is left.
    (The producer's own last chunks are not put in the lost window: nothing could tell
    they were lost, as the end announcement does not say how many chunks came before it.)"""
    store = ChaosRedis(cluster=chaos_cluster)
    cluster = chaos_cluster
    victim, *others = cluster.shards()
    keys = keys_with_sessions_on(others[0])
    sid = session_id_on(victim, "ending-")
    state_key = keys.session_state(sid)
    engine = EngineProcess(model="local").start()
    redis = store.client()

    def finished_on(node: ClusterNode) -> bool:
        with cluster.client(node) as plain:
            marks = plain.hmget(state_key, [f"{service}.done" for service in COUNTS])
        return all(mark == b"1" for mark in marks)

    try:
        async with replicas(store.url, keys.prefix, tmp_path / "logs", engine.endpoint, COUNTS,
                            **store.env) as procs:  # fmt: skip
            everyone = [r for group in procs.values() for r in group]
            # Every chunk and the end announcement are written (and on their way to the
            # replica) before the cut: what the failover loses is the services' own.
            await speak(store.url, keys, sid, speech_wav, cluster=True)
            assert await redis.hget(state_key, "broker.done") is None
            old, heir = victim.master, victim.replicas[0]
            cut_off(cluster, old, heir)
            try:  # the broker drains the last answer (seconds) after the input's end
                await wait_until(lambda: asyncio.to_thread(finished_on, old), within=60)
                cluster.kill(old)
            finally:
                cluster.resume(heir)
            await asyncio.to_thread(cluster.wait_ok, 30)
            assert cluster.master_of_key(state_key) is heir
            masters = [m.server.data_dir for m in cluster.masters()]
            lost = lost_entries(old.server.data_dir, masters, keys.prefix, retried_kept=True)
            assert keys.events(sid) in lost, f"the failover lost no events: {lost}"

            await wait_until(lambda: ended(redis, keys, [sid]), within=120)
            assert not await unreported_losses(redis, keys, lost), lost
            again = [s.service for s in await statuses(redis, keys, sid)
                     if "finishes the session again" in s.message]  # fmt: skip
            assert "broker" in again, again
            history = store.history(keys)
            history.check(sid)
            assert history.speakers(sid) == {"user", "assistant"}
            check_logs(everyone)
        assert all(r.proc is not None and r.proc.returncode == 0 for r in everyone)
    finally:
        await redis.aclose()
        engine.stop()


def cut_off(cluster: LocalCluster, master: ClusterNode, replica: ClusterNode) -> None:
    """From now on `master` replicates nothing to `replica`: the replica is paused (it cannot
    reconnect) and the master drops its replication link (what the master had sent before
    sits in the replica's socket buffer and arrives on resume; what it writes after, never)."""
    cluster.pause(replica)
    with cluster.client(master) as plain:
        assert plain.execute_command("CLIENT", "KILL", "TYPE", "replica") >= 1


def migrate_slot(
    cluster: LocalCluster, slot: int, source: ClusterNode, target: ClusterNode, pause_s: float
) -> int:
    """Move `slot` from `source` to `target` the way an operator does, one key at a time
    with `pause_s` between keys (the session writes on meanwhile: ASK for a moved key,
    TRYAGAIN for a script whose keys are split); then every master learns the new owner
    (target first). Returns how many keys moved."""
    moved = 0
    with cluster.client(source) as src, cluster.client(target) as dst:
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id)
        while names := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1):
            src.execute_command("MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", *names)
            moved += len(names)
            time.sleep(pause_s)
        dst.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
    for master in cluster.masters():
        if master not in (source, target):
            with cluster.client(master) as other:
                other.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
    return moved


async def test_a_slot_migrated_mid_session_loses_and_repeats_nothing(
    chaos_cluster: LocalCluster, speech_wav: Path, tmp_path: Path
) -> None:
    store = ChaosRedis(cluster=chaos_cluster)
    cluster = chaos_cluster
    source, target, third = cluster.shards()
    keys = keys_with_sessions_on(third)
    moving = session_id_on(source, "moving-")
    sids = [moving, session_id_on(source, "staying-"), session_id_on(target, "there-")]
    slot = key_slot(keys.frames(moving).encode())
    assert key_slot(keys.frames(sids[1]).encode()) != slot
    engine = EngineProcess(model="local").start()
    redis = store.client()
    try:
        async with replicas(store.url, keys.prefix, tmp_path / "logs", engine.endpoint, COUNTS,
                            **store.env) as procs:  # fmt: skip
            everyone = [r for group in procs.values() for r in group]
            talking = [asyncio.create_task(speak(store.url, keys, s, speech_wav, cluster=True))
                       for s in sids]  # fmt: skip
            await wait_until(mid_call(redis, keys, sids), within=60)
            moved = await asyncio.to_thread(
                migrate_slot, cluster, slot, source.master, target.master, 0.3
            )
            assert moved >= 5  # audio, frames, events, outputs, state: a live session's keys
            assert cluster.master_of_key(keys.frames(moving)) is target.master
            await asyncio.gather(*talking)
            await wait_until(lambda: ended(redis, keys, sids), within=120)

            for sid in sids:
                reported = [s for s in await statuses(redis, keys, sid)
                            if s.kind == "gap" or "lost writes" in s.message]  # fmt: skip
                assert not reported, (sid, reported)
            # The slot's history: the source's AOF up to the move, then the target's.
            dirs = [n.server.data_dir for n in (source.master, target.master, third.master)]
            history = store.history(keys, dirs)
            for sid in sids:
                history.check(sid)
                assert history.speakers(sid) == {"user", "assistant"}, sid
            check_logs(everyone)
        assert all(r.proc is not None and r.proc.returncode == 0 for r in everyone)
    finally:
        await redis.aclose()
        engine.stop()
