"""What every service process gets: settings, health and metrics over HTTP, JSON logs."""

from __future__ import annotations

import asyncio
import gc
import io
import json
import logging
import signal
import subprocess
import sys
import urllib.request

import pytest
from opentelemetry.metrics import CallbackOptions

from tests.shared.procs import ROOT, start_worker
from vlpipe.shared import logs
from vlpipe.shared.config import ServiceSettings, redact_url
from vlpipe.shared.keys import StreamKeys
from vlpipe.shared.redis_server import RedisServer, free_port
from vlpipe.shared.service import GcPauses, ServiceContext, serve_health
from vlpipe.shared.streams import DeadLetters, connect


def test_settings_come_from_vlpipe_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLPIPE_REDIS_URL", "rediss://app:s3cret@redis.example:6380/2")
    monkeypatch.setenv("VLPIPE_STREAM_PREFIX", "prod")
    monkeypatch.setenv("VLPIPE_MAX_DELIVERIES", "7")
    settings = ServiceSettings()
    assert settings.keys.sessions == "prod:sessions"
    assert settings.max_deliveries == 7
    assert settings.redis_url.get_secret_value().startswith("rediss://app:s3cret@")
    shown = settings.redacted()
    assert shown["redis_url"] == "rediss://app:***@redis.example:6380/2"
    assert "s3cret" not in repr(settings) and "s3cret" not in json.dumps(shown)


def test_invalid_settings_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLPIPE_MAX_DELIVERIES", "0")
    with pytest.raises(ValueError, match="max_deliveries"):
        ServiceSettings()


def test_vlpipe_config_prints_effective_settings_with_secrets_redacted() -> None:
    env = {"VLPIPE_REDIS_URL": "redis://:hunter2@localhost:6379/0", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-m", "vlpipe", "config"], cwd=ROOT, env=env, capture_output=True,
        text=True, check=True,
    ).stdout  # fmt: skip
    shown = json.loads(out)
    assert shown["redis_url"] == "redis://:***@localhost:6379/0"
    assert "hunter2" not in out


def test_redact_url_keeps_urls_without_passwords() -> None:
    assert redact_url("redis://localhost:6379/0") == "redis://localhost:6379/0"
    assert redact_url("rediss://user:pw@h:1") == "rediss://user:***@h:1"


def test_json_logs_carry_session_and_never_audio_bytes_or_secrets() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter("ingest"))
    logger = logging.getLogger("vlpipe.test.logs")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    token = logs.current_session.set("call-7")
    try:
        logger.info(
            "chunk handled",
            extra={"audio": b"\x00\x01secret-audio", "api_key": "k-123", "frames": 3},
        )
    finally:
        logs.current_session.reset(token)
        logger.removeHandler(handler)
    line = json.loads(stream.getvalue())
    assert line["session"] == "call-7" and line["service"] == "ingest"
    assert line["frames"] == 3
    assert line["audio"] == "<14 bytes>"
    assert line["api_key"] == "***"
    assert "secret-audio" not in stream.getvalue() and "k-123" not in stream.getvalue()


