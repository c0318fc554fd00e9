"""A new owner continues a session's audio from the old owner's snapshot, losing nothing.

Each test cuts a stream into chunks anywhere, hands the normalizer over before some of them
(snapshot, through checkpoint text, into `Normalizer.resume`), and compares the frames with
those of one normalizer that saw every chunk:

* exactly as many frames: no audio is lost or repeated, whatever was in flight;
* PCM and WAV: every sample within 4 LSB (the resampler is rebuilt from its replayed input,
  so its output continues as if nothing happened; soxr dithers its 16-bit output with a
  seed of its own, so even two uninterrupted runs differ by up to 2 LSB);
* Opus and MP3: every sample within 6 LSB, except in a window after each takeover where the
  new decoder, warmed with the old one's last 8 packets (160 ms), is still converging on the
  old one's state. Measured on these tones, the worst of many cuts: 156 LSB (0.5% of full
  scale) at once, 51 after 40 ms, 7 after 100 ms, 3 after 150 ms; MP3 (5 frames of
  pre-roll) is within 3 LSB from the start. So the window is 150 ms plus the frame in
  flight, and inside it every sample is within 1% of full scale (328 LSB) and the audio
  correlates with the uninterrupted run's (> 0.99).
"""

from __future__ import annotations

import contextlib
import io
import json
import threading
import wave
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.ingest.test_normalize import compressed, pcm16, tone
from vlpipe.services.ingest.normalize import BadAudio, Normalizer
from vlpipe.shared.audio import AudioFormat
from vlpipe.shared.contracts import InputFormat, RawAudio

TARGET = AudioFormat.PCM16
SAMPLES_PER_FRAME = 480  # 20 ms at 24 kHz
WARMUP = 24 * 150 + SAMPLES_PER_FRAME  # samples: 150 ms after the takeover, and the frame in flight


def signal(rate: int, seconds: float = 2.0) -> np.ndarray:
    """Two tones, so that a decoder converging on one band only is still caught."""
    return tone(rate, seconds, 440) + tone(rate, seconds, 1300, 0.2)


DATA = Path(__file__).parent / "data"


@cache
def stream(kind: str) -> bytes:
    """Two seconds of `signal` as the byte stream a producer of `kind` sends (for
    `webm-chrome`, three seconds of a tone as Chromium's MediaRecorder recorded it)."""
    if kind == "webm-chrome":
        return (DATA / "mediarecorder-chrome.webm").read_bytes()
    if kind == "ogg":
        return compressed(pcm16(signal(48000)), 48000, "ogg", "libopus")
    if kind == "webm":
        return compressed(pcm16(signal(48000)), 48000, "webm", "libopus")
    if kind == "webm-live":
        return as_media_recorder(compressed(pcm16(signal(48000)), 48000, "webm", "libopus"))
    assert kind == "mp3"
    return compressed(pcm16(signal(44100)), 44100, "mp3", "libmp3lame")


def _vint(data: bytes, at: int) -> tuple[int, int]:
    length = 9 - data[at].bit_length()
    return int.from_bytes(data[at : at + length], "big"), length


UNKNOWN_SIZE = b"\x01\xff\xff\xff\xff\xff\xff\xff"


def as_media_recorder(webm: bytes) -> bytes:
    """`webm` rewritten as browsers' MediaRecorder writes WebM: the Segment and every
    Cluster of unknown size (a live writer cannot go back to fill sizes in)."""
    out, at = bytearray(), 0
    while at < len(webm):  # top level: the EBML header, then the Segment
        ident, id_len = _vint(webm, at)
        size, size_len = _vint(webm, at + id_len)
        size &= (1 << (7 * size_len)) - 1
        body = at + id_len + size_len
        if ident != 0x18538067:
            out += webm[at : body + size]
            at = body + size
            continue
        out += webm[at : at + id_len] + UNKNOWN_SIZE
        at = body
        while at < len(webm):  # the Segment's children
            ident, id_len = _vint(webm, at)
            size, size_len = _vint(webm, at + id_len)
            size &= (1 << (7 * size_len)) - 1
            child = at + id_len + size_len
            if ident == 0x1F43B675:
                out += webm[at : at + id_len] + UNKNOWN_SIZE + webm[child : child + size]
            elif ident != 0x1C53BB6B:  # no Cues: a live writer has no index
                out += webm[at : child + size]
            at = child + size
    return bytes(out)


def wav_stream(rate: int, channels: int, seconds: float = 1.0) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        noise = 0.05 * np.random.default_rng(7).standard_normal(int(rate * seconds))
        mono = signal(rate, seconds) + noise
        wav.writeframes(pcm16(np.repeat(mono, channels)))
    return buf.getvalue()


