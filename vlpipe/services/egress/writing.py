"""A session's outputs in its owner's fenced write, with their spans and counts.

The service that makes a session's outputs (`VLPIPE_OUTPUTS_BY`) is egress, following the
session's events stream, or the broker, in the same write as the events themselves. Both
put what `SessionOutputs.observe` made into one `SessionWrite` here, so the two ways write
the same entries with the same retention:

* transcript pieces to `vl:transcript:{sid}`, and final ones to the shared
  `vl:transcripts` (in the same write on one Redis, through the session's outbox and a
  relay on a Redis Cluster: `vlpipe.shared.outbox`);
* audio chunks to `vl:audio-out:{sid}`, status entries to `vl:status:{sid}`;
* the playback position (`vl:playback:{sid}`, read on barge-in);
* with the session's end, the expiry of every key of the session.

The write is applied whole or not at all, and retried unchanged, so each output goes out
once across a takeover: the new owner continues from the checkpoint the write carried
(`SessionOutputs.snapshot`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from opentelemetry.metrics import Observation
from opentelemetry.trace import SpanKind

from vlpipe.services.egress.outputs import Outputs, SessionOutputs
from vlpipe.shared import telemetry
from vlpipe.shared.contracts import encode
from vlpipe.shared.fencing import SessionWrite
from vlpipe.shared.keys import StreamKeys
from vlpipe.shared.outbox import SharedOutbox
from vlpipe.shared.retention import Retention


class OutputWriter:
    """Adds outputs to a service's fenced writes; `written` after each applied one."""

    def __init__(
        self, service: str, keys: StreamKeys, retention: Retention, transcripts: SharedOutbox
    ) -> None:
        self.service = service
        self.keys = keys
        self.retention = retention
        self.transcripts = transcripts
        self.tracer = telemetry.tracer(service)
        # Counted per write and observed when metrics are collected (cheaper than an
        # instrument's add() for each output).
        self.totals: Counter[str] = Counter()
        # Named for what they count, not for the service that writes: the same series
        # whichever service makes the outputs (`service.name` tells them apart).
        meter = telemetry.meter(service)
        meter.create_observable_counter(
            "vlpipe.outputs.audio_chunks", description="Audio chunks written",
            callbacks=[lambda _: [Observation(self.totals["audio_chunks"])]],
        )  # fmt: skip
        meter.create_observable_counter(
            "vlpipe.outputs.transcripts", description="Transcript pieces written",
            callbacks=[lambda _: [Observation(self.totals["transcripts"])]],
        )  # fmt: skip

    def add(self, write: SessionWrite, sid: str, outputs: SessionOutputs, out: Outputs) -> None:
        """`out` (what `outputs` just made) into `write`."""
        keys, keep = self.keys, self.retention
        for piece in out.transcripts:
            write.xadd(keys.transcript(sid), encode(piece), maxlen=keep.transcript)
            if piece.final:
                # Trimmed behind its consumer groups by housekeeping, never on write.
                self.transcripts.add(write, sid, encode(piece))
        for chunk in out.audio:
            write.xadd(keys.audio_out(sid), encode(chunk), maxlen=keep.audio_out)
        for status in out.status:
            write.xadd(keys.status(sid), encode(status), maxlen=keep.status)
        playback = outputs.state.playback
        if out.playback_changed and playback.response_id:
            if out.reset_played:
                write.hdel(keys.playback(sid), "played_ms")
            write.hset(
                keys.playback(sid),
                {
                    "response_id": playback.response_id, "item_id": playback.item_id or "",
                    "delivered_ms": round(playback.delivered_ms, 1),
                },
            )  # fmt: skip
        if out.ended:
            # The session is over: its keys stay readable for `session_ttl_s`, then go.
            for key in keys.session_streams(sid):
                write.expire(key, keep.session_ttl_s)

    def written(self, sid: str, out: Outputs) -> None:
        """A write with `out` was applied: its spans and counts."""
        self.totals["audio_chunks"] += len(out.audio)
        self.totals["transcripts"] += len(out.transcripts)
        firsts = [c for c in out.audio if c.kind == "audio" and c.offset_ms == 0]
        finals = [p for p in out.transcripts if p.final]
        if not firsts and not finals:
            return
        for name, traceparent, response, destination in [
            *(("first_audio", c.traceparent, c.response_id, self.keys.audio_out(sid))
              for c in firsts),
            *(("transcript", p.traceparent, p.response_id, self.keys.transcript(sid))
              for p in finals),
        ]:  # fmt: skip
            context = telemetry.extract(traceparent)
            if context is None:
                continue
            attributes = dict(telemetry.messaging_attributes("send", destination))
            attributes.update({"session.id": sid, "gen_ai.response.id": response or ""})
            self.tracer.start_span(
                f"{self.service}.{name}", context=context, kind=SpanKind.PRODUCER,
                attributes=attributes,
            ).end()  # fmt: skip


def prefixed(values: Mapping[str, str], prefix: str) -> dict[str, str]:
    """`values`' fields whose names start with `prefix`, without it."""
    return {k[len(prefix) :]: v for k, v in values.items() if k.startswith(prefix)}
