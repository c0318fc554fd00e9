"""Hostile input against the whole pipeline: every producer-facing stream and the gateway.

One pipeline (ingest, broker and egress as real processes, the local engine) takes bad
entries on `vl:sessions`, `vl:audio:{id}` and `vl:ctl:{id}` written with raw Redis
commands, and bad requests and frames from raw WebSocket clients. The contract: each bad
message gets a reason that names the problem (on `vl:dead` where it came from a stream,
on the session's status stream where there is a session, in the reply or close reason on
a socket), no service dies, and a good session afterwards still gets both sides'
transcripts through the same processes.

The tests share the pipeline on purpose: the last one proves that the processes that took
everything above still serve a good session, so they run in file order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import uuid
import wave
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio as aioredis
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.integration.pipeline import Pipeline, outputs_done, running_pipeline
from tests.waiting import wait_until
from vlpipe.services.engine.server import running_engine
from vlpipe.shared.contracts import MAX_AUDIO_BYTES, Status, TranscriptPiece, decode
from vlpipe.shared.keys import StreamKeys
from vlpipe.shared.redis_server import RedisServer
from vlpipe.shared.streams import DEAD_FIELD_BYTES, connect

# Every test runs in the module's event loop: the pipeline and its Redis client live there.
pytestmark = pytest.mark.asyncio(loop_scope="module")

SERVICES = {"ingest", "broker", "egress"}


@dataclass
class Hostile:
    """The shared pipeline, its key prefix, a Redis client and the services' log folder."""

    pipeline: Pipeline
    keys: StreamKeys
    redis: aioredis.Redis
    logs: Path


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def hostile(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Hostile]:
    if not redis_server.ping():  # an earlier fault test may have left it down
        redis_server.start()
    keys = StreamKeys(f"t{uuid.uuid4().hex[:10]}")
    logs = tmp_path_factory.mktemp("hostile-logs")
    redis = connect(redis_server.url)
    try:
        # The local engine (not `echo`): the good session at the end must be transcribed,
        # and the echo model neither transcribes the user nor speaks words of its own.
        async with (
            running_engine(model="local", output_pace=0) as engine,
            running_pipeline(redis_server.url, keys.prefix, engine.endpoint, logs=logs) as p,
        ):
            yield Hostile(p, keys, redis, logs)
            # Leaving running_pipeline also asserts that all three exit 0 on SIGTERM.
    finally:
        await redis.aclose()


# ----------------------------------------------------------------------------- helpers


Fields = dict[bytes, bytes]


async def add(h: Hostile, key: str, fields: Mapping[Any, Any]) -> str:
    """XADD raw fields, as any producer would; the new entry's id."""
    entry_id: Any = await h.redis.xadd(key, dict(fields))
    return str(entry_id.decode())


async def entries(h: Hostile, key: str) -> list[Fields]:
    """Every entry's fields (the client answers bytes: decode_responses is off)."""
    raw: Any = await h.redis.xrange(key)
    return [fields for _, fields in raw]


def text(fields: Mapping[bytes, bytes], name: str) -> str:
    return fields[name.encode()].decode("utf-8", "replace")


async def dead_letters(h: Hostile, stream: str) -> list[Fields]:
    """The dead letters of entries that came from `stream`."""
    return [f for f in await entries(h, h.keys.dead) if text(f, "stream") == stream]


async def statuses(h: Hostile, sid: str) -> list[Status]:
    return [decode(Status, f) for f in await entries(h, h.keys.status(sid))]


async def finals(h: Hostile, sid: str) -> list[TranscriptPiece]:
    pieces: list[TranscriptPiece] = [
        decode(TranscriptPiece, f) for f in await entries(h, h.keys.transcript(sid))
    ]
    return [p for p in pieces if p.final]


async def wait_until_done(h: Hostile, sid: str, within: float = 60) -> None:
    """Egress, the last service, finished the session: it went all the way through."""

    async def done() -> bool:
        return await outputs_done(h.redis, h.keys, sid)

    await wait_until(done, within=within)


async def announced(h: Hostile, sid: str) -> bool:
    """Whether any entry on the sessions stream names `sid`."""
    return any(f.get(b"session") == sid.encode() for f in await entries(h, h.keys.sessions))


def words(said: object) -> list[str]:
    """The words of a transcript, whatever the case and punctuation Whisper chose."""
    return re.findall(r"[a-z']+", str(said).lower())


