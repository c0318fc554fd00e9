"""Per-connection limits: the token bucket and the audio speed rule, on a given clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vlpipe.services.egress.limits import (
    ConnectionLimits,
    LimitExceeded,
    LimitSettings,
    TokenBucket,
    audio_bytes_per_s,
)

PCM16_16K = audio_bytes_per_s("pcm16", 16000)  # 32 000 bytes a second


def send(limits: ConnectionLimits, seconds: float, speed: float, chunk_s: float = 0.02) -> float:
    """Send `seconds` of PCM16 16 kHz audio at `speed` times real time in `chunk_s` chunks;
    the seconds of audio accepted before the limit closed the connection."""
    sent, now = 0.0, 0.0
    while sent < seconds:
        try:
            limits.message(now)
            limits.audio_chunk(int(PCM16_16K * chunk_s), now)
        except LimitExceeded:
            return sent
        sent += chunk_s
        now += chunk_s / speed
    return sent


def test_real_time_and_up_to_twice_real_time_pass_for_ever() -> None:
    for speed in (1.0, 1.5, 1.99):
        assert send(ConnectionLimits(LimitSettings(), PCM16_16K), 600, speed) >= 600


def test_ten_times_real_time_is_stopped_after_the_burst() -> None:
    limits = ConnectionLimits(LimitSettings(audio_burst_s=2.0), PCM16_16K)
    accepted = send(limits, 600, 10)
    # The burst (2 s) plus what refilled at 2x while it was sent at 10x: 2 / (1 - 2/10).
    assert 2.0 <= accepted <= 2.6


def test_the_reason_names_the_limit() -> None:
    limits = ConnectionLimits(LimitSettings(), PCM16_16K)
    with pytest.raises(LimitExceeded) as caught:
        for _ in range(10):  # 10 s of audio at once
            limits.audio_chunk(32000, 0.0)
    assert caught.value.kind == "audio_rate" and caught.value.code == 1008
    assert "2x real time" in caught.value.reason


def test_an_audio_chunk_over_the_size_limit_is_refused_with_1009() -> None:
    limits = ConnectionLimits(LimitSettings(max_audio_chunk_bytes=1000), PCM16_16K)
    limits.audio_chunk(1000, 0.0)
    with pytest.raises(LimitExceeded) as caught:
        limits.audio_chunk(1001, 0.0)
    assert caught.value.kind == "audio_size" and caught.value.code == 1009


def test_too_many_messages_a_second_are_refused() -> None:
    limits = ConnectionLimits(LimitSettings(max_messages_per_s=50), PCM16_16K)
    for n in range(500):
        limits.message(n / 49)  # just under 50 a second: for ever
    with pytest.raises(LimitExceeded) as caught:
        for _ in range(100):
            limits.message(500 / 49)  # 100 at once: over the burst of 50
    assert caught.value.kind == "message_rate"


def test_real_time_byte_rates_of_the_formats() -> None:
    assert audio_bytes_per_s("pcm16", 24000) == 48000
    assert audio_bytes_per_s("g711_ulaw", 8000) == 8000
    assert audio_bytes_per_s("webm", None) == 510_000 / 8  # Opus at its highest bitrate


@given(
    rate=st.floats(1, 1e6),
    capacity=st.floats(1, 1e6),
    takes=st.lists(st.tuples(st.floats(0, 10), st.floats(0, 1e5)), max_size=200),
)
def test_a_bucket_never_passes_more_than_its_rate_allows(
    rate: float, capacity: float, takes: list[tuple[float, float]]
) -> None:
    bucket = TokenBucket(rate, capacity)
    now, passed, largest = 0.0, 0.0, 0.0
    for wait, amount in takes:
        now += wait
        if bucket.take(amount, now):
            passed += amount
            largest = max(largest, amount)
    # Over any run: the burst, what refilled, and at most one overdraft.
    assert passed <= capacity + rate * now + largest + 1e-6 * (capacity + rate * now + largest)
