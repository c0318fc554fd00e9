"""The whole pipeline for a test: ingest, broker and egress (with its gateway) as real
processes on one Redis, talking to a local engine."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tests.broker.helpers import start_broker
from tests.egress.helpers import start_egress
from tests.ingest.test_service import start_ingest
from tests.waiting import wait_until
from vlpipe.shared.redis_server import free_port

TOKEN = "pipeline-token"


@dataclass
class Pipeline:
    gateway_port: int
    procs: list[subprocess.Popen[bytes]]

    def url(self, path: str) -> str:
        sep = "&" if "?" in path else "?"
        return f"ws://127.0.0.1:{self.gateway_port}{path}{sep}token={TOKEN}"


def _log_files(logs: Path | None) -> dict[str, IO[bytes] | None]:
    names = ("ingest", "broker", "egress")
    return {name: (logs / f"{name}.log").open("wb") if logs else None for name in names}


@asynccontextmanager
async def running_pipeline(
    redis_url: str, prefix: str, engine_endpoint: str, *, logs: Path | None = None, **env: str
) -> AsyncIterator[Pipeline]:
    """`logs`: a folder for each service's stderr (`ingest.log`, ...); else discarded."""
    port = free_port()
    files = _log_files(logs)
    sink = {name: f if f is not None else subprocess.DEVNULL for name, f in files.items()}
    procs = [
        start_ingest(redis_url, prefix, stderr=sink["ingest"], **env),
        start_broker(redis_url, prefix, engine_endpoint, stderr=sink["broker"], **env),
        start_egress(
            redis_url,
            prefix,
            VLPIPE_GATEWAY="1",
            VLPIPE_GATEWAY_PORT=str(port),
            VLPIPE_GATEWAY_TOKENS=TOKEN,
            VLPIPE_CLAIM_IDLE_MS="15000",
            stderr=sink["egress"],
            **env,
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
        yield Pipeline(port, procs)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(30) for proc in procs]
        for f in files.values():
            if f is not None:
                f.close()
        assert codes == [0, 0, 0], codes