def assert_all_alive(h: Hostile) -> None:
    """No service process exited (running_pipeline starts ingest, broker, egress)."""
    names = ("ingest", "broker", "egress")
    exited = {
        n: p.poll() for n, p in zip(names, h.pipeline.procs, strict=True) if p.poll() is not None
    }
    assert not exited, f"service processes exited, with these codes: {exited}"


async def closed_by_server(connecting: Any, *sends: str | bytes) -> ConnectionClosed:
    """Open the socket `connecting` (a `websockets.connect(...)`), send, and return how the
    gateway closed it."""
    async with connecting as ws:
        with pytest.raises(ConnectionClosed) as closed:
            for message in sends:  # the gateway may close before all of them are sent
                await ws.send(message)
            while True:
                await asyncio.wait_for(ws.recv(), timeout=10)
    return closed.value


async def refused_with_reasons(
    h: Hostile, sid: str, stream: str, bad: dict[str, list[str]], service: str
) -> dict[str, list[Fields]]:
    """Every entry in `bad` (and no other) was dead-lettered by `service` with a reason
    holding its expected parts, and the same reason reached the session's status stream.
    Returns the dead letters by entry id."""
    letters = await refused_entries(h, stream, bad, by={service}, within=30)
    assert set(letters) == set(bad), "only the bad entries are refused"
    reasons: dict[str, str] = {}
    for entry_id, expected in bad.items():
        [fields] = letters[entry_id]
        assert fields[b"service"] == service.encode()
        reasons[entry_id] = text(fields, "reason")
        assert all(part in reasons[entry_id] for part in expected), (expected, reasons[entry_id])

    async def reported() -> bool:
        return len([s for s in await statuses(h, sid) if s.kind == "error"]) >= len(bad)

    await wait_until(reported)
    errors = [s for s in await statuses(h, sid) if s.kind == "error"]
    # The producer, who may not read vl:dead, sees the same reason for each entry it sent.
    assert {s.detail["id"]: s.message for s in errors} == reasons
    assert {(s.service, s.detail["stream"]) for s in errors} == {(service, stream)}
    return letters


async def refused_entries(
    h: Hostile, stream: str, bad: dict[str, list[str]], by: set[str], within: float = 15
) -> dict[str, list[Fields]]:
    """Wait until every service in `by` dead-lettered every entry id in `bad`; return the
    dead letters of `stream` by entry id."""

    async def by_id() -> dict[str, list[Fields]]:
        letters: dict[str, list[Fields]] = {}
        for fields in await dead_letters(h, stream):
            letters.setdefault(text(fields, "id"), []).append(fields)
        return letters

    async def complete() -> bool:
        letters = await by_id()
        return all(by <= {text(f, "service") for f in letters.get(i, [])} for i in bad)

    await wait_until(complete, within=within)
    return await by_id()


# ----------------------------------------------------------------------------- vl:sessions


async def test_bad_announcements_are_dead_lettered_by_every_service_naming_the_field(
    hostile: Hostile,
) -> None:
    h = hostile
    cases: list[tuple[dict[Any, Any], list[str]]] = [
        ({"type": "start"}, ["'start.session'", "Field required"]),
        ({"type": "start", "session": "bad id!"}, ["'start.session'", "pattern"]),
        ({"type": "start", "session": "s-json", "config": "{not json"},
         ["'start.config'", "not valid JSON"]),
        ({"type": "start", "session": "s-cfg", "config": '{"input_audio_format": "mp3"}'},
         ["'start.config.input_audio_format'"]),
        ({"type": "start", "session": "s-out", "audio_out": "flac"}, ["'start.audio_out'"]),
        ({"type": "start", "session": "s-extra", "colour": "red"},
         ["'start.colour'", "Extra inputs are not permitted"]),
        ({"type": "dance", "session": "s-dance"}, ["Input tag 'dance'", "'start', 'end'"]),
        ({"session": "s-untyped"}, ["discriminator 'type'"]),
        ({"type": "start", "session": b"\xff\xfe"}, ["field 'session'", "not UTF-8"]),
        ({"type": "end", "session": "s-end", "reason": "r" * 300},
         ["'end.reason'", "at most 256 characters"]),
    ]  # fmt: skip
    bad: dict[str, list[str]] = {}
    for fields, expected in cases:
        bad[await add(h, h.keys.sessions, fields)] = expected

    letters = await refused_entries(h, h.keys.sessions, bad, by=SERVICES)
    for entry_id, expected in bad.items():
        # Each service reads the stream through its own group, and each refuses the entry
        # at once (validation is deterministic: retrying would only delay good entries).
        got = letters[entry_id]
        assert {text(f, "service") for f in got} == SERVICES, got
        for fields in got:
            reason = text(fields, "reason")
            assert all(part in reason for part in expected), (expected, reason)
            assert text(fields, "group") == text(fields, "service")
            assert fields[b"deliveries"] == b"1"
    # The original fields travel with the reason, so an operator can see what was sent.
    first = next(f for f in letters[next(iter(bad))] if f[b"service"] == b"ingest")
    assert first[b"orig.type"] == b"start"
    # A refused announcement changes no session: nothing half-started, nothing ended.
    for sid in ("s-json", "s-cfg", "s-out", "s-extra", "s-end"):
        assert not await h.redis.exists(h.keys.session_state(sid)), sid
    assert_all_alive(h)


