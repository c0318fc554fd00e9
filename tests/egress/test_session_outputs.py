"""`SessionOutputs` proved without Redis: events in, transcripts, audio and markers out.

Every test builds `Event`s as the broker writes them (numbered, `received` on a ms clock,
audio deltas already decoded to bytes) and feeds them to `observe`; nothing here opens a
socket. What is proved is what consumers and a replica taking a session over rely on:
partials that only grow and a final that replaces them, audio offsets without gaps, output
that does not depend on how the upstream chunked its deltas, not one more sample of a
cleared response, and a snapshot that a replica continues from without renumbering, even
when each write carried only the snapshot fields that changed.
"""

from __future__ import annotations

import base64
import copy
import itertools
import json
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.egress.helpers import recorded_turn
from vlpipe.services.egress.outputs import STATE_FIELDS, Outputs, SessionOutputs
from vlpipe.shared.audio import AudioFormat, decode_to_pcm16
from vlpipe.shared.contracts import AudioOut, Event

SID = "s1"
RESPONSE = "resp_1"
ITEM = "item_1"
UPSTREAM = AudioFormat.PCM16  # what Voice Live speaks by default: PCM16 at 24 kHz
CONVERTED = [
    AudioFormat.G711_ULAW,
    AudioFormat.G711_ALAW,
    AudioFormat.PCM16_16K,
    AudioFormat.PCM16_8K,
]
USER_DELTA = "conversation.item.input_audio_transcription.delta"
USER_FINAL = "conversation.item.input_audio_transcription.completed"


class Broker:
    """Makes events as the broker writes them to `vl:events:{sid}`."""

    def __init__(self) -> None:
        self.seq = 0
        self.clock = 1_700_000_000_000.0  # `Event.received` is ms since epoch

    def event(self, body: dict[str, Any], audio: bytes | None = None, gap_ms: float = 50) -> Event:
        self.clock += gap_ms
        event = Event(session=SID, seq=self.seq, received=self.clock, type=body["type"],
                      event=body, audio=audio)  # fmt: skip
        self.seq += 1
        return event

    def recorded(self, bodies: Iterable[dict[str, Any]]) -> list[Event]:
        """Upstream events as recorded; the broker moves an audio delta's base64 to `audio`."""
        events = []
        for body in bodies:
            body = dict(body)
            audio = None
            if body["type"] == "response.audio.delta":
                audio = base64.b64decode(body.pop("delta"))
            events.append(self.event(body, audio))
        return events

    def audio(self, pcm: bytes, response_id: str = RESPONSE, item_id: str = ITEM) -> Event:
        body = {"type": "response.audio.delta", "response_id": response_id, "item_id": item_id,
                "output_index": 0, "content_index": 0}  # fmt: skip
        return self.event(body, pcm, gap_ms=20)

    def done(self, response_id: str = RESPONSE, status: str = "completed") -> Event:
        return self.event(
            {"type": "response.done", "response": {"id": response_id, "status": status}}
        )

    def barge_in(self, response_id: str = RESPONSE, item_id: str = ITEM) -> Event:
        return self.event({"type": "vlpipe.barge_in", "response_id": response_id,
                           "item_id": item_id, "audio_end_ms": 0, "reason": "test"})  # fmt: skip

    def ended(self) -> Event:
        return self.event({"type": "vlpipe.session.ended", "reason": "input_ended"})


def outputs_for(audio_out: AudioFormat, partial_ms: float = 200) -> SessionOutputs:
    return SessionOutputs(SID, audio_out, UPSTREAM, partial_ms)


def feed(outputs: SessionOutputs, events: Iterable[Event]) -> Outputs:
    out = Outputs()
    for event in events:
        outputs.observe(event, out)
    return out


def tone(seconds: float, hz: float = 440.0, rate: int = UPSTREAM.rate) -> bytes:
    t = np.arange(round(rate * seconds)) / rate
    return (0.4 * np.sin(2 * np.pi * hz * t) * 32767).astype("<i2").tobytes()


def split(pcm: bytes, cuts: Iterable[int]) -> list[bytes]:
    """`pcm` cut at these byte positions (the ends are implied)."""
    edges = [0, *sorted(set(cuts)), len(pcm)]
    return [pcm[a:b] for a, b in itertools.pairwise(edges) if b > a]


