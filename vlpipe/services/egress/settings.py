"""Egress settings: the shared `VLPIPE_*` settings plus `VLPIPE_EGRESS_*` and `VLPIPE_GATEWAY_*`."""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import SettingsConfigDict

from vlpipe.shared.config import ServiceSettings


class EgressSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="VLPIPE_", extra="ignore", populate_by_name=True)

    http_port: int = Field(default=9103, description="Health and metrics port.")
    partial_ms: float = Field(
        default=200,
        ge=0,
        validation_alias=AliasChoices("VLPIPE_EGRESS_PARTIAL_MS", "partial_ms"),
        description="At most one partial transcript per item in this much event time.",
    )
    gateway: bool = Field(
        default=True,
        validation_alias=AliasChoices("VLPIPE_GATEWAY", "gateway"),
        description="Serve the WebSocket gateway (and the web console) in this process.",
    )
    gateway_host: str = Field(
        default="127.0.0.1",
        validation_alias=AliasChoices("VLPIPE_GATEWAY_HOST", "gateway_host"),
        description="Gateway listen address. Without tokens only loopback is allowed.",
    )
    gateway_port: int = Field(
        default=8080, ge=0, le=65535,
        validation_alias=AliasChoices("VLPIPE_GATEWAY_PORT", "gateway_port"),
        description="Gateway listen port; 0 picks a free one.",
    )  # fmt: skip
    gateway_tokens: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("VLPIPE_GATEWAY_TOKENS", "gateway_tokens"),
        description="Comma-separated tokens clients must present (?token= or Bearer).",
    )
    client_buffer: int = Field(
        default=200,
        ge=4,
        validation_alias=AliasChoices("VLPIPE_GATEWAY_CLIENT_BUFFER", "client_buffer"),
        description="Messages queued per client before the slow-client policy applies.",
    )
    slow_client: Literal["drop_audio", "disconnect"] = Field(
        default="drop_audio",
        validation_alias=AliasChoices("VLPIPE_GATEWAY_SLOW_CLIENT", "slow_client"),
        description="drop_audio: drop the oldest queued audio and tell the client; "
        "disconnect: close the socket (1013). Text is never dropped: a client whose queue is "
        "full of text is disconnected either way.",
    )

    def tokens(self) -> set[str]:
        raw = self.gateway_tokens.get_secret_value() if self.gateway_tokens else ""
        return {t.strip() for t in raw.split(",") if t.strip()}
