"""The broker's pure conversation state: barge-in cuts, what is remembered, replay, takeover.

These are the lessons of the peers' bug trackers, proved without a socket: a cut never
goes past the audio delivered or played, nothing unheard enters the history, and the
state a takeover loads is the state that was dumped.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from vlpipe.services.broker.conversation import Conversation
from vlpipe.shared.audio import AudioFormat

BYTES_PER_MS = 48  # PCM16 at 24 kHz, the default output format
T0 = 1000.0  # wall time (s) of the assistant's first audio delta in these tests


def assistant_turn(
    conv: Conversation, text: str, audio_ms: int, *, item: str = "a1", done: bool = True
) -> None:
    """Feed the events of one spoken assistant answer, as the upstream sends them."""
    conv.observe({"type": "response.created", "response": {"id": "r1"}})
    conv.observe(
        {"type": "conversation.item.created",
         "item": {"id": item, "type": "message", "role": "assistant",
                  "content": [{"type": "audio"}]}}
    )  # fmt: skip
    for _ in range(audio_ms // 20):
        conv.observe(
            {"type": "response.audio.delta", "item_id": item, "response_id": "r1"},
            audio_bytes=20 * BYTES_PER_MS,
            now=T0,
        )
    if done:
        conv.observe({"type": "response.audio_transcript.done", "item_id": item,
                      "transcript": text})  # fmt: skip
        conv.observe({"type": "response.done", "response": {"id": "r1"}})


def user_turn(conv: Conversation, text: str, item: str = "u1") -> None:
    conv.observe(
        {"type": "conversation.item.created",
         "item": {"id": item, "type": "message", "role": "user",
                  "content": [{"type": "input_audio"}]}}
    )  # fmt: skip
    conv.observe({"type": "conversation.item.input_audio_transcription.completed",
                  "item_id": item, "transcript": text})  # fmt: skip


def replayed_texts(conv: Conversation) -> list[tuple[str, str]]:
    out = []
    for event in conv.replay():
        item: dict[str, Any] = event["item"]
        if item["type"] == "message":
            out.append((item["role"], item["content"][0]["text"]))
    return out


WORDS = "one two three four five six seven eight nine ten"


def test_the_cut_is_what_was_played_when_the_consumer_reports_it() -> None:
    conv = Conversation()
    assistant_turn(conv, WORDS, audio_ms=2000, done=False)
    cut = conv.cut_for_barge_in(played_ms=600, delivered_ms=1500, playback_item="a1", now=T0 + 5)
    assert cut is not None and (cut.item_id, cut.audio_end_ms, cut.delete) == ("a1", 600, False)


def test_the_cut_never_goes_past_the_audio_delivered() -> None:
    conv = Conversation()
    assistant_turn(conv, WORDS, audio_ms=2000, done=False)
    cut = conv.cut_for_barge_in(played_ms=1800, delivered_ms=900, playback_item="a1", now=T0 + 5)
    assert cut is not None and cut.audio_end_ms == 900


def test_the_cut_never_goes_past_the_audio_the_upstream_produced() -> None:
    conv = Conversation()
    assistant_turn(conv, WORDS, audio_ms=400, done=False)
    cut = conv.cut_for_barge_in(played_ms=None, delivered_ms=5000, playback_item="a1", now=T0 + 9)
    assert cut is not None and cut.audio_end_ms == 400


def test_the_cut_never_goes_past_real_time_since_the_first_audio() -> None:
    # A consumer cannot have heard 1.5 s of audio 0.5 s after it started.
    conv = Conversation()
    assistant_turn(conv, WORDS, audio_ms=2000, done=False)
    cut = conv.cut_for_barge_in(played_ms=1500, delivered_ms=1500, playback_item="a1", now=T0 + 0.5)
    assert cut is not None and cut.audio_end_ms == 500


def test_nothing_delivered_deletes_instead_of_truncating_at_zero() -> None:
    conv = Conversation()
    assistant_turn(conv, WORDS, audio_ms=1000, done=False)
    for playback in [
        {"played_ms": None, "delivered_ms": None, "playback_item": None},
        # egress is still delivering the previous item: none of this one was heard
        {"played_ms": 800, "delivered_ms": 800, "playback_item": "a0"},
    ]:
        cut = conv.cut_for_barge_in(**playback, now=T0 + 5)  # type: ignore[arg-type]
        assert cut is not None and cut.delete and cut.audio_end_ms == 0


def test_an_item_heard_whole_after_its_response_is_not_cut() -> None:
    conv = Conversation()
    assistant_turn(conv, WORDS, audio_ms=1000)
    assert conv.cut_for_barge_in(1000, 1000, "a1", now=T0 + 5) is None


def test_a_truncated_item_remembers_only_the_words_that_fit_what_was_heard() -> None:
    conv = Conversation()
    user_turn(conv, "count to ten")
    assistant_turn(conv, WORDS, audio_ms=2000)
    conv.observe({"type": "conversation.item.truncated", "item_id": "a1", "audio_end_ms": 700})
    assert replayed_texts(conv) == [("user", "count to ten"), ("assistant", "one two three")]
    assert conv.cut_for_barge_in(2000, 2000, "a1", now=T0 + 5) is None  # cut once


def test_a_transcript_arriving_after_the_truncation_is_cut_too() -> None:
    # With server VAD the upstream cancels by itself, so the truncation may be confirmed
    # before the transcript of the interrupted answer arrives.
    conv = Conversation()
    assistant_turn(conv, WORDS, audio_ms=2000, done=False)
    conv.observe({"type": "conversation.item.truncated", "item_id": "a1", "audio_end_ms": 1000})
    conv.observe({"type": "response.audio_transcript.done", "item_id": "a1", "transcript": WORDS})
    conv.observe(
        {"type": "response.output_item.done",
         "item": {"id": "a1", "type": "message", "role": "assistant",
                  "content": [{"type": "audio", "transcript": WORDS}]}}
    )  # fmt: skip
    assert replayed_texts(conv) == [("assistant", "one two three four five")]


def test_a_deleted_item_is_forgotten() -> None:
    conv = Conversation()
    user_turn(conv, "hello")
    assistant_turn(conv, WORDS, audio_ms=1000)
    conv.observe({"type": "conversation.item.deleted", "item_id": "a1"})
    assert replayed_texts(conv) == [("user", "hello")]


def test_items_still_waiting_for_a_transcript_are_not_replayed() -> None:
    conv = Conversation()
    user_turn(conv, "hello")
    assistant_turn(conv, WORDS, audio_ms=1000, done=False)
    assert replayed_texts(conv) == [("user", "hello")]


def test_the_history_is_bounded_to_the_newest_items() -> None:
    conv = Conversation(max_items=3)
    for n in range(10):
        user_turn(conv, f"turn {n}", item=f"u{n}")
    assert [text for _, text in replayed_texts(conv)] == ["turn 7", "turn 8", "turn 9"]


def test_a_tool_call_is_pending_until_its_output_is_in_the_conversation() -> None:
    conv = Conversation()
    conv.observe({"type": "response.function_call_arguments.done", "item_id": "f1",
                  "call_id": "c1", "name": "get_weather", "arguments": '{"city":"Oslo"}'})  # fmt: skip
    assert [(i.call_id, i.name) for i in conv.pending_calls()] == [("c1", "get_weather")]
    conv.observe(
        {"type": "conversation.item.created",
         "item": {"id": "o1", "type": "function_call_output", "call_id": "c1", "output": "{}"}}
    )  # fmt: skip
    assert conv.pending_calls() == []
    assert [e["item"]["type"] for e in conv.replay()] == ["function_call", "function_call_output"]


def test_audio_is_measured_in_the_sessions_output_format() -> None:
    conv = Conversation()
    conv.observe({"type": "session.updated", "session": {"output_audio_format": "g711_ulaw"}})
    assert conv.output_format is AudioFormat.G711_ULAW
    conv.observe({"type": "response.audio.delta", "item_id": "a1"}, audio_bytes=8000, now=T0)
    assert conv.items["a1"].audio_ms == 1000  # 8000 mu-law bytes at 8 kHz


@given(
    audio_ms=st.integers(min_value=20, max_value=10_000).map(lambda ms: ms - ms % 20),
    played=st.one_of(st.none(), st.floats(min_value=0, max_value=20_000)),
    delivered=st.one_of(st.none(), st.floats(min_value=0, max_value=20_000)),
    elapsed_s=st.floats(min_value=0, max_value=30),
)
def test_a_cut_never_exceeds_what_was_delivered_produced_or_could_have_played(
    audio_ms: int, played: float | None, delivered: float | None, elapsed_s: float
) -> None:
    conv = Conversation()
    assistant_turn(conv, WORDS, audio_ms=audio_ms, done=False)
    cut = conv.cut_for_barge_in(played, delivered, "a1", now=T0 + elapsed_s)
    assert cut is not None  # the response is in flight
    assert 0 <= cut.audio_end_ms <= min(audio_ms, elapsed_s * 1000)
    # What was played was delivered: without a delivery figure, the played one bounds it.
    reported = delivered if delivered is not None else played
    assert cut.audio_end_ms <= (reported if reported is not None else 0)
    assert cut.delete == (cut.audio_end_ms == 0)


@given(
    words=st.lists(st.text("abcdefgh", min_size=1, max_size=6), min_size=1, max_size=40),
    audio_ms=st.integers(min_value=1, max_value=200).map(lambda n: n * 20),
    end_ms=st.integers(min_value=0, max_value=5000),
    transcript_first=st.booleans(),
)
def test_remembered_words_are_a_prefix_no_longer_than_the_heard_share(
    words: list[str], audio_ms: int, end_ms: int, transcript_first: bool
) -> None:
    text = " ".join(words)
    conv = Conversation()
    assistant_turn(conv, text, audio_ms=audio_ms, done=transcript_first)
    conv.observe({"type": "conversation.item.truncated", "item_id": "a1", "audio_end_ms": end_ms})
    if not transcript_first:
        conv.observe({"type": "response.audio_transcript.done", "item_id": "a1",
                      "transcript": text})  # fmt: skip
    kept = conv.items["a1"].text.split()
    assert kept == words[: len(kept)]
    assert len(kept) <= len(words) * min(1.0, end_ms / audio_ms)


@given(
    steps=st.lists(
        st.sampled_from(["user", "assistant", "truncate", "call", "output", "delete"]),
        max_size=30,
    )
)
def test_a_dumped_conversation_loads_back_the_same(steps: list[str]) -> None:
    conv = Conversation(max_items=12)
    for n, step in enumerate(steps):
        if step == "user":
            user_turn(conv, f"user says {n}", item=f"u{n}")
        elif step == "assistant":
            assistant_turn(conv, f"assistant says {n} at length", audio_ms=600, item=f"a{n}")
        elif step == "truncate" and conv.audio_item_id:
            conv.observe({"type": "conversation.item.truncated",
                          "item_id": conv.audio_item_id, "audio_end_ms": 300})  # fmt: skip
        elif step == "call":
            conv.observe({"type": "response.function_call_arguments.done", "item_id": f"f{n}",
                          "call_id": f"c{n}", "name": "lookup", "arguments": "{}"})  # fmt: skip
        elif step == "output" and conv.pending_calls():
            call = conv.pending_calls()[0]
            conv.observe(
                {"type": "conversation.item.created",
                 "item": {"id": f"o{n}", "type": "function_call_output",
                          "call_id": call.call_id, "output": "42"}}
            )  # fmt: skip
        elif step == "delete" and conv.items:
            conv.observe({"type": "conversation.item.deleted", "item_id": next(iter(conv.items))})
    loaded = Conversation.load(conv.dump(), max_items=12)
    assert loaded.items == conv.items
    assert loaded.replay() == conv.replay()
    assert [c.call_id for c in loaded.pending_calls()] == [c.call_id for c in conv.pending_calls()]
    assert len(loaded.items) <= 12
