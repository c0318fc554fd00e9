"""What the compressed-stream readers (Ogg, WebM, MP3) share: the packets they hand to the
decoder, and how the bytes in their resumable state are written into a checkpoint."""

from __future__ import annotations

import base64
from typing import Literal, NamedTuple


class Packet(NamedTuple):
    """One codec packet out of a container: the codec's header, or audio to decode."""

    kind: Literal["head", "audio"]
    data: bytes


def b64(data: bytes | bytearray) -> str:
    """Bytes as checkpoint text (the session state hash holds UTF-8 text)."""
    return base64.b64encode(data).decode("ascii")


def unb64(text: object) -> bytes:
    """The bytes `b64` wrote; ValueError if `text` is not such a string."""
    if not isinstance(text, str):
        raise ValueError(f"expected base64 text, got {type(text).__name__}")
    return base64.b64decode(text, validate=True)
