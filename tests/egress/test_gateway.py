"""The WebSocket gateway over real sockets: subscribers joining and leaving, tokens, slow
clients, Twilio."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidStatus
from websockets.frames import Close, Frame, Opcode
from websockets.uri import parse_uri

from tests.egress.helpers import (
    SIGNING_KEY,
    TOKEN,
    EventFeed,
    GatewayProc,
    announce,
    audio_out,
    recorded_turn,
    tone_deltas,
)
from tests.waiting import wait_until
from vlpipe.services.egress.access import Scope, mint_token
from vlpipe.shared.contracts import AudioOut, TranscriptPiece, encode
from vlpipe.shared.keys import StreamKeys


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
    path = "/v1/subscribe?session=g1"
    async with gateway.connect(path) as a, gateway.connect(path) as b:
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
    refusals = [
        (gateway.connect("/v1/subscribe?session=g2", token=None), b"missing token"),
        (gateway.connect("/v1/subscribe?session=g2", token="guess"), b"wrong token"),
        # The right token, in the URL, where proxies and access logs would keep it.
        (gateway.connect(f"/v1/subscribe?session=g2&token={TOKEN}", token=None),
         b"a token in the URL is refused"),
    ]  # fmt: skip
    for connecting, reason in refusals:
        with pytest.raises(InvalidStatus) as refused:
            async with connecting:
                pass
        assert refused.value.response.status_code == 401
        assert reason in refused.value.response.body
    async with gateway.connect("/v1/subscribe?session=g2") as ok:
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
        request = self.protocol.connect()
        request.headers["Authorization"] = f"Bearer {TOKEN}"
        self.protocol.send_request(request)
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
        slow = SlowClient(gateway.url("/v1/subscribe?session=s1"))
        await slow.connect()
        async with gateway.connect("/v1/subscribe?session=s1") as fast:
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


# ---------------------------------------------------------------- viewers joining and leaving


async def write_pieces(redis: aioredis.Redis, keys: StreamKeys, sid: str, texts: list[str],
                       first_seq: int = 0) -> None:  # fmt: skip
    """Transcript pieces on the session's output stream, as egress writes them."""
    async with redis.pipeline(transaction=False) as pipe:
        for n, text in enumerate(texts):
            piece = TranscriptPiece(session=sid, speaker="user", text=text, final=True,
                                    item_id=f"item_{first_seq + n}", seq=first_seq + n)  # fmt: skip
            pipe.xadd(keys.transcript(sid), encode(piece))  # type: ignore[arg-type]
        await pipe.execute()


async def texts_until(ws: ClientConnection, last: str) -> list[str]:
    """The transcript texts a client receives, up to and including `last`."""
    texts: list[str] = []
    while not texts or texts[-1] != last:
        message = json.loads(await asyncio.wait_for(ws.recv(), timeout=30))
        if message["type"] == "transcript":
            texts.append(message["text"])
    return texts


async def nothing_followed(gateway: GatewayProc) -> bool:
    """No client is registered and the shared read follows no stream."""
    clients = await gateway.metric("vlpipe_gateway_clients")
    return clients == 0 and await gateway.metric("vlpipe_gateway_followed_streams") == 0


async def test_viewers_of_a_long_session_from_the_start_are_all_served_and_none_stays_registered(
    redis: aioredis.Redis, keys: StreamKeys, gateway: GatewayProc
) -> None:
    # The fixture's gateway queues 16 messages per client: the 300 pieces are many times
    # what a viewer's queue holds, so its backlog must come in pages as it reads.
    await gateway.ready()
    texts = [f"piece {n}" for n in range(300)]
    await write_pieces(redis, keys, "long", texts)
    path = "/v1/subscribe?session=long&from=start"
    async with gateway.connect(path) as first, gateway.connect(path) as second:
        assert json.loads(await first.recv())["type"] == "subscribed"
        assert json.loads(await second.recv())["type"] == "subscribed"
        assert await texts_until(first, "piece 299") == texts
        assert await texts_until(second, "piece 299") == texts
        # A third viewer comes while the first two are live; then more is said.
        async with gateway.connect(path) as third:
            await write_pieces(redis, keys, "long", ["piece 300"], first_seq=300)
            assert (await texts_until(third, "piece 300"))[-2:] == ["piece 299", "piece 300"]
        for viewer in (first, second):
            assert await texts_until(viewer, "piece 300") == ["piece 300"]
    # Viewers that hang up while their backlog is still being delivered.
    for _ in range(10):
        async with gateway.connect(path) as quitter:
            await quitter.recv()
    await wait_until(lambda: nothing_followed(gateway), within=15)