def every(pcm: bytes, ms: int) -> list[bytes]:
    """`pcm` (24 kHz PCM16) in deltas of `ms`, as the upstream sends them (100 ms each)."""
    step = UPSTREAM.bytes_for_ms(ms)
    return split(pcm, range(step, len(pcm), step))


def samples(chunks: Sequence[AudioOut]) -> np.ndarray:
    """The chunks' audio as PCM16 samples at their format's rate."""
    data = b"".join(c.audio for c in chunks)
    return np.frombuffer(decode_to_pcm16(data, chunks[0].format), dtype="<i2").astype(np.int64)


def ends(chunk: AudioOut) -> float:
    return chunk.offset_ms + chunk.format.ms_for_bytes(len(chunk.audio))


def assert_gapless(chunks: Sequence[AudioOut], start_ms: float = 0.0) -> None:
    """Each chunk starts where the one before it ended: the offsets are the audio's clock."""
    assert chunks[0].offset_ms == pytest.approx(start_ms, abs=2e-3)
    for before, after in itertools.pairwise(chunks):
        assert after.offset_ms == pytest.approx(ends(before), abs=2e-3)  # offsets round to µs


def assert_numbered(chunks: Sequence[AudioOut], first: int = 0) -> None:
    assert [c.seq for c in chunks] == list(range(first, first + len(chunks)))


# ---------------------------------------------------------------- transcripts

WORDS = ["Ever ", "tried. ", "Ever ", "failed. ", "No ", "matter. ", "Try ", "again. ",
         "Fail ", "again. ", "Fail ", "better."]  # fmt: skip


@pytest.mark.parametrize(
    ("speaker", "delta_type", "final_type", "final_key"),
    [
        pytest.param("user", USER_DELTA, USER_FINAL, "transcript", id="user"),
        pytest.param("assistant", "response.audio_transcript.delta",
                     "response.audio_transcript.done", "transcript", id="assistant-audio"),
        pytest.param("assistant", "response.text.delta", "response.text.done", "text",
                     id="assistant-text"),
    ],
)  # fmt: skip
def test_deltas_of_an_item_become_growing_partials_that_its_final_replaces(
    speaker: str, delta_type: str, final_type: str, final_key: str
) -> None:
    broker = Broker()
    outputs = outputs_for(AudioFormat.PCM16, partial_ms=200)
    response = {"response_id": RESPONSE} if speaker == "assistant" else {}
    deltas = [broker.event({"type": delta_type, "item_id": ITEM, "delta": word, **response},
                           gap_ms=80) for word in WORDS]  # fmt: skip
    whole = "".join(WORDS)
    final = broker.event({"type": final_type, "item_id": ITEM, final_key: whole, **response})
    pieces = feed(outputs, [*deltas, final]).transcripts

    *partials, last = pieces
    assert [(p.speaker, p.item_id) for p in pieces] == [(speaker, ITEM)] * len(pieces)
    assert [p.response_id for p in pieces] == [response.get("response_id")] * len(pieces)
    assert [p.seq for p in pieces] == list(range(len(pieces)))
    # Coalesced: one piece every 200 ms of event time, not one per 80 ms delta.
    assert 1 < len(partials) < len(WORDS)
    assert not any(p.final for p in partials)
    texts = [p.text for p in partials]
    assert all(len(a) < len(b) and b.startswith(a) for a, b in itertools.pairwise(texts))
    assert (last.final, last.text) == (True, whole)
    assert all(whole.startswith(text) for text in texts)
    assert ITEM not in outputs.state.partials  # nothing of the item is left to come after it


