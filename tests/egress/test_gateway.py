"""The WebSocket gateway over real sockets: subscribers, tokens and slow clients."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidStatus
from websockets.frames import Close, Frame, Opcode
from websockets.uri import parse_uri

from tests.egress.helpers import (
    EventFeed,
    announce,
    audio_out,
    recorded_turn,
    start_egress,
    tone_deltas,
)
from tests.waiting import wait_until
from vlpipe.shared.keys import StreamKeys
from vlpipe.shared.redis_server import free_port

TOKEN = "gw-token-1"


class GatewayProc:
    def __init__(self, redis_url: str, prefix: str, **env: str) -> None:
        self.port = free_port()
        self.proc = start_egress(
            redis_url, prefix, VLPIPE_GATEWAY="1", VLPIPE_GATEWAY_PORT=str(self.port),
            VLPIPE_GATEWAY_TOKENS=TOKEN, **env,
        )  # fmt: skip

    def url(self, path: str, token: str | None = TOKEN) -> str:
        return f"ws://127.0.0.1:{self.port}{path}" + (f"&token={token}" if token else "")

    async def ready(self) -> None:
        async def listening() -> bool:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                return False
            writer.close()
            return True

        await wait_until(listening, within=30)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(20) == 0


@pytest.fixture
def gateway(redis_url: str, keys: StreamKeys) -> Iterator[GatewayProc]:
    proc = GatewayProc(redis_url, keys.prefix, VLPIPE_GATEWAY_CLIENT_BUFFER="16")
    yield proc
    proc.stop()


async def collect(ws: ClientConnection, until: str = "ended") -> list[str | bytes]:
    """Every message until the session's `ended` status."""
    got: list[str | bytes] = []
    async for message in ws:
        got.append(message)
        if isinstance(message, str) and json.loads(message).get("message") == until:
            return got
    return got


async def test_two_subscribers_of_one_session_both_get_everything(
    redis: aioredis.Redis, keys: StreamKeys, gateway: GatewayProc
) -> None:
    await gateway.ready()
    url = gateway.url("/v1/subscribe?session=g1")
    async with websockets.connect(url) as a, websockets.connect(url) as b:
        assert json.loads(await a.recv())["type"] == "subscribed"
        assert json.loads(await b.recv())["type"] == "subscribed"
        await announce(redis, keys, "g1")
        feed = EventFeed(redis, keys, "g1")
        await feed.start()
        for event in recorded_turn():
            await feed.send(event)
        await feed.end()
        got_a, got_b = await asyncio.gather(collect(a), collect(b))
    assert got_a == got_b
    audio = [m for m in got_a if isinstance(m, bytes)]
    chunks = [c for c in await audio_out(redis, keys, "g1") if c.kind == "audio"]
    assert audio == [c.audio for c in chunks]
    texts = [json.loads(m) for m in got_a if isinstance(m, str)]
    finals = [t["text"] for t in texts if t["type"] == "transcript" and t["final"]]
    assert len(finals) == 2 and finals[1].startswith("You said:")
    assert any(t["type"] == "audio.end" for t in texts)


async def test_a_client_without_the_right_token_is_refused(
    keys: StreamKeys, gateway: GatewayProc
) -> None:
    await gateway.ready()
    for url in (gateway.url("/v1/subscribe?session=g2", token=None),
                gateway.url("/v1/subscribe?session=g2", token="guess")):  # fmt: skip
        with pytest.raises(InvalidStatus) as refused:
            async with websockets.connect(url):
                pass
        assert refused.value.response.status_code == 401
    async with websockets.connect(
        f"ws://127.0.0.1:{gateway.port}/v1/subscribe?session=g2",
        additional_headers={"Authorization": f"Bearer {TOKEN}"},
    ) as ok:
        assert json.loads(await ok.recv())["type"] == "subscribed"


