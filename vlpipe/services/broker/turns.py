"""One OpenTelemetry trace per conversational turn, seen from the broker.

A turn starts when the user starts speaking (`input_audio_buffer.speech_started`) or when
a response is asked for without speech (text, manual turns); it ends with its response.
The `vlpipe.turn` span (linked to the frame that carried the producer's trace, if any,
and to the session's span) holds a `vlpipe.response` child span per response, with span
events for what happened in between (speech stopped, transcript, first audio, tool call,
interruption). Every event the broker writes during the turn carries the turn's
`traceparent`, so egress's spans join the same trace.

Metrics: `vlpipe.turn.time_to_first_audio` (speech stopped to the first audio delta, ms:
the silence the user hears), `vlpipe.turn.transcription_delay` (speech stopped to the
user's transcript), and `vlpipe.turn.interrupted` (turns cut short by barge-in).
"""

from __future__ import annotations

import time
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from vlpipe.shared import telemetry

_tracer = telemetry.tracer("broker")
_meter = telemetry.meter("broker")
TIME_TO_FIRST_AUDIO = _meter.create_histogram(
    "vlpipe.turn.time_to_first_audio",
    unit="ms",
    description="From the end of the user's speech to the first audio of the answer",
    explicit_bucket_boundaries_advisory=telemetry.TURN_BUCKETS_MS,
)
TRANSCRIPTION_DELAY = _meter.create_histogram(
    "vlpipe.turn.transcription_delay",
    unit="ms",
    description="From the end of the user's speech to the user's transcript",
    explicit_bucket_boundaries_advisory=telemetry.TURN_BUCKETS_MS,
)
INTERRUPTED = _meter.create_counter(
    "vlpipe.turn.interrupted", description="Turns whose answer the user interrupted"
)


class SessionTrace:
    """The session-level trace: short spans for its start, reconnects, takeovers and end,
    all children of the first (`vlpipe.session.start`), whose context the checkpoint keeps
    so a replica that takes the session over adds to the same trace. Turns link to it."""

    def __init__(self, sid: str, traceparent: str | None, producer: str | None) -> None:
        self.sid = sid
        self.traceparent = traceparent
        self.producer_links = telemetry.link_from(producer)

    def mark(self, name: str, **attributes: Any) -> None:
        attributes = {
            "session.id": self.sid,
            **{k: v for k, v in attributes.items() if v is not None},
        }
        context = telemetry.extract(self.traceparent)
        if context is None:  # the first mark opens the session's trace
            span = _tracer.start_span(name, links=self.producer_links, attributes=attributes)
            self.traceparent = telemetry.current_traceparent(trace.set_span_in_context(span))
        else:
            span = _tracer.start_span(name, context=context, attributes=attributes)
        span.end()


