"""Sessions per second on one Redis node and on a 3-master Redis Cluster (issue #15).

    .venv/bin/python bench/cluster_bench.py [--modes single,cluster] [--rates 2,5]
        [--call-s 3] [--seconds 20] [--replicas 1] [--appendfsync everysec|always]
        [--wait on|off] [--busy-above 25] [--busy-wait 120]

For each mode and each offered session rate R, a fresh Redis (one redis-server, or a
`LocalCluster` of 3 masters with `--replicas` replicas each) and ingest, broker and egress as
real processes on it (`VLPIPE_REDIS_CLUSTER=true` on the cluster), the broker pointed at the
null Voice Live server of `bench/pipeline_vs_direct.py` (it answers every 3 s of audio with
1 s of audio). This process is the callers: for `--seconds` it starts R calls a second
(`XADD vl:sessions` of a start), each sending one 20 ms chunk of 24 kHz PCM16 every 20 ms
(all live calls' chunks of a tick in one pipeline) for `--call-s` seconds, then ending
(`XADD vl:sessions` of an end); it polls each ended call's state until every service is
done with it.

Printed per run:

* **Sessions per second**: calls that every service finished, per second between the
  first and the last one done, next to the offered rate; how long a call took
  from its end announcement to done everywhere (p50 / p99), and the calls not done within
  the grace period.
* **CPU**: each process in % of one core over the run (psutil user + system: ingest,
  broker, egress, every redis-server), the transport's total, its CPU per call and per
  second of call audio, and the whole machine's CPU with its core count (a saturated
  machine shows; the machine is shared, so the run waits for it to calm down first).
* **vl:sessions, the one shared stream every call goes through**: the latency of the
  callers' `XADD vl:sessions` (p50 / p99, client side) and what the node that holds it
  does (its commands per second and server µs per command, from `INFO commandstats`). On
  the cluster the prefix is chosen so that `vl:sessions` is alone on its master (the other
  shared streams and every call's keys are on the two others, and redis-py's GETKEYS
  lookups go to the first): that master's CPU above its idle is the slot's own cost, and
  `1 core / (its CPU per call)` is the session rate one slot could carry at this call
  length. The refresh of owned entries (`EVALSHA`, the heartbeat's XPENDING + XCLAIM per
  owned session every 2 s per service) grows with call length, so its share is printed
  as well.
* With `--wait on`, the services run with `VLPIPE_REDIS_WAIT_REPLICAS=1` (a `WAIT 1` after
  checkpoints, if the code under test has it): the same figures show its cost.

The machine's CPU, core count and redis-server version are printed first. Nothing here
asserts on time; `tests/bench/test_cluster_bench.py` runs it at a minimal size.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Container
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from redis.crc import key_slot

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.pipeline_vs_direct import (
    CHUNK,
    RATE,
    SESSION_CONFIG,
    TICK_S,
    Child,
    Children,
    StartFailed,
    commandstats,
    cpu_seconds,
    percentile,
    quiet_machine,
    says_ready,
    wait_for,
)
from vlpipe.shared.keys import StreamKeys
from vlpipe.shared.redis_cluster import LocalCluster, session_id_on
from vlpipe.shared.redis_server import RedisServer, find_redis_server, free_port
from vlpipe.shared.streams import connect

SERVICES = ("ingest", "broker", "egress")
DONE_FIELDS = [f"{s}.done" for s in SERVICES]
GRACE_S = 30.0
IDLE_S = 3.0


# ==================================================================== the store


@dataclass
class Store:
    """One redis-server or a LocalCluster, with its processes by name."""

    mode: str
    server: RedisServer | None = None
    cluster: LocalCluster | None = None

    @property
    def url(self) -> str:
        if self.cluster is not None:
            return self.cluster.url
        assert self.server is not None
        return self.server.url

    def pids(self) -> dict[str, int]:
        if self.server is not None:
            assert self.server.proc is not None
            return {"redis": self.server.proc.pid}
        assert self.cluster is not None
        out = {}
        masters = self.cluster.masters()
        for shard in self.cluster.shards():
            i = masters.index(shard.master)
            assert shard.master.server.proc is not None
            out[f"master-{i}"] = shard.master.server.proc.pid
            for j, replica in enumerate(shard.replicas):
                assert replica.server.proc is not None
                out[f"replica-{i}.{j}"] = replica.server.proc.pid
        return out

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        if self.cluster is not None:
            self.cluster.stop()


def start_store(mode: str, base: Path, replicas: int, appendfsync: str) -> Store:
    args = ("--appendfsync", appendfsync)
    if mode == "single":
        server = RedisServer(base / "redis", extra_args=args)
        server.start()
        return Store(mode, server=server)
    cluster = LocalCluster(base / "cluster", replicas_per_master=replicas, extra_args=args)
    cluster.start()
    return Store(mode, cluster=cluster)


def placed_keys(store: Store) -> tuple[StreamKeys, list[Container[int]]]:
    """Keys under a fresh prefix and where calls go. On the cluster, `vl:sessions` alone on
    the last master (the other shared streams elsewhere) and the calls on the two others,
    so that master's work is the sessions stream's alone. (Not the first master: redis-py's
    cluster client asks its default node, the first master, for the keys of every XREAD
    and XREADGROUP with COMMAND GETKEYS, which is no cost of the stream's.)"""
    if store.cluster is None:
        return StreamKeys(f"cb{uuid.uuid4().hex[:8]}"), [range(16384)]
    *others, last = store.cluster.shards()
    while True:
        keys = StreamKeys(f"cb{uuid.uuid4().hex[:8]}")
        shared = [keys.transcripts, keys.tool_calls, keys.dead]
        if key_slot(keys.sessions.encode()) in last and not any(
            key_slot(k.encode()) in last for k in shared
        ):
            return keys, list(others)


def sessions_node(store: Store, keys: StreamKeys) -> tuple[str, Any]:
    """The name and an async client of the node that holds `vl:sessions`."""
    import redis.asyncio as aioredis

    if store.server is not None:
        return "redis", connect(store.server.url)
    assert store.cluster is not None
    node = store.cluster.master_of_key(keys.sessions)
    name = f"master-{store.cluster.masters().index(node)}"
    return name, aioredis.Redis(host=node.host, port=node.port)


# ==================================================================== the callers


@dataclass
class Calls:
    """What the callers did: per call, when it started, ended and was done everywhere."""

    started: dict[str, float] = field(default_factory=dict)
    ended: dict[str, float] = field(default_factory=dict)
    done: dict[str, float] = field(default_factory=dict)
    sessions_xadd_ms: list[float] = field(default_factory=list)
    late_ticks: int = 0
    ticks: int = 0
    live_samples: list[int] = field(default_factory=list)


def call_ids(slots: list[Any]) -> Any:
    """Call ids whose hash tags land in `slots` (round robin over them)."""
    n = 0
    while True:
        for where in slots:
            sid = session_id_on(where, prefix="c", start=n)
            n = int(sid[1:]) + 1
            yield sid


async def _timed_xadd(redis: Any, key: str, fields: dict[str, Any], calls: Calls) -> None:
    began = time.perf_counter()
    await redis.xadd(key, fields)
    calls.sessions_xadd_ms.append((time.perf_counter() - began) * 1000)


async def watch_done(redis: Any, keys: StreamKeys, calls: Calls, last_call: asyncio.Event) -> None:
    """Every 100 ms, which ended calls every service is done with; returns once the last
    call has ended and every call is done."""
    while not (last_call.is_set() and len(calls.done) == len(calls.ended)):
        waiting = [s for s in calls.ended if s not in calls.done]
        if waiting:
            async with redis.pipeline(transaction=False) as pipe:
                for sid in waiting:
                    pipe.hmget(keys.session_state(sid), DONE_FIELDS)
                states = await pipe.execute()
            now = time.time()
            for sid, state in zip(waiting, states, strict=True):
                if all(v == b"1" for v in state):
                    calls.done[sid] = now
        await asyncio.sleep(0.1)


async def callers(redis: Any, keys: StreamKeys, slots: list[Any], rate: float, call_s: float,
                  seconds: float) -> Calls:  # fmt: skip
    """Start `rate` calls a second for `seconds`, each `call_s` of 20 ms chunks; then wait
    until every call is done everywhere (or `GRACE_S` passed)."""
    calls = Calls()
    last_call = asyncio.Event()
    watcher = asyncio.create_task(watch_done(redis, keys, calls, last_call))
    try:
        await _call(redis, keys, slots, rate, call_s, seconds, calls)
        last_call.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(watcher), GRACE_S)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    return calls