async def test_health_readiness_and_metrics_endpoints(redis_url: str) -> None:
    redis = connect(redis_url)
    ctx = ServiceContext(
        name="t", settings=ServiceSettings(), redis=redis, keys=ServiceSettings().keys,
        replica="r", dead=DeadLetters(redis, ServiceSettings().keys, "t"), stop=asyncio.Event(),
    )  # fmt: skip
    upstream_ok = False

    async def upstream() -> str | None:
        return None if upstream_ok else "upstream unreachable: connection refused"

    ctx.ready_checks.append(upstream)
    port = free_port()
    server = await serve_health(ctx, "127.0.0.1", port)
    base = f"http://127.0.0.1:{port}"

    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(base + path, timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    try:
        assert await asyncio.to_thread(get, "/healthz") == (200, "ok\n")
        status, body = await asyncio.to_thread(get, "/readyz")
        assert status == 503 and "upstream unreachable" in body
        upstream_ok = True
        assert (await asyncio.to_thread(get, "/readyz"))[0] == 200
        status, body = await asyncio.to_thread(get, "/metrics")
        assert status == 200 and "# TYPE" in body
        assert (await asyncio.to_thread(get, "/nope"))[0] == 404
        ctx.fail("the claims loop died: WRONGTYPE")  # a work loop died: stop, and say so
        assert ctx.stop.is_set()
        status, body = await asyncio.to_thread(get, "/healthz")
        assert status == 503 and body == "failed: the claims loop died: WRONGTYPE\n"
    finally:
        server.close()
        await server.wait_closed()
        await redis.aclose()


async def test_healthz_fails_when_a_work_loop_is_wedged_but_not_while_redis_is_down(
    fresh_redis_server: RedisServer,
) -> None:
    redis = connect(fresh_redis_server.url, timeout_s=1)
    settings = ServiceSettings(watchdog_s=0.3, redis_timeout_s=1, block_ms=200)
    ctx = ServiceContext(
        name="t", settings=settings, redis=redis, keys=settings.keys, replica="r",
        dead=DeadLetters(redis, settings.keys, "t"), stop=asyncio.Event(),
    )  # fmt: skip
    loop = ctx.watchdog.loop("session reader")
    port = free_port()
    server = await serve_health(ctx, "127.0.0.1", port)

    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    release = asyncio.Event()

    async def wedged_turn() -> None:  # a handler that never returns
        with loop.turn():
            await release.wait()

    turn = asyncio.create_task(wedged_turn())
    try:
        assert (await asyncio.to_thread(get, "/healthz"))[0] == 200  # busy, not for long yet
        await asyncio.sleep(0.5)
        status, body = await asyncio.to_thread(get, "/healthz")
        assert status == 503 and "session reader stuck" in body
        fresh_redis_server.kill()  # now the turn may be waiting for Redis: not a wedge
        assert (await asyncio.to_thread(get, "/healthz"))[0] == 200
        assert (await asyncio.to_thread(get, "/readyz"))[0] == 503
        release.set()
        await turn
        fresh_redis_server.start()
        assert (await asyncio.to_thread(get, "/healthz"))[0] == 200  # the loop turns again
    finally:
        release.set()
        server.close()
        await server.wait_closed()
        await redis.aclose()


def test_a_service_that_does_not_stop_when_cancelled_exits_non_zero_and_says_where_it_hung(
    redis_url: str, keys: StreamKeys
) -> None:
    worker = start_worker("stubborn", redis_url, keys.prefix)
    assert worker.stderr is not None
    try:
        started = worker.stderr.readline().decode()
        assert "service started" in started, started
        worker.send_signal(signal.SIGTERM)
        # The drain (1 s) runs out, the cancellation is swallowed, 5 s later it exits.
        assert worker.wait(timeout=60) == 1
        log = worker.stderr.read().decode()
        assert "drain took too long; cancelling" in log
        assert "the service did not stop when cancelled; exiting" in log
        assert "stubborn" in log  # where the body hung
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


def test_gc_pauses_are_counted_per_generation_and_the_longest_resets_when_observed() -> None:
    pauses = GcPauses()
    gc.callbacks.append(pauses._on_gc)
    gc.disable()  # no automatic young collection in between: only the three full ones
    try:
        for _ in range(3):
            cycle: list[object] = []
            cycle.append(cycle)
            del cycle
            gc.collect()
    finally:
        gc.enable()
        gc.callbacks.remove(pauses._on_gc)
    assert pauses.total_ms[2] > 0 and pauses.total_ms[0] == pauses.total_ms[1] == 0
    longest = pauses._observe_longest(CallbackOptions())[0].value
    assert 0 < longest <= pauses.total_ms[2]
    assert pauses._observe_longest(CallbackOptions())[0].value == 0, "reset once observed"


def test_a_service_freezes_what_start_up_loaded_and_collects_its_young_less_often() -> None:
    # In a process of its own: freezing would keep this test process's objects forever.
    probe = (
        "import gc; from vlpipe.shared.service import tune_gc, GC_YOUNG_THRESHOLD; "
        "before = gc.get_freeze_count(); tune_gc(); "
        "print(before, gc.get_freeze_count(), gc.get_threshold()[0] == GC_YOUNG_THRESHOLD)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout.split()  # fmt: skip
    before, frozen, young = int(out[0]), int(out[1]), out[2]
    assert before == 0 and frozen > 10_000, "the modules and schemas loaded are frozen"
    assert young == "True"
