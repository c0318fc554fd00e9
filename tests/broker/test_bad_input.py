"""Bad control messages, bad frames, bad configs, upstream errors: reported, and the session goes on."""

from __future__ import annotations

import base64
import json

import redis.asyncio as aioredis
from websockets.asyncio.server import ServerConnection, serve

from tests.broker.helpers import (
    FrameWriter,
    control,
    events,
    running_broker,
    start_session,
    statuses,
    wait_for_event,
)
from tests.egress.helpers import audio_out, transcript
from tests.waiting import wait_until
from vlpipe.services.engine.server import running_engine
from vlpipe.shared.keys import StreamKeys


async def dead_reasons(redis: aioredis.Redis, keys: StreamKeys) -> list[str]:
    return [f[b"reason"].decode() for _, f in await redis.xrange(keys.dead)]


async def test_bad_control_messages_are_refused_and_the_session_goes_on(
    redis_url: str, redis: aioredis.Redis, keys: StreamKeys
) -> None:
    async with (
        running_engine(model="local", output_pace=0) as engine,
        running_broker(redis_url, keys, engine.endpoint),
    ):
        await start_session(redis, keys, "q1", modalities=["text"])
        await control(redis, keys, "q1", type="dance", style="tango")
        await control(redis, keys, "q1", type="text", text="x" * 40_000)
        await control(
            redis, keys, "q1", type="session.update", config={"input_audio_format": "mp3"}
        )
        await control(redis, keys, "q1", type="session.update", config="{not json")
        await redis.xadd(keys.ctl("q1"), {b"type": b"text", b"text": b"\xff\xfe"})
        await control(redis, keys, "q1", type="text", text="Are you still fine.")
        evs = await wait_for_event(redis, keys, "q1", "response.done", within=60)
        reasons = await dead_reasons(redis, keys)
    assert [e.event["text"] for e in evs if e.type == "response.text.done"] == [
        "You said: Are you still fine."
    ]
    assert len(reasons) == 5

    def one(*words: str) -> None:
        assert len([r for r in reasons if all(w in r for w in words)]) == 1, (words, reasons)

    one("unknown control message type 'dance'")
    one("invalid AddText", "field 'text'", "32768")
    one("invalid session.update", "input_audio_format")
    one("invalid UpdateSession", "field 'config'", "not valid JSON")
    one("not UTF-8")
    errors = [s.message for s in await statuses(redis, keys, "q1") if s.kind == "error"]
    assert sorted(errors) == sorted(reasons)


async def test_garbage_frames_are_dead_lettered_and_the_audio_goes_on(
    redis_url: str, redis: aioredis.Redis, keys: StreamKeys
) -> None:
    async with (
        running_engine(model="echo", output_pace=0) as engine,
        running_broker(redis_url, keys, engine.endpoint) as broker,
    ):
        await start_session(redis, keys, "g1")
        frames = FrameWriter(redis, keys, "g1")
        await frames.write(b"\0" * 3200)
        await redis.xadd(keys.frames("g1"), {"m": b"\xc1\x00garbage"})
        await redis.xadd(keys.frames("g1"), {"audio": b"raw"})
        await frames.write(b"\0" * 3200)
        await frames.finish()
        await wait_for_event(redis, keys, "g1", "vlpipe.session.ended")
        assert broker.totals["frames"] == 10
    reasons = await dead_reasons(redis, keys)
    assert len(reasons) == 2 and all("invalid Frame" in r for r in reasons)