# ----------------------------------------------------------------------------- vl:audio:{id}


async def test_bad_audio_chunks_get_a_reason_on_dead_and_on_the_sessions_status_and_it_goes_on(
    hostile: Hostile,
) -> None:
    h = hostile
    sid = "h-audio"
    await h.redis.xadd(h.keys.sessions, {"type": "start", "session": sid})
    garbage = bytes(range(256)) * 18 + b"\x07"  # 4609 bytes: not whole 16-bit samples
    cases: list[tuple[dict[Any, Any], list[str]]] = [
        ({"audio": garbage, "format": "pcm16", "rate": "16000"},
         ["pcm16", "multiple of 2 bytes", "got 4609"]),
        ({"audio": b"\0\0", "format": "aiff", "rate": "16000"}, ["field 'format'", "'pcm16'"]),
        ({"audio": b"\0\0", "format": "pcm16", "rate": "1000000"},
         ["field 'rate'", "less than or equal to 48000"]),
        ({"audio": b"\0\0", "format": "pcm16", "rate": "fast"}, ["field 'rate'", "integer"]),
        ({"audio": b"\0\0", "format": "pcm16"}, ["'pcm16' needs a 'rate' field"]),
        ({"audio": b"\0" * (5 * MAX_AUDIO_BYTES), "format": "pcm16", "rate": "16000"},
         ["field 'audio'", f"at most {MAX_AUDIO_BYTES} bytes"]),
        ({"audio": b"\0\0", "format": b"\xff\xfe", "rate": "16000"},
         ["field 'format'", "not UTF-8"]),
        ({b"\xff\xfe": b"\0\0", "audio": b"\0\0", "format": "pcm16", "rate": "16000"},
         ["Extra inputs are not permitted"]),
        ({"format": "pcm16", "rate": "16000"}, ["field 'audio'", "Field required"]),
        ({"audio": b"\0\0", "format": "pcm16", "rate": "16000", "channels": "3"},
         ["field 'channels'"]),
        ({"audio": b"\0\0\xc0\x7f", "format": "f32", "rate": "16000"}, ["NaN"]),
        ({"audio": b"\0\0", "format": "wav"}, ["WAV data before any WAV header"]),
    ]  # fmt: skip
    bad: dict[str, list[str]] = {}
    for fields, expected in cases:
        bad[await add(h, h.keys.audio(sid), fields)] = expected
    huge = list(bad)[5]
    # A good chunk after them: 100 ms of silence, which must still become frames.
    await h.redis.xadd(h.keys.audio(sid), {"audio": b"\0\0" * 1600, "format": "pcm16",
                                           "rate": "16000"})  # fmt: skip

    letters = await refused_with_reasons(h, sid, h.keys.audio(sid), bad, "ingest")
    # The dead letter keeps enough of a huge payload to look at, and its size, not a copy.
    [huge_letter] = letters[huge]
    assert huge_letter[b"orig.audio"] == b"\0" * DEAD_FIELD_BYTES
    assert int(huge_letter[b"orig.audio.bytes"]) == 5 * MAX_AUDIO_BYTES

    async def framed() -> bool:
        written = await h.redis.hget(h.keys.session_state(sid), "ingest.next_seq")
        return int(written or 0) > 0

    await wait_until(framed)  # the session went on with the next (good) chunk
    await h.redis.xadd(h.keys.sessions, {"type": "end", "session": sid})
    await wait_until_done(h, sid)
    assert_all_alive(h)


