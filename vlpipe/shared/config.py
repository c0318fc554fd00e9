"""Typed settings from `VLPIPE_*` environment variables, one model per service.

Every service's settings class derives from `ServiceSettings`, so the Redis connection,
the key prefix, logging and the health/metrics port read the same variables everywhere.
Secrets are `SecretStr`: they never appear in `repr`, logs or `vlpipe config`.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from vlpipe.shared.keys import StreamKeys


class ServiceSettings(BaseSettings):
    """Settings every service shares. Environment: `VLPIPE_<FIELD>` (case-insensitive)."""

    model_config = SettingsConfigDict(env_prefix="VLPIPE_", extra="ignore")

    redis_url: SecretStr = Field(
        default=SecretStr("redis://127.0.0.1:6379/0"),
        description="Redis URL: redis:// or rediss://, optionally with ACL user:password.",
    )
    stream_prefix: str = Field(default="vl", description="Prefix of every Redis key.")
    replica_name: str = Field(
        default="",
        description="This replica's consumer name; empty means hostname-pid.",
    )
    log_level: str = "INFO"
    http_host: str = Field(default="0.0.0.0", description="Health and metrics listen address.")
    http_port: int = Field(default=0, description="Health and metrics port; 0 picks a free one.")
    # Stream runtime tuning (see vlpipe.shared.streams).
    read_batch: int = Field(default=64, ge=1, description="Entries per XREAD/XREADGROUP.")
    block_ms: int = Field(default=1000, ge=1, description="How long a read blocks, in ms.")
    max_deliveries: int = Field(
        default=5, ge=1, description="Deliveries before a failing entry is dead-lettered."
    )
    claim_idle_ms: int = Field(
        default=15000,
        ge=100,
        description="Idle time after which a dead consumer's entries are claimed.",
    )
    heartbeat_ms: int = Field(
        default=2000, ge=50, description="Session ownership heartbeat period."
    )
    shutdown_grace_s: float = Field(default=10.0, gt=0, description="Drain budget on SIGTERM.")

    @property
    def keys(self) -> StreamKeys:
        return StreamKeys(self.stream_prefix)

    def redacted(self) -> dict[str, Any]:
        """The effective settings with secrets (and passwords inside URLs) masked."""
        out: dict[str, Any] = {}
        for name, value in self:
            if isinstance(value, SecretStr):
                raw = value.get_secret_value()
                out[name] = redact_url(raw) if "://" in raw else ("***" if raw else "")
            else:
                out[name] = value
        return out


def redact_url(url: str) -> str:
    """`url` with any password replaced by `***` (the user name is kept)."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user + ':' if user else ':'}***@{host}"


def is_loopback(host: str) -> bool:
    """True if `host` names only the loopback interface."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
