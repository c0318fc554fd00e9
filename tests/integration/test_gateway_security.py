"""Hostile gateway clients against the whole pipeline while a caller talks.

A caller is on a call with its own call token, speaking the sample recording. Meanwhile
other clients try: another session's token, an expired one, a tampered one, a listener
sending, the caller's own token from a foreign web page or in the URL, and, on sessions
of their own, audio at 10x real time, an oversized message, an audio chunk over the limit
and a flood of messages. Each is refused with the documented code (HTTP 401/403 at the
handshake; close 1008, or 1009 for size) and counted by reason; the caller's session
sees none of it and ends normally, with both transcripts.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import wave
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Subprotocol

from tests.integration.pipeline import (
    SIGNING_KEY,
    Pipeline,
    outputs_done,
    running_pipeline,
    send_paced,
)
from tests.waiting import wait_until
from vlpipe.services.egress.access import Scope, mint_token
from vlpipe.services.engine.server import running_engine
from vlpipe.shared.contracts import SessionAnnouncement, Status, TranscriptPiece, decode
from vlpipe.shared.keys import StreamKeys

VICTIM = "victim"


async def refused_at_handshake(connecting: Any) -> tuple[int, str]:
    """The HTTP status and body of a handshake the gateway refuses."""
    try:
        async with connecting:
            pass
    except InvalidStatus as exc:
        return exc.response.status_code, exc.response.body.decode()
    raise AssertionError("the gateway let it in")


async def closed_while(ws: Any, attack: Callable[[], Awaitable[None]]) -> tuple[int, str]:
    """Run `attack` on an open socket; the code and reason the gateway closed it with."""
    try:
        await attack()
        while True:
            await asyncio.wait_for(ws.recv(), timeout=20)
    except ConnectionClosed as exc:
        assert exc.rcvd is not None, "closed without a close frame"
        return exc.rcvd.code, exc.rcvd.reason
    raise AssertionError("the gateway kept the socket open")


async def hostile_clients(p: Pipeline, victim_token: str) -> dict[str, tuple[int, str]]:
    """Every attack, each with how it was refused."""
    got: dict[str, tuple[int, str]] = {}
    subscribe, call = f"/v1/subscribe?session={VICTIM}", f"/v1/call?session={VICTIM}"
    intruder = p.token("intruder", Scope.CALL)
    got["another session's token, listening"] = await refused_at_handshake(
        p.connect(subscribe, token=intruder)
    )
    got["another session's token, calling"] = await refused_at_handshake(
        p.connect(call, token=intruder)
    )
    expired = mint_token(SIGNING_KEY, VICTIM, Scope.CALL, ttl_s=60, now=time.time() - 3600)
    got["expired token"] = await refused_at_handshake(p.connect(subscribe, token=expired))
    got["tampered token"] = await refused_at_handshake(
        p.connect(call, token=_tampered(p.token(VICTIM, Scope.LISTEN)))
    )
    listen = p.token(VICTIM, Scope.LISTEN)
    got["listener calling"] = await refused_at_handshake(p.connect(call, token=listen))
    async with p.connect(subscribe, token=listen) as listener:
        assert json.loads(await listener.recv())["type"] == "subscribed"  # may listen
        got["listener sending text"] = await closed_while(
            listener, lambda: listener.send(json.dumps({"type": "text", "text": "Obey me."}))
        )
    async with p.connect(subscribe, token=listen) as listener:
        await listener.recv()
        got["listener reporting playback"] = await closed_while(
            listener,
            lambda: listener.send(json.dumps({"type": "played", "response_id": "r", "ms": 0})),
        )
    # The caller's own token, from another web page (cross-site WebSocket hijacking) and
    # in the URL (where it would be logged).
    foreign = [Subprotocol("vlpipe"), Subprotocol(f"vlpipe.bearer.{victim_token}")]
    got["foreign origin"] = await refused_at_handshake(
        websockets.connect(p.url(subscribe), subprotocols=foreign, origin="https://evil.example")
    )
    got["token in the query string"] = await refused_at_handshake(
        websockets.connect(p.url(f"{subscribe}&token={victim_token}"))
    )
    # Abuse on sessions of the attacker's own, with valid tokens.
    got["audio at 10x real time"] = await _fast_audio(p)
    async with p.connect("/v1/call?session=big", token=p.token("big")) as big:
        await big.recv()
        got["oversized message"] = await closed_while(big, lambda: big.send(b"\0" * 300_000))
    async with p.connect("/v1/call?session=chunk", token=p.token("chunk")) as chunky:
        await chunky.recv()
        got["audio chunk over the limit"] = await closed_while(
            chunky, lambda: chunky.send(b"\0" * 100_000)
        )
    async with p.connect("/v1/subscribe?session=flood", token=p.token("flood")) as flood:
        await flood.recv()
        played = json.dumps({"type": "played", "response_id": "r", "ms": 1})  # no reply

        async def flood_it() -> None:
            for _ in range(1000):
                await flood.send(played)

        got["message flood"] = await closed_while(flood, flood_it)
    return got


def _tampered(token: str) -> str:
    """`token` with its claims rewritten to the call scope, the signature kept."""
    header, claims, signature = token.split(".")
    decoded = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
    decoded["scope"] = "call"
    forged = base64.urlsafe_b64encode(json.dumps(decoded).encode()).decode().rstrip("=")
    return f"{header}.{forged}.{signature}"


async def _fast_audio(p: Pipeline) -> tuple[int, str]:
    """A call pushing audio at 10x real time, on average over any stretch: it catches up
    in bursts if this process is held up, so the gateway never sees it slower."""
    async with p.connect("/v1/call?session=flooder&input=pcm16&rate=16000",
                         token=p.token("flooder")) as ws:  # fmt: skip
        await ws.recv()
        loop = asyncio.get_running_loop()

        async def push() -> None:
            started, sent_s = loop.time(), 0.0
            while sent_s < 120:
                while sent_s < 10 * (loop.time() - started):
                    await ws.send(b"\0" * 3200)  # 100 ms
                    sent_s += 0.1
                await asyncio.sleep(0.01)

        return await closed_while(ws, push)


async def the_call(p: Pipeline, token: str, pcm: bytes, attacked: asyncio.Event) -> list[Any]:
    """The victim's call: speech in at 1.5x real time, until its answer is heard."""
    texts: list[Any] = []
    async with p.connect(f"/v1/call?session={VICTIM}&input=pcm16&rate=16000", token=token) as ws:
        assert json.loads(await ws.recv())["type"] == "session"
        attacked.set()
        await send_paced(ws, [pcm[i : i + 3200] for i in range(0, len(pcm), 3200)],
                         len(pcm) / 32000)  # fmt: skip

        async def answered() -> None:
            async for message in ws:
                if isinstance(message, str):
                    texts.append(json.loads(message))
                    last = texts[-1]
                    if (
                        last["type"] == "transcript"
                        and last["speaker"] == "assistant"
                        and (last["final"] and "better" in last["text"].lower())
                    ):
                        return

        await asyncio.wait_for(answered(), timeout=120)
        await ws.send(json.dumps({"type": "end"}))
    return texts


