"""The conversation a session builds: ordered items, as the realtime API names them.

Items are mutable while a response fills them in (transcripts, status, arguments);
`to_wire()` renders an item as the `item` object of server events.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vlpipe.services.engine.errors import ClientError


@dataclass
class InputText:
    text: str

    def to_wire(self) -> dict[str, Any]:
        return {"type": "input_text", "text": self.text}


@dataclass
class InputAudio:
    """User audio: PCM16 mono 16 kHz; `transcript` is None until transcription ends."""

    audio: bytes
    transcript: str | None = None

    @property
    def duration_ms(self) -> float:
        return len(self.audio) / 32.0

    def to_wire(self) -> dict[str, Any]:
        return {"type": "input_audio", "transcript": self.transcript}


@dataclass
class OutputText:
    text: str = ""

    def to_wire(self) -> dict[str, Any]:
        return {"type": "text", "text": self.text}


@dataclass
class OutputAudio:
    """Assistant speech; `duration_ms` counts the audio produced (or kept by a truncate)."""

    transcript: str = ""
    duration_ms: float = 0.0

    def to_wire(self) -> dict[str, Any]:
        return {"type": "audio", "transcript": self.transcript}


ContentPart = InputText | InputAudio | OutputText | OutputAudio


@dataclass
class Message:
    id: str
    role: str  # user, assistant or system
    content: list[ContentPart] = field(default_factory=list)
    status: str = "completed"

    @property
    def text(self) -> str:
        """The words of this message: typed text, transcripts and output text, joined."""
        words: list[str] = []
        for part in self.content:
            if isinstance(part, InputText | OutputText):
                words.append(part.text)
            elif part.transcript:
                words.append(part.transcript)
        return " ".join(w.strip() for w in words if w.strip())

    @property
    def transcription_pending(self) -> bool:
        return any(isinstance(p, InputAudio) and p.transcript is None for p in self.content)

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "realtime.item",
            "type": "message",
            "role": self.role,
            "status": self.status,
            "content": [part.to_wire() for part in self.content],
        }


@dataclass
class FunctionCall:
    id: str
    name: str
    call_id: str
    arguments: str = ""
    status: str = "completed"

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "realtime.item",
            "type": "function_call",
            "status": self.status,
            "name": self.name,
            "call_id": self.call_id,
            "arguments": self.arguments,
        }


@dataclass
class FunctionCallOutput:
    id: str
    call_id: str
    output: str

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "realtime.item",
            "type": "function_call_output",
            "call_id": self.call_id,
            "output": self.output,
        }


Item = Message | FunctionCall | FunctionCallOutput


class Conversation:
    """The ordered items of one session."""

    def __init__(self) -> None:
        self.items: list[Item] = []

    def get(self, item_id: str) -> Item | None:
        return next((item for item in self.items if item.id == item_id), None)

    @property
    def last_id(self) -> str | None:
        return self.items[-1].id if self.items else None

    def add(self, item: Item, previous_item_id: str | None = None) -> str | None:
        """Insert `item` after `previous_item_id` (end if None, start if 'root').

        Returns the id of the item it now follows. Raises ClientError for a duplicate id or
        an unknown `previous_item_id`.
        """
        if self.get(item.id) is not None:
            raise ClientError(
                "invalid_value", f"Item with id '{item.id}' already exists.", "item.id"
            )
        if previous_item_id is None:
            previous = self.last_id
            self.items.append(item)
            return previous
        if previous_item_id == "root":
            self.items.insert(0, item)
            return None
        for index, existing in enumerate(self.items):
            if existing.id == previous_item_id:
                self.items.insert(index + 1, item)
                return previous_item_id
        raise ClientError(
            "invalid_value",
            f"Previous item with id '{previous_item_id}' not found.",
            "previous_item_id",
        )

    def delete(self, item_id: str) -> bool:
        """Remove the item; False if there was none with that id."""
        item = self.get(item_id)
        if item is None:
            return False
        self.items.remove(item)
        return True

    def last_user_message(self) -> Message | None:
        for item in reversed(self.items):
            if isinstance(item, Message) and item.role == "user":
                return item
        return None

    def since_last_user_message(self) -> list[Item]:
        """The items after the last user message (all items if there is none)."""
        for index in range(len(self.items) - 1, -1, -1):
            item = self.items[index]
            if isinstance(item, Message) and item.role == "user":
                return self.items[index + 1 :]
        return list(self.items)

    def function_name(self, call_id: str) -> str | None:
        """The function a call_id was issued for, if this conversation holds the call."""
        for item in self.items:
            if isinstance(item, FunctionCall) and item.call_id == call_id:
                return item.name
        return None