class TurnTracer:
    def __init__(self, sid: str, session_traceparent: str | None, frames_key: str = "") -> None:
        self.sid = sid
        self.frames_key = frames_key
        self.session_links = telemetry.link_from(session_traceparent)
        self.turn: Span | None = None
        self.response: Span | None = None
        self.traceparent: str | None = None
        self.speech_stopped_at: float | None = None
        self.first_audio_seen = False
        self.interrupted = False
        self.previous: Span | None = None
        self.previous_response: Span | None = None

    def start(
        self,
        reason: str,
        frame_traceparent: str | None,
        start_ns: int | None = None,
        first_frame: int | None = None,
    ) -> None:
        """A new turn. A previous one still open stays open until `close_previous()`, so a
        barge-in can still mark it interrupted."""
        self.close_previous()
        if self.turn is not None:
            self.previous, self.previous_response = self.turn, self.response
            self.response = None
        links = [*telemetry.link_from(frame_traceparent), *self.session_links]
        # The broker processes the utterance it consumed from the frames stream.
        attributes: dict[str, Any] = {
            **telemetry.messaging_attributes("process", self.frames_key),
            "session.id": self.sid, "vlpipe.turn.start": reason,
        }  # fmt: skip
        if first_frame is not None:
            attributes["vlpipe.turn.first_frame"] = first_frame
        self.turn = _tracer.start_span(
            "vlpipe.turn", kind=SpanKind.CONSUMER, links=links, attributes=attributes,
            start_time=start_ns,
        )  # fmt: skip
        self.traceparent = telemetry.current_traceparent(trace.set_span_in_context(self.turn))
        self.speech_stopped_at = None
        self.first_audio_seen = False
        self.interrupted = False

    def observe(self, kind: str, event: dict[str, Any], now: float | None = None) -> None:
        now = now if now is not None else time.monotonic()
        turn = self.turn
        if turn is None:
            return
        if kind == "input_audio_buffer.speech_stopped":
            self.speech_stopped_at = now
            turn.add_event("speech_stopped", {"audio_end_ms": event.get("audio_end_ms") or 0})
        elif kind == "conversation.item.input_audio_transcription.completed":
            turn.add_event("transcript")
            if self.speech_stopped_at is not None:
                TRANSCRIPTION_DELAY.record((now - self.speech_stopped_at) * 1000)
        elif kind == "response.created":
            response_id = (event.get("response") or {}).get("id") or ""
            self.response = _tracer.start_span(
                "vlpipe.response", context=trace.set_span_in_context(turn),
                attributes={"session.id": self.sid, "gen_ai.response.id": response_id},
            )  # fmt: skip
            turn.set_attribute("gen_ai.response.id", response_id)
        elif kind == "response.audio.delta" and not self.first_audio_seen:
            self.first_audio_seen = True
            turn.add_event("first_audio")
            if self.speech_stopped_at is not None:
                ms = (now - self.speech_stopped_at) * 1000
                TIME_TO_FIRST_AUDIO.record(ms)
                turn.set_attribute("vlpipe.turn.time_to_first_audio_ms", round(ms, 1))
        elif kind == "response.function_call_arguments.done":
            turn.add_event("tool_call", {"gen_ai.tool.name": str(event.get("name") or ""),
                                         "gen_ai.tool.call.id": str(event.get("call_id") or "")})  # fmt: skip
        elif kind == "error":
            error = event.get("error") or {}
            turn.add_event("upstream_error", {"code": str(error.get("code") or "")})
        elif kind == "response.done":
            self._response_done(event.get("response") or {})

    def interrupt(self) -> None:
        """The user cut the answer short: marks the turn that was answering."""
        span = self.previous or self.turn
        if span is not None and span.is_recording():
            span.set_attribute("turn.was_interrupted", True)
            INTERRUPTED.add(1)

    def close_previous(self) -> None:
        for span in (self.previous_response, self.previous):
            if span is not None:
                span.end()
        self.previous = self.previous_response = None

    def _response_done(self, response: dict[str, Any]) -> None:
        span: Span | None
        if self.previous_response is not None and (response.get("id") or "") == _span_response(
            self.previous_response
        ):
            span, self.previous_response = self.previous_response, None
        else:
            span, self.response = self.response, None
        if span is None:
            return
        status = str(response.get("status") or "")
        usage = response.get("usage") or {}
        span.set_attribute("gen_ai.response.status", status)
        for key in ("input_tokens", "output_tokens", "total_tokens"):
            if isinstance(usage.get(key), int):
                span.set_attribute(f"gen_ai.usage.{key}", usage[key])
        if status == "cancelled":
            span.set_attribute("turn.was_interrupted", True)
        elif status == "failed":
            span.set_status(Status(StatusCode.ERROR, "response failed"))
        span.end()

    def end(self) -> None:
        self.close_previous()
        if self.response is not None:
            self.response.end()
            self.response = None
        if self.turn is not None:
            self.turn.end()
            self.turn = None


def _span_response(span: Span) -> str:
    attributes = getattr(span, "attributes", None) or {}
    return str(attributes.get("gen_ai.response.id", ""))
