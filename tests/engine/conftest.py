"""Fixtures of the engine tests: the test recording, audio helpers and a raw client."""

from __future__ import annotations

import asyncio
import base64
import json
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soxr
from websockets.asyncio.client import ClientConnection

from tests.engine.sdk_models import parse_server_event

SPEECH_WAV = Path(__file__).resolve().parents[2] / "samples" / "speech-16k-beckett.wav"
SPEECH_WORDS = "Ever tried. Ever failed. No matter. Try again. Fail again. Fail better."


@pytest.fixture(scope="session")
def speech_16k() -> bytes:
    """The Beckett recording: PCM16 mono 16 kHz, 9.96 s."""
    with wave.open(str(SPEECH_WAV)) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (16000, 1, 2)
        return wav.readframes(wav.getnframes())


def resample(pcm: bytes, rate_in: int, rate_out: int) -> bytes:
    """PCM16 mono resampled in one go."""
    if rate_in == rate_out:
        return pcm
    samples = np.frombuffer(pcm, dtype="<i2")
    return soxr.resample(samples, rate_in, rate_out).astype("<i2").tobytes()


def silence(ms: int, rate: int = 16000) -> bytes:
    """PCM16 zeros."""
    return b"\0\0" * (rate * ms // 1000)


def tone(ms: int, rate: int = 16000) -> bytes:
    """A loud 220 Hz PCM16 tone."""
    t = np.arange(rate * ms // 1000) / rate
    return (np.sin(2 * np.pi * 220 * t) * 8000).astype("<i2").tobytes()


class LoudnessModel:
    """A stand-in VAD model: probability 0.9 for windows louder than -30 dBFS, else 0.05."""

    window_samples = 512

    def speech_probability(self, window: np.ndarray) -> float:
        return 0.9 if float(np.sqrt(np.mean(window**2))) > 0.03 else 0.05

    def reset(self) -> None:
        pass


class RawClient:
    """A plain `websockets` client speaking raw JSON; keeps every event it receives and
    checks each against the SDK's models."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []
        self._returned: set[int] = set()

    async def send(self, event: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(event))

    async def append_audio(self, wire: bytes, chunk_bytes: int, pace_s: float = 0.0) -> None:
        for start in range(0, len(wire), chunk_bytes):
            chunk = base64.b64encode(wire[start : start + chunk_bytes]).decode()
            await self.send({"type": "input_audio_buffer.append", "audio": chunk})
            await asyncio.sleep(pace_s)

    async def next_event(self, within: float = 10.0) -> dict[str, Any]:
        event: dict[str, Any] = json.loads(await asyncio.wait_for(self.ws.recv(), within))
        parse_server_event(event)
        self.events.append(event)
        return event

    async def wait_for(self, kind: str, within: float = 20.0, **match: Any) -> dict[str, Any]:
        """The first event of type `kind` (with the given top-level fields) that no earlier
        call returned, waiting for it if need be."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            for index, event in enumerate(self.events):
                if index in self._returned or event["type"] != kind:
                    continue
                if all(event.get(k) == v for k, v in match.items()):
                    self._returned.add(index)
                    return event
            remaining = deadline - loop.time()
            if remaining <= 0:
                seen = [e["type"] for e in self.events[-15:]]
                raise AssertionError(f"no {kind} within {within}s; last events: {seen}")
            await self.next_event(remaining)

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]
