"""Direct input: a session announced with `audio_in` equal to its input format skips
ingest, and the broker reads the producer's chunks itself (`vlpipe.services.broker.direct`).

Pure tests of what ingest would otherwise do for such chunks (sequence numbers, format
checks), of the producer `seq` a new owner resumes from, and the broker as a real service
with the local engine and no ingest running: a spoken session answered, bad chunks
dead-lettered with a reason, a repeated chunk dropped, the input ended by the producer's
end announcement.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import redis.asyncio as aioredis
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.broker.helpers import read_wav, running_broker, start_broker, statuses, wait_for_event
from tests.broker.test_core import VAD, make_core
from tests.waiting import wait_until
from vlpipe.services.broker.core import SessionCore
from vlpipe.services.broker.direct import NO_SEQ, DirectFrame, DirectInput
from vlpipe.services.broker.settings import BrokerSettings
from vlpipe.services.engine.server import running_engine
from vlpipe.shared.audio import AudioFormat
from vlpipe.shared.contracts import (
    MAX_AUDIO_BYTES,
    RawAudio,
    SessionConfig,
    SessionStart,
    decode,
    encode,
)
from vlpipe.shared.keys import StreamKeys
from vlpipe.shared.reorder import Gap, Notice, Stale
from vlpipe.shared.streams import Entry, entry_key

PCM = AudioFormat.PCM16


def as_read(raw: RawAudio) -> dict[bytes, bytes]:
    """`raw`'s stream fields as redis-py reads them back: bytes names, bytes values."""
    return {
        k.encode(): v if isinstance(v, bytes) else str(v).encode() for k, v in encode(raw).items()
    }


def chunk(n: int, seq: int | None, **fields: object) -> Entry:
    raw = RawAudio.model_validate(
        {"audio": b"\1\0" * 480, "format": "pcm16", "rate": 24000, "seq": seq, **fields}
    )
    return Entry("vl:audio:{s1}", f"{1000 + n}-0", as_read(raw))


def take(
    direct: DirectInput, entries: list[Entry]
) -> tuple[list[tuple[str, DirectFrame]], list[Notice], list[tuple[Entry, str]]]:
    """What the broker does with a batch: the contract and format checks, then the
    sequence."""
    good, refused = direct.read(entries)
    frames, notices = direct.accept(good)
    return frames, notices, refused


def test_chunks_in_the_upstream_format_go_through_as_they_are() -> None:
    direct = DirectInput("s1", PCM)
    frames, notices, refused = take(direct, [chunk(0, 0), chunk(1, 1), chunk(2, None)])
    assert [entry_id for entry_id, _ in frames] == ["1000-0", "1001-0", "1002-0"]
    assert [f.seq for _, f in frames] == [0, 1, NO_SEQ]
    assert all(f.audio == b"\1\0" * 480 and f.format is PCM for _, f in frames)
    assert notices == [] and refused == []


def test_a_repeated_or_late_chunk_is_dropped_and_a_skipped_number_reported() -> None:
    direct = DirectInput("s1", PCM, expected=5)
    frames, notices, refused = take(
        direct, [chunk(0, 4), chunk(1, 5), chunk(2, 5), chunk(3, 8), chunk(4, 7)]
    )
    assert [f.seq for _, f in frames] == [5, 8]  # no reordering: 7 came after 8
    assert notices == [Stale(4), Stale(5), Gap(6, 7), Stale(7)]
    assert refused == []


def test_a_new_owner_reading_chunks_again_does_not_report_their_gaps_twice() -> None:
    # The earlier owner reported the gap before 8 and the repeated 8 (read up to 1003-0).
    direct = DirectInput("s1", PCM, expected=5, noticed_through="1003-0")
    frames, notices, _ = take(
        direct, [chunk(0, 5), chunk(1, 8), chunk(2, 8), chunk(3, 9), chunk(4, 11)]
    )
    assert [f.seq for _, f in frames] == [5, 8, 9, 11]  # the same chunks go upstream
    assert notices == [Gap(10, 10)]  # only what the earlier owner had not read


