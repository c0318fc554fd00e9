"""Who may open what at the gateway, over real sockets: the console's tokens, origins and
hosts, Twilio's token in `start`, tokens in the URL when allowed, and the limit on audio
waiting in Redis. The hostile clients against the whole pipeline are in
tests/integration/test_gateway_security.py."""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Subprotocol

from tests.egress.helpers import SIGNING_KEY, TOKEN, GatewayProc
from tests.waiting import wait_until
from vlpipe.services.egress.access import Scope, mint_token
from vlpipe.shared.contracts import SessionAnnouncement, SessionEnd, SessionStart, decode
from vlpipe.shared.keys import StreamKeys


@pytest.fixture
def gateway(redis_url: str, keys: StreamKeys) -> Iterator[GatewayProc]:
    proc = GatewayProc(redis_url, keys.prefix)
    yield proc
    proc.stop()


@pytest.fixture
def open_gateway(redis_url: str, keys: StreamKeys) -> Iterator[GatewayProc]:
    """A gateway with no credential configured: on loopback, trusting this machine."""
    proc = GatewayProc(redis_url, keys.prefix, VLPIPE_GATEWAY_TOKENS="",
                       VLPIPE_GATEWAY_SIGNING_KEY="")  # fmt: skip
    yield proc
    proc.stop()


async def http_get(port: int, path: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of a plain HTTP GET (errors included)."""

    def get() -> tuple[int, dict[str, str], bytes]:
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as reply:
                return reply.status, dict(reply.headers), reply.read()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read()

    return await asyncio.to_thread(get)


async def raw_status(port: int, request: str) -> int:
    """The status of a hand-written HTTP request (to send a Host of our choosing)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request.encode())
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    writer.close()
    return status


def basic(password: str) -> str:
    return "Basic " + base64.b64encode(f"operator:{password}".encode()).decode()


async def keep_announcements(redis: aioredis.Redis, keys: StreamKeys) -> None:
    """A consumer group that reads nothing: the sessions stream, trimmed behind its slowest
    group, then keeps every announcement for `announcements` to see."""
    await redis.xgroup_create(keys.sessions, "audit", id="0", mkstream=True)


async def announcements(redis: aioredis.Redis, keys: StreamKeys) -> list[SessionStart | SessionEnd]:
    return [decode(SessionAnnouncement, f) for _, f in await redis.xrange(keys.sessions)]


async def test_the_console_gets_a_call_token_for_each_call_only_with_the_operators_credential(
    gateway: GatewayProc,
) -> None:
    await gateway.ready()
    status, headers, _ = await http_get(gateway.port, "/")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")
    assert (await http_get(gateway.port, "/console/session"))[0] == 401
    assert (await http_get(gateway.port, "/", Authorization=basic("guess")))[0] == 401
    status, _, page = await http_get(gateway.port, "/", Authorization=basic(TOKEN))
    assert status == 200 and b"console.js" in page and b"token" not in page.lower()
    status, headers, body = await http_get(
        gateway.port, "/console/session", Authorization=basic(TOKEN)
    )
    assert status == 200 and headers["Cache-Control"] == "no-store"
    call = json.loads(body)
    # The token opens a call on its own session, as a browser offers it: a subprotocol.
    offered = [Subprotocol("vlpipe"), Subprotocol(f"vlpipe.bearer.{call['token']}")]
    url = gateway.url(f"/v1/call?session={call['session']}")
    async with websockets.connect(url, subprotocols=offered) as ws:
        assert ws.subprotocol == "vlpipe"
        assert json.loads(await ws.recv())["session"] == call["session"]
    with pytest.raises(InvalidStatus) as refused:
        async with websockets.connect(gateway.url("/v1/call?session=other"), subprotocols=offered):
            pass
    assert refused.value.response.status_code == 403
    assert b"another session" in refused.value.response.body


async def test_without_credentials_only_this_machines_pages_may_open_sockets(
    open_gateway: GatewayProc,
) -> None:
    gateway = open_gateway
    await gateway.ready()
    path = "/v1/subscribe?session=o1"
    async with gateway.connect(path, token=None) as ws:  # not a browser: no Origin
        assert json.loads(await ws.recv())["type"] == "subscribed"
    own = f"http://127.0.0.1:{gateway.port}"
    async with gateway.connect(path, token=None, origin=own) as ws:  # the console
        assert json.loads(await ws.recv())["type"] == "subscribed"
    # Any other web page the user visits: cross-site WebSocket hijacking.
    with pytest.raises(InvalidStatus) as refused:
        async with gateway.connect(path, token=None, origin="https://evil.example"):
            pass
    assert refused.value.response.status_code == 403
    assert b"origin 'https://evil.example' is not allowed" in refused.value.response.body
    # A page of a domain that resolves to 127.0.0.1 (DNS rebinding) is "same origin" to
    # itself, but names its own domain as Host: refused, the console's token too.
    for target in ("/console/session", path):
        request = (f"GET {target} HTTP/1.1\r\nHost: evil.example:{gateway.port}\r\n"
                   f"Origin: http://evil.example:{gateway.port}\r\n\r\n")  # fmt: skip
        assert await raw_status(gateway.port, request) == 403, target
    status, _, body = await http_get(gateway.port, "/console/session")
    assert status == 200 and json.loads(body)["session"].startswith("console-")