@settings(max_examples=80, deadline=None)
@given(
    deltas=st.lists(
        st.tuples(st.text(alphabet="ab .,?", min_size=1, max_size=6), st.integers(0, 400)),
        min_size=1,
        max_size=30,
    )
)
def test_partials_are_prefixes_of_the_final_spaced_by_partial_ms_and_never_split_a_word(
    deltas: list[tuple[str, int]],
) -> None:
    broker = Broker()
    outputs = outputs_for(AudioFormat.PCM16, partial_ms=200)
    so_far = ""
    emitted: list[tuple[float, str, str]] = []  # (received, piece text, raw text so far)
    for delta, gap_ms in deltas:
        event = broker.event({"type": USER_DELTA, "item_id": ITEM, "delta": delta}, gap_ms=gap_ms)
        so_far += delta
        out = feed(outputs, [event])
        emitted += [(event.received, p.text, so_far) for p in out.transcripts]
    whole = "".join(delta for delta, _ in deltas)
    final = feed(outputs, [broker.event({"type": USER_FINAL, "item_id": ITEM,
                                         "transcript": whole})]).transcripts  # fmt: skip

    assert [(p.final, p.text) for p in final] == [(True, whole.strip())]
    texts = [text for _, text, _ in emitted] + [whole.strip()]
    assert all(b.startswith(a) for a, b in itertools.pairwise(texts))
    assert all(b - a >= 200 for (a, _, _), (b, _, _) in itertools.pairwise(emitted))
    # After the first, a partial waits for a word to end: the consumer never shows "fai".
    assert all(raw[-1].isspace() or raw[-1] in ".,;:!?" for _, _, raw in emitted[1:])


# ---------------------------------------------------------------- the recorded turn


def test_the_recorded_turn_gives_user_then_assistant_final_and_gapless_audio_then_end() -> None:
    recorded = recorded_turn()
    broker = Broker()
    events = broker.recorded(recorded)
    out = feed(outputs_for(AudioFormat.PCM16), events)

    user_text = next(e["transcript"] for e in recorded if e["type"] == USER_FINAL)
    said = next(e["transcript"] for e in recorded if e["type"] == "response.audio_transcript.done")
    response_id = next(e["response"]["id"] for e in recorded if e["type"] == "response.done")
    pieces = out.transcripts
    finals = [p for p in pieces if p.final]
    assert [(p.speaker, p.text) for p in finals] == [
        ("user", user_text.strip()),
        ("assistant", said),
    ]
    assert [p.seq for p in pieces] == list(range(len(pieces)))
    for final in finals:  # each item's partials come before its final, and are prefixes of it
        mine = [p for p in pieces if p.item_id == final.item_id]
        assert mine[-1] is final and all(final.text.startswith(p.text) for p in mine[:-1])
    user, assistant = finals
    assert (user.start_ms, user.end_ms) == (52, 10400)  # from speech_started / speech_stopped

    sent = [e.audio for e in events if e.type == "response.audio.delta"]
    chunks = out.audio
    assert [c.kind for c in chunks] == ["audio"] * len(sent) + ["end"]
    assert {c.response_id for c in chunks} == {response_id}
    assert [c.audio for c in chunks[:-1]] == sent  # 24 kHz PCM16 on both sides: unchanged
    assert_gapless(chunks)
    assert_numbered(chunks)
    total_ms = UPSTREAM.ms_for_bytes(sum(len(a or b"") for a in sent))
    assert chunks[-1].offset_ms == pytest.approx(total_ms)
    assert (assistant.start_ms, assistant.end_ms) == (0.0, pytest.approx(total_ms))
    # The first chunk says when the user stopped speaking, so a consumer can time the silence.
    stopped = next(e.received for e in events if e.type == "input_audio_buffer.speech_stopped")
    assert chunks[0].speech_end == stopped and all(c.speech_end is None for c in chunks[1:])
    first_audio = next(e.received for e in events if e.type == "response.audio.delta")
    latency = [s.detail["ms"] for s in out.status if s.kind == "latency"]
    assert latency == [pytest.approx(first_audio - stopped)]


@pytest.mark.parametrize("audio_out", CONVERTED, ids=str)
def test_the_recorded_turn_in_a_converted_format_is_gapless_and_ends_at_the_audio_sent(
    audio_out: AudioFormat,
) -> None:
    events = Broker().recorded(recorded_turn())
    chunks = feed(outputs_for(audio_out), events).audio

    assert [c.kind for c in chunks[:-1]] == ["audio"] * (len(chunks) - 1)
    assert chunks[-1].kind == "end"
    assert {c.format for c in chunks} == {audio_out}
    assert_gapless(chunks)
    assert_numbered(chunks)
    sent = sum(len(e.audio or b"") for e in events if e.type == "response.audio.delta")
    # The resampler's tail is flushed before the end marker: nothing of the answer is lost.
    assert chunks[-1].offset_ms == pytest.approx(
        UPSTREAM.ms_for_bytes(sent), abs=1000 / audio_out.rate
    )


