"""Egress settings: the shared `VLPIPE_*` settings plus `VLPIPE_EGRESS_*` and `VLPIPE_GATEWAY_*`."""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import SettingsConfigDict

from vlpipe.services.egress.limits import LimitSettings
from vlpipe.shared.config import OutputsSettings


class EgressSettings(OutputsSettings):
    model_config = SettingsConfigDict(env_prefix="VLPIPE_", extra="ignore", populate_by_name=True)

    http_port: int = Field(default=9103, description="Health and metrics port.")
    gateway: bool = Field(
        default=True,
        validation_alias=AliasChoices("VLPIPE_GATEWAY", "gateway"),
        description="Serve the WebSocket gateway (and the web console) in this process.",
    )
    gateway_host: str = Field(
        default="127.0.0.1",
        validation_alias=AliasChoices("VLPIPE_GATEWAY_HOST", "gateway_host"),
        description="Gateway listen address. Without tokens or a signing key only loopback is "
        "allowed.",
    )
    gateway_port: int = Field(
        default=8080, ge=0, le=65535,
        validation_alias=AliasChoices("VLPIPE_GATEWAY_PORT", "gateway_port"),
        description="Gateway listen port; 0 picks a free one.",
    )  # fmt: skip
    gateway_tokens: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("VLPIPE_GATEWAY_TOKENS", "gateway_tokens"),
        description="Comma-separated static operator tokens; each has the admin scope.",
    )
    signing_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("VLPIPE_GATEWAY_SIGNING_KEY", "signing_key"),
        description="HS256 key (at least 32 bytes) of the scoped session tokens "
        "(`vlpipe token`); shared by every egress replica and the app backends that mint them.",
    )
    audience: str | None = Field(
        default=None,
        validation_alias=AliasChoices("VLPIPE_GATEWAY_AUDIENCE", "audience"),
        description="When set, a token's `aud` must name it (one deployment's tokens are "
        "refused by another's).",
    )
    origins: str = Field(
        default="",
        validation_alias=AliasChoices("VLPIPE_GATEWAY_ORIGINS", "origins"),
        description="Comma-separated origins whose pages may open sockets, besides the "
        "gateway's own; clients that send no Origin are not browsers and are admitted.",
    )
    allow_query_token: bool = Field(
        default=False,
        validation_alias=AliasChoices("VLPIPE_GATEWAY_ALLOW_QUERY_TOKEN", "allow_query_token"),
        description="Accept tokens in the URL (?token=, /twilio/TOKEN), which proxies and "
        "access logs record. Off: only the Authorization header and the subprotocol.",
    )
    console_token_ttl_s: float = Field(
        default=300, gt=0,
        validation_alias=AliasChoices("VLPIPE_GATEWAY_CONSOLE_TOKEN_TTL_S", "console_token_ttl_s"),
        description="Life of the call token the web console gets for each call.",
    )  # fmt: skip
    max_audio_speed: float = Field(
        default=2.0, gt=0,
        validation_alias=AliasChoices("VLPIPE_GATEWAY_MAX_AUDIO_SPEED", "max_audio_speed"),
        description="Inbound audio per connection at most this many times real time, sustained.",
    )  # fmt: skip
    audio_burst_s: float = Field(
        default=2.0, gt=0,
        validation_alias=AliasChoices("VLPIPE_GATEWAY_AUDIO_BURST_S", "audio_burst_s"),
        description="Seconds of audio a connection may send ahead at once.",
    )  # fmt: skip
    max_messages_per_s: float = Field(
        default=200, gt=0,
        validation_alias=AliasChoices("VLPIPE_GATEWAY_MAX_MESSAGES_PER_S", "max_messages_per_s"),
        description="Inbound messages per connection and second, sustained (as many at once).",
    )  # fmt: skip
    max_message_bytes: int = Field(
        default=256 * 1024, ge=1024,
        validation_alias=AliasChoices("VLPIPE_GATEWAY_MAX_MESSAGE_BYTES", "max_message_bytes"),
        description="The largest inbound WebSocket message; over it the socket closes (1009).",
    )  # fmt: skip
    max_audio_chunk_bytes: int = Field(
        default=64 * 1024,
        ge=160,
        validation_alias=AliasChoices(
            "VLPIPE_GATEWAY_MAX_AUDIO_CHUNK_BYTES", "max_audio_chunk_bytes"
        ),
        description="The largest audio message (a call's binary message, a Twilio payload); "
        "over it the socket closes (1009).",
    )
    max_waiting_audio: int = Field(
        default=1500, ge=1,
        validation_alias=AliasChoices("VLPIPE_GATEWAY_MAX_WAITING_AUDIO", "max_waiting_audio"),
        description="Audio entries of one session waiting in Redis for ingest (its raw audio "
        "stream's length); a call that adds more is closed (1008).",
    )  # fmt: skip
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

    def allowed_origins(self) -> list[str]:
        return [o.strip() for o in self.origins.split(",") if o.strip()]

    def limits(self) -> LimitSettings:
        return LimitSettings(
            max_audio_speed=self.max_audio_speed, audio_burst_s=self.audio_burst_s,
            max_messages_per_s=self.max_messages_per_s,
            max_audio_chunk_bytes=self.max_audio_chunk_bytes,
        )  # fmt: skip