def cut(data: bytes, sizes: list[int], first: int = 0) -> list[bytes]:
    """`data` in chunks of the given sizes (cycled); the first chunk `first` bytes longer."""
    chunks, at, i = [], 0, 0
    while at < len(data):
        size = sizes[i % len(sizes)] + (first if i == 0 else 0)
        chunks.append(data[at : at + size])
        at, i = at + size, i + 1
    return chunks


def normalized(
    chunks: list[RawAudio], takeovers: set[int], target: AudioFormat = TARGET
) -> tuple[np.ndarray, list[int], list[dict[str, str]]]:
    """The samples of every frame, the sample each takeover happened at, and the snapshots.

    Before each chunk in `takeovers` the normalizer is replaced by one resumed from its
    snapshot, as a new owner would from the checkpoint hash."""
    norm = Normalizer(target)
    frames: list[bytes] = []
    at: list[int] = []
    snapshots: list[dict[str, str]] = []
    for i, chunk in enumerate(chunks):
        snapshots.append(norm.snapshot())
        if i in takeovers:
            norm = Normalizer.resume(target, 20, snapshots[-1])
            at.append(len(frames) * SAMPLES_PER_FRAME)
        frames += norm.push(chunk)
    frames += norm.flush()
    samples = np.frombuffer(b"".join(frames), dtype="<i2").astype(np.int32)
    return samples, at, snapshots


def assert_same_audio(got: np.ndarray, expected: np.ndarray, takeovers: list[int]) -> None:
    assert len(got) == len(expected), "no audio lost or repeated"
    outside = np.ones(len(got), dtype=bool)
    for start in takeovers:
        window = slice(start, start + WARMUP)
        outside[window] = False
        assert np.max(np.abs(got[window] - expected[window]), initial=0) <= 328, "warm-up"
        if len(expected[window]) > SAMPLES_PER_FRAME and np.std(expected[window]) > 0:
            assert np.corrcoef(got[window], expected[window])[0, 1] > 0.99, "warm-up"
    assert np.max(np.abs(got - expected)[outside], initial=0) <= 6


def assert_small_and_steady(snapshots: list[dict[str, str]]) -> None:
    """The header field is written once learned; what is in flight stays a few kB: base64
    of less than a frame (960 bytes), the resampler's replay (at most 30 ms of the source),
    the pre-roll (3 kB at most) and a partial packet."""
    headers = [s["stream"] for s in snapshots]
    learned = [h for h in headers if h != headers[0]]
    assert len(set(learned)) <= 1, "the stream field changes once, when the header is read"
    assert max(len(s["carry"]) for s in snapshots) < 12 * 1024


COMPRESSED = {
    "ogg": InputFormat.OGG,
    "webm": InputFormat.WEBM,
    "webm-live": InputFormat.WEBM,
    "webm-chrome": InputFormat.WEBM,
    "mp3": InputFormat.MP3,
}


CHUNK_SIZES = st.lists(st.integers(1, 3000), min_size=1, max_size=6).filter(
    lambda sizes: sum(sizes) >= 100 * len(sizes)  # at most a few hundred chunks: see below
)


@pytest.mark.parametrize("kind", list(COMPRESSED))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=CHUNK_SIZES,
    picks=st.lists(st.floats(0, 1, exclude_max=True), min_size=1, max_size=3),
)
def test_a_compressed_stream_taken_over_anywhere_loses_nothing(
    kind: str, sizes: list[int], picks: list[float]
) -> None:
    chunks = [RawAudio(audio=c, format=COMPRESSED[kind]) for c in cut(stream(kind), sizes)]
    takeovers = {1 + int(p * (len(chunks) - 1)) for p in picks} - {len(chunks)}
    expected, _, _ = normalized(chunks, set())
    got, at, snapshots = normalized(chunks, takeovers)
    assert_same_audio(got, expected, at)
    assert_small_and_steady(snapshots)


@settings(max_examples=100, deadline=None)
@given(
    rate=st.sampled_from([8000, 11025, 16000, 22050, 24000, 44100, 48000]),
    channels=st.integers(1, 2),
    target=st.sampled_from([AudioFormat.PCM16, AudioFormat.PCM16_16K, AudioFormat.PCM16_8K]),
    first=st.integers(44, 3000),
    sizes=CHUNK_SIZES,
    picks=st.lists(st.floats(0, 1, exclude_max=True), min_size=1, max_size=3),
)
def test_a_wav_stream_taken_over_anywhere_loses_nothing(
    rate: int,
    channels: int,
    target: AudioFormat,
    first: int,
    sizes: list[int],
    picks: list[float],
) -> None:
    # The first chunk carries the RIFF header (44 bytes); any chunk may cut a sample in two.
    data = wav_stream(rate, channels)
    chunks = [RawAudio(audio=c, format=InputFormat.WAV) for c in cut(data, sizes, first - 1)]
    takeovers = {1 + int(p * (len(chunks) - 1)) for p in picks} - {len(chunks)}
    expected, _, _ = normalized(chunks, set(), target)
    got, _, snapshots = normalized(chunks, takeovers, target)
    assert len(got) == len(expected), "no audio lost or repeated"
    # A resumed resampler re-primes its filter from the input it held back, so samples near
    # a takeover differ from the uninterrupted run by float rounding: a few LSB (4 in 150
    # random cases, 5 in one Hypothesis found), far below hearing (8 LSB is -72 dBFS).
    assert np.max(np.abs(got - expected)) <= 8, "the resampler continues within rounding"
    assert_small_and_steady(snapshots)