# ----------------------------------------------------------------------------- vl:ctl:{id}


async def test_bad_control_messages_get_a_reason_on_dead_and_on_the_sessions_status_and_it_goes_on(
    hostile: Hostile,
) -> None:
    h = hostile
    sid = "h-ctl"
    await h.redis.xadd(h.keys.sessions, {"type": "start", "session": sid})
    cases: list[tuple[dict[Any, Any], list[str]]] = [
        ({"type": "dance", "style": "tango"},
         ["unknown control message type 'dance'", "expected one of", "session.update"]),
        ({"text": "no type"}, ["unknown control message type (missing)"]),
        ({"type": b"\xff\xfe"}, ["unknown control message type"]),
        ({"type": "session.update", "config": "{not json"}, ["field 'config'", "not valid JSON"]),
        ({"type": "session.update", "config": "[1, 2]"}, ["field 'config'", "dictionary"]),
        ({"type": "session.update", "config": '{"input_audio_format": "mp3"}'},
         ["invalid session.update", "input_audio_format"]),
        ({"type": "text", "text": "x" * 40_000}, ["field 'text'", "at most 32768 characters"]),
        ({"type": "text", "text": ""}, ["field 'text'", "at least 1 character"]),
        ({"type": "text", "text": b"\xff\xfe"}, ["field 'text'", "not UTF-8"]),
        ({"type": "text", "text": "hello", "respond": "maybe"}, ["field 'respond'"]),
        ({"type": "tool.result", "call_id": "no-such-call", "output": "{}"},
         ["tool.result for unknown call 'no-such-call'"]),
    ]  # fmt: skip
    bad: dict[str, list[str]] = {}
    for fields, expected in cases:
        bad[await add(h, h.keys.ctl(sid), fields)] = expected
    # A good control message after them: the session must still answer it.
    await h.redis.xadd(h.keys.ctl(sid), {"type": "text", "text": "Are you still there."})

    await refused_with_reasons(h, sid, h.keys.ctl(sid), bad, "broker")

    async def answered() -> bool:
        return any(p.speaker == "assistant" for p in await finals(h, sid))

    await wait_until(answered, within=30)
    said = [p.text for p in await finals(h, sid) if p.speaker == "assistant"]
    assert [words(s) for s in said] == [words("You said: Are you still there.")]
    await h.redis.xadd(h.keys.sessions, {"type": "end", "session": sid})
    await wait_until_done(h, sid)
    assert_all_alive(h)


# ----------------------------------------------------------------------------- the gateway


async def test_the_gateway_refuses_bad_calls_with_a_reason_before_announcing_anything(
    hostile: Hostile,
) -> None:
    h = hostile
    base = f"ws://127.0.0.1:{h.pipeline.gateway_port}"
    for url in (f"{base}/v1/call?session=g-token&token=guess", f"{base}/v1/call?session=g-token"):
        with pytest.raises(InvalidStatus) as refused:
            async with websockets.connect(url):
                pass
        # Refused over HTTP, before the WebSocket opens, with the reason in the body.
        assert refused.value.response.status_code == 401
        assert b"token" in refused.value.response.body
    cases = [
        ("/v1/call?session=g-input&input=flac", "input 'flac': expected pcm16, webm or ogg"),
        ("/v1/call?session=g-format&format=flac", "format 'flac': expected one of pcm16"),
        ("/v1/call?session=g-config&config=%7Bnot", "invalid config: not valid JSON"),
        ("/v1/call?session=g-cfgobj&config=%5B1%5D", "invalid config: expected a JSON object"),
        ("/v1/call?session=g-cfgfld&config=%7B%22input_audio_format%22%3A%22mp3%22%7D",
         "invalid SessionConfig: field 'input_audio_format'"),
        ("/v1/call?session=g-rate&rate=abc", "invalid RawAudio: field 'rate'"),
        ("/v1/call?session=g-rate2&rate=100", "invalid RawAudio: field 'rate'"),
        ("/v1/call?session=bad%20id%21", "invalid session id 'bad id!'"),
        ("/v1/subscribe?session=g-sub&format=flac", "format 'flac'"),
        ("/v1/subscribe", "missing session id"),
    ]  # fmt: skip
    for path, reason in cases:
        closed = await closed_by_server(h.pipeline.connect(path))
        # The handshake succeeded, so the reason travels as the close frame's reason.
        assert closed.rcvd is not None, path
        assert closed.rcvd.code == 1008 and reason in closed.rcvd.reason, (path, closed.rcvd)
    for sid in ("g-token", "g-input", "g-format", "g-config", "g-cfgobj", "g-cfgfld", "g-rate",
                "g-rate2"):  # fmt: skip
        assert not await announced(h, sid), f"{sid} was announced although refused"
    assert_all_alive(h)


