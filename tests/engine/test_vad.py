"""Turn detection: the server VAD parameters, on scripted probabilities and on Silero."""

from __future__ import annotations

import numpy as np
import pytest

from tests.engine.conftest import LoudnessModel, silence, tone
from vlpipe.services.engine.vad import (
    SileroVoiceActivity,
    SpeechStarted,
    SpeechStopped,
    TurnDetector,
    VadConfig,
)


def feed_all(detector: TurnDetector, pcm: bytes, chunk: int = 640) -> list[object]:
    events: list[object] = []
    for start in range(0, len(pcm), chunk):
        events += detector.feed(pcm[start : start + chunk])
    return events


def test_speech_start_includes_prefix_padding_and_stop_waits_for_silence_duration() -> None:
    detector = TurnDetector(LoudnessModel(), VadConfig(0.5, 300, 500))
    events = feed_all(detector, silence(1024) + tone(992) + silence(1024))
    assert len(events) == 2
    started, stopped = events
    assert isinstance(started, SpeechStarted) and isinstance(stopped, SpeechStopped)
    assert started.audio_start_ms == 1024 - 300
    # Speech ends at 2016 ms; the stop is decided a silence duration later (to the window).
    assert 2016 + 500 <= stopped.audio_end_ms <= 2016 + 500 + 32


@pytest.mark.parametrize("silence_ms", [200, 800])
def test_pauses_shorter_than_silence_duration_do_not_end_the_turn(silence_ms: int) -> None:
    detector = TurnDetector(LoudnessModel(), VadConfig(0.5, 0, silence_ms))
    pause = 500
    events = feed_all(detector, tone(640) + silence(pause) + tone(640) + silence(1500))
    starts = [e for e in events if isinstance(e, SpeechStarted)]
    expected_turns = 2 if silence_ms < pause else 1
    assert len(starts) == expected_turns


def test_blips_shorter_than_64_ms_are_not_speech() -> None:
    detector = TurnDetector(LoudnessModel(), VadConfig())
    assert feed_all(detector, silence(256) + tone(32) + silence(1000)) == []


def test_threshold_above_the_models_confidence_hears_nothing() -> None:
    detector = TurnDetector(LoudnessModel(), VadConfig(threshold=0.95))
    assert feed_all(detector, tone(1000) + silence(1000)) == []


def test_times_count_from_the_detectors_start() -> None:
    detector = TurnDetector(LoudnessModel(), VadConfig(0.5, 0, 300), start_ms=10_000)
    started = feed_all(detector, silence(320) + tone(320))[0]
    assert started == SpeechStarted(10_320)


def test_silero_finds_the_six_phrases_of_the_recording(speech_16k: bytes) -> None:
    detector = TurnDetector(SileroVoiceActivity(), VadConfig(0.5, 300, 500))
    events = feed_all(detector, speech_16k + silence(1000), chunk=3200)
    starts = [e for e in events if isinstance(e, SpeechStarted)]
    stops = [e for e in events if isinstance(e, SpeechStopped)]
    assert len(starts) == len(stops) == 6


def test_silero_ignores_white_noise() -> None:
    noise = np.random.default_rng(7).normal(0, 2000, 16000 * 3).astype("<i2").tobytes()
    detector = TurnDetector(SileroVoiceActivity(), VadConfig())
    assert feed_all(detector, noise, chunk=3200) == []