async def _call(redis: Any, keys: StreamKeys, slots: list[Any], rate: float, call_s: float,
                seconds: float, calls: Calls) -> None:  # fmt: skip
    ids = call_ids(slots)
    live: dict[str, int] = {}  # sid -> chunks sent
    per_call = round(call_s / TICK_S)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    next_start, tick = t0, 0
    start_fields = {"type": "start", "config": json.dumps(SESSION_CONFIG), "audio_out": "pcm16"}
    while True:
        now = loop.time()
        while next_start <= now and next_start < t0 + seconds:
            sid = next(ids)
            await _timed_xadd(redis, keys.sessions, {**start_fields, "session": sid}, calls)
            calls.started[sid] = time.time()
            live[sid] = 0
            next_start += 1 / rate
        if live:
            async with redis.pipeline(transaction=False) as pipe:
                for sid, seq in live.items():
                    pipe.xadd(keys.audio(sid), {"format": "pcm16", "rate": RATE, "seq": seq,
                                                "audio": CHUNK})  # fmt: skip
                await pipe.execute()
        calls.live_samples.append(len(live))
        for sid in [s for s, seq in live.items() if seq + 1 >= per_call]:
            del live[sid]
            await _timed_xadd(redis, keys.sessions, {"type": "end", "session": sid}, calls)
            calls.ended[sid] = time.time()
        for sid in live:
            live[sid] += 1
        if not live and next_start >= t0 + seconds:
            break
        tick += 1
        calls.ticks += 1
        delay = t0 + tick * TICK_S - loop.time()
        if delay < -TICK_S:
            calls.late_ticks += 1
        await asyncio.sleep(max(0.0, delay))