FIELD_VALUES: dict[bytes, list[bytes]] = {
    b"audio": [b"", b"\1\0" * 480, b"\0" * 3, b"\xff" * 160, b"\0" * (MAX_AUDIO_BYTES + 2)],
    b"format": [b"pcm16", b"PCM16", b" pcm16", b"s16le", b"g711_ulaw", b"ulaw", b"f32", b"x"],
    b"rate": [b"24000", b"16000", b"8000", b"024000", b"24000.0", b"", b"-1", b"99999"],
    b"channels": [b"1", b"2", b"01", b"3", b"one"],
    b"seq": [b"0", b"7", b"007", b"-1", b"1.5", b"", b"\xd9\xa1", b"9" * 18, b"9" * 40],
    b"v": [b"1", b"2", b"01", b"x"],
    b"ts": [b"1.5", b"nan"],
    b"traceparent": [b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", b"bad"],
    b"junk": [b"1"],
}


def usual_fields(fmt: AudioFormat) -> dict[bytes, bytes]:
    return {b"audio": b"\1\0" * 480, b"format": fmt.wire_name.encode(),
            b"rate": str(fmt.rate).encode(), b"seq": b"7"}  # fmt: skip


@st.composite
def chunk_fields(draw: st.DrawFn) -> tuple[AudioFormat, dict[bytes, bytes]]:
    """A usual chunk of one of the formats, with up to three of its fields changed,
    dropped or added (values that are right, wrong, or right in another spelling)."""
    fmt = draw(st.sampled_from([PCM, AudioFormat.PCM16_16K, AudioFormat.G711_ULAW]))
    fields = usual_fields(fmt)
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(sorted(FIELD_VALUES)))
        if draw(st.booleans()) and name in fields:
            del fields[name]
        else:
            fields[name] = draw(st.sampled_from(FIELD_VALUES[name]))
    return fmt, fields


@settings(max_examples=500, deadline=None)
@given(chunk_fields())
@example((PCM, {b"audio": b"\1\0", b"format": b"pcm16", b"rate": b"24000"}))
def test_a_chunk_taken_without_the_model_is_one_the_model_takes_the_same(
    case: tuple[AudioFormat, dict[bytes, bytes]],
) -> None:
    """`DirectInput.plain` (the hot path) may pass a chunk over to the model, never take
    one the model refuses or read it differently."""
    fmt, fields = case
    direct = DirectInput("s1", fmt)
    plain = direct.plain(fields)
    if plain is None:
        return
    raw = decode(RawAudio, fields)  # raises if the model refuses it
    assert direct.mismatch(raw) is None
    assert plain == direct.frame(raw)


def test_the_usual_chunks_are_taken_without_the_model() -> None:
    for fmt, fields in [
        (PCM, {b"audio": b"\1\0" * 480, b"format": b"pcm16", b"rate": b"24000"}),
        (PCM, as_read(RawAudio(audio=b"\1\0" * 480, rate=24000, seq=12))),
        (AudioFormat.G711_ULAW, {b"audio": b"\xff" * 160, b"format": b"g711_ulaw", b"seq": b"0"}),
    ]:
        assert DirectInput("s1", fmt).plain(fields) is not None


def test_entries_that_are_no_raw_audio_are_refused_in_stream_order() -> None:
    direct = DirectInput("s1", PCM)
    entries = [
        Entry("k", "1-0", {b"audio": b"\1\0", b"format": b"pcm16", b"rate": b"24000"}),
        Entry("k", "2-0", {b"garbage": b"1"}),
        Entry("k", "3-0", {b"audio": b"\1\0", b"format": b"wav9", b"rate": b"24000"}),
        Entry("k", "4-0", {b"audio": b"\1\0", b"format": b"pcm16", b"rate": b"16000"}),
        Entry(
            "k", "5-0", {b"audio": b"\1\0", b"format": b"pcm16", b"rate": b"24000", b"seq": b"x"}
        ),
    ]
    good, refused = direct.read(entries)
    assert [e.id for e, _ in good] == ["1-0"]
    assert [e.id for e, _ in refused] == ["2-0", "3-0", "4-0", "5-0"]
    reasons = [why for _, why in refused]
    assert "invalid RawAudio" in reasons[0] and "'garbage'" in reasons[0]
    assert "field 'format'" in reasons[1]
    assert "announced audio_in pcm16" in reasons[2] and "16000 Hz" in reasons[2]
    assert "field 'seq'" in reasons[3]


