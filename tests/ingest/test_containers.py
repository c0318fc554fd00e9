"""Compressed streams as producers really send them: chained, laced, tagged, or broken.

The framing of Ogg, WebM and MP3 is ingest's own (so that a new owner can resume it); these
tests hold it to what the formats allow, with streams made by FFmpeg's muxers or built
element by element here, and check that a broken part is reported while the audio around
it is kept.
"""

from __future__ import annotations

import io
import itertools

import av
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.ingest.test_normalize import compressed, pcm16, tone
from tests.ingest.test_takeover import COMPRESSED, _vint, as_media_recorder, stream
from vlpipe.services.ingest.normalize import BadAudio, Normalizer
from vlpipe.shared.audio import AudioFormat
from vlpipe.shared.contracts import InputFormat, RawAudio

TARGET = AudioFormat.PCM16


def feed(chunks: list[bytes], fmt: InputFormat) -> tuple[np.ndarray, list[str]]:
    """Samples of every frame (flushed at the end) and the problems reported, in order."""
    norm = Normalizer(TARGET)
    frames: list[bytes] = []
    problems: list[str] = []
    for chunk in chunks:
        try:
            frames += norm.push(RawAudio(audio=chunk, format=fmt))
        except BadAudio as exc:
            problems.append(str(exc))
    frames += norm.flush()
    return np.frombuffer(b"".join(frames), dtype="<i2").astype(np.int32), problems


def same_audio(got: np.ndarray, expected: np.ndarray) -> bool:
    """Equal but for soxr's dither of its 16-bit output (its own seed each run: ±1 LSB)."""
    return len(got) == len(expected) and int(np.max(np.abs(got - expected), initial=0)) <= 2


def chunked(data: bytes, size: int = 900) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def peak_hz(samples: np.ndarray) -> float:
    x = samples / 32767
    return float(np.argmax(np.abs(np.fft.rfft(x * np.hanning(len(x))))) * 24000 / len(x))


def opus(seconds: float, hz: float, container: str = "ogg") -> bytes:
    return compressed(pcm16(tone(48000, seconds, hz)), 48000, container, "libopus")


# ---------------------------------------------------------------------------- Ogg


def test_ogg_streams_chained_by_a_producer_that_restarted_its_recorder_are_both_heard() -> None:
    first, second = opus(1.0, 440), opus(1.0, 880)
    samples, problems = feed(chunked(first + second), InputFormat.OGG)
    assert problems == []
    assert abs(len(samples) / 24000 - 2.0) <= 0.05
    assert abs(peak_hz(samples[2400:21600]) - 440) < 5
    assert abs(peak_hz(samples[-21600:-2400]) - 880) < 5