async def test_an_allowlisted_origin_may_open_sockets(redis_url: str, keys: StreamKeys) -> None:
    gateway = GatewayProc(redis_url, keys.prefix, VLPIPE_GATEWAY_ORIGINS="https://app.example")
    try:
        await gateway.ready()
        path = "/v1/subscribe?session=o2"
        async with gateway.connect(path, origin="https://app.example") as ws:
            assert json.loads(await ws.recv())["type"] == "subscribed"
        with pytest.raises(InvalidStatus) as refused:
            async with gateway.connect(path, origin="https://app.example.evil"):
                pass
        assert refused.value.response.status_code == 403
    finally:
        gateway.stop()


async def test_a_twilio_stream_must_start_with_its_token_before_any_media(
    redis: aioredis.Redis, keys: StreamKeys, gateway: GatewayProc
) -> None:
    await keep_announcements(redis, keys)
    await gateway.ready()
    media = {"event": "media", "streamSid": "MZ1", "media": {"chunk": "1", "payload": "f39/"}}
    start = {"event": "start", "streamSid": "MZ1",
             "start": {"callSid": "CA1", "customParameters": {"session": "tw-a"}}}  # fmt: skip
    other = mint_token(SIGNING_KEY, "tw-b", Scope.CALL)
    listen = mint_token(SIGNING_KEY, "tw-a", Scope.LISTEN)
    cases = [
        ([media], "expected Media Streams `start` first, got 'media'"),
        ([start], "missing token"),
        ([_with_token(start, "guess")], "wrong token"),
        ([_with_token(start, other)], "another session"),
        ([_with_token(start, listen)], "scope is 'listen'"),
    ]
    for messages, reason in cases:
        async with gateway.connect("/twilio", token=None) as twilio:
            for message in messages:
                await twilio.send(json.dumps(message))
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(twilio.recv(), timeout=10)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1008 and reason in closed.value.rcvd.reason, reason
    assert not await announcements(redis, keys), "a refused stream announced a session"
    # Counted as refusals: the four token problems (media first is a bad request).
    assert await gateway.metric("vlpipe_gateway_refused_total") == len(cases) - 1


def _with_token(start: dict[str, object], token: str) -> dict[str, object]:
    body = dict(start["start"])  # type: ignore[call-overload]
    body["customParameters"] = {**body["customParameters"], "token": token}
    return {**start, "start": body}


async def test_a_token_in_the_url_is_taken_only_when_allowed(
    redis_url: str, keys: StreamKeys
) -> None:
    gateway = GatewayProc(redis_url, keys.prefix, VLPIPE_GATEWAY_ALLOW_QUERY_TOKEN="true")
    try:
        await gateway.ready()
        token = mint_token(SIGNING_KEY, "q1", Scope.LISTEN)
        async with websockets.connect(gateway.url(f"/v1/subscribe?session=q1&token={token}")) as ws:
            assert json.loads(await ws.recv())["type"] == "subscribed"
    finally:
        gateway.stop()


async def test_a_call_whose_audio_piles_up_in_redis_is_closed_and_its_session_ended(
    redis_url: str, redis: aioredis.Redis, keys: StreamKeys
) -> None:
    # No ingest reads the audio: it waits in Redis. The limit is 20 chunks.
    await keep_announcements(redis, keys)
    gateway = GatewayProc(redis_url, keys.prefix, VLPIPE_GATEWAY_MAX_WAITING_AUDIO="20")
    try:
        await gateway.ready()
        async with gateway.connect("/v1/call?session=pile&input=pcm16&rate=16000") as call:
            assert json.loads(await call.recv())["type"] == "session"
            with pytest.raises(ConnectionClosed) as closed:
                for _ in range(40):
                    await call.send(b"\0" * 640)  # 20 ms, in real time
                    await asyncio.sleep(0.02)
                await asyncio.wait_for(call.recv(), timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        assert "wait in Redis" in closed.value.rcvd.reason
        assert await redis.xlen(keys.audio("pile")) == 21  # the one over the limit, no more

        async def ended() -> bool:
            return any(isinstance(a, SessionEnd) for a in await announcements(redis, keys))

        await wait_until(ended)
        assert await gateway.metric("vlpipe_gateway_refused_total", reason="waiting_audio") == 1
    finally:
        gateway.stop()