async def test_garbage_frames_from_gateway_clients_get_an_error_reply_and_the_socket_stays_usable(
    hostile: Hostile,
) -> None:
    h = hostile
    garbage = ["garbage", "[1, 2]", '"just a string"', "{}", '{"type": "dance"}',
               '{"type": "text", "text": 5}', '{"type": "text", "text": "' + "x" * 40_000 + '"}']  # fmt: skip
    expected = [
        *(["expected a JSON object with a type"] * 4),
        "unknown message type 'dance'",
        "invalid AddText: field 'text': Input should be a valid string",
        "invalid AddText: field 'text': String should have at most 32768 characters",
    ]
    async with h.pipeline.connect("/v1/subscribe?session=g-sub2") as sub:
        assert json.loads(await sub.recv())["type"] == "subscribed"
        for message in garbage:
            await sub.send(message)
        replies = [json.loads(await sub.recv()) for _ in garbage]
        assert replies == [{"type": "error", "message": m} for m in expected]
        # Text that is not UTF-8 breaks the WebSocket protocol itself: 1007, with the reason.
        await sub.send(b"\xff\xfe", text=True)
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(sub.recv(), timeout=10)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1007 and "invalid start byte" in closed.value.rcvd.reason

    # On a call the same garbage is answered, and the call goes on to a normal end.
    async with h.pipeline.connect("/v1/call?session=g-call") as call:
        assert json.loads(await call.recv())["type"] == "session"
        for message in garbage:
            await call.send(message)

        async def errors_seen() -> list[str]:
            seen: list[str] = []
            while len(seen) < len(garbage):
                reply = json.loads(await call.recv())
                if reply["type"] == "error":
                    seen.append(reply["message"])
            return seen

        assert await asyncio.wait_for(errors_seen(), timeout=10) == expected
        await call.send(json.dumps({"type": "end"}))
        await wait_until_done(h, "g-call")
    assert await h.redis.hget(h.keys.session_state("g-call"), "end_reason") == b"caller hung up"
    assert_all_alive(h)


async def test_an_oversize_message_closes_the_call_with_1009_and_the_session_still_ends(
    hostile: Hostile,
) -> None:
    h = hostile
    async with h.pipeline.connect("/v1/call?session=g-big&input=pcm16&rate=16000") as call:
        # After the `session` reply, so that the session is surely announced and its
        # audio stream can be checked (earlier hang-ups: the test after this one).
        assert json.loads(await call.recv())["type"] == "session"
        with pytest.raises(ConnectionClosed) as closed:
            await call.send(b"\0" * (2 * MAX_AUDIO_BYTES))
            while True:
                await asyncio.wait_for(call.recv(), timeout=10)
    rcvd = closed.value.rcvd
    assert rcvd is not None
    assert rcvd.code == 1009 and "exceeds limit" in rcvd.reason
    # Closing the socket ends the session, whatever closed it; none of the oversize
    # message reached the audio stream.
    await wait_until_done(h, "g-big")
    assert await h.redis.hget(h.keys.session_state("g-big"), "end_reason") == b"caller hung up"
    assert await h.redis.hget(h.keys.session_state("g-big"), "ingest.audio_id") == b"0-0"
    assert_all_alive(h)


async def test_calls_that_hang_up_at_once_still_end_their_sessions(hostile: Hostile) -> None:
    # A socket gone before the gateway's first reply must not leave its session open in
    # every service (and an upstream socket held) for ever.
    h = hostile
    for n in range(10):
        async with h.pipeline.connect(f"/v1/call?session=g-quick{n}"):
            pass  # hang up without reading the `session` reply
    for n in range(10):
        with contextlib.suppress(ConnectionClosed):
            async with h.pipeline.connect(f"/v1/call?session=g-burst{n}") as ws:
                await ws.send(b"\0" * (2 * MAX_AUDIO_BYTES))  # closed with 1009 at once
                await ws.recv()
    for sid in [*(f"g-quick{n}" for n in range(10)), *(f"g-burst{n}" for n in range(10))]:
        if await announced(h, sid):
            await wait_until_done(h, sid)
    assert_all_alive(h)


