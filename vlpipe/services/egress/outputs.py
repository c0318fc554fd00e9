"""From the broker's raw events to what consumers want: pure logic, no I/O.

`SessionOutputs.observe(event)` turns one `Event` into outputs:

* `TranscriptPiece`s: partials (`...delta`) are coalesced per item (at most one every
  `partial_ms` of event time, each carrying the whole text so far); the final entry
  (`...completed`, `...done`) replaces them.
* `AudioOut` chunks: the assistant's audio converted to the session's `audio_out` format
  with a streaming resampler, with the response id and each chunk's offset; an `end`
  marker after each response's audio and a `clear` marker when a response is cancelled
  or interrupted (`vlpipe.barge_in`); audio of a cleared response is dropped.
* `Status` messages: session state, upstream connection changes, tool calls and their
  results, and per-turn latency.

It also keeps the playback position (`playback`) the broker reads on barge-in. Its state
is plain data, checkpointed as a few fields (`snapshot` / `load`, see `STATE_FIELDS`) so
that a replica that takes the session over continues the numbering; only the resampler
starts afresh, losing the few milliseconds of audio it held (converted formats only).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from vlpipe.shared.audio import AudioFormat, FormatConverter, decode_to_pcm16
from vlpipe.shared.contracts import AudioOut, Event, Message, Status, TranscriptPiece

_USER_DELTA = "conversation.item.input_audio_transcription.delta"
_USER_FINAL = "conversation.item.input_audio_transcription.completed"
_ASSISTANT_DELTAS = ("response.audio_transcript.delta", "response.text.delta")
_ASSISTANT_FINALS = {"response.audio_transcript.done": "transcript", "response.text.done": "text"}


@dataclass
class Partial:
    text: str = ""
    emitted_at: float = 0.0
    emitted_len: int = 0
    response_id: str | None = None


@dataclass
class Playback:
    response_id: str | None = None
    item_id: str | None = None
    delivered_ms: float = 0.0


@dataclass
class State:
    output_format: str = AudioFormat.PCM16.value
    transcript_seq: int = 0
    audio_seq: int = 0
    partials: dict[str, Partial] = field(default_factory=dict)
    spans: dict[str, list[float]] = field(default_factory=dict)  # user item -> [start, end]
    playback: Playback = field(default_factory=Playback)
    # Recent responses and items, newest last. Tuples: replaced, never changed in place,
    # so the snapshot can tell in one comparison that none of them moved.
    cleared: tuple[str, ...] = ()  # responses cleared
    ended_audio: tuple[str, ...] = ()  # responses whose `end` went out
    speech_stopped_at: float | None = None
    first_audio_seen: tuple[str, ...] = ()
    finished_items: tuple[str, ...] = ()  # items with a final


_RECENT = 16  # how many recent responses and items the tuples above remember


def _remember(recent: tuple[str, ...], key: str) -> tuple[str, ...]:
    """`recent` with `key` added, keeping the newest `_RECENT`."""
    return (*recent[-(_RECENT - 1) :], key)


STATE_FIELDS = ("seqs", "playback", "turn", "partials", "spans", "recent")
"""The checkpoint fields of `SessionOutputs.snapshot()`, each the JSON of one part of the
state. An audio chunk changes `seqs` and `playback` only; the others change a few times a
turn, so a write carries only the fields whose text changed."""

_json = json.JSONEncoder(separators=(",", ":")).encode


@dataclass
class Outputs:
    transcripts: list[TranscriptPiece] = field(default_factory=list)
    audio: list[AudioOut] = field(default_factory=list)
    status: list[Status] = field(default_factory=list)
    playback_changed: bool = False
    reset_played: bool = False
    ended: bool = False


class SessionOutputs:
    def __init__(
        self,
        sid: str,
        audio_out: AudioFormat,
        output_format: AudioFormat,
        partial_ms: float = 200,
        service: Literal["broker", "egress"] = "egress",
    ) -> None:
        """`service`: the one that makes the outputs, named in the status messages."""
        self.sid = sid
        self.service: Literal["broker", "egress"] = service
        self.audio_out = audio_out
        self.partial_ms = partial_ms
        self.state = State(output_format=output_format.value)
        self._converter: FormatConverter | None = None
        self._converter_response: str | None = None
        self._odd_byte = b""  # half a PCM16 sample, held for the converter's next delta
        self._recent_of: tuple[tuple[tuple[str, ...], ...], str] = ((), "")

    # ---------------------------------------------------------------- persistence

    def snapshot(self) -> dict[str, str]:
        """The state as checkpoint fields (`STATE_FIELDS`), from which `load` continues.

        Made on every write, so the parts that rarely change are not encoded again while
        they have not (the recent tuples are compared, not encoded)."""
        state = self.state
        recent = (state.cleared, state.ended_audio, state.first_audio_seen, state.finished_items)
        if recent != self._recent_of[0]:
            self._recent_of = (recent, _json(recent))
        playback = state.playback
        return {
            "seqs": f"[{state.transcript_seq},{state.audio_seq}]",
            "playback": _json((playback.response_id, playback.item_id, playback.delivered_ms)),
            "turn": _json((state.output_format, state.speech_stopped_at)),
            "partials": _json({
                item: (p.text, p.emitted_at, p.emitted_len, p.response_id)
                for item, p in state.partials.items()
            }) if state.partials else "{}",
            "spans": _json(state.spans) if state.spans else "{}",
            "recent": self._recent_of[1],
        }  # fmt: skip

    def load(self, checkpoint: Mapping[str, str]) -> None:
        """Continue from a `snapshot()` (the checkpoint's other fields are ignored); from
        a checkpoint of an egress before the split fields (`state`, the whole state as one
        JSON object), during a rolling upgrade."""
        if "seqs" not in checkpoint:
            if checkpoint.get("state"):
                raw = json.loads(checkpoint["state"])
                raw["partials"] = {k: Partial(**v) for k, v in raw.get("partials", {}).items()}
                raw["playback"] = Playback(**raw.get("playback", {}))
                for name in ("cleared", "ended_audio", "first_audio_seen", "finished_items"):
                    raw[name] = tuple(raw.get(name, ()))
                self.state = State(**raw)
            return
        transcript_seq, audio_seq = json.loads(checkpoint["seqs"])
        output_format, speech_stopped_at = json.loads(checkpoint["turn"])
        cleared, ended_audio, first_audio_seen, finished_items = (
            tuple(ids) for ids in json.loads(checkpoint["recent"])
        )
        self.state = State(
            output_format=output_format, transcript_seq=transcript_seq, audio_seq=audio_seq,
            partials={item: Partial(*p) for item, p in json.loads(checkpoint["partials"]).items()},
            spans=json.loads(checkpoint["spans"]),
            playback=Playback(*json.loads(checkpoint["playback"])),
            cleared=cleared, ended_audio=ended_audio, speech_stopped_at=speech_stopped_at,
            first_audio_seen=first_audio_seen, finished_items=finished_items,
        )  # fmt: skip

    # ---------------------------------------------------------------- events

    def observe(self, event: Event, out: Outputs) -> None:
        kind = event.type
        body = event.event
        if kind == "response.audio.delta":
            self._audio(event, out)
        elif kind == _USER_DELTA:
            self._partial(
                str(body.get("item_id")), "user", str(body.get("delta") or ""), None, event, out
            )
        elif kind in _ASSISTANT_DELTAS:
            self._partial(
                str(body.get("item_id")), "assistant", str(body.get("delta") or ""),
                body.get("response_id"), event, out,
            )  # fmt: skip
        elif kind == _USER_FINAL:
            self._final(
                str(body.get("item_id")),
                "user",
                str(body.get("transcript") or ""),
                None,
                event,
                out,
            )
        elif kind in _ASSISTANT_FINALS:
            text = str(body.get(_ASSISTANT_FINALS[kind]) or "")
            self._final(
                str(body.get("item_id")), "assistant", text, body.get("response_id"), event, out
            )
        elif kind == "conversation.item.input_audio_transcription.failed":
            item_id = str(body.get("item_id"))
            self.state.partials.pop(item_id, None)
            self.state.spans.pop(item_id, None)
            self.state.finished_items = _remember(self.state.finished_items, item_id)
            error = body.get("error") or {}
            self._status(out, event, "error", "transcription failed",
                         {"item_id": item_id, "code": error.get("code"),
                          "message": error.get("message")})  # fmt: skip
        elif kind == "input_audio_buffer.speech_started":
            spans = self.state.spans
            spans[str(body.get("item_id"))] = [float(body.get("audio_start_ms") or 0), 0.0]
            while len(spans) > _RECENT:  # turns whose transcript never came (none asked for)
                spans.pop(next(iter(spans)))
        elif kind == "input_audio_buffer.speech_stopped":
            span = self.state.spans.setdefault(str(body.get("item_id")), [0.0, 0.0])
            span[1] = float(body.get("audio_end_ms") or 0)
            self.state.speech_stopped_at = event.received
        elif kind == "response.done":
            self._response_done(body.get("response") or {}, event, out)
        elif kind == "vlpipe.barge_in":
            self._clear(body.get("response_id"), body.get("item_id"), "barge_in", event, out)
        elif kind == "session.updated":
            fmt = (body.get("session") or {}).get("output_audio_format")
            if isinstance(fmt, str) and fmt in AudioFormat.__members__.values():
                self.state.output_format = fmt
        elif kind == "response.function_call_arguments.done":
            self._status(out, event, "tool_call", f"tool call {body.get('name')}",
                         {k: body.get(k) for k in ("call_id", "name", "arguments", "response_id")})  # fmt: skip
        elif kind == "conversation.item.created":
            item = body.get("item") or {}
            if item.get("type") == "function_call_output":
                self._status(out, event, "tool_result", "tool result",
                             {"call_id": item.get("call_id"), "output": item.get("output")})  # fmt: skip
        elif kind == "vlpipe.session.started":
            self._status(out, event, "state", "started", {})
        elif kind.startswith("vlpipe.upstream."):
            self._status(out, event, "state", kind.removeprefix("vlpipe.upstream."), body)
        elif kind == "vlpipe.session.ended":
            self._finish_audio(out, event)
            self._status(out, event, "state", "ended", {"reason": body.get("reason")})
            out.ended = True

    # ---------------------------------------------------------------- transcripts

    def _piece(self, item_id: str, speaker: str, text: str, final: bool,
               response_id: Any, event: Event) -> TranscriptPiece:  # fmt: skip
        start = end = None
        if speaker == "user" and item_id in self.state.spans:
            start, end = self.state.spans[item_id]
            end = end or None
        elif speaker == "assistant" and self.state.playback.item_id == item_id:
            start, end = 0.0, self.state.playback.delivered_ms if final else None
        piece = TranscriptPiece(
            session=self.sid, speaker=speaker, text=text, final=final,
            item_id=item_id, response_id=response_id if isinstance(response_id, str) else None,
            start_ms=start, end_ms=end, seq=self.state.transcript_seq,
            traceparent=event.traceparent,
        )  # fmt: skip
        self.state.transcript_seq += 1
        return piece

    def _partial(self, item_id: str, speaker: str, delta: str, response_id: Any,
                 event: Event, out: Outputs) -> None:  # fmt: skip
        if item_id in self.state.finished_items:
            return  # its final went out: a late delta must not reopen it
        partial = self.state.partials.setdefault(item_id, Partial(response_id=response_id))
        partial.text += delta
        due = event.received - partial.emitted_at >= self.partial_ms
        at_boundary = partial.text[-1:].isspace() or partial.text[-1:] in ".,;:!?"
        grown = len(partial.text.strip()) > len(partial.text[: partial.emitted_len].strip())
        if due and (at_boundary or partial.emitted_len == 0) and grown:
            out.transcripts.append(
                self._piece(item_id, speaker, partial.text.strip(), False, response_id, event)
            )
            partial.emitted_at = event.received
            partial.emitted_len = len(partial.text)

    def _final(self, item_id: str, speaker: str, text: str, response_id: Any,
               event: Event, out: Outputs) -> None:  # fmt: skip
        self.state.partials.pop(item_id, None)
        self.state.finished_items = _remember(self.state.finished_items, item_id)
        out.transcripts.append(
            self._piece(item_id, speaker, text.strip(), True, response_id, event)
        )
        if speaker == "user":
            self.state.spans.pop(item_id, None)

    # ---------------------------------------------------------------- audio

    def _audio(self, event: Event, out: Outputs) -> None:
        body = event.event
        response_id = str(body.get("response_id") or "")
        item_id = str(body.get("item_id") or "")
        if response_id in self.state.cleared or not event.audio:
            return  # interrupted: not one more sample of it
        playback = self.state.playback
        if playback.response_id != response_id:
            self._finish_audio(out, event)
            self.state.playback = playback = Playback(response_id, item_id, 0.0)
            out.reset_played = True
            self._converter = None
        speech_end = None
        if response_id not in self.state.first_audio_seen:
            self.state.first_audio_seen = _remember(self.state.first_audio_seen, response_id)
            speech_end = self.state.speech_stopped_at
            if self.state.speech_stopped_at is not None:
                self._status(out, event, "latency", "time to first audio",
                             {"response_id": response_id,
                              "ms": round(event.received - self.state.speech_stopped_at, 1)})  # fmt: skip
                self.state.speech_stopped_at = None
        playback.item_id = item_id
        audio = self._convert(event.audio, response_id)
        if audio:
            self._emit_audio(out, event, "audio", audio, speech_end=speech_end)

    def _convert(self, data: bytes, response_id: str) -> bytes:
        source = AudioFormat(self.state.output_format)
        if source is self.audio_out:
            return data
        if self._converter is None or self._converter_response != response_id:
            self._converter = FormatConverter(source.rate, self.audio_out)
            self._converter_response = response_id
            self._odd_byte = b""
        if source.bytes_per_sample == 2:
            # A delta that ends mid-sample keeps its last byte for the next one.
            data = self._odd_byte + data
            cut = len(data) - len(data) % 2
            data, self._odd_byte = data[:cut], data[cut:]
        return self._converter.process(decode_to_pcm16(data, source))

    def _emit_audio(
        self,
        out: Outputs,
        event: Event,
        kind: str,
        audio: bytes = b"",
        speech_end: float | None = None,
    ) -> None:
        playback = self.state.playback
        out.audio.append(
            AudioOut(
                session=self.sid,
                kind=kind,
                format=self.audio_out,
                audio=audio,
                response_id=playback.response_id,
                item_id=playback.item_id,
                offset_ms=round(playback.delivered_ms, 3),
                speech_end=speech_end,
                seq=self.state.audio_seq,
                traceparent=event.traceparent,
            )
        )
        self.state.audio_seq += 1
        playback.delivered_ms += self.audio_out.ms_for_bytes(len(audio))
        out.playback_changed = True

    def _finish_audio(self, out: Outputs, event: Event) -> None:
        """The `end` marker of the response whose audio went out last (once)."""
        response_id = self.state.playback.response_id
        if response_id is None or response_id in self.state.ended_audio:
            return
        if response_id in self.state.cleared:
            return
        tail = self._converter.flush() if self._converter is not None else b""
        self._converter = None
        if tail:
            self._emit_audio(out, event, "audio", tail)
        self._emit_audio(out, event, "end")
        self.state.ended_audio = _remember(self.state.ended_audio, response_id)

    def _response_done(self, response: dict[str, Any], event: Event, out: Outputs) -> None:
        response_id = response.get("id")
        if response.get("status") == "cancelled":
            self._clear(response_id, None, "cancelled", event, out)
        elif response_id == self.state.playback.response_id:
            self._finish_audio(out, event)

    def _clear(self, response_id: Any, item_id: Any, why: str, event: Event, out: Outputs) -> None:
        """Drop the rest of a response's audio, and clear what the consumer still holds."""
        playback = self.state.playback
        targets = {response_id} if isinstance(response_id, str) else set()
        if playback.response_id is not None and item_id == playback.item_id:
            # A barge-in names the response in progress, but the item it cuts may be an
            # earlier response's that is still playing: that audio is what must stop.
            targets.add(playback.response_id)
        fresh = targets.difference(self.state.cleared)
        for target in sorted(fresh):
            self.state.cleared = _remember(self.state.cleared, target)
        if playback.response_id not in fresh:
            return  # none of its audio went out, or it was cleared already
        # Even a response delivered whole may still be playing at the consumer: clear it.
        self._converter = None
        self._emit_audio(out, event, "clear")
        self._status(out, event, "interrupted", f"response {why}",
                     {"response_id": response_id, "item_id": item_id,
                      "delivered_ms": round(self.state.playback.delivered_ms, 1)})  # fmt: skip

    # ---------------------------------------------------------------- status

    def _status(self, out: Outputs, event: Event, kind: str, message: str,
                detail: dict[str, Any]) -> None:  # fmt: skip
        out.status.append(
            Status(
                session=self.sid,
                service=self.service,
                kind=kind,
                message=message,
                detail=detail,
                traceparent=event.traceparent,
            )
        )


def all_messages(out: Outputs) -> list[Message]:
    return [*out.transcripts, *out.audio, *out.status]
