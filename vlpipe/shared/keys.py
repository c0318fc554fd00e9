"""Redis key names, built in one place.

Per-session keys carry the session id in a hash tag (`{sid}`) so that all of one
session's keys land in one Redis Cluster slot.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SESSION_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
_SESSION_ID = re.compile(SESSION_ID_PATTERN)


def check_session_id(sid: str) -> str:
    """`sid` if it is a valid session id, else ValueError naming the rule."""
    if not _SESSION_ID.match(sid):
        raise ValueError(
            f"invalid session id {sid!r}: 1-128 characters of letters, digits, '.', '_', ':' "
            "or '-', starting with a letter or digit"
        )
    return sid


@dataclass(frozen=True, slots=True)
class StreamKeys:
    """Every key the pipeline uses, under one configurable prefix (default `vl`)."""

    prefix: str = "vl"

    # Global streams.
    @property
    def sessions(self) -> str:
        """Session start/end announcements (producers, CLI -> every service)."""
        return f"{self.prefix}:sessions"

    @property
    def transcripts(self) -> str:
        """Every session's final transcripts (egress -> storage/analytics groups)."""
        return f"{self.prefix}:transcripts"

    @property
    def tool_calls(self) -> str:
        """Function calls to run (broker -> tool workers)."""
        return f"{self.prefix}:tool-calls"

    @property
    def dead(self) -> str:
        """Messages that could not be handled, with the reason (every service -> operators)."""
        return f"{self.prefix}:dead"

    # Per-session streams and keys.
    def audio(self, sid: str) -> str:
        """Raw audio from producers (-> ingest)."""
        return f"{self.prefix}:audio:{{{sid}}}"

    def frames(self, sid: str) -> str:
        """Normalized PCM16 frames (ingest -> broker)."""
        return f"{self.prefix}:frames:{{{sid}}}"

    def ctl(self, sid: str) -> str:
        """Control messages (producers, tool workers -> broker)."""
        return f"{self.prefix}:ctl:{{{sid}}}"

    def events(self, sid: str) -> str:
        """Every server event (broker -> egress)."""
        return f"{self.prefix}:events:{{{sid}}}"

    def transcript(self, sid: str) -> str:
        """The session's transcript pieces (egress -> consumers)."""
        return f"{self.prefix}:transcript:{{{sid}}}"

    def audio_out(self, sid: str) -> str:
        """The assistant's audio (egress -> consumers)."""
        return f"{self.prefix}:audio-out:{{{sid}}}"

    def status(self, sid: str) -> str:
        """Status changes, gaps, errors, tool calls in flight (every service -> dashboards)."""
        return f"{self.prefix}:status:{{{sid}}}"

    def session_state(self, sid: str) -> str:
        """Hash: per-service owner, checkpoint and the ended flag of a session."""
        return f"{self.prefix}:session:{{{sid}}}"

    def playback(self, sid: str) -> str:
        """Hash: how much of the current response egress delivered / the consumer played."""
        return f"{self.prefix}:playback:{{{sid}}}"

    def outbox(self, shared: str, sid: str) -> str:
        """On a Redis Cluster: the session's entries for a shared stream (`transcripts`,
        `tool-calls`), relayed to it exactly once (`vlpipe.shared.outbox`)."""
        return f"{self.prefix}:outbox:{shared}:{{{sid}}}"

    def session_streams(self, sid: str) -> list[str]:
        """All per-session keys, for expiry after the session ends."""
        return [
            self.audio(sid),
            self.frames(sid),
            self.ctl(sid),
            self.events(sid),
            self.transcript(sid),
            self.audio_out(sid),
            self.status(sid),
            self.session_state(sid),
            self.playback(sid),
            self.outbox("transcripts", sid),
            self.outbox("tool-calls", sid),
        ]
