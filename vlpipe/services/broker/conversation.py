"""What the broker knows of one conversation, learned from the upstream's events.

Pure state, no I/O: `Conversation.observe(event)` follows every server event and keeps

* the conversation's items in order, as text: the user's transcripts, the assistant's
  transcripts (cut to what was heard when an item is truncated), function calls and their
  outputs. A new upstream connection gets them back (`replay()`), so the conversation
  continues after a reconnect, a rollover or a takeover;
* the response in flight and how much audio each assistant item has produced, which
  bounds a truncation (`cut_for_barge_in`);
* whether the user is speaking.

The state survives a takeover as JSON in the session's checkpoint (`dump` / `load`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from vlpipe.shared.audio import AudioFormat

ItemKind = Literal["message", "function_call", "function_call_output"]


@dataclass
class Item:
    id: str
    kind: ItemKind
    role: str = ""
    text: str = ""
    call_id: str = ""
    name: str = ""
    arguments: str = ""
    output: str = ""
    audio_ms: float = 0.0
    """Assistant audio the upstream produced for this item."""
    truncated: bool = False
    heard_share: float | None = None
    """After a truncation: the share of the item's audio the user heard. Its transcript is
    cut to that share of its words, also when the transcript arrives after the truncation."""
    pending_text: bool = False
    """An audio item whose transcript has not arrived yet (not replayed until it does)."""

    def create_event(self) -> dict[str, Any] | None:
        """The `conversation.item.create` that recreates this item upstream, as text."""
        if self.kind == "function_call":
            item: dict[str, Any] = {
                "type": "function_call", "id": self.id, "call_id": self.call_id,
                "name": self.name, "arguments": self.arguments,
            }  # fmt: skip
        elif self.kind == "function_call_output":
            item = {
                "type": "function_call_output", "id": self.id,
                "call_id": self.call_id, "output": self.output,
            }  # fmt: skip
        else:
            if not self.text.strip():
                return None  # nothing heard or said: nothing to remember
            part = "text" if self.role == "assistant" else "input_text"
            item = {
                "type": "message", "id": self.id, "role": self.role,
                "content": [{"type": part, "text": self.text}],
            }  # fmt: skip
        return {"type": "conversation.item.create", "item": item}


@dataclass
class Cut:
    """What to do with an assistant item the user interrupted."""

    item_id: str
    audio_end_ms: int
    """0 means delete the item: none of it was heard."""

    @property
    def delete(self) -> bool:
        return self.audio_end_ms <= 0


@dataclass
class Conversation:
    output_format: AudioFormat = AudioFormat.PCM16
    max_items: int = 200
    items: dict[str, Item] = field(default_factory=dict)
    response_id: str | None = None
    """The response in progress (between response.created and response.done)."""
    audio_item_id: str | None = None
    """The assistant item whose audio was produced last."""
    audio_started_at: float | None = None
    """Wall time (s) of that item's first audio delta."""
    user_speaking: bool = False
    response_items: list[str] = field(default_factory=list)
    answered_calls: set[str] = field(default_factory=set)

    # ---------------------------------------------------------------- following events

    def observe(
        self, event: dict[str, Any], audio_bytes: int = 0, now: float | None = None
    ) -> None:
        kind = event.get("type", "")
        if kind == "response.audio.delta":
            self._on_audio(event, audio_bytes, now)
        elif kind == "conversation.item.created":
            self._on_item(event.get("item") or {})
        elif kind == "conversation.item.input_audio_transcription.completed":
            self._set_text(event.get("item_id"), str(event.get("transcript") or ""))
        elif kind == "conversation.item.input_audio_transcription.failed":
            self._set_text(event.get("item_id"), "")
        elif kind == "response.audio_transcript.done":
            self._set_text(event.get("item_id"), str(event.get("transcript") or ""))
        elif kind == "response.text.done":
            self._set_text(event.get("item_id"), str(event.get("text") or ""))
        elif kind == "response.function_call_arguments.done":
            self._on_call(event)
        elif kind == "response.output_item.done":
            self._on_item(event.get("item") or {}, done=True)
        elif kind == "conversation.item.truncated":
            self._on_truncated(event)
        elif kind == "conversation.item.deleted":
            self.items.pop(str(event.get("item_id")), None)
        elif kind == "response.created":
            response = event.get("response") or {}
            self.response_id = response.get("id")
            self.response_items = []
        elif kind == "response.done":
            self.response_id = None
        elif kind == "input_audio_buffer.speech_started":
            self.user_speaking = True
        elif kind in ("input_audio_buffer.speech_stopped", "input_audio_buffer.committed"):
            self.user_speaking = False
        elif kind == "session.updated":
            fmt = (event.get("session") or {}).get("output_audio_format")
            if isinstance(fmt, str):
                try:
                    self.output_format = AudioFormat(fmt)
                except ValueError:
                    pass

    def _on_item(self, raw: dict[str, Any], done: bool = False) -> None:
        item_id = raw.get("id")
        if not isinstance(item_id, str):
            return
        kind = raw.get("type", "message")
        item = self.items.get(item_id)
        if item is None:
            if kind not in ("message", "function_call", "function_call_output"):
                return
            item = Item(id=item_id, kind=kind, role=str(raw.get("role") or ""))
            self.items[item_id] = item
            self._bound()
            if self.response_id is not None:
                self.response_items.append(item_id)
        if kind == "function_call":
            item.call_id = str(raw.get("call_id") or item.call_id)
            item.name = str(raw.get("name") or item.name)
            item.arguments = str(raw.get("arguments") or item.arguments)
        elif kind == "function_call_output":
            item.call_id = str(raw.get("call_id") or item.call_id)
            item.output = str(raw.get("output") or item.output)
        elif not done or not item.text:
            text, pending = _message_text(raw.get("content") or [])
            if text:
                item.text = _heard_words(text, item.heard_share)
            item.pending_text = pending and not item.text

    def _set_text(self, item_id: Any, text: str) -> None:
        item = self.items.get(str(item_id))
        if item is None:
            return
        item.pending_text = False
        item.text = _heard_words(text.strip(), item.heard_share)

    def _on_call(self, event: dict[str, Any]) -> None:
        item_id = str(event.get("item_id") or "")
        item = self.items.get(item_id)
        if item is None:
            item = Item(id=item_id, kind="function_call")
            self.items[item_id] = item
            self._bound()
        item.call_id = str(event.get("call_id") or "")
        item.name = str(event.get("name") or item.name)
        item.arguments = str(event.get("arguments") or "")

    def _on_audio(self, event: dict[str, Any], audio_bytes: int, now: float | None) -> None:
        item_id = str(event.get("item_id") or "")
        item = self.items.get(item_id)
        if item is None:
            item = Item(id=item_id, kind="message", role="assistant", pending_text=True)
            self.items[item_id] = item
            self._bound()
        if self.audio_item_id != item_id:
            self.audio_item_id = item_id
            self.audio_started_at = now if now is not None else time.time()
        item.audio_ms += self.output_format.ms_for_bytes(audio_bytes)

    def _on_truncated(self, event: dict[str, Any]) -> None:
        item = self.items.get(str(event.get("item_id")))
        if item is None:
            return
        end = float(event.get("audio_end_ms") or 0)
        share = min(1.0, end / item.audio_ms) if item.audio_ms > 0 else 0.0
        item.text = _heard_words(item.text, share)
        item.heard_share = share * (1.0 if item.heard_share is None else item.heard_share)
        item.audio_ms = min(item.audio_ms, end)
        item.truncated = True
        item.pending_text = False

    def _bound(self) -> None:
        while len(self.items) > self.max_items:
            self.items.pop(next(iter(self.items)))

    # ---------------------------------------------------------------- decisions

    @property
    def busy(self) -> bool:
        """A turn is in flight: the user is speaking or a response is being produced."""
        return self.user_speaking or self.response_id is not None

    def cut_for_barge_in(
        self,
        played_ms: float | None,
        delivered_ms: float | None,
        playback_item: str | None,
        now: float | None = None,
    ) -> Cut | None:
        """Where to cut the assistant's last audio item when the user interrupts it.

        The cut is what the consumer reports as played, else what egress delivered, but
        never more than the audio the upstream produced, nor more than real time since
        the item's first audio (nobody hears audio faster than it plays). None when the
        user had already heard the whole item, or there is no such item.
        """
        item = self.items.get(self.audio_item_id or "")
        if item is None or item.truncated:
            return None
        heard: float
        if playback_item is not None and playback_item != item.id:
            heard = 0.0  # egress has not delivered any of this item yet
        elif played_ms is not None:
            heard = played_ms
        elif delivered_ms is not None:
            heard = delivered_ms
        else:
            heard = 0.0
        heard = min(heard, delivered_ms if delivered_ms is not None else heard, item.audio_ms)
        if self.audio_started_at is not None:
            elapsed_ms = ((now if now is not None else time.time()) - self.audio_started_at) * 1000
            heard = min(heard, elapsed_ms)
        in_progress = self.response_id is not None
        if heard >= item.audio_ms - 1 and not in_progress:
            return None  # all of it was heard
        return Cut(item.id, max(0, int(heard)))

    def pending_calls(self) -> list[Item]:
        """Function calls without an output item yet."""
        answered = {i.call_id for i in self.items.values() if i.kind == "function_call_output"}
        answered |= self.answered_calls
        return [
            i
            for i in self.items.values()
            if i.kind == "function_call" and i.call_id and i.call_id not in answered
        ]

    def replay(self) -> list[dict[str, Any]]:
        """The `conversation.item.create` events that rebuild the conversation upstream."""
        events = []
        for item in self.items.values():
            if item.pending_text:
                continue
            created = item.create_event()
            if created is not None:
                events.append(created)
        return events

    # ---------------------------------------------------------------- persistence

    def dump(self) -> str:
        """The conversation as checkpoint text (`load` reads it back). Made on every write
        after a change: an item's own attributes are its fields, so they are dumped as
        they are (`dataclasses.asdict` copied each item deeply, six times the cost)."""
        return json.dumps(
            {
                "output_format": self.output_format.value,
                "items": [vars(i) for i in self.items.values()],
                "answered_calls": sorted(self.answered_calls),
            },
            separators=(",", ":"),
        )

    @classmethod
    def load(cls, text: str | None, max_items: int = 200) -> Conversation:
        conv = cls(max_items=max_items)
        if not text:
            return conv
        data = json.loads(text)
        conv.output_format = AudioFormat(data.get("output_format", "pcm16"))
        for raw in data.get("items", []):
            item = Item(**raw)
            conv.items[item.id] = item
        conv.answered_calls = set(data.get("answered_calls", []))
        return conv


def _heard_words(text: str, share: float | None) -> str:
    """The first `share` of the words of `text`, rounded down (all of it when None).

    The words are not timed, so the share of them that fits in what was heard is the best
    estimate; rounding down keeps anything unheard out of the conversation.
    """
    if share is None:
        return text
    words = text.split()
    return " ".join(words[: int(len(words) * share)])


def _message_text(content: list[Any]) -> tuple[str, bool]:
    """The text of a message's content parts, and whether an audio transcript is pending."""
    texts: list[str] = []
    pending = False
    for part in content:
        if not isinstance(part, dict):
            continue
        if isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif isinstance(part.get("transcript"), str) and part["transcript"]:
            texts.append(part["transcript"])
        elif part.get("type") in ("input_audio", "audio"):
            pending = True
    return " ".join(t.strip() for t in texts if t.strip()), pending