# ==================================================================== one run


@dataclass
class Run:
    mode: str
    rate: float
    call_s: float
    calls: Calls
    wall_s: float
    cpu: dict[str, float]  # % of one core over the run
    idle_cpu: dict[str, float]  # % of one core before any call
    machine_percent: float
    node_name: str
    node_calls: dict[str, tuple[int, int]]

    @property
    def done(self) -> int:
        return len(self.calls.done)

    @property
    def sessions_per_s(self) -> float:
        """Calls done per second between the first and the last one done (the ramp up and
        down of the run left out)."""
        done = sorted(self.calls.done.values())
        if len(done) < 2 or done[-1] == done[0]:
            return math.nan
        return (len(done) - 1) / (done[-1] - done[0])

    @property
    def transport(self) -> list[str]:
        return [
            n for n in self.cpu if n in SERVICES or n.startswith(("redis", "master", "replica"))
        ]

    @property
    def transport_cpu_s(self) -> float:
        return sum(self.cpu[n] for n in self.transport) * self.wall_s / 100

    @property
    def end_to_done_ms(self) -> list[float]:
        c = self.calls
        return [(c.done[s] - c.ended[s]) * 1000 for s in c.done]


def service_env(store: Store, keys: StreamKeys, null_port: int, port: int,
                wait: bool) -> dict[str, str]:  # fmt: skip
    env = {
        **os.environ,
        "VLPIPE_REDIS_URL": store.url,
        "VLPIPE_STREAM_PREFIX": keys.prefix,
        "VLPIPE_HTTP_HOST": "127.0.0.1",
        "VLPIPE_HTTP_PORT": str(port),
        "VLPIPE_BROKER_ENDPOINT": f"http://127.0.0.1:{null_port}",
        "VLPIPE_GATEWAY": "0",
        "VLPIPE_LOG_LEVEL": "WARNING",
    }
    if store.cluster is not None:
        env["VLPIPE_REDIS_CLUSTER"] = "true"
    if wait:
        env["VLPIPE_REDIS_WAIT_REPLICAS"] = "1"
    return env