async def test_a_client_joining_while_another_of_its_session_leaves_gets_everything(
    redis: aioredis.Redis, keys: StreamKeys, gateway: GatewayProc
) -> None:
    await gateway.ready()
    sid = "race"
    await write_pieces(redis, keys, sid, ["before"])
    leaving = await gateway.connect(f"/v1/subscribe?session={sid}")
    await leaving.recv()
    for n in range(40):
        from_start = n % 2 == 0
        path = f"/v1/subscribe?session={sid}" + ("&from=start" if from_start else "")
        # One client leaves at the moment the next one joins.
        _, joining = await asyncio.gather(leaving.close(), gateway.connect(path))
        assert json.loads(await joining.recv())["type"] == "subscribed"
        await write_pieces(redis, keys, sid, [f"round {n}"], first_seq=n + 1)
        got = await texts_until(joining, f"round {n}")
        if from_start:
            assert got == ["before", *(f"round {r}" for r in range(n + 1))], n
        else:
            assert got == [f"round {n}"], n
        leaving = joining
    await leaving.close()
    await wait_until(lambda: nothing_followed(gateway), within=15)


# ---------------------------------------------------------------- Twilio


async def test_a_twilio_call_with_marks_echoed_has_no_gaps_and_its_audio_is_not_held_back(
    redis_url: str, redis: aioredis.Redis, keys: StreamKeys, gateway: GatewayProc
) -> None:
    # Twilio numbers every message it sends (`sequenceNumber`), mark echoes included, and
    # only media in `media.chunk`: numbered by the first, each echo would leave a hole that
    # the reader of the audio (the broker: a call's µ-law is direct input) reports as a gap.
    sid, stream = "tw-marks", "MZmarks"
    await gateway.ready()
    async with gateway.connect("/twilio", token=None) as twilio:
        sequence = iter(range(1, 10_000))
        await twilio.send(json.dumps({"event": "connected", "sequenceNumber": "0"}))
        await twilio.send(json.dumps({
            "event": "start", "sequenceNumber": str(next(sequence)), "streamSid": stream,
            "start": {"streamSid": stream, "callSid": "CAmarks", "customParameters": {
                "session": sid, "token": mint_token(SIGNING_KEY, sid, Scope.CALL)}},
        }))  # fmt: skip
        # The assistant speaks: 100 chunks of 20 ms, each sent with a mark to echo. Five at
        # a time, each five once the last went out: a burst larger than the client's
        # buffer (16 messages here) may be dropped, by design, when the gateway reads it
        # live (on a loaded host, before the catch-up from the start has begun).
        marks: list[dict[str, object]] = []
        for first in range(0, 100, 5):
            async with redis.pipeline(transaction=False) as pipe:
                for n in range(first, first + 5):
                    chunk = AudioOut(session=sid, kind="audio", format="g711_ulaw",
                                     audio=b"\xff" * 160, response_id="resp_1",
                                     item_id="item_1", offset_ms=n * 20.0, seq=n)  # fmt: skip
                    pipe.xadd(keys.audio_out(sid), encode(chunk))  # type: ignore[arg-type]
                await pipe.execute()
            while len(marks) < first + 5:
                message = json.loads(await asyncio.wait_for(twilio.recv(), timeout=30))
                if message["event"] == "mark":
                    marks.append(message["mark"])
        # The caller talks over it: 100 media messages, a mark echo after each, as the
        # phone plays the assistant's audio.
        for n in range(100):
            await twilio.send(json.dumps({
                "event": "media", "sequenceNumber": str(next(sequence)), "streamSid": stream,
                "media": {"track": "inbound", "chunk": str(n + 1), "timestamp": str(n * 20),
                          "payload": base64.b64encode(b"\x7f" * 160).decode()},
            }))  # fmt: skip
            await twilio.send(json.dumps({"event": "mark", "streamSid": stream,
                                          "sequenceNumber": str(next(sequence)),
                                          "mark": marks[n]}))  # fmt: skip
            await asyncio.sleep(0.015)

        async def all_published() -> bool:
            return bool(await redis.xlen(keys.audio(sid)) >= 100)

        await wait_until(all_published, within=30)
        await twilio.send(json.dumps({"event": "stop", "streamSid": stream}))
    published = [f for _, f in await redis.xrange(keys.audio(sid))]
    assert [int(f[b"seq"]) for f in published] == list(range(1, 101))  # no hole
    assert {(f[b"format"], f[b"rate"]) for f in published} == {(b"g711_ulaw", b"8000")}
    [start] = [f for _, f in await redis.xrange(keys.sessions) if f[b"type"] == b"start"]
    assert start[b"audio_in"] == b"g711_ulaw"  # direct input: the broker reads it as it is
