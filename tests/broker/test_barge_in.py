"""Barge-in: the assistant's item is cut to what the user heard, never past what was delivered."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.broker.helpers import (
    FrameWriter,
    assert_in_order,
    read_wav,
    running_broker,
    silence,
    start_session,
    types,
    wait_for_event,
)
from vlpipe.services.engine.server import running_engine
from vlpipe.shared.keys import StreamKeys


@pytest.mark.parametrize(
    ("playback", "expected"),
    [
        pytest.param({"delivered_ms": 400, "played_ms": 250}, 250, id="cut-at-played"),
        pytest.param({"delivered_ms": 200, "played_ms": 500}, 200, id="never-past-delivered"),
        pytest.param({"delivered_ms": 300}, 300, id="delivered-when-no-played"),
        pytest.param(None, 0, id="nothing-heard-deletes"),
    ],
)
async def test_barge_in_cuts_the_item_to_what_was_heard(
    redis_url: str,
    redis: aioredis.Redis,
    keys: StreamKeys,
    speech_wav: Path,
    playback: dict[str, int] | None,
    expected: int,
) -> None:
    speech = read_wav(speech_wav)[: int(16000 * 1.3) * 2]  # "Ever tried."
    async with (
        running_engine(model="echo", output_pace=1.0) as engine,
        # Egress makes the outputs, and the playback position is the test's to write.
        running_broker(redis_url, keys, engine.endpoint, outputs_by="egress"),
    ):
        await start_session(redis, keys, "b1")
        frames = FrameWriter(redis, keys, "b1")
        await frames.write(speech + silence(900))
        evs = await wait_for_event(redis, keys, "b1", "response.audio.delta", count=8)
        first = next(e for e in evs if e.type == "response.audio.delta")
        item_id, response_id = first.event["item_id"], first.event["response_id"]
        if playback is not None:  # what egress reports
            await redis.hset(
                keys.playback("b1"),
                mapping={"response_id": response_id, "item_id": item_id, **playback},
            )
        await frames.write(speech, pace=4.0)  # the user talks over the assistant
        after = "conversation.item.deleted" if expected == 0 else "conversation.item.truncated"
        evs = await wait_for_event(redis, keys, "b1", after)
        await frames.write(silence(900))
        await frames.finish()
        evs = await wait_for_event(redis, keys, "b1", "vlpipe.session.ended", within=60)
    assert_in_order(evs)
    barge = [e for e in evs if e.type == "vlpipe.barge_in"]
    assert barge and barge[0].event["item_id"] == item_id
    assert barge[0].event["audio_end_ms"] == expected
    kinds = types(evs)
    assert kinds.index("input_audio_buffer.speech_started", kinds.index("response.created")) < (
        kinds.index("vlpipe.barge_in")
    )
    truncated = [e.event for e in evs if e.type == "conversation.item.truncated"]
    if expected == 0:
        # Never audio_end_ms=0: an item nobody heard is deleted, and forgotten.
        assert truncated == []
        assert any(
            e.event.get("item_id") == item_id for e in evs if e.type == "conversation.item.deleted"
        )
        conversation = json.loads(
            await redis.hget(keys.session_state("b1"), "broker.conversation") or "{}"
        )
        assert item_id not in [i["id"] for i in conversation["items"]]
    else:
        assert truncated == [
            {**truncated[0], "item_id": item_id, "content_index": 0, "audio_end_ms": expected}
        ]