async def test_hostile_clients_are_refused_and_the_callers_session_goes_on_untouched(
    redis_url: str, redis: aioredis.Redis, keys: StreamKeys, speech_wav: Path
) -> None:
    with wave.open(str(speech_wav)) as w:
        pcm = w.readframes(w.getnframes()) + b"\0\0" * 16000 * 2
    # A consumer group that reads nothing keeps every announcement on the sessions stream
    # (it is trimmed behind its slowest group), to see afterwards who announced what.
    await redis.xgroup_create(keys.sessions, "audit", id="0", mkstream=True)
    async with (
        running_engine(model="local", output_pace=0) as engine,
        running_pipeline(redis_url, keys.prefix, engine.endpoint) as p,
    ):
        token = p.token(VICTIM, Scope.CALL)
        attacked = asyncio.Event()

        async def attacks() -> dict[str, tuple[int, str]]:
            await attacked.wait()  # while the caller talks
            return await hostile_clients(p, token)

        texts, got = await asyncio.gather(the_call(p, token, pcm, attacked), attacks())

        async def ended() -> bool:
            return await outputs_done(redis, keys, VICTIM)

        await wait_until(ended, within=60)
        refused = {reason: await p.egress_metric("vlpipe_gateway_refused_total", reason=reason)
                   for reason in ("session", "expired", "token", "scope", "origin", "url_token",
                                  "audio_rate", "message_size", "audio_size", "message_rate")}  # fmt: skip

    expected = {
        "another session's token, listening": (403, "another session"),
        "another session's token, calling": (403, "another session"),
        "expired token": (401, "token expired"),
        "tampered token": (401, "signature does not verify"),
        "listener calling": (403, "scope is 'listen'"),
        "listener sending text": (1008, "scope is 'listen'"),
        "listener reporting playback": (1008, "scope is 'listen'"),
        "foreign origin": (403, "origin 'https://evil.example' is not allowed"),
        "token in the query string": (401, "a token in the URL is refused"),
        "audio at 10x real time": (1008, "audio faster than 2x real time"),
        "oversized message": (1009, "exceeds limit"),
        "audio chunk over the limit": (1009, "audio message of 100000 bytes is over the limit"),
        "message flood": (1008, "more than 200 messages per second"),
    }
    assert set(got) == set(expected)
    for attack, (code, words) in expected.items():
        assert got[attack][0] == code and words in got[attack][1], (attack, got[attack])
    assert refused == {"session": 2, "expired": 1, "token": 1, "scope": 3, "origin": 1,
                       "url_token": 1, "audio_rate": 1, "message_size": 1, "audio_size": 1,
                       "message_rate": 1}  # fmt: skip

    # The caller's session saw none of it: one start and one end (its own), no control
    # message, no error, and both sides' transcripts.
    audit: Any = await redis.xreadgroup("audit", "a", {keys.sessions: ">"}, count=10_000)
    announced = [decode(SessionAnnouncement, f) for _, f in audit[0][1]]
    assert [a.type for a in announced if a.session == VICTIM] == ["start", "end"]
    assert await redis.hget(keys.session_state(VICTIM), "end_reason") == b"caller hung up"
    assert await redis.hget(keys.session_state(VICTIM), "broker.ctl_id") in (None, b"0-0")
    statuses = [decode(Status, f) for _, f in await redis.xrange(keys.status(VICTIM))]
    assert not [s for s in statuses if s.kind == "error"], statuses
    pieces = [decode(TranscriptPiece, f) for _, f in await redis.xrange(keys.transcript(VICTIM))]
    finals = [p for p in pieces if p.final]
    heard = " ".join(p.text for p in finals if p.speaker == "user").lower()
    assert "try again" in heard and "fail better" in heard
    assert [p for p in finals if p.speaker == "assistant"]
    on_socket = [t["text"] for t in texts if t["type"] == "transcript" and t["final"]]
    assert on_socket == [p.text for p in finals]
