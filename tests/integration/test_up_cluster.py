"""`vlpipe up --redis-cluster` runs the whole pipeline on a private Redis Cluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import redis
from redis.cluster import RedisCluster

from tests.integration.test_up import vlpipe
from tests.shared.procs import kill_group, start_in_own_group
from vlpipe.shared.keys import StreamKeys
from vlpipe.shared.redis_server import free_port


def test_up_on_a_redis_cluster_answers_a_call_and_stops_every_node(
    tmp_path: Path, speech_wav: Path
) -> None:
    env = {**os.environ, "VLPIPE_STREAM_PREFIX": "upcluster"}
    for name in ("VLPIPE_BROKER_ENDPOINT", "AZURE_COGNITIVE_SERVICES_ENDPOINT",
                 "VLPIPE_REDIS_CLUSTER", "VLPIPE_REDIS_URL"):  # fmt: skip
        env.pop(name, None)
    up = start_in_own_group(
        [sys.executable, "-m", "vlpipe", "up", "--redis-cluster", "--data-dir", str(tmp_path),
         "--engine-port", str(free_port()), "--gateway-port", str(free_port())],
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
        started = next(x for x in lines if "started a Redis Cluster" in x)
        seed = started.split("): ", 1)[1].split()[0]
        # It tells how to reach the cluster from another shell.
        assert f"export VLPIPE_REDIS_CLUSTER=true VLPIPE_REDIS_URL={seed}" in output
        cluster = RedisCluster.from_url(seed)
        shards = cluster.cluster_shards()
        assert len(shards) == 3 and all(len(s["nodes"]) == 2 for s in shards), shards
        children = psutil.Process(up.pid).children(recursive=True)
        servers = [c for c in children if "redis-server" in c.name()]
        assert len(servers) == 6, "3 masters and 3 replicas"

        client_env = {**env, "VLPIPE_REDIS_URL": seed, "VLPIPE_REDIS_CLUSTER": "true"}
        config = json.dumps({"input_audio_format": "pcm16_16000hz",
                             "turn_detection": {"type": "server_vad", "silence_duration_ms": 1500}})  # fmt: skip
        published = vlpipe("publish", str(speech_wav), "--session", "upc1", "--pace", "0",
                           "--config", config, env=client_env)  # fmt: skip
        assert published.returncode == 0, published.stderr
        tailed = vlpipe("tail", "--session", "upc1", "--json", env=client_env, timeout=180)
        assert tailed.returncode == 0, tailed.stderr
        records = [json.loads(line) for line in tailed.stdout.splitlines()]
        finals = [r for r in records if r.get("final") is True]
        assert [r["speaker"] for r in finals] == ["user", "assistant"], tailed.stdout[-3000:]
        assert "fail better" in finals[0]["text"].lower()
        assert records[-1]["message"] == "ended"
        # The session's keys are on the master that serves its hash tag's slot.
        keys = StreamKeys("upcluster")
        node = cluster.get_node_from_key(keys.transcript("upc1"))
        direct = redis.Redis(host=node.host, port=node.port)
        assert direct.xlen(keys.transcript("upc1")) == len(
            [r for r in records if "speaker" in r]
        )  # every piece tail showed, on that one master
        cluster.close()
        direct.close()

        up.send_signal(signal.SIGINT)
        rest, _ = up.communicate(timeout=60)
        assert up.returncode == 0, rest
        _gone, alive = psutil.wait_procs(children, timeout=10)
        assert alive == [], f"left behind: {alive}"
    finally:
        kill_group(up)  # what `up` started too, if the test failed before it stopped them


def test_up_killed_outright_leaves_no_node_or_service_behind(tmp_path: Path) -> None:
    env = {**os.environ, "VLPIPE_STREAM_PREFIX": "upkilled"}
    for name in ("VLPIPE_BROKER_ENDPOINT", "AZURE_COGNITIVE_SERVICES_ENDPOINT",
                 "VLPIPE_REDIS_CLUSTER", "VLPIPE_REDIS_URL"):  # fmt: skip
        env.pop(name, None)
    up = start_in_own_group(
        [sys.executable, "-m", "vlpipe", "up", "--redis-cluster", "--data-dir", str(tmp_path),
         "--engine-model", "echo", "--engine-port", str(free_port()),
         "--gateway-port", str(free_port())],
        env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        assert up.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and "Ctrl-C stops" not in "".join(lines[-1:]):
            line = up.stdout.readline()
            if not line:
                break
            lines.append(line)
        assert "pipeline ready" in "".join(lines), "".join(lines)
        children = psutil.Process(up.pid).children(recursive=True)
        assert len([c for c in children if "redis-server" in c.name()]) == 6
        assert len(children) >= 10, "6 nodes, the engine, ingest, broker and egress"

        up.kill()  # no Ctrl-C, no clean-up of its own: the kernel must stop its children
        up.wait(10)
        _gone, alive = psutil.wait_procs(children, timeout=60)
        assert alive == [], f"left behind: {alive}"
    finally:
        kill_group(up)  # the test's own guarantee, whatever the outcome above


def test_up_refuses_a_redis_url_with_a_cluster_of_its_own() -> None:
    refused = vlpipe("up", "--redis-cluster", "--redis-url", "redis://127.0.0.1:1/0",
                     env=dict(os.environ), timeout=30)  # fmt: skip
    assert refused.returncode == 2
    assert "--redis-cluster starts a cluster of its own" in refused.stderr
