"""Real processes and real faults for the chaos tests.

* `Replica`: one ingest, broker or egress process with short timings, its log in a file,
  its health port known, so a test can SIGKILL, SIGSTOP/SIGCONT it and read its logs.
* `TcpProxy`: sits between the services and Redis; it can drop every connection or
  black-hole all traffic (a network that stops answering, not one that refuses).
* `speak()`: a producer that publishes a recording in real time, chunk by chunk, and
  keeps going through Redis outages (retrying a chunk with the same `seq`).
* `cpu_seconds()`: a process's CPU time, to bound what it burns during an outage.
* `ChaosRedis`: where a test's services keep their streams, one redis-server or a Redis
  Cluster (`VLPIPE_REDIS_CLUSTER=true`), with the client and the history for either, so
  a chaos test runs against both by taking the `chaos_store` fixture.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import wave
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from redis.exceptions import RedisClusterException, RedisError

from tests.chaos.history import History, aof_base
from tests.shared.procs import ROOT
from vlpipe.shared.audio import AudioFormat
from vlpipe.shared.contracts import SessionConfig, SessionEnd, SessionStart, encode
from vlpipe.shared.keys import StreamKeys
from vlpipe.shared.redis_cluster import LocalCluster
from vlpipe.shared.redis_server import RedisServer
from vlpipe.shared.streams import REDIS_DOWN, connect

FAST = {
    "VLPIPE_HEARTBEAT_MS": "200",
    "VLPIPE_BLOCK_MS": "200",
    "VLPIPE_CLAIM_IDLE_MS": "1500",
    "VLPIPE_REDIS_TIMEOUT_S": "1",
    "VLPIPE_BROKER_DRAIN_QUIET_S": "0.5",
    # The drain after the input ended waits for the answer in flight at most this long
    # (60 s by default). The local engine answers every turn of every session of a test,
    # and on a loaded two-core CI host (three test workers, each with engines) its
    # transcriptions queued for up to a minute: the last session's answer came after the
    # default budget, and the session ended without it. The tests' waits for the end (120
    # s) stay longer than this, so a session that never gets its answer still fails them.
    "VLPIPE_BROKER_DRAIN_MAX_S": "110",
    "VLPIPE_GATEWAY": "0",
    "VLPIPE_LOG_LEVEL": "INFO",
}


@dataclass
class Replica:
    """One service replica as a real process."""

    service: str
    name: str
    redis_url: str
    prefix: str
    logs: Path
    env: dict[str, str] = field(default_factory=dict)
    _http_port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.logs / f"{self.name}.log"

    def start(self) -> Replica:
        env = {
            **os.environ, **FAST,
            "VLPIPE_REDIS_URL": self.redis_url, "VLPIPE_STREAM_PREFIX": self.prefix,
            "VLPIPE_HTTP_HOST": "127.0.0.1", "VLPIPE_HTTP_PORT": "0",
            "VLPIPE_REPLICA_NAME": self.name, **self.env,
        }  # fmt: skip
        self.logs.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", f"vlpipe.services.{self.service}"],
                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log,
            )  # fmt: skip
        return self

    def http_port(self) -> int:
        """The health port the replica bound (a free one it picked: a port chosen here and
        bound there could be taken in between), from its "service started" log line."""
        deadline = time.monotonic() + 30
        while not self._http_port:
            for line in self.log().splitlines():
                if '"service started"' in line:
                    self._http_port = int(json.loads(line)["http_port"])
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} never logged its health port")
            time.sleep(0.05)
        return self._http_port

    def health(self, path: str) -> int | None:
        """The HTTP status of `/healthz` or `/readyz`, or None if it does not answer."""
        try:
            # Generous: a loaded machine may take seconds to answer; the status matters.
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port()}{path}", timeout=10):
                return 200
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def cpu_seconds(self) -> float:
        assert self.proc is not None
        return cpu_seconds(self.proc.pid)

    def stop(self) -> int | None:
        """SIGTERM (after SIGCONT, in case it is stopped); the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGCONT)
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


@asynccontextmanager
async def replicas(
    redis_url: str, prefix: str, logs: Path, engine: str, counts: dict[str, int], **env: str
) -> AsyncIterator[dict[str, list[Replica]]]:
    """`counts` replicas of each service (ingest, broker, egress), stopped at the end."""
    out: dict[str, list[Replica]] = {}
    for service, n in counts.items():
        extra = {"VLPIPE_BROKER_ENDPOINT": engine} if service == "broker" else {}
        out[service] = [
            Replica(service, f"{service}-{i}", redis_url, prefix, logs, {**extra, **env}).start()
            for i in range(n)
        ]
    try:
        yield out
    finally:
        for group in out.values():
            for replica in group:
                replica.stop()


def speech_chunks(path: Path, chunk_ms: int = 100) -> tuple[int, list[bytes]]:
    with wave.open(str(path)) as w:
        rate = w.getframerate()
        pcm = w.readframes(w.getnframes())
    step = rate * 2 * chunk_ms // 1000
    return rate, [pcm[i : i + step] for i in range(0, len(pcm), step)]


async def _until_done(redis: Any, key: str, fields: dict[str, object]) -> None:
    """XADD, retried through outages, failovers and resharding (a retry may add the entry
    twice: readers drop repeats by `seq`)."""
    while True:
        try:
            await redis.xadd(key, fields)
            return
        except (*REDIS_DOWN, RedisError, RedisClusterException):
            await asyncio.sleep(0.1)