class SlowClient:
    """A WebSocket client that can stop reading its socket entirely.

    Client libraries keep reading into their own buffers; this one speaks the protocol
    sans-I/O over a raw socket with a tiny receive buffer, so when it does not read, the
    TCP window closes and the gateway's sends to it stall, as with a stuck phone or tab.
    """

    def __init__(self, url: str) -> None:
        self.protocol = ClientProtocol(parse_uri(url), max_size=None)
        self.url = url

    async def connect(self) -> None:
        uri = parse_uri(self.url)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (uri.host, uri.port))
        self.reader, self.writer = await asyncio.open_connection(sock=sock, limit=4096)
        self.protocol.send_request(self.protocol.connect())
        self._flush()
        while self.protocol.handshake_exc is None and self.protocol.state.name == "CONNECTING":
            self.protocol.receive_data(await self.reader.read(4096))
        self.pending = list(self.protocol.events_received())

    def _flush(self) -> None:
        for data in self.protocol.data_to_send():
            if data:
                self.writer.write(data)

    async def messages(self) -> AsyncIterator[str | bytes]:
        """Read from now on: every message, until the connection closes."""
        while True:
            for frame in self.pending:
                if not isinstance(frame, Frame):
                    continue  # the handshake's response
                if frame.opcode is Opcode.TEXT:
                    yield bytes(frame.data).decode()
                elif frame.opcode is Opcode.BINARY:
                    yield bytes(frame.data)
                elif frame.opcode is Opcode.CLOSE:
                    self.close_code = Close.parse(frame.data).code
                    return
            data = await self.reader.read(65536)
            if not data:
                return
            self.protocol.receive_data(data)
            self._flush()
            self.pending = list(self.protocol.events_received())

    close_code: int | None = None


async def feed_tone(redis: aioredis.Redis, keys: StreamKeys, sid: str, seconds: float) -> None:
    await announce(redis, keys, sid)
    feed = EventFeed(redis, keys, sid)
    await feed.start()
    for delta in tone_deltas("resp_1", "item_1", hz=440, seconds=seconds):
        await feed.send(delta)
    await feed.send({"type": "response.done", "response": {"id": "resp_1", "status": "completed"}})
    await feed.end()


@pytest.mark.parametrize("policy", ["drop_audio", "disconnect"])
async def test_a_slow_client_does_not_hold_up_the_others(
    redis_url: str, redis: aioredis.Redis, keys: StreamKeys, policy: str
) -> None:
    # 64 queued messages: room for a reading client's scheduling hiccups while 2 400 chunks
    # arrive in a burst; nothing like the 11.5 MB the stuck client would need.
    gateway = GatewayProc(redis_url, keys.prefix, VLPIPE_GATEWAY_CLIENT_BUFFER="64",
                          VLPIPE_GATEWAY_SLOW_CLIENT=policy)  # fmt: skip
    try:
        await gateway.ready()
        url = gateway.url("/v1/subscribe?session=s1")
        slow = SlowClient(url)
        await slow.connect()
        async with websockets.connect(url) as fast:
            await fast.recv()
            # 4 min of 24 kHz audio: about 11.5 MB, far more than socket buffers hold.
            await feed_tone(redis, keys, "s1", seconds=240)
            got_fast = await collect(fast)  # all of it, while the slow client reads nothing
        chunks = [c for c in await audio_out(redis, keys, "s1") if c.kind == "audio"]
        fast_audio = [m for m in got_fast if isinstance(m, bytes)]
        fast_notices = [json.loads(m) for m in got_fast
                        if isinstance(m, str) and json.loads(m)["type"] == "notice"]  # fmt: skip
        if not fast_notices:
            assert fast_audio == [c.audio for c in chunks]
        else:  # a loaded test machine: it may have lagged a moment, never lost track
            assert len(fast_audio) + fast_notices[-1]["chunks"] == len(chunks)
            assert fast_notices[-1]["chunks"] < len(chunks) // 100
        got_slow: list[str | bytes] = []

        async def drain_slow() -> None:
            async for message in slow.messages():
                got_slow.append(message)
                if isinstance(message, str) and json.loads(message).get("message") == "ended":
                    return

        await asyncio.wait_for(drain_slow(), timeout=60)
        received = [m for m in got_slow if isinstance(m, bytes)]
        if policy == "disconnect":
            assert slow.close_code == 1013
            assert len(received) < len(chunks)
        else:
            notices = [json.loads(m) for m in got_slow
                       if isinstance(m, str) and json.loads(m)["type"] == "notice"]  # fmt: skip
            assert notices and notices[-1]["kind"] == "audio_dropped"
            assert len(received) + notices[-1]["chunks"] == len(chunks)
            assert json.loads(got_slow[-1])["message"] == "ended"  # text is never dropped
    finally:
        gateway.stop()
