"""`vlpipe up` runs the whole pipeline; `vlpipe publish` and `vlpipe tail` use it; Ctrl-C stops all."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import redis

from tests.shared.procs import ROOT, kill_group, start_in_own_group
from vlpipe.shared.redis_server import free_port


def vlpipe(
    *args: str, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vlpipe", *args], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=timeout, check=False,
    )  # fmt: skip


def test_up_publish_tail_and_stop_leave_nothing_behind(tmp_path: Path, speech_wav: Path) -> None:
    engine_port, gateway_port = free_port(), free_port()
    env = {
        **os.environ,
        "VLPIPE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",  # nothing listens there
        "VLPIPE_STREAM_PREFIX": "uptest",
    }
    for name in ("VLPIPE_BROKER_ENDPOINT", "AZURE_COGNITIVE_SERVICES_ENDPOINT"):
        env.pop(name, None)
    up = start_in_own_group(
        [sys.executable, "-m", "vlpipe", "up", "--data-dir", str(tmp_path),
         "--engine-port", str(engine_port), "--gateway-port", str(gateway_port)],
        env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    lines: list[str] = []
    try:
        assert up.stdout is not None
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = up.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Ctrl-C stops" in line:
                break
        output = "".join(lines)
        for ready in ("engine ready", "ingest ready", "broker ready", "egress ready"):
            assert ready in output, output
        assert f"web console:     http://127.0.0.1:{gateway_port}/" in output
        redis_url = (
            next(x for x in lines if "started redis-server" in x).rsplit(" at ", 1)[1].strip()
        )
        assert redis.Redis.from_url(redis_url).config_get("appendonly") == {"appendonly": "yes"}
        children = psutil.Process(up.pid).children(recursive=True)
        assert len(children) >= 5, "redis-server, the engine, ingest, broker and egress"

        client_env = {**env, "VLPIPE_REDIS_URL": redis_url}
        config = json.dumps({"input_audio_format": "pcm16_16000hz",
                             "turn_detection": {"type": "server_vad", "silence_duration_ms": 1500}})  # fmt: skip
        published = vlpipe("publish", str(speech_wav), "--session", "up1", "--pace", "0",
                           "--config", config, env=client_env)  # fmt: skip
        assert published.returncode == 0, published.stderr
        assert "published up1: 10.0 s of audio" in published.stderr
        tailed = vlpipe("tail", "--session", "up1", "--json", env=client_env, timeout=180)
        assert tailed.returncode == 0, tailed.stderr
        records = [json.loads(line) for line in tailed.stdout.splitlines()]
        finals = [r for r in records if r.get("final") is True]
        assert [r["speaker"] for r in finals] == ["user", "assistant"]
        assert "fail better" in finals[0]["text"].lower()
        assert finals[1]["text"].startswith("You said: Ever tried")
        # The broker makes the outputs (its default), their status messages too.
        assert records[-1] == {"status": "state", "service": "broker", "message": "ended",
                               "detail": {"reason": "input_ended"}}  # fmt: skip
        with urllib.request.urlopen(f"http://127.0.0.1:{gateway_port}/", timeout=5) as page:
            assert page.status == 200

        up.send_signal(signal.SIGINT)
        rest, _ = up.communicate(timeout=60)
        assert up.returncode == 0, rest
        assert "stopped" in rest
        _gone, alive = psutil.wait_procs(children, timeout=10)
        assert alive == [], f"left behind: {alive}"
    finally:
        kill_group(up)  # what `up` started too, if the test failed before it stopped them