async def one_run(args: argparse.Namespace, children: Children, null_port: int, mode: str,
                  rate: float, tmp: Path) -> Run:  # fmt: skip
    store = await asyncio.to_thread(
        start_store, mode, tmp / f"{mode}-{rate:g}", args.replicas, args.appendfsync
    )
    started: list[Child] = []
    redis: Any = None
    node: Any = None
    try:
        keys, slots = placed_keys(store)
        ports = {name: free_port() for name in SERVICES}
        for name in SERVICES:
            env = service_env(store, keys, null_port, ports[name], args.wait == "on")
            started.append(await children.start(
                f"{name}-{mode}-{rate:g}", [sys.executable, "-m", f"vlpipe.services.{name}"],
                env=env))  # fmt: skip
        for child, name in zip(started, SERVICES, strict=True):
            port = ports[name]
            await wait_for(f"{name} ready (/readyz)", says_ready(port), 60,
                           watch=started, tails=[child])  # fmt: skip
        pids = {**{n: c.pid for n, c in zip(SERVICES, started, strict=True)}, **store.pids()}
        procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        redis = connect(store.url, cluster=store.cluster is not None)
        node_name, node = sessions_node(store, keys)

        cpu0 = {n: cpu_seconds(p) for n, p in procs.items()}
        await asyncio.sleep(IDLE_S)
        cpu1 = {n: cpu_seconds(p) for n, p in procs.items()}
        idle = {n: (cpu1[n] - cpu0[n]) * 100 / IDLE_S for n in procs}

        calls0 = await commandstats(node)
        psutil.cpu_percent(interval=None)
        began = time.monotonic()
        calls = await callers(redis, keys, slots, rate, args.call_s, args.seconds)
        last = max(calls.done.values(), default=time.time())
        wall = time.monotonic() - began - max(0.0, time.time() - last)
        cpu2 = {n: cpu_seconds(p) for n, p in procs.items()}
        machine = psutil.cpu_percent(interval=None)
        calls1 = await commandstats(node)
        node_calls = {
            name: (c - calls0.get(name, (0, 0))[0], u - calls0.get(name, (0, 0))[1])
            for name, (c, u) in calls1.items()
            if name != "info" and c > calls0.get(name, (0, 0))[0]
        }
        cpu = {n: (cpu2[n] - cpu1[n]) * 100 / wall for n in procs}
        return Run(mode, rate, args.call_s, calls, wall, cpu, idle, machine, node_name,
                   node_calls)  # fmt: skip
    finally:
        for client in (redis, node):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.aclose()
        await children.stop(*started)
        await asyncio.to_thread(store.stop)


# ==================================================================== report


def fmt(value: float, digits: int = 1) -> str:
    return "—" if math.isnan(value) else f"{value:.{digits}f}"


