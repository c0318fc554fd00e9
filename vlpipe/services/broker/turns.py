"""One OpenTelemetry trace per conversational turn, seen from the broker.

A turn starts when the user starts speaking (`input_audio_buffer.speech_started`) or when
a response is asked for without speech (text, manual turns); it ends with its last
response. The `vlpipe.turn` span (linked to the frame that carried the producer's trace,
if any, and to the session's span) holds a `vlpipe.response` child span per response,
with span events for what happened in between (speech stopped, transcript, first audio,
tool call). Every event the broker writes carries the `traceparent` of the turn it
belongs to, so egress's spans join the same trace.

Turns overlap: the user may start the next one while the last answer is still being
generated or played. So events are matched to their turn by what they name, not by
which turn is newest: the user's input item (`item_id`: speech stopped, its transcript),
the response (`response_id`: audio, tool calls, `response.done`) and the assistant's
audio item (the barge-in's cut). A turn whose answer is complete stays open (its span
ends at the time the answer completed) until the answer has had time to play out or the
next turn's barge-in check ran, so that an interruption still marks the turn it cut.

Metrics: `vlpipe.turn.time_to_first_audio` (speech stopped to the first audio delta, ms:
the silence the user hears), `vlpipe.turn.transcription_delay` (speech stopped to the
user's transcript), and `vlpipe.turn.interrupted` (turns cut short by barge-in).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
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


LINGER_S = 0.5
"""How long past the end of its answer's audio a finished turn stays open for a barge-in."""
_REMEMBERED = 64  # item and response ids mapped to their turns, for late events


@dataclass(eq=False)
class Turn:
    span: Span
    traceparent: str | None
    responses: dict[str, Span] = field(default_factory=dict)
    """Response spans in flight, by response id."""
    speech_stopped_at: float | None = None
    first_audio_at: float | None = None
    audio_ms: float = 0.0
    interrupted: bool = False
    done_ns: int | None = None
    """When its last response completed: the span's end time."""
    linger_until: float | None = None


