"""Typed settings from `VLPIPE_*` environment variables, one model per service.

Every service's settings class derives from `ServiceSettings`, so the Redis connection,
the key prefix, logging and the health/metrics port read the same variables everywhere.
Secrets are `SecretStr`: they never appear in `repr`, logs or `vlpipe config`.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from vlpipe.shared.keys import StreamKeys
from vlpipe.shared.redis_tls import RedisTLS
from vlpipe.shared.retention import Retention


class ServiceSettings(BaseSettings):
    """Settings every service shares. Environment: `VLPIPE_<FIELD>` (case-insensitive)."""

    model_config = SettingsConfigDict(env_prefix="VLPIPE_", extra="ignore")

    redis_url: SecretStr = Field(
        default=SecretStr("redis://127.0.0.1:6379/0"),
        description="Redis URL: redis:// or rediss://, optionally with ACL user:password.",
    )
    redis_cluster: bool = Field(
        default=False,
        description="Redis Cluster: VLPIPE_REDIS_URL names any node (a seed), and every "
        "client follows the cluster's slots (redis-py's cluster client).",
    )
    redis_ca_file: str | None = Field(
        default=None,
        description="With rediss://: the CA certificate(s) that sign the server's certificate "
        "(PEM); unset, the system's CAs.",
    )
    redis_cert_file: str | None = Field(
        default=None, description="With rediss://: this client's certificate (PEM), if asked."
    )
    redis_key_file: str | None = Field(
        default=None, description="With rediss://: the private key of the client certificate."
    )
    redis_wait_replicas: int = Field(
        default=0,
        ge=0,
        description="After each batch of fenced writes (outputs and checkpoints), wait until "
        "this many replicas have it (WAIT), up to redis_wait_ms; 0: do not wait. Narrows "
        "what a failover can lose; costs a replica round trip per batch.",
    )
    redis_wait_ms: int = Field(
        default=100, ge=1, description="The longest a batch of writes waits for its replicas."
    )
    stream_prefix: str = Field(default="vl", description="Prefix of every Redis key.")
    replica_name: str = Field(
        default="",
        description="This replica's consumer name; empty means hostname-pid.",
    )
    log_level: str = Field(default="INFO", description="DEBUG, INFO, WARNING or ERROR.")
    http_host: str = Field(default="0.0.0.0", description="Health and metrics listen address.")
    http_port: int = Field(default=0, description="Health and metrics port; 0 picks a free one.")
    # Stream runtime tuning (see vlpipe.shared.streams).
    read_batch: int = Field(default=64, ge=1, description="Entries per XREAD/XREADGROUP.")
    block_ms: int = Field(default=1000, ge=1, description="How long a read blocks, in ms.")
    read_interval_ms: float = Field(
        default=4.0,
        ge=0,
        le=100,
        description="Least time between the starts of two reads of the sessions' streams, in "
        "ms (0: none). Each read names every session's stream, and calls whose 20 ms clocks "
        "are not aligned would wake it for nearly every chunk; a chunk waits at most this.",
    )
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
    redis_timeout_s: float = Field(
        default=5.0,
        gt=0,
        description="A Redis reply later than this fails the call and is retried: a server "
        "that stops answering is noticed like one that went away.",
    )
    watchdog_s: float = Field(
        default=60.0,
        gt=0,
        description="/healthz fails when a work loop has been stuck this long while Redis "
        "answers (a wedged replica, for Kubernetes to restart).",
    )
    consumer_idle_s: float = Field(
        default=3600.0,
        gt=0,
        description="A consumer of the sessions group idle this long with nothing pending "
        "(a replica long gone) is removed.",
    )
    transcripts_max_entries: int = Field(
        default=200_000,
        ge=100,
        description="Memory budget of the shared transcripts stream, in entries. It is "
        "trimmed behind its slowest consumer group; only this budget trims entries a group "
        "has not read, and that is reported (vl:dead, a metric, a warning).",
    )
    tool_calls_max_entries: int = Field(
        default=50_000,
        ge=100,
        description="Memory budget of the shared tool-calls stream, in entries (as above).",
    )

    @model_validator(mode="after")
    def _reads_block_less_than_the_timeout(self) -> ServiceSettings:
        if self.block_ms >= self.redis_timeout_s * 1000:
            raise ValueError(
                f"block_ms ({self.block_ms}) must be below redis_timeout_s "
                f"({self.redis_timeout_s:g} s): a blocking read would time out"
            )
        return self

    @property
    def keys(self) -> StreamKeys:
        return StreamKeys(self.stream_prefix)

    @property
    def redis_tls(self) -> RedisTLS:
        return RedisTLS(self.redis_ca_file, self.redis_cert_file, self.redis_key_file)

    @property
    def retention(self) -> Retention:
        return Retention(
            transcripts_cap=self.transcripts_max_entries,
            tool_calls_cap=self.tool_calls_max_entries,
        )

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


class OutputsSettings(ServiceSettings):
    """What the broker and egress share: how they make a session's outputs (which of them
    makes them is the broker's `outputs_by`)."""

    partial_ms: float = Field(
        default=200,
        ge=0,
        validation_alias=AliasChoices(
            "VLPIPE_PARTIAL_MS", "VLPIPE_EGRESS_PARTIAL_MS", "partial_ms"
        ),
        description="At most one partial transcript per item in this much event time.",
    )


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