def test_garbage_between_ogg_pages_is_reported_and_the_audio_around_it_kept() -> None:
    data = opus(2.0, 440)
    page = data.find(b"OggS", len(data) // 2)  # a page boundary in the middle
    broken = data[:page] + b"\x13\x37" * 50 + data[page:]
    samples, problems = feed(chunked(broken), InputFormat.OGG)
    assert len(problems) == 1 and "100 bytes that are not Ogg pages skipped" in problems[0]
    clean, _ = feed(chunked(data), InputFormat.OGG)
    assert len(samples) == len(clean), "nothing of the stream itself was lost"


def test_a_stream_that_is_not_ogg_is_refused_naming_the_problem() -> None:
    _, problems = feed([b"RIFF" + b"\x00" * 2000], InputFormat.OGG)
    assert problems and "not an Ogg stream" in problems[0]


def test_an_ogg_stream_of_another_codec_is_refused_naming_it() -> None:
    data = opus(0.5, 440).replace(b"OpusHead", b"\x01vorbis\x00", 1)
    samples, problems = feed(chunked(data), InputFormat.OGG)
    assert problems and "another codec" in problems[0] and "only Opus" in problems[0]
    assert len(samples) == 0


def test_an_ogg_stream_joined_mid_way_is_refused_until_its_header() -> None:
    data = opus(1.0, 440)
    second_page = data.find(b"OggS", 1)
    _, problems = feed([data[second_page:]], InputFormat.OGG)
    assert problems and "before the stream's OpusHead" in problems[0]


# ---------------------------------------------------------------------------- WebM


def _size(n: int) -> bytes:
    return (0x01 << 56 | n).to_bytes(8, "big")


def element(ident: int, body: bytes, *, unknown_size: bool = False) -> bytes:
    ident_bytes = ident.to_bytes((ident.bit_length() + 7) // 8, "big")
    size = b"\x01\xff\xff\xff\xff\xff\xff\xff" if unknown_size else _size(len(body))
    return ident_bytes + size + body


def opus_packets(seconds: float, hz: float) -> tuple[bytes, list[bytes]]:
    """An OpusHead and the packets of a tone, straight from libopus (no container)."""
    codec = av.CodecContext.create("libopus", "w")
    assert isinstance(codec, av.AudioCodecContext)
    codec.sample_rate, codec.layout, codec.format = 48000, "mono", "s16"
    codec.open()
    frame = av.AudioFrame.from_ndarray(
        np.frombuffer(pcm16(tone(48000, seconds, hz)), dtype="<i2").reshape(1, -1),
        format="s16",
        layout="mono",
    )
    frame.sample_rate = 48000
    packets = [bytes(p) for p in codec.encode(frame)] + [bytes(p) for p in codec.encode(None)]
    return bytes(codec.extradata or b""), packets


def webm(head: bytes, blocks: list[bytes], codec: bytes = b"A_OPUS") -> bytes:
    """A live WebM stream (unknown sizes) with one audio track and one cluster."""
    ebml = element(0x1A45DFA3, element(0x4282, b"webm"))
    track = element(0xD7, b"\x01") + element(0x83, b"\x02") + element(0x86, codec)
    tracks = element(0x1654AE6B, element(0xAE, track + element(0x63A2, head)))
    cluster = element(0x1F43B675, element(0xE7, b"\x00") + b"".join(blocks), unknown_size=True)
    return ebml + element(0x18538067, tracks + cluster, unknown_size=True)


def simple_block(frames: list[bytes], lacing: str) -> bytes:
    """A SimpleBlock of track 1 holding `frames`, laced as Matroska allows."""
    if lacing == "none":
        assert len(frames) == 1
        return element(0xA3, b"\x81\x00\x00\x80" + frames[0])
    flags = {"xiph": 0x82, "fixed": 0x84, "ebml": 0x86}[lacing]
    sizes = [len(f) for f in frames[:-1]]
    if lacing == "xiph":
        lace = b"".join(b"\xff" * (s // 255) + bytes([s % 255]) for s in sizes)
    elif lacing == "fixed":
        assert len(set(len(f) for f in frames)) == 1
        lace = b""
    else:
        lace = (0x4000 | sizes[0]).to_bytes(2, "big")
        for before, size in itertools.pairwise(sizes):
            lace += (0x4000 | (size - before + 0x1FFF)).to_bytes(2, "big")
    header = b"\x81\x00\x00" + bytes([flags, len(frames) - 1]) + lace
    return element(0xA3, header + b"".join(frames))


@pytest.mark.parametrize("lacing", ["xiph", "ebml"])
def test_laced_webm_blocks_give_the_same_audio_as_one_frame_per_block(lacing: str) -> None:
    head, packets = opus_packets(1.0, 440)
    plain = webm(head, [simple_block([p], "none") for p in packets])
    laced = webm(
        head, [simple_block(packets[i : i + 3], lacing) for i in range(0, len(packets), 3)]
    )
    expected, problems = feed(chunked(plain), InputFormat.WEBM)
    got, laced_problems = feed(chunked(laced, 333), InputFormat.WEBM)
    assert problems == laced_problems == []
    assert len(expected) > 20000 and same_audio(got, expected)


def test_fixed_size_lacing_is_read() -> None:
    head, packets = opus_packets(0.5, 440)
    same = [p for p in packets if len(p) == len(packets[5])][:4]
    assert len(same) >= 2, "libopus made packets of one size here (CBR-like tone)"
    expected, _ = feed([webm(head, [simple_block([p], "none") for p in same])], InputFormat.WEBM)
    got, problems = feed([webm(head, [simple_block(same, "fixed")])], InputFormat.WEBM)
    assert problems == [] and same_audio(got, expected)


def test_a_webm_stream_of_another_codec_is_refused_naming_it() -> None:
    head, packets = opus_packets(0.2, 440)
    data = webm(head, [simple_block([p], "none") for p in packets], codec=b"A_VORBIS")
    samples, problems = feed([data], InputFormat.WEBM)
    assert problems and "'A_VORBIS'" in problems[0] and "only Opus" in problems[0]
    assert len(samples) == 0


def test_garbage_in_a_webm_cluster_is_reported_and_reading_resumes_at_the_next_cluster() -> None:
    buf = io.BytesIO()  # clusters of 1 s (FFmpeg's default for audio is 5 s)
    with av.open(buf, "w", format="webm", options={"cluster_time_limit": "1000"}) as out:
        stream = out.add_stream("libopus", rate=48000)
        stream.layout = "mono"  # type: ignore[union-attr]
        frame = av.AudioFrame.from_ndarray(
            np.frombuffer(pcm16(tone(48000, 3.0, 440)), dtype="<i2").reshape(1, -1),
            format="s16",
            layout="mono",
        )
        frame.sample_rate = 48000
        for packet in [*stream.encode(frame), *stream.encode(None)]:  # type: ignore[union-attr]
            out.mux(packet)
    data = as_media_recorder(buf.getvalue())
    cluster = data.index(b"\x1f\x43\xb6\x75")
    at = cluster + 4 + 8  # the first child: its Timecode
    for _ in range(5):  # and four blocks on
        size, size_len = _vint(data, at + 1)
        at += 1 + size_len + (size & ((1 << (7 * size_len)) - 1))
    broken = data[:at] + b"\x00" * 64 + data[at:]
    samples, problems = feed(chunked(broken), InputFormat.WEBM)
    assert problems and "skipping to the next cluster" in problems[0]
    assert abs(peak_hz(samples[-24000:-2400]) - 440) < 5, "the clusters after it are heard"


def test_webm_streams_chained_by_a_producer_that_restarted_its_recorder_are_both_heard() -> None:
    first, second = opus(1.0, 440, "webm"), opus(1.0, 880, "webm")
    samples, problems = feed(chunked(first + second), InputFormat.WEBM)
    assert problems == []
    assert abs(len(samples) / 24000 - 2.0) <= 0.05
    assert abs(peak_hz(samples[-21600:-2400]) - 880) < 5


def test_a_stream_that_is_not_webm_is_refused_naming_the_problem() -> None:
    _, problems = feed([b"OggS" + b"\x00" * 2000], InputFormat.WEBM)
    assert problems and "not a WebM stream" in problems[0]


# ---------------------------------------------------------------------------- MP3


def id3v2_tag(size: int) -> bytes:
    syncsafe = bytes((size >> shift) & 0x7F for shift in (21, 14, 7, 0))
    return b"ID3\x04\x00\x00" + syncsafe + b"\x00" * size


def test_an_mp3_streams_id3_tag_is_skipped_however_it_is_cut() -> None:
    mp3 = compressed(pcm16(tone(44100, 1.0, 440)), 44100, "mp3", "libmp3lame")
    bare = mp3[mp3.index(b"\xff\xfb") :] if mp3.startswith(b"ID3") else mp3
    expected, _ = feed([bare], InputFormat.MP3)
    for size in (3, 7, 1000):  # cuts inside the tag's header and body
        got, problems = feed(chunked(id3v2_tag(40_000) + bare, size), InputFormat.MP3)
        assert problems == [] and same_audio(got, expected)


def test_garbage_sent_as_mp3_is_refused_as_undecodable() -> None:
    noise = np.random.default_rng(3).integers(0, 256, 20_000, dtype=np.uint8).tobytes()
    samples, problems = feed(chunked(noise, 5000), InputFormat.MP3)
    assert len(samples) == 0 or problems, "garbage never becomes audio unreported"


def test_an_opus_head_with_no_channels_is_refused() -> None:
    data = opus(0.5, 440)
    at = data.index(b"OpusHead")
    broken = data[: at + 9] + b"\x00" + data[at + 10 :]
    _, problems = feed([broken], InputFormat.OGG)
    assert problems and "bad OpusHead" in problems[0]


def test_the_decoded_stream_keeps_its_tone_through_a_stereo_to_mono_mixdown() -> None:
    buf = io.BytesIO()
    with av.open(buf, "w", format="ogg") as out:
        stream = out.add_stream("libopus", rate=48000)
        stream.layout = "stereo"  # type: ignore[union-attr]
        left = np.frombuffer(pcm16(tone(48000, 1.0, 600)), dtype="<i2")
        frame = av.AudioFrame.from_ndarray(
            np.column_stack([left, left]).reshape(1, -1), format="s16", layout="stereo"
        )
        frame.sample_rate = 48000
        for packet in [*stream.encode(frame), *stream.encode(None)]:  # type: ignore[union-attr]
            out.mux(packet)
    samples, problems = feed(chunked(buf.getvalue()), InputFormat.OGG)
    assert problems == []
    assert abs(peak_hz(samples[2400:21600]) - 600) < 5
    level = np.sqrt(np.mean((samples[2400:21600] / 32767) ** 2))
    assert abs(level - 0.3 / np.sqrt(2)) < 0.03, "mono is the channels' mean"


@settings(max_examples=150, deadline=None)
@given(
    kind=st.sampled_from(["ogg", "webm", "webm-live", "mp3"]),
    damage=st.lists(
        st.tuples(st.floats(0, 1, exclude_max=True), st.binary(min_size=1, max_size=40)),
        min_size=1,
        max_size=4,
    ),
    size=st.integers(50, 3000),
    takeover=st.floats(0, 1),
)
def test_a_damaged_stream_is_refused_in_part_never_crashes_and_survives_a_takeover(
    kind: str, damage: list[tuple[float, bytes]], size: int, takeover: float
) -> None:
    data = bytearray(stream(kind))
    for where, junk in damage:  # overwrite, so that sizes and offsets lie
        at = int(where * len(data))
        data[at : at + len(junk)] = junk
    fmt = COMPRESSED[kind]
    chunks = chunked(bytes(data), size)
    norm, frames = Normalizer(TARGET), []
    for i, chunk in enumerate(chunks):
        if i == int(takeover * len(chunks)):
            norm = Normalizer.resume(TARGET, 20, norm.snapshot())
        try:
            frames += norm.push(RawAudio(audio=chunk, format=fmt))
        except BadAudio as exc:
            assert str(exc).startswith(f"{fmt.value} stream: ")
    frames += norm.flush()
    # (Not how much audio: an Opus decoder turns almost any bytes into up to 120 ms of it,
    # and a damaged lacing byte can make one block into many packets.)
    assert all(len(f) == 960 for f in frames)