@settings(max_examples=60, deadline=None)
@given(
    rate=st.sampled_from([8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000]),
    sizes=CHUNK_SIZES,
    picks=st.lists(st.floats(0, 1, exclude_max=True), min_size=1, max_size=3),
)
def test_raw_pcm_taken_over_anywhere_keeps_the_resamplers_held_back_audio(
    rate: int, sizes: list[int], picks: list[float]
) -> None:
    data = pcm16(signal(rate, 1.0))
    chunks = [RawAudio(audio=c, rate=rate) for c in cut(data, [2 * s for s in sizes])]
    takeovers = {1 + int(p * (len(chunks) - 1)) for p in picks} - {len(chunks)}
    expected, _, _ = normalized(chunks, set())
    got, _, _ = normalized(chunks, takeovers)
    assert len(got) == len(expected)
    assert np.max(np.abs(got - expected)) <= 4


@pytest.mark.parametrize("kind", list(COMPRESSED))
def test_a_compressed_stream_taken_over_at_every_byte_of_its_start_loses_nothing(kind: str) -> None:
    # Cuts inside the container's headers and first packets: one byte per chunk, and a new
    # owner for every chunk. (The property test above cuts at a few hundred places at most.)
    data = stream(kind)
    sizes = [1] * 700 + [1500] * (len(data) // 1500 + 1)
    chunks = [RawAudio(audio=c, format=COMPRESSED[kind]) for c in cut(data, sizes)]
    expected, _, _ = normalized(chunks, set())
    got, at, snapshots = normalized(chunks, set(range(1, 700)))
    assert_same_audio(got, expected, sorted(set(at)))
    assert_small_and_steady(snapshots)


def test_a_browser_s_webm_taken_over_between_any_two_of_its_chunks_loses_nothing() -> None:
    # The chunks as Chromium's MediaRecorder handed them out (every 100 ms): stereo Opus in
    # 60 ms packets, a Segment and Clusters of unknown size.
    sizes = [int(n) for n in (DATA / "mediarecorder-chrome.sizes").read_text().split(",")]
    data = stream("webm-chrome")
    chunks = [RawAudio(audio=c, format=InputFormat.WEBM) for c in cut(data, sizes)]
    assert len(chunks) == len(sizes)
    expected, _, _ = normalized(chunks, set())
    tail = expected[4800:-4800] / 32767
    peak_hz = np.argmax(np.abs(np.fft.rfft(tail * np.hanning(len(tail))))) * 24000 / len(tail)
    assert abs(len(expected) / 24000 - 3.0) <= 0.1 and abs(peak_hz - 440) < 5
    for takeover in range(1, len(chunks)):
        got, at, snapshots = normalized(chunks, {takeover})
        assert_same_audio(got, expected, at)
        assert_small_and_steady(snapshots)


def test_a_wav_stream_taken_over_is_not_refused_after_the_takeover() -> None:
    # Before snapshots, a new owner knew no WAV header: "WAV data before any WAV header".
    data = wav_stream(16000, 1)
    norm = Normalizer(TARGET)
    norm.push(RawAudio(audio=data[:3001], format=InputFormat.WAV))  # odd: half a sample left
    resumed = Normalizer.resume(TARGET, 20, norm.snapshot())
    frames = resumed.push(RawAudio(audio=data[3001:6000], format=InputFormat.WAV))
    assert frames, "the new owner decodes the next chunk"


def test_mp3_resynchronizes_on_its_own_from_any_byte() -> None:
    # What a decoder gets when it joins an MP3 stream mid-way without any state (a producer
    # relaying a radio stream, or a new owner before snapshots existed): FFmpeg's parser
    # takes a few false sync words in the cut frame for frames, then locks on. With a
    # snapshot none of this happens: the new owner's parser starts at a frame boundary.
    data = stream("mp3")
    frame = 1152 * 24000 // 44100  # samples at 24 kHz
    whole, _, _ = normalized([RawAudio(audio=data, format=InputFormat.MP3)], set())
    for start in (1000, 5001, 9999):
        norm, frames, refused = Normalizer(TARGET), [], 0
        for chunk in cut(data[start:], [1500]):
            try:
                frames += norm.push(RawAudio(audio=chunk, format=InputFormat.MP3))
            except BadAudio as exc:
                assert "undecodable" in str(exc) and not frames, "only junk before the sync"
                refused += 1
        got = np.frombuffer(b"".join(frames + norm.flush()), dtype="<i2") / 32767
        lost = (len(data) - start) / len(data) * len(whole) - len(got)
        assert refused <= 1 and -frame <= lost <= 6 * frame, "at most 6 frames to sync"
        tail = got[-24000:-2400]
        peak_hz = np.argmax(np.abs(np.fft.rfft(tail * np.hanning(len(tail))))) * 24000 / len(tail)
        assert abs(peak_hz - 440) < 5


def test_a_snapshot_taken_before_any_audio_resumes_a_new_normalizer() -> None:
    resumed = Normalizer.resume(TARGET, 20, Normalizer(TARGET).snapshot())
    assert resumed.push(RawAudio(audio=pcm16(tone(24000, 0.04)), rate=24000))


@pytest.mark.parametrize(
    "checkpoint",
    [
        {"stream": "not json", "carry": "{}"},
        {"stream": '{"v": 99}', "carry": '{"v": 99}'},
        {"stream": '{"v": 1, "wav": [16000, 1, 2]}', "carry": '{"v": 1, "pending": 5}'},
        {"stream": '{"v": 1, "container": {"format": "ogg"}}', "carry": '{"v": 1}'},
        {"stream": "[]", "carry": "5"},
        {"stream": '{"v": 1, "wav": [16000, 0, 2]}', "carry": '{"v": 1, "wav_partial": ""}'},
    ],
)
def test_an_unreadable_snapshot_is_logged_and_the_session_goes_on(
    checkpoint: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    resumed = Normalizer.resume(TARGET, 20, {"audio_id": "1-0", **checkpoint})
    assert "audio snapshot unreadable" in caplog.text
    assert len(resumed.push(RawAudio(audio=pcm16(tone(24000, 0.04)), rate=24000))) == 2


@pytest.mark.parametrize("kind", list(COMPRESSED))
def test_compressed_streams_start_no_thread_whether_they_end_or_are_abandoned(kind: str) -> None:
    # Sessions lost, retried or switching format drop their normalizer mid-stream; one that
    # ends flushes it. Neither may leave a decoder thread behind.
    before = threading.active_count()
    data = stream(kind)
    for finish in (True, False):
        for _ in range(5):
            norm = Normalizer(TARGET)
            for chunk in cut(data[: len(data) // 2], [700]):
                norm.push(RawAudio(audio=chunk, format=COMPRESSED[kind]))
            norm.push(RawAudio(audio=pcm16(tone(24000, 0.1)), rate=24000))  # format change
            if finish:
                norm.flush()
    assert threading.active_count() == before


def _leaves(value: object, path: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _leaves(v, (*path, k))] or [path]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _leaves(v, (*path, i))] or [path]
    return [path]


def _replace(value: Any, path: tuple[Any, ...], new: object) -> Any:
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = _replace(copy[path[0]], path[1:], new)
    return copy


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=5,
)


@pytest.mark.parametrize("kind", ["wav", *COMPRESSED])
@settings(max_examples=60, deadline=None)
@given(field=st.sampled_from(["stream", "carry"]), pick=st.floats(0, 1, exclude_max=True),
       new=JSON_VALUES)  # fmt: skip
def test_a_damaged_snapshot_never_breaks_the_new_owner(
    kind: str, field: str, pick: float, new: object
) -> None:
    # Any value of the snapshot replaced by any other: the new owner starts (afresh if it
    # must), and what it pushes only ever fails as BadAudio.
    fmt = InputFormat.WAV if kind == "wav" else COMPRESSED[kind]
    data = wav_stream(16000, 2) if kind == "wav" else stream(kind)
    chunks = [RawAudio(audio=c, format=fmt) for c in cut(data, [1001])]
    norm = Normalizer(TARGET)
    for chunk in chunks[:5]:
        norm.push(chunk)
    snapshot = norm.snapshot()
    tree = json.loads(snapshot[field])
    paths = _leaves(tree)
    snapshot[field] = json.dumps(_replace(tree, paths[int(pick * len(paths))], new))
    resumed = Normalizer.resume(TARGET, 20, snapshot)
    for chunk in chunks[5:12]:
        with contextlib.suppress(BadAudio):
            frames = resumed.push(chunk)
            assert all(len(f) == 960 for f in frames)
    assert all(len(f) == 960 for f in resumed.flush())