# ---------------------------------------------------------------- format conversion


@pytest.mark.parametrize("audio_out", CONVERTED, ids=str)
def test_a_24k_tone_comes_out_in_the_session_format_with_its_length_and_frequency(
    audio_out: AudioFormat,
) -> None:
    seconds, hz = 1.0, 440.0
    broker = Broker()
    events = [broker.audio(delta) for delta in every(tone(seconds, hz), 100)]
    chunks = feed(outputs_for(audio_out), [*events, broker.done()]).audio

    audio = [c for c in chunks if c.kind == "audio"]
    assert {c.format for c in chunks} == {audio_out}
    assert [c.kind for c in chunks] == ["audio"] * len(audio) + ["end"]
    assert_gapless(chunks)
    pcm = samples(audio).astype(np.float64)
    assert abs(len(pcm) - seconds * audio_out.rate) <= 1  # within one sample's rounding
    spectrum = np.abs(np.fft.rfft(pcm * np.hanning(len(pcm))))
    freqs = np.fft.rfftfreq(len(pcm), 1 / audio_out.rate)
    assert freqs[np.argmax(spectrum)] == pytest.approx(hz, abs=2)
    # Almost all the energy stays at the tone: no clicks where the deltas were joined.
    near = (spectrum[np.abs(freqs - hz) < 20] ** 2).sum()
    assert near / (spectrum**2).sum() > 0.95


TONE = tone(0.25, hz=700.0)  # 6000 samples: short enough for many examples, long for soxr


