"""Ingest settings: `VLPIPE_*` shared settings plus `VLPIPE_INGEST_*`."""

from __future__ import annotations

from pydantic import AliasChoices, Field

from vlpipe.shared.config import ServiceSettings


class IngestSettings(ServiceSettings):
    http_port: int = Field(default=9101, description="Health and metrics port.")
    frame_ms: int = Field(
        default=20,
        ge=10,
        le=100,
        validation_alias=AliasChoices("VLPIPE_INGEST_FRAME_MS", "frame_ms"),
        description="Frame length in ms.",
    )
    reorder_window: int = Field(
        default=8,
        ge=1,
        le=256,
        validation_alias=AliasChoices("VLPIPE_INGEST_REORDER_WINDOW", "reorder_window"),
        description="Entries held waiting for a missing producer seq before a gap is declared.",
    )
    max_backlog_frames: int = Field(
        default=3000,
        ge=10,
        validation_alias=AliasChoices("VLPIPE_INGEST_MAX_BACKLOG_FRAMES", "max_backlog_frames"),
        description="Frames the broker may leave unread (60 s at 20 ms) before ingest pauses.",
    )
