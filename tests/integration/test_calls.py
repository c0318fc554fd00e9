"""Calls through the whole pipeline: a Twilio Media Stream and a browser, speech in, speech out."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import wave
from pathlib import Path

import numpy as np
import pytest
import redis.asyncio as aioredis
import websockets
from websockets.typing import Subprotocol

from tests.ingest.test_normalize import compressed
from tests.integration.pipeline import outputs_done, running_pipeline, send_paced
from tests.waiting import wait_until
from vlpipe.services.engine.server import running_engine
from vlpipe.shared.audio import StreamingResampler, pcm16_to_ulaw, ulaw_to_pcm16
from vlpipe.shared.contracts import AudioOut, Event, TranscriptPiece, decode
from vlpipe.shared.keys import StreamKeys

LAST_REPLY = "You said: Fail better."


def words(text: object) -> list[str]:
    """The words of a transcript, whatever the case and punctuation Whisper chose."""
    return re.findall(r"[a-z']+", str(text).lower())


def speech_pcm(path: Path) -> bytes:
    with wave.open(str(path)) as w:
        return w.readframes(w.getnframes())


async def finals(redis: aioredis.Redis, keys: StreamKeys, sid: str) -> list[TranscriptPiece]:
    pieces = [decode(TranscriptPiece, f) for _, f in await redis.xrange(keys.transcript(sid))]
    return [p for p in pieces if p.final]


async def reply_complete(redis: aioredis.Redis, keys: StreamKeys, sid: str, received: int) -> bool:
    """The last response's audio ended, was transcribed, and every chunk reached the client."""
    chunks = [decode(AudioOut, f) for _, f in await redis.xrange(keys.audio_out(sid))]
    if not chunks or chunks[-1].kind != "end":
        return False
    said = {p.response_id for p in await finals(redis, keys, sid) if p.speaker == "assistant"}
    return chunks[-1].response_id in said and received == sum(c.kind == "audio" for c in chunks)


def rms(pcm: bytes) -> float:
    samples = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    return float(np.sqrt(np.mean(samples**2))) if len(samples) else 0.0


async def test_a_twilio_call_gets_the_assistants_speech_back_as_media_messages(
    redis_url: str, redis: aioredis.Redis, keys: StreamKeys, speech_wav: Path
) -> None:
    resampler = StreamingResampler(16000, 8000)
    mulaw = pcm16_to_ulaw(resampler.process(speech_pcm(speech_wav)) + resampler.flush())
    mulaw += b"\xff" * 8000 * 2  # two seconds of mu-law silence: the caller waits
    stream = "MZ0123456789abcdef"
    async with (
        running_engine(model="local", output_pace=0) as engine,
        running_pipeline(redis_url, keys.prefix, engine.endpoint) as pipeline,
    ):
        # Twilio sends no headers: its token is a <Parameter name="token"> of the Stream.
        async with pipeline.connect("/twilio", token=None) as twilio:
            await twilio.send(
                json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})
            )
            await twilio.send(json.dumps({
                "event": "start", "sequenceNumber": "1", "streamSid": stream,
                "start": {"streamSid": stream, "accountSid": "AC1", "callSid": "CA1",
                          "tracks": ["inbound"],
                          "customParameters": {"session": "tw1", "token": pipeline.token("tw1")},
                          "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000,
                                          "channels": 1}},
            }))  # fmt: skip
            media_messages = [
                json.dumps({
                    "event": "media", "sequenceNumber": str(n + 2), "streamSid": stream,
                    "media": {"track": "inbound", "chunk": str(n + 1), "timestamp": str(n * 20),
                              "payload": base64.b64encode(mulaw[start : start + 160]).decode()},
                })
                for n, start in enumerate(range(0, len(mulaw), 160))
            ]  # fmt: skip
            await send_paced(twilio, media_messages, len(mulaw) / 8000)
            media: list[dict[str, object]] = []
            marks: list[str] = []

            async def receive_reply() -> None:
                async for raw in twilio:
                    message = json.loads(raw)
                    assert message["streamSid"] == stream
                    if message["event"] == "media":
                        media.append(message)
                    elif message["event"] == "mark":
                        marks.append(message["mark"]["name"])
                        await twilio.send(json.dumps({"event": "mark", "streamSid": stream,
                                                      "mark": message["mark"]}))  # played  # fmt: skip
                    if await reply_complete(redis, keys, "tw1", len(media)):
                        return

            await asyncio.wait_for(receive_reply(), timeout=90)
            await twilio.send(json.dumps({"event": "stop", "streamSid": stream,
                                          "stop": {"callSid": "CA1"}}))  # fmt: skip
        said = await finals(redis, keys, "tw1")
        playback = await redis.hgetall(keys.playback("tw1"))

    # Sent faster than real time, the caller's phrases interrupt the replies to the
    # earlier ones; the reply to the last phrase is heard whole.
    heard = " ".join(p.text for p in said if p.speaker == "user").lower()
    assert "try again" in heard and "fail better" in heard  # through G.711 at 8 kHz
    assistant = [p.text for p in said if p.speaker == "assistant"]
    assert words(assistant[-1]) == words(LAST_REPLY)
    audio = b"".join(base64.b64decode(str(m["media"]["payload"])) for m in media)  # type: ignore[index]
    assert len(audio) > 8000  # more than a second of mu-law at 8 kHz
    assert rms(ulaw_to_pcm16(audio)) > 300  # speech, not silence
    # The phone's played marks became the playback position the broker cuts at.
    assert float(playback[b"played_ms"]) > 0
    assert float(playback[b"played_ms"]) <= float(playback[b"delivered_ms"]) + 1