async def test_bad_twilio_messages_are_reported_on_the_calls_status_stream(
    hostile: Hostile,
) -> None:
    h = hostile
    sid = "tw-hostile"
    start: dict[str, Any] = {"event": "start", "sequenceNumber": "1", "streamSid": "MZ1",
             "start": {"streamSid": "MZ1", "callSid": "CA1",
                       "customParameters": {"session": sid}}}  # fmt: skip
    async with h.pipeline.connect("/twilio") as twilio:
        await twilio.send(json.dumps(start))
        await twilio.send("garbage")
        await twilio.send(json.dumps({"event": "media", "streamSid": "MZ1",
                                      "media": {"payload": "not base64!"}}))  # fmt: skip
        await twilio.send(json.dumps({"event": "stop", "streamSid": "MZ1"}))
        await twilio.wait_closed()
    await wait_until_done(h, sid)
    errors = [(s.service, s.message) for s in await statuses(h, sid) if s.kind == "error"]
    assert errors == [
        ("gateway", "twilio: a message that is not Media Streams JSON"),
        ("gateway", "twilio: media payload is not base64"),
    ]
    # Twilio sends no headers: without the token in the URL it must come in `start`.
    no_token = {**start, "start": {**start["start"], "customParameters": {"session": "tw-x"}}}
    closed = await closed_by_server(h.pipeline.connect("/twilio", token=None), json.dumps(no_token))
    assert closed.rcvd is not None
    assert closed.rcvd.code == 1008 and "missing token" in closed.rcvd.reason
    assert not await announced(h, "tw-x")
    assert_all_alive(h)


# ----------------------------------------------------------------------------- afterwards


async def test_after_all_that_no_service_failed_and_a_good_session_gets_both_transcripts(
    hostile: Hostile, speech_wav: Path
) -> None:
    h = hostile
    assert_all_alive(h)
    sid = "good-after"
    with wave.open(str(speech_wav)) as w:
        pcm = w.readframes(w.getnframes()) + b"\0\0" * 16000 * 2
    config = {"input_audio_format": "pcm16_16000hz",
              "turn_detection": {"type": "server_vad", "silence_duration_ms": 1500}}  # fmt: skip
    received: list[dict[str, Any]] = []
    async with h.pipeline.connect(f"/v1/subscribe?session={sid}") as client:
        await client.recv()  # subscribed: the gateway that took the garbage still serves
        await h.redis.xadd(
            h.keys.sessions, {"type": "start", "session": sid, "config": json.dumps(config)}
        )
        for seq, start in enumerate(range(0, len(pcm), 3200)):
            await h.redis.xadd(h.keys.audio(sid), {"audio": pcm[start : start + 3200],
                                                   "rate": "16000", "seq": str(seq)})  # fmt: skip
            await asyncio.sleep(0.025)  # 100 ms of audio at 4x real time, as a live call
        await h.redis.xadd(h.keys.sessions, {"type": "end", "session": sid})

        async def until_ended() -> None:
            async for message in client:
                if isinstance(message, str):
                    received.append(json.loads(message))
                    if received[-1].get("message") == "ended":
                        return

        await asyncio.wait_for(until_ended(), timeout=90)
    said = await finals(h, sid)
    heard = " ".join(p.text for p in said if p.speaker == "user").lower()
    assert "try again" in heard and "fail better" in heard, said
    replies = [p.text for p in said if p.speaker == "assistant"]
    assert len(replies) == 1 and words(replies[0])[:2] == ["you", "said"], replies
    assert "fail better" in replies[0].lower()
    on_socket = [m["text"] for m in received if m["type"] == "transcript" and m["final"]]
    assert on_socket == [p.text for p in said]
    assert not [s for s in await statuses(h, sid) if s.kind == "error"]
    assert not await dead_letters(h, h.keys.audio(sid))
    assert_all_alive(h)
    # Stronger than "still running": no session task, handler or socket handler failed in
    # any service during the whole module (a failure is logged at error level and retried).
    for name in ("ingest", "broker", "egress"):
        for line in (h.logs / f"{name}.log").read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # e.g. a traceback written to stderr past the logger
                pytest.fail(f"{name} wrote a line that is not a JSON log record: {line[:600]}")
            assert record["level"] not in ("error", "critical"), f"{name}: {line[:600]}"
