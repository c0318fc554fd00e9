"""The benchmark's count of wake-ups (voluntary context switches), on real processes: it
is read from the kernel, and a process that sleeps and is woken N times must show N."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil

from bench.pipeline_vs_direct import ModeResult, Turns, Window, per_process_table, wake_ups


def test_each_sleep_a_process_wakes_from_is_counted() -> None:
    me = psutil.Process()
    before = wake_ups(me)
    for _ in range(20):
        time.sleep(0.001)
    assert wake_ups(me) - before >= 20


def test_a_process_counts_the_wake_ups_of_its_live_children() -> None:
    me = psutil.Process()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(0.001)"])
    try:
        child = psutil.Process(sleeper.pid)
        deadline = time.monotonic() + 60
        while child.num_ctx_switches().voluntary < 50 and time.monotonic() < deadline:
            time.sleep(0.05)
        own = me.num_ctx_switches().voluntary
        of_child = child.num_ctx_switches().voluntary
        assert of_child >= 50
        assert wake_ups(me) >= own + of_child
    finally:
        sleeper.kill()
        sleeper.wait()


def result(mode: str, wall_s: float, wakes: dict[str, int]) -> ModeResult:
    window = Window(wall_s=wall_s, cpu_s={}, rss={}, machine_percent=0.0, null_appends=0,
                    null_bytes=0, redis_calls={}, wakes=wakes)  # fmt: skip
    turns = Turns(expected=0, latency_ms=[], uplink_ms=[], downlink_ms=[], delivered=1.0,
                  ticker_late_ms=[])  # fmt: skip
    transport = (
        ("ingest", "broker", "egress", "redis-server") if mode == "pipeline" else ("direct",)
    )
    return ModeResult(mode, 25, window, transport, {}, turns)


def test_the_wake_up_table_gives_each_process_a_second_and_sums_the_pipelines_own() -> None:
    pipe = result("pipeline", 10.0, {"ingest": 30, "broker": 2410, "egress": 1440,
                                     "redis-server": 3880, "null server": 2280,
                                     "producer": 950, "consumer": 810})  # fmt: skip
    direct = result("direct", 20.0, {"direct": 2180, "null server": 3140})
    _, _, row = per_process_table([(pipe, direct)], ModeResult.wakes_per_s, digits=0)
    # ingest, broker, egress, redis-server; their sum (776, neither the null server's nor
    # the producer's and consumer's); the direct app over its own window
    assert row == "| 25 | 3 | 241 | 144 | 388 | 776 | 109 | 228 / 157 | 95 / 81 |"