class TurnTracer:
    """The turns of one session, fed every server event in order (pure, no I/O).

    Times: `now` is `time.monotonic()` seconds unless given; audio in ms.
    """

    def __init__(self, sid: str, session_traceparent: str | None, frames_key: str = "") -> None:
        self.sid = sid
        self.frames_key = frames_key
        self.session_links = telemetry.link_from(session_traceparent)
        self.current: Turn | None = None
        self.open: list[Turn] = []
        self._by_item: dict[str, Turn] = {}
        self._by_response: dict[str, Turn] = {}

    # ---------------------------------------------------------------- turns

    @property
    def traceparent(self) -> str | None:
        """The traceparent of the turn in progress (None between turns)."""
        turn = self.current
        return turn.traceparent if turn is not None and turn.done_ns is None else None

    @property
    def in_progress(self) -> bool:
        return self.traceparent is not None

    def start(
        self,
        reason: str,
        frame_traceparent: str | None,
        start_ns: int | None = None,
        first_frame: int | None = None,
        item_id: str | None = None,
    ) -> None:
        """A new turn becomes the current one; earlier ones stay open until they finish."""
        earlier = self.current
        if earlier is not None and earlier.done_ns is None and not earlier.responses:
            # Speech that got no answer (or none the session still waits for), or a turn
            # followed without telemetry: it gets no more responses, so it is finished.
            self._finish(earlier, time.monotonic())
        links = [*telemetry.link_from(frame_traceparent), *self.session_links]
        attributes: dict[str, Any] = {"session.id": self.sid, "vlpipe.turn.start": reason}
        if first_frame is not None:
            # The broker processes the utterance it consumed from the frames stream.
            attributes.update(telemetry.messaging_attributes("process", self.frames_key))
            attributes["vlpipe.turn.first_frame"] = first_frame
        kind = SpanKind.CONSUMER if first_frame is not None else SpanKind.INTERNAL
        span = _tracer.start_span("vlpipe.turn", kind=kind, links=links, attributes=attributes,
                                  start_time=start_ns)  # fmt: skip
        turn = Turn(span, telemetry.current_traceparent(trace.set_span_in_context(span)))
        self.current = turn
        self.open.append(turn)
        if item_id:
            self._remember(self._by_item, item_id, turn)

    def traceparent_for(self, kind: str, event: dict[str, Any]) -> str | None:
        """The traceparent an event carries: that of the turn it names, else of the turn in
        progress, else none."""
        turn = self._turn_of(kind, event)
        return turn.traceparent if turn is not None else None

    def _turn_of(self, kind: str, event: dict[str, Any]) -> Turn | None:
        """The turn an event belongs to, by the response or item it names; else the turn
        in progress."""
        response_id = event.get("response_id")
        if kind.startswith("response.") and kind != "response.created":
            response_id = response_id or (event.get("response") or {}).get("id")
        turn = self._by_response.get(str(response_id)) if response_id else None
        if turn is None and kind.startswith(("input_audio_buffer.", "conversation.item.")):
            item_id = event.get("item_id") or (event.get("item") or {}).get("id")
            turn = self._by_item.get(str(item_id)) if item_id else None
        if turn is None and self.current is not None and self.current.done_ns is None:
            turn = self.current
        return turn

    @staticmethod
    def _remember(index: dict[str, Turn], key: str, turn: Turn) -> None:
        index[key] = turn
        while len(index) > _REMEMBERED:
            index.pop(next(iter(index)))

    # ---------------------------------------------------------------- events

    def observe(
        self, kind: str, event: dict[str, Any], now: float | None = None, audio_ms: float = 0.0
    ) -> None:
        now = now if now is not None else time.monotonic()
        turn = self._turn_of(kind, event)
        if turn is None or not turn.span.is_recording():
            return
        span = turn.span
        if kind == "input_audio_buffer.speech_stopped":
            turn.speech_stopped_at = now
            span.add_event("speech_stopped", {"audio_end_ms": event.get("audio_end_ms") or 0})
        elif kind == "conversation.item.input_audio_transcription.completed":
            span.add_event("transcript")
            if turn.speech_stopped_at is not None:
                TRANSCRIPTION_DELAY.record((now - turn.speech_stopped_at) * 1000)
        elif kind == "response.created":
            response_id = str((event.get("response") or {}).get("id") or "")
            turn.responses[response_id] = _tracer.start_span(
                "vlpipe.response", context=trace.set_span_in_context(span),
                attributes={"session.id": self.sid, "gen_ai.response.id": response_id},
            )  # fmt: skip
            self._remember(self._by_response, response_id, turn)
            span.set_attribute("gen_ai.response.id", response_id)
        elif kind == "response.audio.delta":
            self._remember(self._by_item, str(event.get("item_id") or ""), turn)
            turn.audio_ms += audio_ms
            if turn.first_audio_at is None:
                turn.first_audio_at = now
                span.add_event("first_audio")
                if turn.speech_stopped_at is not None:
                    ms = (now - turn.speech_stopped_at) * 1000
                    TIME_TO_FIRST_AUDIO.record(ms)
                    span.set_attribute("vlpipe.turn.time_to_first_audio_ms", round(ms, 1))
        elif kind == "response.function_call_arguments.done":
            span.add_event("tool_call", {"gen_ai.tool.name": str(event.get("name") or ""),
                                         "gen_ai.tool.call.id": str(event.get("call_id") or "")})  # fmt: skip
        elif kind == "error":
            error = event.get("error") or {}
            span.add_event("upstream_error", {"code": str(error.get("code") or "")})
        elif kind == "response.done":
            self._response_done(turn, event.get("response") or {}, now)

    def _response_done(self, turn: Turn, response: dict[str, Any], now: float) -> None:
        span = turn.responses.pop(str(response.get("id") or ""), None)
        if span is not None:
            status = str(response.get("status") or "")
            usage = response.get("usage") or {}
            span.set_attribute("gen_ai.response.status", status)
            for key in ("input_tokens", "output_tokens", "total_tokens"):
                if isinstance(usage.get(key), int):
                    span.set_attribute(f"gen_ai.usage.{key}", usage[key])
            if status == "failed":
                span.set_status(Status(StatusCode.ERROR, "response failed"))
            span.end()
        if turn is not self.current and not turn.responses:
            self._finish(turn, now)  # a later turn began: this one gets no more responses

    def turn_done(self, response_id: str, now: float | None = None) -> None:
        """The session has nothing more to answer for the turn of `response_id`."""
        turn = self._by_response.get(response_id)
        if turn is not None and turn.done_ns is None:
            self._finish(turn, now if now is not None else time.monotonic())

    def _finish(self, turn: Turn, now: float) -> None:
        turn.done_ns = time.time_ns()
        playing_until = now
        if turn.first_audio_at is not None:  # audio plays in real time from its first chunk
            playing_until = max(now, turn.first_audio_at + turn.audio_ms / 1000)
        turn.linger_until = playing_until + LINGER_S

    def interrupt(self, item_id: str) -> None:
        """The user cut the assistant's `item_id` short: marks the turn it answered."""
        turn = self._by_item.get(item_id)
        if turn is not None and turn.span.is_recording() and not turn.interrupted:
            turn.interrupted = True
            turn.span.set_attribute("turn.was_interrupted", True)
            INTERRUPTED.add(1)

    # ---------------------------------------------------------------- ending spans

    def close_finished(self, now: float | None = None, *, all_earlier: bool = False) -> None:
        """End the turns that are done and past their linger time (with `all_earlier`,
        every done turn but the current one: the next turn's barge-in check has run)."""
        now = now if now is not None else time.monotonic()
        for turn in list(self.open):
            if turn.linger_until is None:
                continue  # not finished: a response is still in flight
            if now >= turn.linger_until or (all_earlier and turn is not self.current):
                self._end(turn)

    def end(self) -> None:
        """End every open turn and response (the session or its upstream ended)."""
        for turn in list(self.open):
            for span in turn.responses.values():
                span.end()
            turn.responses.clear()
            self._end(turn)
        self.current = None

    def _end(self, turn: Turn) -> None:
        if not turn.interrupted:
            turn.span.set_attribute("turn.was_interrupted", False)
        turn.span.end(end_time=turn.done_ns)
        self.open.remove(turn)
        if turn is self.current:
            self.current = None
