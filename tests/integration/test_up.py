"""`vlpipe up` starts Redis, the engine and the services that exist; Ctrl-C stops all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import redis

from tests.shared.procs import ROOT
from vlpipe.shared.redis_server import free_port


def test_up_runs_a_private_redis_and_the_engine_and_stops_everything_on_ctrl_c(
    tmp_path: Path,
) -> None:
    engine_port = free_port()
    env = {
        **os.environ,
        "VLPIPE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",  # nothing listens there
        "VLPIPE_STREAM_PREFIX": "uptest",
    }
    env.pop("VLPIPE_BROKER_ENDPOINT", None)
    env.pop("AZURE_COGNITIVE_SERVICES_ENDPOINT", None)
    up = subprocess.Popen(
        [sys.executable, "-m", "vlpipe", "up", "--data-dir", str(tmp_path),
         "--engine-port", str(engine_port), "--engine-model", "echo"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: list[str] = []
    try:
        assert up.stdout is not None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = up.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "pipeline ready" in line:
                break
        output = "".join(lines)
        assert "pipeline ready" in output, output
        assert "engine ready" in output, output
        redis_line = next(x for x in lines if "started redis-server" in x)
        redis_url = redis_line.rsplit(" at ", 1)[1].strip()
        assert redis.Redis.from_url(redis_url).ping()
        with urllib.request.urlopen(f"http://127.0.0.1:{engine_port}/readyz", timeout=5) as r:
            assert r.status == 200
        children = psutil.Process(up.pid).children(recursive=True)
        assert len(children) >= 2, "redis-server and the engine at least"
        up.send_signal(signal.SIGINT)
        rest, _ = up.communicate(timeout=60)
        assert up.returncode == 0, rest
        assert "stopped" in rest
        _gone, alive = psutil.wait_procs(children, timeout=10)
        assert alive == [], f"left behind: {alive}"
    finally:
        if up.poll() is None:
            up.kill()
