"""The speech models one engine process shares between its sessions, and their threads.

`SpeechBackends.load(model)` loads what an engine model needs: `echo` only the VAD pool,
`local` also Whisper (speech-to-text) and espeak-ng (text-to-speech). Whisper and espeak-ng
are loaded once per process (later loads reuse them), and each runs on its own thread pool
so that the event loop never waits for a model: espeak-ng on one thread (it is not
thread-safe), Whisper on `stt_workers` threads.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from vlpipe.services.engine.settings import EngineModel
from vlpipe.services.engine.stt import SpeechToText, WhisperSpeechToText
from vlpipe.services.engine.tts import EspeakSpeech, TextToSpeech
from vlpipe.services.engine.vad import SileroPool

_PREWARMED_VADS = 2


@dataclass
class SpeechBackends:
    """VAD pool, optional STT and TTS, and the executors their blocking calls run on."""

    vad_pool: SileroPool
    stt: SpeechToText | None
    tts: TextToSpeech | None
    stt_executor: ThreadPoolExecutor
    tts_executor: ThreadPoolExecutor

    @classmethod
    def load(cls, model: EngineModel, stt_threads: int = 1, stt_workers: int = 1) -> SpeechBackends:
        """Load the models `model` needs (blocking: seconds on a cold start)."""
        pool = SileroPool()
        pool.prewarm(_PREWARMED_VADS)
        local = model == "local"
        return cls(
            vad_pool=pool,
            stt=whisper(stt_threads, stt_workers) if local else None,
            tts=espeak() if local else None,
            stt_executor=ThreadPoolExecutor(stt_workers, thread_name_prefix="engine-stt"),
            tts_executor=ThreadPoolExecutor(1, thread_name_prefix="engine-tts"),
        )

    def close(self) -> None:
        """Stop the worker threads (models stay loaded for the process)."""
        self.stt_executor.shutdown(wait=False, cancel_futures=True)
        self.tts_executor.shutdown(wait=False, cancel_futures=True)


@functools.cache
def whisper(threads: int, workers: int) -> WhisperSpeechToText:
    """The process's Whisper model for this thread layout (loaded on first use)."""
    return WhisperSpeechToText(threads=threads, workers=workers)


@functools.cache
def espeak() -> EspeakSpeech:
    """The process's espeak-ng voice (initialized on first use)."""
    return EspeakSpeech()