async def speak(
    redis_url: str,
    keys: StreamKeys,
    sid: str,
    recording: Path,
    *,
    pace: float = 1.0,
    tail_s: float = 1.5,
    config: SessionConfig | None = None,
    cluster: bool = False,
    direct: bool = False,
) -> None:
    """Announce `sid`, publish the recording (then `tail_s` of silence) at `pace` x real
    time in 100 ms chunks with producer sequence numbers, and end the session. `cluster`:
    `redis_url` names a node of a Redis Cluster. `direct`: the session's input format is
    the recording's, announced as `audio_in` (the broker reads the chunks, not ingest)."""
    redis = connect(redis_url, timeout_s=1, cluster=cluster)
    try:
        rate, chunks = speech_chunks(recording)
        config = config or SessionConfig()
        start = SessionStart(session=sid, config=config)
        if direct:
            fmt = AudioFormat.parse("pcm16", rate)
            config = config.model_copy(update={"input_audio_format": fmt})
            start = SessionStart(session=sid, config=config, audio_in=fmt)
        await _until_done(redis, keys.sessions, dict(encode(start)))
        chunks += [b"\0" * len(chunks[0])] * int(tail_s * 10)
        loop = asyncio.get_running_loop()
        began = loop.time()
        for seq, chunk in enumerate(chunks):
            fields = {"format": "pcm16", "rate": rate, "seq": seq, "audio": chunk}
            await _until_done(redis, keys.audio(sid), fields)
            due = began + (seq + 1) * 0.1 / pace
            with contextlib.suppress(ValueError):
                await asyncio.sleep(max(0.0, due - loop.time()))
        await _until_done(redis, keys.sessions, dict(encode(SessionEnd(session=sid))))
    finally:
        await redis.aclose()


_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


class TcpProxy:
    """A TCP proxy to `target_port`, in this event loop, with faults on demand."""

    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.host = host
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._open = asyncio.Event()
        self._open.set()
        self.connections = 0

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    async def __aenter__(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._serve, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self.drop_all()
        self._open.set()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        await self._open.wait()  # black hole: accepted, never answered
        try:
            server_r, server_w = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            client_w.close()
            return
        link = (client_w, server_w)
        self._links.add(link)
        try:
            await asyncio.gather(self._pipe(client_r, server_w), self._pipe(server_r, client_w))
        finally:
            self._links.discard(link)
            for w in link:
                w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                await self._open.wait()  # black hole: what is in flight stays in flight
                writer.write(data)
                await writer.drain()
        writer.close()

    def drop_all(self) -> int:
        """Reset every open connection (as a failover or a load balancer would)."""
        links = list(self._links)
        for client_w, server_w in links:
            for w in (client_w, server_w):
                transport = w.transport
                with contextlib.suppress(Exception):
                    sock = transport.get_extra_info("socket")
                    if sock is not None:  # RST, not FIN: a connection lost, not closed
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
                transport.close()
        return len(links)

    def black_hole(self) -> None:
        """Stop forwarding anything, in both directions, on old and new connections."""
        self._open.clear()

    def restore(self) -> None:
        """Forward again; connections made during the black hole are dropped (their
        clients have given up on them)."""
        self.drop_all()
        self._open.set()


@dataclass
class ChaosRedis:
    """Where a chaos test's services keep their streams: one redis-server (`server`) or a
    Redis Cluster (`cluster`), both with AOF `appendfsync always` and no automatic rewrite.

    `bases` are the AOF base files when the test began: `history()` refuses to read an AOF
    that was rewritten since (its commands before the rewrite would be missing)."""

    server: RedisServer | None = None
    cluster: LocalCluster | None = None
    bases: dict[Path, str | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.bases = {path: aof_base(path) for path in self.data_dirs()}

    @property
    def is_cluster(self) -> bool:
        return self.cluster is not None

    @property
    def url(self) -> str:
        if self.cluster is not None:
            return self.cluster.url
        assert self.server is not None
        return self.server.url

    @property
    def env(self) -> dict[str, str]:
        """What the services need to use it."""
        return {"VLPIPE_REDIS_CLUSTER": "true"} if self.cluster is not None else {}

    def client(self) -> Any:
        """The test's own client (bytes; a cluster client on a cluster)."""
        return connect(self.url, timeout_s=2, cluster=self.is_cluster)

    def data_dirs(self) -> list[Path]:
        """Every node's data directory (a cluster's in node order)."""
        if self.cluster is not None:
            return [node.server.data_dir for node in self.cluster.nodes]
        assert self.server is not None
        return [self.server.data_dir]

    def history(self, keys: StreamKeys, data_dirs: list[Path] | None = None) -> History:
        """The history of the test so far: the server's AOF, or the AOFs of `data_dirs` (by
        default the cluster's masters now: a promoted replica's AOF stands for its dead
        master's, less what it never got)."""
        if data_dirs is None:
            if self.cluster is not None:
                data_dirs = [m.server.data_dir for m in self.cluster.masters()]
            else:
                data_dirs = self.data_dirs()
        for path in data_dirs:
            assert aof_base(path) == self.bases.get(path), f"{path}: AOF rewritten mid-test"
        return History.read(data_dirs, keys)
