"""API keys and Entra ID tokens: the upstream checks them; refusals are clear and final."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from typing import Any

import redis.asyncio as aioredis
from azure.core.credentials import AccessToken
from azure.core.credentials_async import AsyncTokenCredential
from azure.core.exceptions import ClientAuthenticationError

from tests.broker.helpers import (
    running_broker,
    start_broker,
    start_session,
    statuses,
    types,
    wait_for_event,
)
from vlpipe.services.broker.settings import BrokerSettings
from vlpipe.services.broker.upstream import TokenAuth, make_auth, realtime_url
from vlpipe.services.engine.server import running_engine
from vlpipe.shared.keys import StreamKeys

KEY = "engine-secret-7f3a"


class FakeCredential(AsyncTokenCredential):
    """An Entra ID credential of the test's own: hands out `token`, valid for `ttl_s`."""

    def __init__(self, token: str = KEY, ttl_s: float = 3600, fail: str | None = None) -> None:
        self.token, self.ttl_s, self.fail = token, ttl_s, fail
        self.scopes: list[tuple[str, ...]] = []

    async def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        self.scopes.append(scopes)
        if self.fail:
            raise ClientAuthenticationError(self.fail)
        return AccessToken(self.token, int(time.time() + self.ttl_s))

    async def close(self) -> None:
        return None


async def test_an_entra_token_is_sent_as_bearer_and_cached(
    redis_url: str, redis: aioredis.Redis, keys: StreamKeys
) -> None:
    credential = FakeCredential()
    async with running_engine(model="echo", api_key=KEY) as engine, running_broker(
        redis_url, keys, engine.endpoint, credential=credential,
        token_scope="https://cognitiveservices.azure.com/.default",
    ) as broker:  # fmt: skip
        for sid in ("e1", "e2"):
            await start_session(redis, keys, sid)
            await wait_for_event(redis, keys, sid, "session.updated")
    assert isinstance(broker.auth, TokenAuth)
    assert credential.scopes == [("https://cognitiveservices.azure.com/.default",)]


async def test_a_token_near_its_expiry_is_refreshed_before_use(
    redis_url: str, redis: aioredis.Redis, keys: StreamKeys
) -> None:
    # Valid for 60.5 s, refreshed when less than 60 s remain: stale half a second after.
    credential = FakeCredential(ttl_s=60.5)
    async with (
        running_engine(model="echo", api_key=KEY) as engine,
        running_broker(
            redis_url, keys, engine.endpoint, credential=credential, token_refresh_margin_s=60
        ),
    ):
        await start_session(redis, keys, "f1")
        await wait_for_event(redis, keys, "f1", "session.updated")
        assert len(credential.scopes) == 1
        await asyncio.sleep(0.6)
        await start_session(redis, keys, "f2")
        await wait_for_event(redis, keys, "f2", "session.updated")
    assert len(credential.scopes) == 2


async def test_a_wrong_token_is_refused_by_the_upstream(
    redis_url: str, redis: aioredis.Redis, keys: StreamKeys
) -> None:
    credential = FakeCredential(token="someone-elses-token")
    async with (
        running_engine(model="echo", api_key=KEY) as engine,
        running_broker(redis_url, keys, engine.endpoint, credential=credential),
    ):
        await start_session(redis, keys, "w1")
        evs = await wait_for_event(redis, keys, "w1", "vlpipe.session.ended")
    assert evs[-1].event["reason"] == "upstream_refused_credentials"
    assert "session.created" not in types(evs)
    errors = [s.message for s in await statuses(redis, keys, "w1") if s.kind == "error"]
    assert errors and all("refused the credential: HTTP 401" in m for m in errors)
    assert all("someone-elses-token" not in m for m in errors)


async def test_an_expired_credential_ends_the_session_with_a_clear_status(
    redis_url: str, redis: aioredis.Redis, keys: StreamKeys
) -> None:
    credential = FakeCredential(
        fail="AADSTS700024: client assertion is not within its valid time range"
    )
    async with (
        running_engine(model="echo", api_key=KEY) as engine,
        running_broker(redis_url, keys, engine.endpoint, credential=credential),
    ):
        await start_session(redis, keys, "x1")
        evs = await wait_for_event(redis, keys, "x1", "vlpipe.session.ended")
    assert evs[-1].event["reason"] == "upstream_refused_credentials"
    errors = [s.message for s in await statuses(redis, keys, "x1") if s.kind == "error"]
    assert errors and "could not get an Entra ID token" in errors[0]
    assert "AADSTS700024" in errors[0]


async def test_a_refused_key_is_reported_and_the_broker_does_not_crash_loop(
    redis_url: str, redis: aioredis.Redis, keys: StreamKeys
) -> None:
    async with running_engine(model="echo", api_key=KEY) as engine:
        broker = start_broker(redis_url, keys.prefix, engine.endpoint, stderr=subprocess.PIPE,
                              VLPIPE_BROKER_API_KEY="wrong-key", VLPIPE_HTTP_PORT="0")  # fmt: skip
        try:
            for sid in ("k1", "k2"):
                await start_session(redis, keys, sid)
                evs = await wait_for_event(redis, keys, sid, "vlpipe.session.ended")
                assert evs[-1].event["reason"] == "upstream_refused_credentials"
            assert broker.poll() is None, "the broker keeps running"
            status = await statuses(redis, keys, "k1")
            assert any("refused the credential: HTTP 401" in s.message for s in status)
        finally:
            broker.send_signal(signal.SIGTERM)
            assert broker.wait(20) == 0
        assert broker.stderr is not None
        log = broker.stderr.read().decode()
        assert "wrong-key" not in log


def test_the_url_and_credentials_follow_the_settings() -> None:
    settings = BrokerSettings(endpoint="https://res.services.ai.azure.com/", model="gpt-realtime")
    assert realtime_url(settings) == (
        "wss://res.services.ai.azure.com/voice-live/realtime?api-version=2025-10-01&model=gpt-realtime"
    )
    agent = BrokerSettings(endpoint="https://res.services.ai.azure.com", agent_name="helpdesk",
                           agent_project="proj")  # fmt: skip
    assert "agent-name=helpdesk&agent-project-name=proj" in realtime_url(agent)
    assert "model=" not in realtime_url(agent)
    assert type(make_auth(BrokerSettings(endpoint="http://127.0.0.1:8765"))).__name__ == "NoAuth"
    assert type(make_auth(settings, FakeCredential())).__name__ == "TokenAuth"
    keyed = make_auth(BrokerSettings(endpoint="https://x", api_key="k"))
    assert "k" not in repr(keyed).replace("KeyAuth", "")


def test_the_azure_variable_names_are_read(monkeypatch: Any) -> None:
    monkeypatch.setenv("AZURE_COGNITIVE_SERVICES_ENDPOINT", "https://res.services.ai.azure.com")
    monkeypatch.setenv("AZURE_COGNITIVE_SERVICES_KEY", "azure-key")
    for name in [n for n in os.environ if n.startswith("VLPIPE_BROKER_")]:
        monkeypatch.delenv(name)
    settings = BrokerSettings()
    assert settings.endpoint == "https://res.services.ai.azure.com"
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "azure-key"
    monkeypatch.setenv("VLPIPE_BROKER_ENDPOINT", "http://127.0.0.1:9999")
    assert BrokerSettings().endpoint == "http://127.0.0.1:9999"
    assert "azure-key" not in str(BrokerSettings().redacted())