async def test_upstream_errors_are_surfaced_and_never_tear_the_session_down(
    redis_url: str, redis: aioredis.Redis, keys: StreamKeys
) -> None:
    async with (
        running_engine(model="local", output_pace=0) as engine,
        running_broker(redis_url, keys, engine.endpoint),
    ):
        await start_session(redis, keys, "z1", modalities=["text"])
        await wait_for_event(redis, keys, "z1", "session.updated")
        # Nothing to cancel: the upstream answers response_cancel_not_active.
        await control(redis, keys, "z1", type="response.cancel")
        # A config our contract accepts but the upstream refuses.
        await control(redis, keys, "z1", type="session.update",
                      config={"turn_detection": {"type": "telepathy"}})  # fmt: skip
        await wait_for_event(redis, keys, "z1", "error", count=2)
        await control(redis, keys, "z1", type="text", text="Hello again.")
        evs = await wait_for_event(redis, keys, "z1", "response.done", within=60)

        async def surfaced() -> bool:
            return len([s for s in await statuses(redis, keys, "z1") if s.kind == "error"]) >= 2

        await wait_until(surfaced)
        status = [s for s in await statuses(redis, keys, "z1") if s.kind == "error"]
    codes = [e.event["error"]["code"] for e in evs if e.type == "error"]
    assert codes[0] == "response_cancel_not_active"
    assert "upstream error response_cancel_not_active" in status[0].message
    assert status[0].detail["code"] == "response_cancel_not_active"
    assert codes[1] in ("invalid_value", "invalid_type")
    assert [e.event["text"] for e in evs if e.type == "response.text.done"] == [
        "You said: Hello again."
    ]
    assert [e.type for e in await events(redis, keys, "z1")].count("vlpipe.upstream.connected") == 1


async def test_an_upstream_event_whose_outputs_cannot_be_made_is_reported_and_the_rest_are_made(
    redis_url: str, redis: aioredis.Redis, keys: StreamKeys
) -> None:
    # An upstream (a real WebSocket server) that sends one event the outputs cannot read
    # (a speech start whose offset is not a number), then a whole spoken answer. With the
    # broker making the outputs, that one event's outputs are skipped and reported; the
    # event itself, and every output of the answer, are still written.
    pcm = bytes(range(256)) * 19  # 4864 bytes: about 100 ms of 24 kHz PCM16
    script = [
        {"type": "input_audio_buffer.speech_started", "item_id": "u1", "audio_start_ms": "soon"},
        {"type": "response.created", "response": {"id": "r1"}},
        {"type": "response.audio.delta", "response_id": "r1", "item_id": "a1",
         "output_index": 0, "content_index": 0, "delta": base64.b64encode(pcm).decode()},
        {"type": "response.audio_transcript.done", "response_id": "r1", "item_id": "a1",
         "output_index": 0, "content_index": 0, "transcript": "Still here."},
        {"type": "response.done", "response": {"id": "r1", "status": "completed", "output": []}},
    ]  # fmt: skip

    async def upstream(ws: ServerConnection) -> None:
        update = json.loads(await ws.recv())
        assert update["type"] == "session.update"
        await ws.send(json.dumps({"type": "session.updated", "session": update["session"]}))
        for event in script:
            await ws.send(json.dumps(event))
        async for _ in ws:  # appends, until the broker closes
            pass

    async with (
        serve(upstream, "127.0.0.1", 0) as server,
        running_broker(redis_url, keys, f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}",
                       outputs_by="broker"),
    ):  # fmt: skip
        await start_session(redis, keys, "o1")
        await wait_for_event(redis, keys, "o1", "response.done")

        async def made() -> bool:
            audio = [a for a in await audio_out(redis, keys, "o1") if a.kind == "audio"]
            return bool(audio) and any(s.kind == "error" for s in await statuses(redis, keys, "o1"))

        await wait_until(made)
        evs = await events(redis, keys, "o1")
        errors = [s for s in await statuses(redis, keys, "o1") if s.kind == "error"]
        audio = [a for a in await audio_out(redis, keys, "o1") if a.kind == "audio"]
        pieces = await transcript(redis, keys, "o1")
    assert "input_audio_buffer.speech_started" in [e.type for e in evs]
    assert len(errors) == 1
    assert "outputs of a input_audio_buffer.speech_started event could not be made" in (
        errors[0].message
    )
    assert "soon" in errors[0].message
    assert b"".join(a.audio for a in audio) == pcm
    assert [(p.speaker, p.text, p.final) for p in pieces if p.final] == [
        ("assistant", "Still here.", True)
    ]
