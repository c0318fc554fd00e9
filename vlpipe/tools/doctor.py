"""`vlpipe doctor`: check what the pipeline needs and say in plain words what is wrong.

Checks Redis (reachable, version, persistence), the upstream (reachable, and whether it
accepts the configured credential), the credential itself, and the versions of the
libraries the pipeline relies on. Exits 1 when something needs fixing.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from vlpipe.services.broker.settings import BrokerSettings
from vlpipe.services.broker.upstream import UpstreamError, make_auth, open_upstream, realtime_url
from vlpipe.shared.config import redact_url
from vlpipe.shared.streams import connect

OK, WARN, FAIL = "ok", "warning", "problem"


async def check_redis(settings: BrokerSettings) -> tuple[str, str]:
    url = settings.redis_url.get_secret_value()
    redis = connect(
        url, name="vlpipe-doctor", tls=settings.redis_tls, cluster=settings.redis_cluster
    )
    try:
        info: Any = await asyncio.wait_for(redis.info(), timeout=5)
    except Exception as exc:
        return FAIL, (f"cannot reach Redis at {redact_url(url)} ({type(exc).__name__}: {exc}). "
                      "Start one, set VLPIPE_REDIS_URL, or use `vlpipe up`, which starts its own.")  # fmt: skip
    finally:
        await redis.aclose()
    version = str(info.get("redis_version", "?"))
    major = int(version.split(".")[0]) if version[0].isdigit() else 0
    if major < 6:
        return FAIL, f"Redis {version} is too old: streams with XAUTOCLAIM need Redis 6.2 or later"
    if not info.get("aof_enabled"):
        return WARN, (f"Redis {version} at {redact_url(url)} answers, but AOF is off: "
                      "a restart may lose the last entries (appendonly yes)")  # fmt: skip
    return OK, f"Redis {version} at {redact_url(url)}" + (
        ", AOF on" if info.get("aof_enabled") else ""
    )


async def check_upstream(settings: BrokerSettings) -> tuple[str, str]:
    url = realtime_url(settings)
    try:
        auth = make_auth(settings)
    except ValueError as exc:
        return FAIL, str(exc)
    try:
        ws = await open_upstream(settings, auth, url)
    except UpstreamError as exc:
        hint = (" Check VLPIPE_BROKER_API_KEY / AZURE_COGNITIVE_SERVICES_KEY, or the identity's "
                "role on the resource (Cognitive Services User).") if exc.refused else (
                " Is the endpoint right? Without one the broker expects the local engine "
                "(`vlpipe engine`) at http://127.0.0.1:8765.")  # fmt: skip
        return FAIL, f"{settings.endpoint}: {exc}.{hint}"
    finally:
        await auth.close()
    await ws.close()
    how = type(auth).__name__.replace("Auth", "").lower() or "no"
    return OK, f"the upstream at {settings.endpoint} accepted a session ({how} credential)"


async def check_versions() -> tuple[str, str]:
    names = [
        "vlpipe",
        "redis",
        "websockets",
        "pydantic",
        "azure-identity",
        "opentelemetry-sdk",
        "soxr",
        "av",
    ]
    found = []
    missing = []
    for name in names:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    python = f"Python {sys.version.split()[0]}"
    if missing:
        return FAIL, f"missing packages: {', '.join(missing)} (pip install -e .)"
    return OK, ", ".join([python, *found])


async def run() -> int:
    settings = BrokerSettings()
    checks: list[tuple[str, Callable[[BrokerSettings], Awaitable[tuple[str, str]]]]] = [
        ("redis", check_redis), ("upstream", check_upstream),
    ]  # fmt: skip
    worst = OK
    for name, check in checks:
        level, message = await check(settings)
        print(f"[{level:^7}] {name:<9} {message}")
        worst = FAIL if FAIL in (worst, level) else (WARN if WARN in (worst, level) else OK)
    level, message = await check_versions()
    print(f"[{level:^7}] {'versions':<9} {message}")
    return 1 if FAIL in (worst, level) else 0


def main(argv: list[str]) -> int:
    argparse.ArgumentParser(prog="vlpipe doctor", description=__doc__).parse_args(argv)
    return asyncio.run(run())
