"""Broker settings: the shared `VLPIPE_*` settings plus `VLPIPE_BROKER_*`.

The endpoint and key also read the names Voice Live users already have in their
environment, `AZURE_COGNITIVE_SERVICES_ENDPOINT` and `AZURE_COGNITIVE_SERVICES_KEY`. With no
endpoint at all, the local engine (`vlpipe engine`, port 8765) is the upstream.
"""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from vlpipe.shared.config import OutputsSettings

LOCAL_ENGINE = "http://127.0.0.1:8765"
SCOPES = ("https://ai.azure.com/.default", "https://cognitiveservices.azure.com/.default")


def _env(name: str, *more: str) -> AliasChoices:
    return AliasChoices(f"VLPIPE_BROKER_{name.upper()}", *more, name)


class BrokerSettings(OutputsSettings):
    model_config = SettingsConfigDict(env_prefix="VLPIPE_", extra="ignore", populate_by_name=True)

    http_port: int = Field(default=9102, description="Health and metrics port.")
    outputs_by: Literal["broker", "egress"] = Field(
        default="broker",
        description="Which service turns a session's events into its outputs (transcripts, "
        "audio out and their status entries): `broker`, in the same fenced write as the "
        "events (one hop fewer: about a fifth less CPU), or `egress`, which follows the "
        "session's events stream. Decided for each session when it starts and kept by every "
        "later owner, so replicas may differ during a rolling change.",
    )
    endpoint: str = Field(
        default=LOCAL_ENGINE,
        validation_alias=_env("endpoint", "AZURE_COGNITIVE_SERVICES_ENDPOINT"),
        description="Voice Live endpoint (https://<resource>.services.ai.azure.com) or the "
        "local engine's address.",
    )
    api_key: SecretStr | None = Field(
        default=None,
        validation_alias=_env("api_key", "AZURE_COGNITIVE_SERVICES_KEY"),
        description="API key; without one the broker authenticates with Entra ID.",
    )
    auth: Literal["auto", "key", "entra", "none"] = Field(
        default="auto",
        validation_alias=_env("auth"),
        description="auto: the key if set, else no auth for the local engine on loopback, "
        "else Entra ID (DefaultAzureCredential).",
    )
    token_scope: str = Field(
        default=SCOPES[0],
        validation_alias=_env("token_scope"),
        description="Entra ID scope, e.g. https://ai.azure.com/.default or "
        "https://cognitiveservices.azure.com/.default.",
    )
    token_refresh_margin_s: float = Field(
        default=300.0,
        ge=0,
        validation_alias=_env("token_refresh_margin_s"),
        description="A cached token is refreshed this long before it expires.",
    )
    model: str = Field(
        default="gpt-realtime", validation_alias=_env("model"), description="Voice Live model."
    )
    api_version: str = Field(
        default="2025-10-01", validation_alias=_env("api_version"), description="API version."
    )
    agent_name: str | None = Field(
        default=None,
        validation_alias=_env("agent_name"),
        description="Connect to a Foundry agent instead of a model (with agent_project).",
    )
    agent_project: str | None = Field(
        default=None, validation_alias=_env("agent_project"), description="The agent's project."
    )
    agent_version: str | None = Field(
        default=None, validation_alias=_env("agent_version"), description="The agent's version."
    )
    ping_interval_s: float = Field(
        default=5.0,
        gt=0,
        validation_alias=_env("ping_interval_s"),
        description="WebSocket ping period towards the upstream.",
    )
    ping_timeout_s: float = Field(
        default=5.0,
        gt=0,
        validation_alias=_env("ping_timeout_s"),
        description="A pong later than this closes the socket as dead and reconnects.",
    )
    connect_timeout_s: float = Field(
        default=10.0,
        gt=0,
        validation_alias=_env("connect_timeout_s"),
        description="How long opening the upstream WebSocket may take, in seconds.",
    )
    max_message_bytes: int = Field(
        default=16 * 1024 * 1024,
        ge=1024,
        validation_alias=_env("max_message_bytes"),
        description="Largest upstream message accepted.",
    )
    reconnect_attempts: int = Field(
        default=8,
        ge=1,
        validation_alias=_env("reconnect_attempts"),
        description="Failed connection attempts in a row before a session is ended.",
    )
    auth_attempts: int = Field(
        default=2,
        ge=1,
        validation_alias=_env("auth_attempts"),
        description="Refused credentials (401/403) in a row before a session is ended.",
    )
    max_upstream_s: float = Field(
        default=1740.0,
        gt=0,
        validation_alias=_env("max_upstream_s"),
        description="Upstream sessions older than this are rolled over to a new one at the "
        "next quiet moment (Voice Live ends sessions after 30 minutes).",
    )
    max_append_ms: int = Field(
        default=1000,
        ge=20,
        validation_alias=_env("max_append_ms"),
        description="Most audio one coalesced input_audio_buffer.append carries.",
    )
    max_pending_frames: int = Field(
        default=500,
        ge=10,
        validation_alias=_env("max_pending_frames"),
        description="Frames held in memory per session before reading pauses.",
    )
    tool_timeout_s: float = Field(
        default=20.0,
        gt=0,
        validation_alias=_env("tool_timeout_s"),
        description="A tool call not answered in this time gets a timeout result.",
    )
    drain_quiet_s: float = Field(
        default=1.0,
        ge=0,
        validation_alias=_env("drain_quiet_s"),
        description="After the input ended, the session closes once nothing was in flight "
        "for this long.",
    )
    drain_max_s: float = Field(
        default=60.0,
        gt=0,
        validation_alias=_env("drain_max_s"),
        description="After the input ended, the session closes after this long regardless.",
    )
    history_items: int = Field(
        default=200,
        ge=0,
        validation_alias=_env("history_items"),
        description="Conversation items kept to replay on a new upstream connection.",
    )
    max_replay_s: float = Field(
        default=60.0,
        gt=0,
        validation_alias=_env("max_replay_s"),
        description="Most audio the upstream has not committed that is kept (in the frames "
        "stream) to replay to a new upstream session after a reconnect or a takeover.",
    )
    session_idle_s: float = Field(
        default=300.0,
        gt=0,
        validation_alias=AliasChoices("VLPIPE_SESSION_IDLE_S", "session_idle_s"),
        description="A session with no input audio and no control for this long is ended "
        "(reason `idle`): a producer that crashed, a gateway pod that was killed.",
    )

    @model_validator(mode="after")
    def _agent_pair(self) -> BrokerSettings:
        if (self.agent_name is None) != (self.agent_project is None):
            raise ValueError("agent_name and agent_project go together (a Foundry agent)")
        return self