@settings(max_examples=60, deadline=None)
@given(
    audio_out=st.sampled_from([AudioFormat.PCM16, *CONVERTED]),
    cuts=st.lists(st.integers(1, len(TONE) // 2 - 1), max_size=16),
)
def test_any_split_of_the_audio_into_deltas_gives_the_same_output_with_gapless_offsets(
    audio_out: AudioFormat, cuts: list[int]
) -> None:
    # Cuts fall between samples: the upstream's deltas are whole PCM16 samples.
    whole_broker, split_broker = Broker(), Broker()
    whole = feed(outputs_for(audio_out), [whole_broker.audio(TONE), whole_broker.done()]).audio
    deltas = [split_broker.audio(delta) for delta in split(TONE, [c * 2 for c in cuts])]
    chunks = feed(outputs_for(audio_out), [*deltas, split_broker.done()]).audio

    assert [c.kind for c in chunks[:-1]] == ["audio"] * (len(chunks) - 1)
    assert chunks[-1].kind == "end"
    assert_gapless(chunks)
    assert_numbered(chunks)
    expected, got = samples(whole[:-1]), samples(chunks[:-1])
    assert abs(len(got) - len(expected)) <= 1
    assert chunks[-1].offset_ms == pytest.approx(whole[-1].offset_ms, abs=1000 / audio_out.rate)
    n = min(len(got), len(expected))
    # The streaming resampler is chunking-independent within rounding: 2 LSB before encoding,
    # which G.711 may turn into one step of its logarithmic scale.
    tolerance = 16 + np.abs(expected[:n]) / 16 if audio_out.is_g711 else 2
    assert np.all(np.abs(got[:n] - expected[:n]) <= tolerance)


# ---------------------------------------------------------------- cancellation, barge-in


@pytest.mark.parametrize("audio_out", [AudioFormat.PCM16, AudioFormat.G711_ULAW], ids=str)
@pytest.mark.parametrize("trigger", ["vlpipe.barge_in", "response.done cancelled"])
def test_a_cleared_response_gets_one_clear_marker_and_not_one_more_audio_chunk(
    trigger: str, audio_out: AudioFormat
) -> None:
    broker = Broker()
    deltas = every(tone(1.0), 100)
    outputs = outputs_for(audio_out)
    before = feed(outputs, [broker.audio(d) for d in deltas[:4]])
    if trigger == "vlpipe.barge_in":
        clearing = [broker.barge_in()]
        # The upstream is still sending while the broker's cancel is on its way: drop it all;
        # its `response.done` (cancelled) then must not clear a second time.
        late = [*(broker.audio(d) for d in deltas[4:]), broker.done(status="cancelled")]
    else:
        clearing = [broker.done(status="cancelled")]
        late = [broker.audio(d) for d in deltas[4:]]
    cleared = feed(outputs, clearing)
    after = feed(outputs, [*late, broker.ended()])

    chunks = [*before.audio, *cleared.audio, *after.audio]
    assert [c.kind for c in chunks] == ["audio"] * len(before.audio) + ["clear"]
    assert {c.response_id for c in chunks} == {RESPONSE}
    assert_gapless(chunks)  # the clear marker says how much was delivered before it
    assert_numbered(chunks)
    interrupted = [s.detail for s in [*cleared.status, *after.status] if s.kind == "interrupted"]
    delivered = round(ends(before.audio[-1]), 1)
    assert [(d["response_id"], d["delivered_ms"]) for d in interrupted] == [(RESPONSE, delivered)]
    assert outputs.state.playback.delivered_ms == pytest.approx(ends(before.audio[-1]))


def test_speech_started_alone_does_not_stop_the_audio_the_broker_decides_on_barge_in() -> None:
    # The broker turns speech into `vlpipe.barge_in` only when the session interrupts
    # responses (`interrupt_response`); egress must not second-guess it.
    broker = Broker()
    deltas = every(tone(1.0), 100)
    events = [
        *(broker.audio(d) for d in deltas[:4]),
        broker.event({"type": "input_audio_buffer.speech_started", "item_id": "item_u2",
                      "audio_start_ms": 12_000}),
        *(broker.audio(d) for d in deltas[4:]),
        broker.done(),
    ]  # fmt: skip
    chunks = feed(outputs_for(AudioFormat.PCM16), events).audio

    assert [c.kind for c in chunks] == ["audio"] * len(deltas) + ["end"]
    assert_gapless(chunks)


def test_a_response_cleared_before_any_audio_gets_no_clear_and_the_next_plays_from_zero() -> None:
    broker = Broker()
    outputs = outputs_for(AudioFormat.PCM16)
    first = [*(broker.audio(d, "resp_a", "item_a") for d in every(tone(0.3), 100)),
             broker.done("resp_a")]  # fmt: skip
    # resp_b is interrupted before any of its audio went out: nothing to clear at the consumer.
    interrupted = [broker.barge_in("resp_b", "item_b"),
                   *(broker.audio(d, "resp_b", "item_b") for d in every(tone(0.3), 100)),
                   broker.done("resp_b", status="cancelled")]  # fmt: skip
    last = [*(broker.audio(d, "resp_c", "item_c") for d in every(tone(0.2), 100)),
            broker.done("resp_c")]  # fmt: skip
    out = feed(outputs, [*first, *interrupted, *last])

    assert [(c.response_id, c.kind) for c in out.audio] == [
        *[("resp_a", "audio")] * 3, ("resp_a", "end"), *[("resp_c", "audio")] * 2, ("resp_c", "end")
    ]  # fmt: skip
    assert not any(s.kind == "interrupted" for s in out.status)
    assert_gapless(out.audio[:4])
    assert_gapless(out.audio[4:])  # each response's offsets start at 0
    assert_numbered(out.audio)


def test_a_barge_in_after_the_end_marker_still_clears_what_the_consumer_may_be_playing() -> None:
    broker = Broker()
    outputs = outputs_for(AudioFormat.PCM16)
    played = feed(outputs, [*(broker.audio(d) for d in every(tone(0.5), 100)), broker.done()])
    cleared = feed(outputs, [broker.barge_in()])

    assert [c.kind for c in played.audio] == ["audio"] * 5 + ["end"]
    assert [(c.kind, c.response_id) for c in cleared.audio] == [("clear", RESPONSE)]
    assert cleared.audio[0].offset_ms == pytest.approx(500)


def test_the_session_ending_mid_response_flushes_the_resampler_and_ends_the_response() -> None:
    broker = Broker()
    events = [*(broker.audio(d) for d in every(tone(0.5), 100)), broker.ended()]
    out = feed(outputs_for(AudioFormat.G711_ULAW), events)

    assert out.ended
    assert [c.kind for c in out.audio][-1] == "end"
    assert len(samples(out.audio[:-1])) == 4000  # 0.5 s at 8 kHz: the filter's tail included
    assert [s.message for s in out.status if s.kind == "state"] == ["ended"]


# ---------------------------------------------------------------- snapshot / load (takeover)


def written(checkpoint: dict[str, str], outputs: SessionOutputs) -> dict[str, str]:
    """What the egress service does with each batch: the snapshot fields whose text changed
    are written over the checkpoint Redis has (returns them)."""
    changed = {k: v for k, v in outputs.snapshot().items() if checkpoint.get(k) != v}
    checkpoint.update(changed)
    return changed


def afresh(outputs: SessionOutputs) -> dict[str, str]:
    """The snapshot of an object that has never made one (nothing reused from earlier)."""
    fresh = outputs_for(outputs.audio_out)
    fresh.state = copy.deepcopy(outputs.state)
    return fresh.snapshot()


def test_a_replica_loaded_at_any_point_of_the_recorded_turn_continues_as_the_original() -> None:
    broker = Broker()
    events = [*broker.recorded(recorded_turn()), broker.ended()]
    for cut in range(len(events) + 1):
        original = outputs_for(AudioFormat.PCM16)
        checkpoint: dict[str, str] = {}
        for event in events[:cut]:  # one write per event, each with what changed
            feed(original, [event])
            written(checkpoint, original)
        replica = outputs_for(AudioFormat.PCM16)
        replica.load(checkpoint)
        assert replica.snapshot() == original.snapshot() == afresh(original)

        # Same transcript pieces, audio chunks (seq, offsets, bytes, markers) and statuses.
        assert feed(replica, events[cut:]) == feed(original, events[cut:]), f"dump after {cut}"
        assert replica.snapshot() == original.snapshot()


def _event(broker: Broker, kind: str, n: int, size: int) -> Event:
    """One event of a small vocabulary, naming one of three responses/items (`n`)."""
    response, item, user = f"resp_{n}", f"item_{n}", f"u{n}"
    if kind == "audio":
        return broker.audio(TONE[: size * 2 + n % 2], response, item)  # odd sizes too
    if kind == "done":
        return broker.done(response, "cancelled" if size % 3 == 0 else "completed")
    if kind == "barge_in":
        return broker.barge_in(response, item)
    bodies = {
        "said": {"type": "response.audio_transcript.delta", "response_id": response,
                 "item_id": item, "delta": "word " if size % 2 else "wo"},
        "said_final": {"type": "response.audio_transcript.done", "response_id": response,
                       "item_id": item, "transcript": "word word"},
        "heard": {"type": USER_DELTA, "item_id": user, "delta": "Ever " if size % 2 else "tri"},
        "heard_final": {"type": USER_FINAL, "item_id": user, "transcript": "Ever tried."},
        "not_heard": {"type": "conversation.item.input_audio_transcription.failed",
                      "item_id": user, "error": {"code": "x"}},
        "started": {"type": "input_audio_buffer.speech_started", "item_id": user,
                    "audio_start_ms": size},
        "stopped": {"type": "input_audio_buffer.speech_stopped", "item_id": user,
                    "audio_end_ms": size + 500},
    }  # fmt: skip
    return broker.event(bodies[kind], gap_ms=size % 300)


KINDS = ["audio", "audio", "audio", "done", "barge_in", "said", "said_final", "heard",
         "heard_final", "not_heard", "started", "stopped"]  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(
    script=st.lists(
        st.tuples(st.sampled_from(KINDS), st.integers(0, 2), st.integers(0, 400)),
        min_size=1, max_size=40,
    ),
    batches=st.lists(st.integers(1, 4), min_size=1, max_size=40),
    cut=st.integers(0, 40),
)  # fmt: skip
def test_a_replica_loaded_from_the_changed_fields_written_so_far_continues_as_the_original(
    script: list[tuple[str, int, int]], batches: list[int], cut: int
) -> None:
    broker = Broker()
    events = [_event(broker, kind, n, size) for kind, n, size in script]
    cut = min(cut, len(events))
    original = outputs_for(AudioFormat.PCM16, partial_ms=100)
    checkpoint: dict[str, str] = {}
    start = 0
    for size in itertools.cycle(batches):  # the service writes once per batch of events
        if start >= cut:
            break
        feed(original, events[start : min(start + size, cut)])
        written(checkpoint, original)
        start += size
        # Nothing stale: each snapshot is what a snapshot made afresh would be.
        assert original.snapshot() == afresh(original)
    replica = outputs_for(AudioFormat.PCM16, partial_ms=100)
    replica.load(checkpoint)

    assert feed(replica, events[cut:]) == feed(original, events[cut:])
    assert replica.snapshot() == original.snapshot()


def test_an_audio_chunk_changes_only_the_numbers_and_the_playback_position() -> None:
    broker = Broker()
    outputs = outputs_for(AudioFormat.PCM16)
    deltas = every(tone(0.5), 100)
    checkpoint: dict[str, str] = {}
    feed(outputs, [broker.audio(deltas[0])])
    assert set(written(checkpoint, outputs)) == set(STATE_FIELDS)  # the first write: all
    for delta in deltas[1:]:
        feed(outputs, [broker.audio(delta)])
        assert set(written(checkpoint, outputs)) == {"seqs", "playback"}


def test_a_checkpoint_of_the_whole_state_as_one_field_is_continued() -> None:
    # What egress wrote before the split fields: a session taken over across an upgrade.
    broker = Broker()
    events = [broker.audio(d) for d in every(tone(1.0), 100)]
    original = outputs_for(AudioFormat.PCM16)
    feed(original, [*events[:4], broker.barge_in(), broker.audio(events[4].audio or b"",
                                                                   "resp_2", "item_2")])  # fmt: skip
    state = original.state
    legacy = {"state": json.dumps({
        "output_format": state.output_format, "transcript_seq": state.transcript_seq,
        "audio_seq": state.audio_seq, "partials": {}, "spans": {},
        "playback": {"response_id": state.playback.response_id,
                     "item_id": state.playback.item_id,
                     "delivered_ms": state.playback.delivered_ms},
        "cleared": list(state.cleared), "ended_audio": list(state.ended_audio),
        "speech_stopped_at": None, "first_audio_seen": list(state.first_audio_seen),
        "finished_items": list(state.finished_items),
    })}  # fmt: skip
    replica = outputs_for(AudioFormat.PCM16)
    replica.load(legacy)

    assert replica.snapshot() == original.snapshot()
    rest = [broker.audio(d, "resp_2", "item_2") for d in every(tone(0.3), 100)]
    assert feed(replica, rest) == feed(original, rest)


@pytest.mark.parametrize("audio_out", [AudioFormat.G711_ULAW, AudioFormat.PCM16_16K], ids=str)
def test_a_replica_taking_over_a_converted_response_keeps_its_numbering_and_offsets(
    audio_out: AudioFormat,
) -> None:
    broker = Broker()
    events = [*(broker.audio(d) for d in every(tone(1.0), 100)), broker.done()]
    original = outputs_for(audio_out)
    before = feed(original, events[:4]).audio
    replica = outputs_for(audio_out)
    replica.load(original.snapshot())
    went_on = feed(original, events[4:]).audio
    took_over = feed(replica, events[4:]).audio

    assert_numbered([*before, *took_over])
    assert_gapless([*before, *took_over])
    assert took_over[0].offset_ms == went_on[0].offset_ms
    assert [c.kind for c in took_over][-1] == "end"
    # What a takeover loses (by design, see the module's docstring): the samples the
    # original's resampler still held at the dump, as the replica's starts afresh. At soxr's
    # LQ that is 5 to 40 ms of audio at 8 kHz, depending on where the dump falls.
    held_ms = 400 - ends(before[-1])  # four 100 ms deltas in, this much out
    assert went_on[-1].offset_ms - took_over[-1].offset_ms == pytest.approx(
        held_ms, abs=1000 / audio_out.rate
    )


def test_a_replica_loaded_after_a_barge_in_keeps_the_cleared_response_silent() -> None:
    broker = Broker()
    deltas = every(tone(1.0), 100)
    original = outputs_for(AudioFormat.PCM16)
    before = feed(original, [*(broker.audio(d) for d in deltas[:4]), broker.barge_in()])
    replica = outputs_for(AudioFormat.PCM16)
    replica.load(original.snapshot())
    late = [*(broker.audio(d) for d in deltas[4:]), broker.done(status="cancelled")]
    after = feed(replica, [*late, *(broker.audio(d, "resp_2", "item_2") for d in deltas[:2])])

    assert [c.kind for c in before.audio] == ["audio"] * 4 + ["clear"]
    assert [(c.response_id, c.kind) for c in after.audio] == [("resp_2", "audio")] * 2
    assert not any(s.kind == "interrupted" for s in after.status)  # cleared once, not again
    assert_numbered([*before.audio, *after.audio])
    assert_gapless(after.audio)


def test_a_barge_in_naming_the_next_response_clears_the_earlier_items_audio_still_playing() -> None:
    # Response A spoke and ended; B was created (after a tool call, say) with no audio yet.
    # The broker cuts A's item but names B, the response in progress: A's audio must stop.
    broker = Broker()
    outputs = outputs_for(AudioFormat.PCM16)
    feed(outputs, [*(broker.audio(d, "resp_a", "item_a") for d in every(tone(1.0), 100)),
                   broker.done("resp_a")])  # fmt: skip
    cleared = feed(outputs, [broker.barge_in("resp_b", "item_a")])
    late_b = feed(outputs, [broker.audio(d, "resp_b", "item_b") for d in every(tone(0.2), 100)])

    assert [(c.kind, c.response_id) for c in cleared.audio] == [("clear", "resp_a")]
    assert late_b.audio == []  # B was interrupted too: not one sample of it


# ---------------------------------------------------------------- bad or odd input


def test_a_delta_ending_mid_sample_keeps_its_half_sample_for_the_next() -> None:
    broker = Broker()
    pcm = tone(0.3)
    whole = feed(outputs_for(AudioFormat.PCM16_8K), [broker.audio(pcm), broker.done()]).audio
    odd = split(pcm, [4801, 9603])  # cuts inside samples
    cut = feed(outputs_for(AudioFormat.PCM16_8K), [*(broker.audio(d) for d in odd),
                                                   broker.done()]).audio  # fmt: skip
    assert cut[-1].kind == "end"
    expected, got = samples(whole[:-1]), samples(cut[:-1])
    assert len(got) == len(expected)
    assert np.all(np.abs(got - expected) <= 2)  # resampling rounding, not a byte shifted


def test_turns_without_transcripts_do_not_grow_the_state() -> None:
    broker = Broker()
    outputs = outputs_for(AudioFormat.PCM16)
    for n in range(100):  # input transcription off: speech, but never a user final
        feed(outputs, [
            broker.event({"type": "input_audio_buffer.speech_started", "item_id": f"u{n}",
                          "audio_start_ms": n * 1000}),
            broker.event({"type": "input_audio_buffer.speech_stopped", "item_id": f"u{n}",
                          "audio_end_ms": n * 1000 + 500}),
        ])  # fmt: skip
    assert len(outputs.state.spans) <= 16
    assert sum(len(v) for v in outputs.snapshot().values()) < 2000


def test_a_failed_transcription_drops_its_partial_and_is_reported() -> None:
    broker = Broker()
    outputs = outputs_for(AudioFormat.PCM16, partial_ms=0)
    out = feed(outputs, [
        broker.event({"type": USER_DELTA, "item_id": "u1", "delta": "Ever "}),
        broker.event({"type": "conversation.item.input_audio_transcription.failed",
                      "item_id": "u1", "error": {"code": "stt_error", "message": "no model"}}),
        broker.event({"type": USER_DELTA, "item_id": "u1", "delta": "tried."}),
    ])  # fmt: skip
    assert [p.text for p in out.transcripts] == ["Ever"]
    assert outputs.state.partials == {}
    errors = [s.detail for s in out.status if s.kind == "error"]
    assert errors == [{"item_id": "u1", "code": "stt_error", "message": "no model"}]


def test_a_delta_after_the_final_does_not_reopen_the_transcript() -> None:
    broker = Broker()
    outputs = outputs_for(AudioFormat.PCM16, partial_ms=0)
    out = feed(outputs, [
        broker.event({"type": USER_DELTA, "item_id": "u1", "delta": "Ever tried. "}),
        broker.event({"type": USER_DELTA, "item_id": "u1", "delta": " "}),  # nothing new
        broker.event({"type": USER_FINAL, "item_id": "u1", "transcript": "Ever tried."}),
        broker.event({"type": USER_DELTA, "item_id": "u1", "delta": "Ever "}),
    ])  # fmt: skip
    assert [(p.text, p.final) for p in out.transcripts] == [
        ("Ever tried.", False), ("Ever tried.", True)
    ]  # fmt: skip
    assert outputs.state.partials == {}
