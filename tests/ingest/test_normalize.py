"""The pure normalizer: exact frames, chunking-independent output, signals preserved."""

from __future__ import annotations

import io
import wave
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlpipe.services.ingest.normalize import BadAudio, Normalizer
from vlpipe.shared.audio import AudioFormat, ulaw_to_pcm16
from vlpipe.shared.contracts import InputFormat, RawAudio

PCM_TARGETS = [AudioFormat.PCM16, AudioFormat.PCM16_16K, AudioFormat.PCM16_8K]


def tone(rate: int, seconds: float, hz: float = 440.0, level: float = 0.3) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return level * np.sin(2 * np.pi * hz * t)


def pcm16(signal: np.ndarray) -> bytes:
    return (signal * 32767).astype("<i2").tobytes()


def run(norm: Normalizer, chunks: list[RawAudio]) -> list[bytes]:
    frames: list[bytes] = []
    for chunk in chunks:
        frames += norm.push(chunk)
    return frames + norm.flush()


def samples(frames: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(frames), dtype="<i2").astype(np.int32)


@settings(max_examples=40, deadline=None)
@given(
    rate=st.sampled_from([8000, 11025, 16000, 22050, 24000, 44100, 48000]),
    target=st.sampled_from(PCM_TARGETS),
    cuts=st.lists(st.integers(1, 4000), min_size=1, max_size=12),
)
def test_any_chunking_gives_the_same_frames_as_the_whole_signal_within_2_lsb(
    rate: int, target: AudioFormat, cuts: list[int]
) -> None:
    whole = pcm16(tone(rate, 0.5) + 0.05 * np.random.default_rng(1).standard_normal(rate // 2))
    expected = samples(run(Normalizer(target), [RawAudio(audio=whole, rate=rate)]))
    chunks, pos = [], 0
    for cut in sorted({c * 2 for c in cuts}):
        if cut > pos and cut < len(whole):
            chunks.append(RawAudio(audio=whole[pos:cut], rate=rate))
            pos = cut
    chunks.append(RawAudio(audio=whole[pos:], rate=rate))
    got = samples(run(Normalizer(target), chunks))
    assert len(got) == len(expected)
    assert np.max(np.abs(got - expected)) <= 2


@pytest.mark.parametrize("target", list(AudioFormat))
def test_frames_are_exactly_20_ms_in_the_session_format(target: AudioFormat) -> None:
    frames = run(Normalizer(target), [RawAudio(audio=pcm16(tone(16000, 0.33)), rate=16000)])
    assert {len(f) for f in frames} == {target.bytes_for_ms(20)}
    assert len(frames) == 17  # 330 ms: 16 whole frames and a padded last one


def test_a_stereo_48k_tone_keeps_its_frequency_and_level_at_24k_mono() -> None:
    left = tone(48000, 1.0, hz=1000, level=0.5)
    stereo = np.column_stack([left, left]).reshape(-1)
    frames = run(
        Normalizer(AudioFormat.PCM16), [RawAudio(audio=pcm16(stereo), rate=48000, channels=2)]
    )
    out = samples(frames)[1000:23000] / 32767
    spectrum = np.abs(np.fft.rfft(out * np.hanning(len(out))))
    peak_hz = np.argmax(spectrum) * 24000 / len(out)
    assert abs(peak_hz - 1000) < 5
    level_db = 20 * np.log10(np.sqrt(np.mean(out**2)) / (0.5 / np.sqrt(2)))
    assert abs(level_db) < 0.5


def test_g711_telephony_audio_becomes_24k_pcm_with_its_tone() -> None:
    from vlpipe.shared.audio import pcm16_to_ulaw

    mulaw = pcm16_to_ulaw(pcm16(tone(8000, 1.0, hz=600)))
    frames = run(
        Normalizer(AudioFormat.PCM16), [RawAudio(audio=mulaw, format=InputFormat.G711_ULAW)]
    )
    out = samples(frames)[2000:22000] / 32767
    peak_hz = np.argmax(np.abs(np.fft.rfft(out))) * 24000 / len(out)
    assert abs(peak_hz - 600) < 5


def test_sessions_asking_for_g711_get_g711_frames() -> None:
    frames = run(
        Normalizer(AudioFormat.G711_ULAW),
        [RawAudio(audio=pcm16(tone(16000, 0.2, 500)), rate=16000)],
    )
    assert len(frames) == 10 and all(len(f) == 160 for f in frames)
    decoded = np.frombuffer(ulaw_to_pcm16(b"".join(frames)), dtype="<i2") / 32767
    assert 0.15 < np.sqrt(np.mean(decoded[400:] ** 2)) < 0.25  # the 0.3 tone's RMS, 0.21


def test_the_speech_recording_keeps_its_duration_within_one_frame(speech_wav: Path) -> None:
    data = speech_wav.read_bytes()
    chunks = [RawAudio(audio=data[:5000], format=InputFormat.WAV)]
    chunks += [
        RawAudio(audio=data[i : i + 3200], format=InputFormat.WAV)
        for i in range(5000, len(data), 3200)
    ]
    frames = run(Normalizer(AudioFormat.PCM16), chunks)
    with wave.open(str(speech_wav)) as wav:
        seconds = wav.getnframes() / wav.getframerate()
    assert abs(len(frames) * 0.020 - seconds) <= 0.020


@pytest.mark.parametrize(
    ("chunk", "problem"),
    [
        (RawAudio(audio=b"\x00\x01\x02", rate=16000), "multiple of 2 bytes"),
        (RawAudio(audio=b"\x00\x01", rate=16000, channels=2), "multiple of 4 bytes"),
        (RawAudio(audio=b"\x00" * 6, format=InputFormat.F32, rate=16000), "multiple of 4 bytes"),
        (RawAudio(audio=np.array([np.nan], "<f4").tobytes(), format=InputFormat.F32, rate=16000), "NaN"),
        (RawAudio(audio=b"\x00\x00"), "needs a 'rate'"),
        (RawAudio(audio=b"RIFF\x00\x00garbage", format=InputFormat.WAV), "WAV header"),
        (RawAudio(audio=b"\x00\x00" * 10, format=InputFormat.WAV), "before any WAV header"),
    ],
)  # fmt: skip
def test_bad_chunks_are_refused_naming_the_problem_and_the_session_goes_on(
    chunk: RawAudio, problem: str
) -> None:
    norm = Normalizer(AudioFormat.PCM16_16K)
    assert norm.push(RawAudio(audio=pcm16(tone(16000, 0.03)), rate=16000))
    with pytest.raises(BadAudio, match=problem):
        norm.push(chunk)
    assert len(norm.push(RawAudio(audio=pcm16(tone(16000, 0.04)), rate=16000))) == 2


def test_an_8_bit_wav_is_refused_with_its_sample_width() -> None:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(1)
        wav.setframerate(8000)
        wav.writeframes(b"\x80" * 800)
    with pytest.raises(BadAudio, match="8-bit"):
        Normalizer(AudioFormat.PCM16).push(RawAudio(audio=buf.getvalue(), format=InputFormat.WAV))


@settings(max_examples=60, deadline=None)
@given(
    garbage=st.binary(max_size=3000),
    fmt=st.sampled_from(list(InputFormat)),
    rate=st.none() | st.integers(8000, 48000),
    channels=st.integers(1, 2),
)
def test_garbage_never_raises_anything_but_bad_audio(
    garbage: bytes, fmt: InputFormat, rate: int | None, channels: int
) -> None:
    norm = Normalizer(AudioFormat.PCM16)
    try:
        frames = norm.push(RawAudio(audio=garbage, format=fmt, rate=rate, channels=channels))
    except BadAudio:
        frames = []
    assert all(len(f) == 960 for f in frames)
    after = norm.push(RawAudio(audio=pcm16(tone(24000, 0.04)), rate=24000))
    assert all(len(f) == 960 for f in after)


def encoded(container: str, codec: str, rate: int, seconds: float, hz: float) -> bytes:
    """A tone as a real compressed stream."""
    return compressed(pcm16(tone(rate, seconds, hz=hz)), rate, container, codec)


def compressed(pcm: bytes, rate: int, container: str, codec: str) -> bytes:
    """Mono PCM16 at `rate` Hz as a real compressed stream made with PyAV's encoders
    (libopus in Ogg or WebM, as a browser's MediaRecorder makes it; libmp3lame)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.layout = "mono"  # type: ignore[union-attr]
        signal = np.frombuffer(pcm, dtype="<i2").reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(signal, format="s16", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):  # type: ignore[union-attr]
            out.mux(packet)
        for packet in stream.encode(None):  # type: ignore[union-attr]
            out.mux(packet)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("fmt", "container", "codec", "rate"),
    [
        (InputFormat.OGG, "ogg", "libopus", 48000),
        (InputFormat.WEBM, "webm", "libopus", 48000),
        (InputFormat.MP3, "mp3", "libmp3lame", 44100),
    ],
)
def test_compressed_streams_fed_in_chunks_decode_to_the_same_tone_and_length(
    fmt: InputFormat, container: str, codec: str, rate: int
) -> None:
    data = encoded(container, codec, rate, 2.0, hz=700)
    chunks = [RawAudio(audio=data[i : i + 1500], format=fmt) for i in range(0, len(data), 1500)]
    frames = run(Normalizer(AudioFormat.PCM16), chunks)
    assert abs(len(frames) * 0.020 - 2.0) <= 0.1, "encoder delay and padding at most 100 ms"
    out = samples(frames)[2400:45600] / 32767
    peak_hz = np.argmax(np.abs(np.fft.rfft(out * np.hanning(len(out))))) * 24000 / len(out)
    assert abs(peak_hz - 700) < 5


def test_a_garbage_compressed_stream_is_refused_and_the_session_goes_on() -> None:
    norm = Normalizer(AudioFormat.PCM16)
    refused = False
    for _ in range(5):
        try:
            norm.push(RawAudio(audio=b"\x13\x37" * 4000, format=InputFormat.OGG))
        except BadAudio as exc:
            refused = "ogg stream" in str(exc)
    frames = norm.flush()
    assert refused or frames == [], "garbage never becomes audio"
    assert len(norm.push(RawAudio(audio=pcm16(tone(24000, 0.04)), rate=24000))) == 2


@pytest.mark.parametrize(
    ("fmt", "container"), [(InputFormat.WEBM, "webm"), (InputFormat.OGG, "ogg")]
)
def test_a_compressed_streams_audio_is_out_when_its_last_chunk_arrives_not_at_its_end(
    fmt: InputFormat, container: str
) -> None:
    # A caller that sent its last words and waits for the answer sends nothing more: those
    # words must be framed now, not when the stream ends or another chunk arrives.
    data = encoded(container, "libopus", 48000, 2.0, hz=700)
    norm = Normalizer(AudioFormat.PCM16)
    frames: list[bytes] = []
    for i in range(0, len(data), 1000):
        frames += norm.push(RawAudio(audio=data[i : i + 1000], format=fmt))
    assert len(frames) * 0.020 >= 2.0 - 0.05, "all but the codec's and resampler's delay"