def test_a_chunk_in_another_format_is_refused_naming_what_was_expected() -> None:
    direct = DirectInput("s1", PCM)
    bad = [
        chunk(0, 0, rate=16000),
        chunk(1, 1, format="g711_ulaw", rate=8000),
        chunk(2, 2, channels=2),
        chunk(3, 3, audio=b"\0\0\0"),
        chunk(4, 4, audio=b""),
    ]
    frames, notices, refused = take(direct, [*bad, chunk(5, 5)])
    assert [f.seq for _, f in frames] == [5] and notices == []
    reasons = [reason for _, reason in refused]
    assert len(reasons) == 4
    for reason in reasons[:3]:
        assert "announced audio_in pcm16" in reason and "pcm16 at 24000 Hz mono" in reason
    assert "got pcm16 at 16000 Hz with 1 channel(s)" in reasons[0]
    assert "got g711_ulaw at 8000 Hz" in reasons[1]
    assert "with 2 channel(s)" in reasons[2]
    assert reasons[3] == "pcm16 needs a multiple of 2 bytes, got 3"


def test_g711_chunks_need_no_rate() -> None:
    direct = DirectInput("s1", AudioFormat.G711_ULAW)
    raw = RawAudio.model_validate({"audio": b"\xff" * 160, "format": "ulaw", "seq": 0})
    frames, _, refused = take(direct, [Entry("k", "1-0", as_read(raw))])
    assert len(frames) == 1 and refused == []


def test_a_new_owner_expects_the_producer_seq_of_the_first_chunk_it_rereads() -> None:
    core = SessionCore("s1", VAD, {}, BrokerSettings(), taken_over=False, replica="r",
                       frames_key="vl:audio:{s1}", direct_input=True)  # fmt: skip
    core.upstream_opened(0.0)
    direct = DirectInput("s1", PCM)
    # 3 s of silence in real time, numbered from 100: all but the last 1.5 s is let go.
    frames, _, _ = take(direct, [chunk(n, 100 + n) for n in range(150)])
    for n, frame in enumerate(frames):
        core.audio([frame], n * 0.02)
    kept = [sent.seq for sent in core.retained]
    assert kept and kept[0] > 100 and kept[-1] == 249
    checkpoint = core.checkpoint()
    assert checkpoint["source_seq"] == kept[0]
    # Just before the first chunk kept (the largest id of the millisecond before it).
    assert checkpoint["frames_id"] == f"{1000 + kept[0] - 100 - 1}-{2**64 - 1}"
    # The new owner reads on after frames_id: the same chunks, none dropped as stale.
    resumed = DirectInput("s1", PCM, expected=int(checkpoint["source_seq"]))
    again, notices, _ = take(resumed, [chunk(n - 100, n) for n in kept])
    assert [f.seq for _, f in again] == kept and notices == []
    # An ingest-fed session keeps no producer seq in its checkpoint.
    assert "source_seq" not in make_core(VAD).checkpoint()


async def test_the_broker_answers_a_direct_session_with_no_ingest_running(
    redis_url: str, redis: aioredis.Redis, keys: StreamKeys, speech_wav: str
) -> None:
    fmt = AudioFormat.PCM16_16K
    config = SessionConfig(input_audio_format=fmt)
    start = SessionStart(session="d1", config=config, audio_in=fmt)
    pcm = read_wav(speech_wav)  # type: ignore[arg-type]
    step = fmt.bytes_for_ms(100)
    async with (
        running_engine(model="local", output_pace=0) as engine,
        running_broker(redis_url, keys, engine.endpoint) as broker,
    ):
        await redis.xadd(keys.sessions, encode(start))  # type: ignore[arg-type]
        for seq, at in enumerate(range(0, len(pcm), step)):
            fields = {"format": "pcm16", "rate": 16000, "seq": seq, "audio": pcm[at : at + step]}
            await redis.xadd(keys.audio("d1"), fields)  # type: ignore[arg-type]
            if seq == 3:  # a producer's retried XADD, a wrong rate, garbage
                await redis.xadd(keys.audio("d1"), fields)  # type: ignore[arg-type]
                wrong_rate = {"format": "pcm16", "rate": 24000, "audio": fields["audio"]}
                await redis.xadd(keys.audio("d1"), wrong_rate)  # type: ignore[arg-type]
                await redis.xadd(keys.audio("d1"), {"format": "speex", "audio": b"\0\0"})
            await asyncio.sleep(0.025)  # 4x real time
        silence = {"format": "pcm16", "rate": 16000, "audio": b"\0\0" * 16000}
        await redis.xadd(keys.audio("d1"), silence)  # type: ignore[arg-type]
        await redis.xadd(keys.sessions, {"type": "end", "session": "d1"})
        evs = await wait_for_event(redis, keys, "d1", "vlpipe.session.ended", within=120)
        sent = broker.totals["frames"]
    said = [e.event["transcript"] for e in evs
            if e.type == "conversation.item.input_audio_transcription.completed"]  # fmt: skip
    assert said and said[-1].lower().strip(" .!") == "fail better", said
    assert sent == len(range(0, len(pcm), step)) + 1  # every chunk once, and the silence
    ended = next(e for e in evs if e.type == "vlpipe.session.ended")
    assert ended.event["reason"] == "input_ended"
    reasons = [f[b"reason"].decode() for _, f in await redis.xrange(keys.dead)]
    assert len(reasons) == 2, reasons
    assert any("must be pcm16 at 16000 Hz mono; got pcm16 at 24000 Hz" in r for r in reasons)
    assert any("invalid RawAudio" in r for r in reasons)
    stale = [s for s in await statuses(redis, keys, "d1") if s.kind == "stale"]
    assert [s.detail for s in stale] == [{"seq": 3}]
    assert await redis.xlen(keys.frames("d1")) == 0  # nothing went through a frames stream