async def check_made_by_broker(redis: aioredis.Redis, keys: StreamKeys, sid: str) -> None:
    """The broker made the session's outputs in its own writes: its checkpoint numbers
    them, every chunk and piece is there once and in order, the finals are in the shared
    stream too, egress let the session go, and the session's keys expire."""
    state = await redis.hgetall(keys.session_state(sid))
    assert state[b"egress.outputs_by"] == b"broker" and b"egress.seqs" not in state
    transcript_seq, audio_seq = json.loads(state[b"broker.out.seqs"])
    chunks = [decode(AudioOut, f) for _, f in await redis.xrange(keys.audio_out(sid))]
    pieces = [decode(TranscriptPiece, f) for _, f in await redis.xrange(keys.transcript(sid))]
    assert [c.seq for c in chunks] == list(range(audio_seq))
    assert [p.seq for p in pieces] == list(range(transcript_seq))
    shared = [decode(TranscriptPiece, f) for _, f in await redis.xrange(keys.transcripts)]
    assert [p for p in shared if p.session == sid] == [p for p in pieces if p.final]
    # Nothing reads the events stream then: it keeps the last minute for those who tap it.
    events = [decode(Event, f) for _, f in await redis.xrange(keys.events(sid))]
    assert [e.seq for e in events] == list(range(len(events)))
    assert events[-1].type == "vlpipe.session.ended"
    for key in (keys.audio_out(sid), keys.transcript(sid), keys.events(sid)):
        assert 0 < await redis.ttl(key) <= 3600, key


def browser_upload(speech_wav: Path, source: str) -> tuple[str, list[bytes], float]:
    """The speech and two seconds of silence as a browser sends them on a call: raw PCM16
    (an AudioWorklet, 20 ms messages), or WebM Opus from MediaRecorder (its container cut
    into blobs wherever the timeslice falls, not at frame boundaries); and its seconds."""
    pcm = speech_pcm(speech_wav) + b"\0\0" * 16000 * 2
    seconds = len(pcm) / 32000
    if source == "pcm16":
        pieces = [pcm[i : i + 640] for i in range(0, len(pcm), 640)]
        return "input=pcm16&rate=16000", pieces, seconds
    resampler = StreamingResampler(16000, 48000)
    webm = compressed(resampler.process(pcm) + resampler.flush(), 48000, "webm", "libopus")
    return "input=webm", [webm[i : i + 1000] for i in range(0, len(webm), 1000)], seconds


@pytest.mark.parametrize(
    ("source", "outputs_by"), [("pcm16", "egress"), ("webm", "egress"), ("pcm16", "broker")]
)
async def test_a_browser_call_gets_speech_and_transcripts_back(
    redis_url: str,
    redis: aioredis.Redis,
    keys: StreamKeys,
    speech_wav: Path,
    source: str,
    outputs_by: str,
) -> None:
    """`outputs_by`: the service that makes the outputs (the broker's `outputs_by`); with
    the broker, egress lets the session go at its first event and only serves the gateway
    the call comes through."""
    query, upload, seconds = browser_upload(speech_wav, source)
    env = {"VLPIPE_OUTPUTS_BY": outputs_by}
    async with (
        running_engine(model="local", output_pace=0) as engine,
        running_pipeline(redis_url, keys.prefix, engine.endpoint, **env) as pipeline,
    ):
        # A browser's token travels as a subprotocol, answered with `vlpipe`.
        url = pipeline.url(f"/v1/call?session=web1&{query}&format=pcm16_16000hz")
        protocols = [Subprotocol("vlpipe"), Subprotocol(f"vlpipe.bearer.{pipeline.token('web1')}")]
        async with websockets.connect(url, subprotocols=protocols) as browser:
            assert browser.subprotocol == "vlpipe"
            hello = json.loads(await browser.recv())
            assert hello == {"type": "session", "session": "web1", "format": "pcm16_16000hz"}
            await send_paced(browser, upload, seconds)
            audio: list[bytes] = []
            texts: list[dict[str, object]] = []

            async def until_answered() -> None:
                """Until the reply to the last phrase was transcribed and its audio ended."""
                answered: set[object] = set()
                ended: set[object] = set()
                async for message in browser:
                    if isinstance(message, bytes):
                        audio.append(message)
                        continue
                    data = json.loads(message)
                    texts.append(data)
                    if data["type"] == "audio.end":
                        ended.add(data["response_id"])
                    if (
                        data["type"] == "transcript"
                        and data["final"]
                        and words(data["text"]) == words(LAST_REPLY)
                    ):
                        answered.add(data["response_id"])
                    if answered & ended:
                        return

            await asyncio.wait_for(until_answered(), timeout=90)
            await browser.send(json.dumps({"type": "end"}))

            async def ended() -> bool:
                return await outputs_done(redis, keys, "web1")

            await wait_until(ended, within=60)
        if outputs_by == "broker":
            await check_made_by_broker(redis, keys, "web1")
    transcripts = [t for t in texts if t["type"] == "transcript" and t["final"]]
    heard = " ".join(str(t["text"]) for t in transcripts if t["speaker"] == "user").lower()
    assert "try again" in heard and "fail better" in heard
    assert any(t["type"] == "transcript" and not t["final"] for t in texts)  # partials too
    reply = b"".join(audio)
    assert len(reply) > 32000  # over a second at 16 kHz
    assert rms(reply) > 300
