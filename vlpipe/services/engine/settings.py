"""The local engine's settings: `VLPIPE_ENGINE_*` environment variables.

The shared settings (log level, health port...) keep their `VLPIPE_*` names; the engine's
own fields read `VLPIPE_ENGINE_<FIELD>`, e.g. `VLPIPE_ENGINE_PORT=8765`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import SettingsConfigDict

from vlpipe.shared.config import ServiceSettings, is_loopback

EngineModel = Literal["local", "echo"]


def _env(name: str) -> AliasChoices:
    # The alias replaces the env prefix for this field; the field name still works in code.
    return AliasChoices(name, f"VLPIPE_ENGINE_{name.upper()}")


class EngineSettings(ServiceSettings):
    """Settings of one engine process."""

    model_config = SettingsConfigDict(env_prefix="VLPIPE_", extra="ignore", populate_by_name=True)

    host: str = Field(
        default="127.0.0.1", validation_alias=_env("host"), description="Listen address."
    )
    port: int = Field(
        default=8765,
        ge=0,
        le=65535,
        validation_alias=_env("port"),
        description="Listen port; 0 picks a free one.",
    )
    api_key: SecretStr | None = Field(
        default=None,
        validation_alias=_env("api_key"),
        description="The key clients must send (api-key header or Bearer token). "
        "Without one the engine only listens on loopback.",
    )
    model: EngineModel = Field(
        default="local",
        validation_alias=_env("model"),
        description="local: VAD, Whisper STT, espeak-ng TTS. echo: VAD only, replies with "
        "the user's own audio.",
    )
    max_message_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=1024,
        validation_alias=_env("max_message_bytes"),
        description="Largest client message; bigger ones close the socket with 1009.",
    )
    output_pace: float = Field(
        default=1.0,
        ge=0,
        validation_alias=_env("output_pace"),
        description="Response audio is sent at this multiple of real time (after a short "
        "lead); 0 sends it as fast as it is synthesized.",
    )
    stt_threads: int = Field(
        default=1,
        ge=1,
        validation_alias=_env("stt_threads"),
        description="CPU threads of one Whisper transcription.",
    )
    stt_workers: int = Field(
        default=1,
        ge=1,
        validation_alias=_env("stt_workers"),
        description="Transcriptions that may run at once (each uses stt_threads).",
    )

    def check_exposure(self) -> None:
        """Refuse to listen beyond loopback without an API key (raises ValueError)."""
        if self.api_key is None and not is_loopback(self.host):
            raise ValueError(
                f"refusing to listen on {self.host} without an API key; "
                "set VLPIPE_ENGINE_API_KEY (or --api-key) or listen on 127.0.0.1"
            )