async def test_a_chunk_refused_once_is_not_refused_again_by_the_owner_that_takes_over(
    redis_url: str, redis: aioredis.Redis, keys: StreamKeys
) -> None:
    # The new owner reads the producer's chunks again from the checkpoint (before the
    # silence still kept for a replay): a bad chunk among them was dead-lettered already,
    # and a gap before it reported already.
    fmt = AudioFormat.PCM16_16K
    start = SessionStart(session="r1", config=SessionConfig(input_audio_format=fmt), audio_in=fmt)
    chunk = {"format": "pcm16", "rate": 16000, "audio": b"\0\0" * 320}  # 20 ms of silence
    async with running_engine(model="echo", output_pace=0) as engine:
        brokers = [start_broker(redis_url, keys.prefix, engine.endpoint) for _ in range(2)]
        try:
            await redis.xadd(keys.sessions, encode(start))  # type: ignore[arg-type]

            numbers = iter(range(1000))

            async def send(chunks: int) -> None:
                for _ in range(chunks):
                    numbered = {**chunk, "seq": next(numbers)}
                    await redis.xadd(keys.audio("r1"), numbered)  # type: ignore[arg-type]
                    await asyncio.sleep(0.02)

            await send(20)
            next(numbers)  # a chunk the producer never sent: a gap
            await send(5)
            await redis.xadd(keys.audio("r1"), {**chunk, "rate": 8000})  # type: ignore[arg-type]
            await send(5)

            async def refused() -> bool:
                return await redis.xlen(keys.dead) == 1

            await wait_until(refused)
            owner: Any = await redis.hget(keys.session_state("r1"), "broker.owner")
            victim = next(b for b in brokers if b.pid == int(owner.decode().rsplit("-", 1)[1]))
            victim.send_signal(signal.SIGTERM)  # hands the session over with its checkpoint
            assert victim.wait(30) == 0
            frames_id: Any = await redis.hget(keys.session_state("r1"), "broker.frames_id")
            bad_id = (await redis.xrange(keys.dead))[0][1][b"id"].decode()
            assert entry_key(frames_id.decode()) < entry_key(bad_id)  # to be read again
            await send(5)
            await redis.xadd(keys.sessions, {"type": "end", "session": "r1"})
            evs = await wait_for_event(redis, keys, "r1", "vlpipe.session.ended", within=60)
        finally:
            for proc in brokers:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(20)
    assert [e for e in evs if e.type == "vlpipe.upstream.connected" and e.event["takeover"]]
    assert await redis.xlen(keys.dead) == 1
    said = await statuses(redis, keys, "r1")
    errors = [s for s in said if s.kind == "error"]
    assert len(errors) == 1 and "got pcm16 at 8000 Hz" in errors[0].message, errors
    assert [s.detail for s in said if s.kind == "gap"] == [
        {"first_missing": 20, "last_missing": 20}
    ]
