"""Inbound limits of one gateway connection: audio speed, message rate, chunk size.

Pure (the caller passes the clock), so the rules are tested without sockets. Going over
any limit is a `LimitExceeded` naming the limit; the gateway closes the socket with 1008
(1009 for a chunk too big) and counts it. The per-session limit, audio waiting in Redis,
needs Redis and lives in the gateway.
"""

from __future__ import annotations

from dataclasses import dataclass, field

OPUS_MAX_BYTES_PER_S = 510_000 / 8
"""Opus's highest bitrate (510 kbit/s): compressed input (WebM, Ogg) is measured against
it, since the gateway does not decode it to learn how long a chunk plays."""


class LimitExceeded(Exception):
    """A client went over a limit; `kind` is the metric label, `code` the close code."""

    def __init__(self, reason: str, kind: str, code: int = 1008) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind
        self.code = code


@dataclass(slots=True)
class TokenBucket:
    """`rate` units per second sustained, `capacity` at once.

    A take is allowed while the bucket is not empty and may overdraw it, so one message
    larger than the burst still passes, but the debt must be refilled before the next:
    the long-run rate never exceeds `rate`.
    """

    rate: float
    capacity: float
    level: float = field(default=-1.0)
    updated: float | None = None

    def __post_init__(self) -> None:
        if self.level < 0:
            self.level = self.capacity

    def take(self, amount: float, now: float) -> bool:
        """Take `amount` at time `now` (seconds, monotonic); False when the bucket is empty."""
        if self.updated is not None:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now
        if self.level <= 0:
            return False
        self.level -= amount
        return True


@dataclass(frozen=True, slots=True)
class LimitSettings:
    max_audio_speed: float = 2.0
    """Inbound audio at most this many times real time, sustained."""
    audio_burst_s: float = 2.0
    """Seconds of real-time audio a client may send ahead at once."""
    max_messages_per_s: float = 200.0
    """Messages per second, sustained; as many at once."""
    max_audio_chunk_bytes: int = 64 * 1024
    """The largest audio message (a call's binary message, a Twilio media payload)."""


class ConnectionLimits:
    """The limits of one connection whose audio plays at `audio_bytes_per_s` in real time."""

    def __init__(self, settings: LimitSettings, audio_bytes_per_s: float) -> None:
        self.settings = settings
        rate = audio_bytes_per_s * settings.max_audio_speed
        self.audio = TokenBucket(rate, audio_bytes_per_s * settings.audio_burst_s)
        self.messages = TokenBucket(settings.max_messages_per_s, settings.max_messages_per_s)

    def message(self, now: float) -> None:
        """One message arrived (any kind); LimitExceeded when they come too fast."""
        if not self.messages.take(1, now):
            raise LimitExceeded(
                f"more than {self.settings.max_messages_per_s:g} messages per second "
                "(VLPIPE_GATEWAY_MAX_MESSAGES_PER_S)",
                "message_rate",
            )

    def audio_chunk(self, size: int, now: float) -> None:
        """`size` bytes of audio arrived; LimitExceeded when too big or too fast."""
        if size > self.settings.max_audio_chunk_bytes:
            raise LimitExceeded(
                f"audio message of {size} bytes is over the limit of "
                f"{self.settings.max_audio_chunk_bytes} (VLPIPE_GATEWAY_MAX_AUDIO_CHUNK_BYTES)",
                "audio_size",
                code=1009,
            )
        if not self.audio.take(size, now):
            raise LimitExceeded(
                f"audio faster than {self.settings.max_audio_speed:g}x real time "
                "(VLPIPE_GATEWAY_MAX_AUDIO_SPEED)",
                "audio_rate",
            )


def audio_bytes_per_s(source: str, rate: int | None) -> float:
    """How many bytes of `source` audio play in one second: PCM16 at `rate`, G.711 at
    8 kHz, compressed formats at Opus's highest bitrate."""
    if source == "pcm16":
        return 2.0 * (rate or 16000)
    if source in ("g711_ulaw", "g711_alaw"):
        return 8000.0
    return OPUS_MAX_BYTES_PER_S