def report(runs: list[Run]) -> str:
    out = [
        "| mode | offered calls/s | done calls/s | done / started | end → done p50 / p99 ms "
        "| live calls (mean) | transport CPU % core | CPU ms per call | CPU ms per call-audio-s "
        "| machine CPU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        e2d = r.end_to_done_ms
        live = r.calls.live_samples
        total = sum(r.cpu[n] for n in r.transport)
        per_call = r.transport_cpu_s * 1000 / r.done if r.done else math.nan
        out.append(
            f"| {r.mode} | {r.rate:g} | {fmt(r.sessions_per_s, 2)} "
            f"| {r.done} / {len(r.calls.started)} "
            f"| {fmt(percentile(e2d, 50), 0)} / {fmt(percentile(e2d, 99), 0)} "
            f"| {fmt(sum(live) / len(live) if live else math.nan)} | {fmt(total)} "
            f"| {fmt(per_call)} | {fmt(per_call / r.call_s)} | {r.machine_percent:.0f}% |"
        )
    out += ["", "CPU per process, % of one core over the run (idle before the calls):", ""]
    for r in runs:
        cells = ", ".join(f"{n} {fmt(r.cpu[n])} ({fmt(r.idle_cpu[n])})" for n in r.cpu)
        out.append(f"- {r.mode} at {r.rate:g}/s: {cells}")
    out += ["", "vl:sessions: callers' XADD latency, and the node that holds it:", ""]
    for r in runs:
        x = r.calls.sessions_xadd_ms
        busy = r.cpu.get(r.node_name, math.nan) - r.idle_cpu.get(r.node_name, math.nan)
        per_call_us = busy / 100 * r.wall_s * 1e6 / r.done if r.done else math.nan
        total_us = sum(u for _, u in r.node_calls.values()) or 1
        evalsha = r.node_calls.get("evalsha", (0, 0))[1] / total_us
        refresh = f"; refresh (EVALSHA) {evalsha:.0%} of its command time" if (
            r.mode == "cluster") else ""  # fmt: skip
        ranked = sorted(r.node_calls.items(), key=lambda kv: -kv[1][0])[:8]
        cells = ", ".join(f"{n} {c / r.wall_s:.0f}/s ({u / c:.1f} µs)" for n, (c, u) in ranked)
        ceiling = 1e6 / per_call_us if per_call_us and per_call_us > 0 else math.nan
        out.append(
            f"- {r.mode} at {r.rate:g}/s: XADD p50 {fmt(percentile(x, 50), 2)} / p99 "
            f"{fmt(percentile(x, 99), 2)} ms ({len(x) / r.wall_s:.1f}/s); {r.node_name} "
            f"{fmt(busy)}% of a core above idle = {fmt(per_call_us, 0)} µs per call"
            + (f" → one slot ≈ {fmt(ceiling, 0)} calls/s at {r.call_s:g} s calls"
               if r.mode == "cluster" else " (it holds every key here)")
            + f"{refresh}; {cells}"
        )  # fmt: skip
    late = [f"{r.mode}@{r.rate:g}: {r.calls.late_ticks}/{r.calls.ticks}" for r in runs]
    out += ["", "Callers' ticks more than 20 ms late: " + ", ".join(late)]
    return "\n".join(out)


def machine_line(args: argparse.Namespace) -> str:
    cpu_model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    import subprocess

    words = subprocess.run([find_redis_server() or "redis-server", "--version"],
                           capture_output=True, text=True).stdout.split()  # fmt: skip
    version = next((w.removeprefix("v=") for w in words if w.startswith("v=")), "?")
    return (
        f"{psutil.cpu_count()} cores ({cpu_model}), redis-server {version}, AOF "
        f"{args.appendfsync}, cluster: 3 masters x {args.replicas} replica(s); calls of "
        f"{args.call_s:g} s, 20 ms chunks, started for {args.seconds:g} s; WAIT 1 {args.wait}"
    )


async def run(args: argparse.Namespace) -> list[Run]:
    modes = [m for m in args.modes.split(",") if m]
    rates = [float(r) for r in args.rates.split(",") if r]
    print(machine_line(args), flush=True)
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="vlpipe-cb-") as tmp:
        children = Children(Path(tmp))
        try:
            null_port = free_port()
            null = await children.role("null server", "null", {"port": null_port})
            await null.message("ready", within=30)
            for rate in rates:
                for mode in modes:
                    before = await quiet_machine(args.busy_above, args.busy_wait)
                    r = await one_run(args, children, null_port, mode, rate, Path(tmp))
                    runs.append(r)
                    print(f"{mode} at {rate:g}/s: {r.sessions_per_s:.2f} calls/s done "
                          f"({r.done}/{len(r.calls.started)}), machine {before:.0f}% before, "
                          f"{r.machine_percent:.0f}% during", flush=True)  # fmt: skip
        except StartFailed as exc:
            raise SystemExit(f"benchmark stopped: {exc}") from None
        finally:
            await children.stop_all()
            if runs:
                print(f"\n{machine_line(args)}\n\n{report(runs)}", flush=True)
    return runs


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--modes", default="single,cluster")
    p.add_argument("--rates", default="2,5", help="offered calls per second, comma-separated")
    p.add_argument("--call-s", type=float, default=3.0, help="each call's length")
    p.add_argument("--seconds", type=float, default=20.0, help="how long calls are started")
    p.add_argument("--replicas", type=int, default=1, help="replicas per master (cluster)")
    p.add_argument("--appendfsync", choices=["everysec", "always"], default="everysec")
    p.add_argument("--wait", choices=["on", "off"], default="off",
                   help="on: VLPIPE_REDIS_WAIT_REPLICAS=1 (WAIT 1 after checkpoints)")  # fmt: skip
    p.add_argument("--busy-above", type=float, default=25.0)
    p.add_argument("--busy-wait", type=float, default=120.0)
    return p


WAIT_SETTING = "redis_wait_replicas"
"""The services' setting for a `WAIT` after checkpoints (`VLPIPE_REDIS_WAIT_REPLICAS`)."""


def main() -> None:
    args = parser().parse_args()
    if args.wait == "on":
        from vlpipe.shared.config import ServiceSettings

        if WAIT_SETTING not in ServiceSettings.model_fields:
            raise SystemExit(f"--wait on: the services have no {WAIT_SETTING} setting (no "
                             "WAIT after checkpoints to measure in this code)")  # fmt: skip

    async def guarded() -> None:
        task = asyncio.current_task()
        assert task is not None
        for signum in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(signum, task.cancel)
        await run(args)

    with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):
        asyncio.run(guarded())


if __name__ == "__main__":
    main()
