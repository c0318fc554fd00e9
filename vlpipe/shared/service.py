"""What every service process does around its own work.

`run_service` configures JSON logs and telemetry, connects to Redis, serves `/healthz`,
`/readyz` and `/metrics` over HTTP, turns SIGTERM/SIGINT into the `stop` event, runs the
service's body, and gives it `shutdown_grace_s` to drain before cancelling it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus

import redis.asyncio as aioredis
from opentelemetry.metrics import CallbackOptions, Observation
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from vlpipe.shared import logs, telemetry
from vlpipe.shared.config import ServiceSettings
from vlpipe.shared.keys import StreamKeys
from vlpipe.shared.progress import Watchdog
from vlpipe.shared.retention import Retention
from vlpipe.shared.streams import DeadLetters, connect

log = logging.getLogger("vlpipe.service")

ReadyCheck = Callable[[], Awaitable[str | None]]
"""Returns None when ready, or a plain-words reason why not."""


@dataclass
class ServiceContext:
    """What a service body gets: its settings, its Redis, and the stop signal."""

    name: str
    settings: ServiceSettings
    redis: aioredis.Redis
    keys: StreamKeys
    replica: str
    dead: DeadLetters
    stop: asyncio.Event
    ready_checks: list[ReadyCheck] = field(default_factory=list)
    http_port: int = 0
    watchdog: Watchdog = field(default_factory=Watchdog)
    failure: str | None = None
    """Why the service stops itself (a work loop died of an error no retry fixes): from
    then on `/healthz` fails with it and the process exits non-zero, also when its drain
    is cut short."""

    def fail(self, reason: str) -> None:
        """A work loop died: fail health checks and stop (the first reason is kept)."""
        if self.failure is None:
            self.failure = reason
            log.error("service failing", extra={"reason": reason[:500]})
        self.stop.set()

    @property
    def retention(self) -> Retention:
        return self.settings.retention


def replica_name(settings: ServiceSettings, service: str) -> str:
    return settings.replica_name or f"{service}-{socket.gethostname()}-{os.getpid()}"


def _http_response(status: HTTPStatus, body: bytes, content_type: str) -> Response:
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body)))])
    return Response(status.value, status.phrase, headers, body)


async def serve_health(ctx: ServiceContext, host: str, port: int) -> Server:
    """HTTP `/healthz` (alive: no work loop wedged), `/readyz` (Redis and the service's
    checks), `/metrics`."""

    async def redis_down() -> str | None:
        try:
            async with asyncio.timeout(min(2.0, ctx.settings.redis_timeout_s)):
                await ctx.redis.ping()
        except Exception as exc:
            return f"redis unreachable: {exc!r}"
        return None

    async def readiness() -> str | None:
        reason = await redis_down()
        if reason:
            return reason
        for check in ctx.ready_checks:
            reason = await check()
            if reason:
                return reason
        return None

    async def liveness() -> str | None:
        if ctx.failure is not None:
            return f"failed: {ctx.failure}"
        stalled = ctx.watchdog.stalled(ctx.settings.watchdog_s)
        if not stalled or await redis_down():
            return None  # waiting for Redis is not a wedge; /readyz reports the outage
        return "wedged: " + ", ".join(f"{name} stuck for {age:.0f} s" for name, age in stalled)

    async def process_request(conn: ServerConnection, request: Request) -> Response:
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            reason = await liveness()
            if reason:
                log.error("health check failed", extra={"reason": reason})
                return _http_response(
                    HTTPStatus.SERVICE_UNAVAILABLE, reason.encode() + b"\n", "text/plain"
                )
            return _http_response(HTTPStatus.OK, b"ok\n", "text/plain")
        if path == "/readyz":
            reason = await readiness()
            if reason:
                return _http_response(
                    HTTPStatus.SERVICE_UNAVAILABLE, reason.encode() + b"\n", "text/plain"
                )
            return _http_response(HTTPStatus.OK, b"ready\n", "text/plain")
        if path == "/metrics":
            return _http_response(HTTPStatus.OK, generate_latest(), CONTENT_TYPE_LATEST)
        return _http_response(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")

    async def no_websocket(conn: ServerConnection) -> None:  # pragma: no cover
        await conn.close()

    return await serve(no_websocket, host, port, process_request=process_request)


CANCEL_WAIT_S = 5.0
"""How long a cancelled body may take to unwind before the process exits regardless."""


async def _cancelled_or_exit(task: asyncio.Task[None]) -> None:
    """Wait for the cancelled body; if it has not ended within `CANCEL_WAIT_S` (something
    in it kept running through the cancellation), log where every task stands and exit
    at once, non-zero: a process that neither works nor ends would hold its sessions'
    streams and its port until killed by hand."""
    await asyncio.wait({task}, timeout=CANCEL_WAIT_S)
    if task.done():
        return
    stacks = {
        t.get_name(): [f"{f.f_code.co_filename}:{f.f_lineno} {f.f_code.co_name}"
                       for f in t.get_stack(limit=4)]
        for t in asyncio.all_tasks() if t is not asyncio.current_task()
    }  # fmt: skip
    log.error("the service did not stop when cancelled; exiting", extra={"tasks": stacks})
    logging.shutdown()
    os._exit(1)


def run_process(
    name: str, settings: ServiceSettings, body: Callable[[ServiceContext], Awaitable[None]]
) -> int:
    """A service process's whole life (`run_service`) on the stock asyncio loop.

    uvloop was measured (no gain above the noise at 25 sessions) and dropped: writing to a
    connection the network had reset raised `RuntimeError` instead of a connection error
    under redis-py, which turned a Redis outage into handler failures."""
    return asyncio.run(run_service(name, settings, body))


GC_YOUNG_THRESHOLD = 10_000
"""Allocations of container objects between two collections of the youngest generation
(CPython's default is 700)."""


def tune_gc() -> None:
    """CPython's cyclic collector, set for a long-lived process that answers in real time.

    * What start-up loaded (modules, pydantic schemas, the telemetry SDK, the clients:
      most of a service's tracked objects before any session) moves to the permanent
      generation (`gc.freeze`), so no collection scans it again. A full collection of the
      broker at 250 sessions walked all of it, a pause of 100-200 ms in the middle of
      every session's audio.
    * The youngest generation is collected every `GC_YOUNG_THRESHOLD` allocations instead
      of 700: at real-time pace most objects (a chunk's entry, an event's dict) are gone
      before a collection, so fewer collections do less work, and fewer objects survive to
      the older generations whose collections are the long pauses."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)
    GcPauses().watch()


class GcPauses:
    """How long the collector stopped the process, for `/metrics`.

    * `vlpipe.process.gc_pause` (ms, by generation): the total, a counter (with
      `python_gc_collections_total`, the mean pause);
    * `vlpipe.process.gc_longest_pause` (ms): the longest pause since the metrics were last
      collected (a scrape), so each scrape shows the worst of its interval.

    The collector's callback only adds numbers: it may run inside any allocation, also
    inside the metrics SDK's own locked code, so it records into no instrument itself."""

    def __init__(self) -> None:
        self.total_ms = [0.0, 0.0, 0.0]
        self.longest_ms = 0.0
        self._started = 0.0

    def watch(self) -> None:
        gc.callbacks.append(self._on_gc)
        meter = telemetry.meter("process")
        meter.create_observable_counter(
            "vlpipe.process.gc_pause", unit="ms",
            description="Time the cyclic garbage collector stopped the process",
            callbacks=[lambda _: [Observation(ms, {"generation": g})
                                  for g, ms in enumerate(self.total_ms)]],
        )  # fmt: skip
        meter.create_observable_gauge(
            "vlpipe.process.gc_longest_pause", unit="ms",
            description="The longest garbage collection pause since the last collection "
            "of the metrics", callbacks=[self._observe_longest],
        )  # fmt: skip

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause = (time.perf_counter() - self._started) * 1000
        self.total_ms[info["generation"]] += pause
        if pause > self.longest_ms:
            self.longest_ms = pause

    def _observe_longest(self, _: CallbackOptions) -> list[Observation]:
        longest, self.longest_ms = self.longest_ms, 0.0
        return [Observation(longest)]


async def run_service(
    name: str,
    settings: ServiceSettings,
    body: Callable[[ServiceContext], Awaitable[None]],
) -> int:
    """Run one service until SIGTERM/SIGINT; return the process exit code."""
    logs.configure(name, settings.log_level)
    telemetry.configure(name)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    redis = connect(
        settings.redis_url.get_secret_value(),
        name=f"vlpipe-{name}",
        timeout_s=settings.redis_timeout_s,
        tls=settings.redis_tls,
        cluster=settings.redis_cluster,
    )
    keys = settings.keys
    ctx = ServiceContext(
        name=name,
        settings=settings,
        redis=redis,
        keys=keys,
        replica=replica_name(settings, name),
        dead=DeadLetters(redis, keys, name, maxlen=settings.retention.dead),
        stop=stop,
    )
    health = await serve_health(ctx, settings.http_host, settings.http_port)
    ctx.http_port = next(iter(health.sockets)).getsockname()[1]
    log.info(
        "service started",
        extra={"replica": ctx.replica, "http_port": ctx.http_port, "prefix": keys.prefix},
    )
    tune_gc()
    task: asyncio.Task[None] = asyncio.ensure_future(body(ctx))
    stopper = asyncio.create_task(stop.wait())
    code = 0
    try:
        done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()
        else:
            log.info("stopping: draining", extra={"grace_s": settings.shutdown_grace_s})
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout=settings.shutdown_grace_s)
            except TimeoutError:
                log.warning("drain took too long; cancelling")
                task.cancel()
                await _cancelled_or_exit(task)
    except Exception:
        log.exception("service failed")
        code = 1
    finally:
        if ctx.failure is not None:
            code = 1
        stopper.cancel()
        health.close()
        await health.wait_closed()
        await redis.aclose()
        telemetry.shutdown()
        log.info("service stopped", extra={"exit_code": code})
    return code
