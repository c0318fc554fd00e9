"""The Voice Live WebSocket: its URL, its credentials and opening it.

The broker speaks the protocol with the `websockets` library directly (not the SDK), so a
connection costs a socket and a few buffers, and one process holds hundreds.

Credentials: an API key goes in the `api-key` header; otherwise an Entra ID token from an
`AsyncTokenCredential` (`DefaultAzureCredential` unless one is given) goes in
`Authorization: Bearer`. Tokens are cached and fetched again `refresh_margin_s` before they
expire; neither keys nor tokens are ever logged.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlencode, urlsplit, urlunsplit

import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import InvalidStatus

from vlpipe.services.broker.settings import BrokerSettings
from vlpipe.shared.config import is_loopback


class UpstreamError(Exception):
    """Opening the upstream failed. `refused` marks a credential problem (401/403)."""

    def __init__(self, message: str, *, refused: bool = False, status: int | None = None):
        super().__init__(message)
        self.refused = refused
        self.status = status


class Auth(Protocol):
    async def headers(self) -> dict[str, str]: ...

    async def close(self) -> None: ...


class NoAuth:
    async def headers(self) -> dict[str, str]:
        return {}

    async def close(self) -> None:
        return None


@dataclass
class KeyAuth:
    key: str

    async def headers(self) -> dict[str, str]:
        return {"api-key": self.key}

    async def close(self) -> None:
        return None

    def __repr__(self) -> str:  # never the key
        return "KeyAuth(***)"


class TokenAuth:
    """Bearer tokens from an `AsyncTokenCredential`, cached until near expiry."""

    def __init__(self, credential: Any, scope: str, refresh_margin_s: float = 300.0) -> None:
        self.credential = credential
        self.scope = scope
        self.refresh_margin_s = refresh_margin_s
        self._token: str | None = None
        self._expires_on = 0.0
        self._lock = asyncio.Lock()
        self.fetches = 0

    async def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {await self.token()}"}

    async def token(self) -> str:
        async with self._lock:
            if self._token is None or time.time() >= self._expires_on - self.refresh_margin_s:
                try:
                    access = await self.credential.get_token(self.scope)
                except Exception as exc:  # azure-identity raises many kinds
                    raise UpstreamError(
                        f"could not get an Entra ID token for {self.scope}: "
                        f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
                        refused=True,
                    ) from None
                self.fetches += 1
                self._token = access.token
                self._expires_on = float(access.expires_on)
            return self._token

    async def close(self) -> None:
        close = getattr(self.credential, "close", None)
        if close is not None:
            await close()

    def __repr__(self) -> str:
        return f"TokenAuth(scope={self.scope!r})"


def make_auth(settings: BrokerSettings, credential: Any = None) -> Auth:
    """The credential the settings ask for (see `BrokerSettings.auth`)."""
    mode = settings.auth
    if mode == "auto":
        if settings.api_key is not None:
            mode = "key"
        elif credential is None and is_loopback(urlsplit(settings.endpoint).hostname or ""):
            mode = "none"
        else:
            mode = "entra"
    if mode == "none":
        return NoAuth()
    if mode == "key":
        if settings.api_key is None:
            raise ValueError("VLPIPE_BROKER_AUTH=key needs VLPIPE_BROKER_API_KEY")
        return KeyAuth(settings.api_key.get_secret_value())
    if credential is None:
        from azure.identity.aio import DefaultAzureCredential

        credential = DefaultAzureCredential()
    return TokenAuth(credential, settings.token_scope, settings.token_refresh_margin_s)


def realtime_url(settings: BrokerSettings) -> str:
    """`{endpoint}/voice-live/realtime?api-version=...&model=...` (or the agent's query)."""
    parts = urlsplit(settings.endpoint.strip())
    scheme = {"https": "wss", "http": "ws"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss"):
        raise ValueError(f"endpoint {settings.endpoint!r}: expected an http(s) or ws(s) URL")
    query: dict[str, str] = {"api-version": settings.api_version}
    if settings.agent_name and settings.agent_project:
        query["agent-name"] = settings.agent_name
        query["agent-project-name"] = settings.agent_project
        if settings.agent_version:
            query["agent-version"] = settings.agent_version
    else:
        query["model"] = settings.model
    path = parts.path.rstrip("/")
    if not path.endswith("/voice-live/realtime"):
        path += "/voice-live/realtime"
    return urlunsplit((scheme, parts.netloc, path, urlencode(query), ""))


async def open_upstream(settings: BrokerSettings, auth: Auth, url: str) -> ClientConnection:
    """Open one session's socket; failures become an `UpstreamError` naming the cause."""
    headers = await auth.headers()
    try:
        return await asyncio.wait_for(
            websockets.connect(
                url,
                additional_headers=headers,
                ping_interval=settings.ping_interval_s,
                ping_timeout=settings.ping_timeout_s,
                max_size=settings.max_message_bytes,
                max_queue=64,
                open_timeout=None,
                close_timeout=2,
                compression=None,
                user_agent_header="vlpipe-broker",
            ),
            timeout=settings.connect_timeout_s,
        )
    except InvalidStatus as exc:
        status = exc.response.status_code
        body = (
            exc.response.body.decode("utf-8", "replace").strip()[:300] if exc.response.body else ""
        )
        refused = status in (401, 403)
        what = "refused the credential" if refused else "rejected the connection"
        raise UpstreamError(
            f"upstream {what}: HTTP {status}" + (f" ({body})" if body else ""),
            refused=refused,
            status=status,
        ) from None
    except TimeoutError:
        raise UpstreamError(
            f"upstream did not answer within {settings.connect_timeout_s:g} s"
        ) from None
    except (OSError, websockets.InvalidHandshake, websockets.InvalidURI) as exc:
        raise UpstreamError(f"cannot reach the upstream: {type(exc).__name__}: {exc}") from None


async def reachable(url: str, within_s: float = 2.0) -> bool:
    """Whether the upstream's host accepts TCP connections (for /readyz)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "wss" else 80)
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(parts.hostname, port), timeout=within_s
        )
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True
