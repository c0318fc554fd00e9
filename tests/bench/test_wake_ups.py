"""The benchmark's count of wake-ups (voluntary context switches), on real processes: it
is read from the kernel, and a process that sleeps and is woken N times must show N."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil

from bench.pipeline_vs_direct import wake_ups


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
