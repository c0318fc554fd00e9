"""The whole pipeline for a test: ingest, broker and egress (with its gateway) as real
processes on one Redis, talking to a local engine."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import redis.asyncio as aioredis
import websockets
from websockets.asyncio.client import connect

from tests.broker.helpers import start_broker
from tests.egress.helpers import prometheus_value, start_egress
from tests.ingest.test_service import start_ingest
from tests.waiting import wait_until
from vlpipe.services.egress.access import Scope, mint_token
from vlpipe.shared.keys import StreamKeys
from vlpipe.shared.redis_server import free_port

TOKEN = "pipeline-operator-token"
"""A static operator token (admin scope)."""
SIGNING_KEY = "pipeline-signing-key-0123456789abcdef"
"""The gateway's signing key, for tests that mint scoped session tokens."""


@dataclass
class Pipeline:
    gateway_port: int
    procs: list[subprocess.Popen[bytes]]
    egress_http_port: int
    """Egress's health and metrics port."""

    def url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.gateway_port}{path}"

    def connect(self, path: str, token: str | None = TOKEN, **options: Any) -> connect:
        """A client socket to `path`, its token in the Authorization header."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return websockets.connect(self.url(path), additional_headers=headers, **options)

    async def egress_metric(self, name: str, **labels: str) -> float:
        """A Prometheus metric of egress (and its gateway), summed over these labels."""
        return await prometheus_value(self.egress_http_port, name, **labels)

    @staticmethod
    def token(session: str, scope: Scope = Scope.CALL, ttl_s: float = 300) -> str:
        return mint_token(SIGNING_KEY, session, scope, ttl_s=ttl_s)


async def outputs_done(redis: aioredis.Redis, keys: StreamKeys, sid: str) -> bool:
    """The session's outputs are all written: the broker and egress have both finished
    it (whichever of them made the outputs; egress lets a session whose outputs the
    broker makes go at its first event)."""
    done = await redis.hmget(keys.session_state(sid), ["broker.done", "egress.done"])
    return all(v == b"1" for v in done)


def _log_files(logs: Path | None) -> dict[str, IO[bytes] | None]:
    names = ("ingest", "broker", "egress")
    return {name: (logs / f"{name}.log").open("wb") if logs else None for name in names}


@asynccontextmanager
async def running_pipeline(
    redis_url: str,
    prefix: str,
    engine_endpoint: str,
    *,
    logs: Path | None = None,
    service_urls: Mapping[str, str] | None = None,
    **env: str,
) -> AsyncIterator[Pipeline]:
    """`logs`: a folder for each service's stderr (`ingest.log`, ...); else discarded.
    `service_urls`: a Redis URL per service (its own ACL user), else `redis_url` for all."""
    port, egress_http_port = free_port(), free_port()
    files = _log_files(logs)
    sink = {name: f if f is not None else subprocess.DEVNULL for name, f in files.items()}
    urls = {name: (service_urls or {}).get(name, redis_url) for name in sink}
    procs = [
        start_ingest(urls["ingest"], prefix, stderr=sink["ingest"], **env),
        start_broker(urls["broker"], prefix, engine_endpoint, stderr=sink["broker"], **env),
        start_egress(
            urls["egress"],
            prefix,
            **{
                "VLPIPE_GATEWAY": "1",
                "VLPIPE_GATEWAY_PORT": str(port),
                "VLPIPE_GATEWAY_TOKENS": TOKEN,
                "VLPIPE_GATEWAY_SIGNING_KEY": SIGNING_KEY,
                "VLPIPE_CLAIM_IDLE_MS": "15000",
                "VLPIPE_HTTP_PORT": str(egress_http_port),
                **env,
            },
            stderr=sink["egress"],
        ),
    ]

    async def listening() -> bool:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return False
        writer.close()
        return True

    try:
        await wait_until(listening, within=30)
        yield Pipeline(port, procs, egress_http_port)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(30) for proc in procs]
        for f in files.values():
            if f is not None:
                f.close()
        assert codes == [0, 0, 0], codes


async def send_paced(ws: Any, messages: list[Any], seconds: float, speed: float = 1.5) -> None:
    """Send `messages`, which hold `seconds` of audio, at `speed` times real time: under
    the gateway's limit (2x, sustained). Sleeps after each 100 ms of audio sent."""
    per_message = seconds / max(1, len(messages))
    owed = 0.0
    for message in messages:
        await ws.send(message)
        owed += per_message / speed
        if owed >= 0.1:
            await asyncio.sleep(owed)
            owed = 0.0
