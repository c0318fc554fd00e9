"""Text-to-speech: the interface the engine needs, and espeak-ng behind it.

espeak-ng (GPL-3.0) comes from the `espeakng-loader` wheel, which ships the shared library
and its data; it is loaded at run time as a separate shared library through `ctypes`, never
linked into vlpipe. It renders PCM16 mono at 22.05 kHz. The library keeps global state and
is not thread-safe, so every call goes through one lock; `synthesize` blocks and the server
runs it on a single worker thread.
"""

from __future__ import annotations

import ctypes
import threading
from typing import ClassVar, Protocol

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_END_PAUSE = 0x1000
_BUFFER_MS = 200

_SYNTH_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)

# Session voices that get espeak-ng's female variant; every other name gets the male one.
_FEMALE_VOICES = (
    "coral sage shimmer marin ava emma jenny aria sara nancy jane michelle elizabeth "
    "amber ashley cora monica denise elsa francisca xiaoxiao ximena aarti diya meera"
).split()


class TextToSpeech(Protocol):
    """Renders text as speech. Must be safe to call from several threads."""

    @property
    def sample_rate(self) -> int:
        """Rate in Hz of the PCM16 that `synthesize` returns."""
        ...

    def synthesize(self, text: str, voice: str) -> bytes:
        """PCM16 LE mono at `sample_rate` speaking `text` with a voice chosen for the
        session voice name `voice` (blocking)."""
        ...


def espeak_voice_for(voice: str) -> str:
    """The espeak-ng voice for a Voice Live voice name: US English, female or male variant.

    A name is female if any word of it (split on '-', ':', '_' and spaces, case-insensitive)
    is a known female voice name, e.g. `shimmer` or `en-US-AvaNeural`.
    """
    lowered = voice.lower()
    female = any(name in lowered for name in _FEMALE_VOICES)
    return "en-us+f3" if female else "en-us+m3"


class EspeakSpeech:
    """espeak-ng through ctypes, serialized by a process-wide lock."""

    _lock: ClassVar[threading.Lock] = threading.Lock()
    _lib: ClassVar[ctypes.CDLL | None] = None
    _rate: ClassVar[int] = 0
    _chunks: ClassVar[list[bytes]] = []  # filled by the callback while the lock is held

    def __init__(self) -> None:
        with EspeakSpeech._lock:
            if EspeakSpeech._lib is None:
                EspeakSpeech._lib, EspeakSpeech._rate = _load_espeak()

    @property
    def sample_rate(self) -> int:
        return EspeakSpeech._rate

    def synthesize(self, text: str, voice: str) -> bytes:
        lib = EspeakSpeech._lib
        assert lib is not None
        data = text.encode("utf-8") + b"\0"
        with EspeakSpeech._lock:
            EspeakSpeech._chunks = []
            lib.espeak_SetVoiceByName(espeak_voice_for(voice).encode())
            status = lib.espeak_Synth(
                data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8 | _END_PAUSE, None, None
            )
            lib.espeak_Synchronize()
            chunks, EspeakSpeech._chunks = EspeakSpeech._chunks, []
        if status != 0:
            raise RuntimeError(f"espeak-ng synthesis failed with status {status}")
        return b"".join(chunks)


def _on_audio(wav: ctypes._Pointer[ctypes.c_short], count: int, _events: int | None) -> int:
    if count > 0:
        EspeakSpeech._chunks.append(ctypes.string_at(wav, count * 2))
    return 0  # 0 = keep going


_callback = _SYNTH_CALLBACK(_on_audio)  # module-level so that it is never collected


def _load_espeak() -> tuple[ctypes.CDLL, int]:
    import espeakng_loader

    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetVoiceByName.restype = ctypes.c_int
    lib.espeak_Synth.argtypes = [
        ctypes.c_char_p,
        ctypes.c_size_t,
        ctypes.c_uint,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.c_uint,
        ctypes.c_void_p,
        ctypes.c_void_p,
    ]
    lib.espeak_Synth.restype = ctypes.c_int
    rate = lib.espeak_Initialize(
        _AUDIO_OUTPUT_SYNCHRONOUS, _BUFFER_MS, espeakng_loader.get_data_path().encode(), 0
    )
    if rate <= 0:
        raise RuntimeError("espeak-ng failed to initialize")
    lib.espeak_SetSynthCallback(_callback)
    return lib, rate
