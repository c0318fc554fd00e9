"""The WebSocket gateway: the pipeline's edge for browsers, apps and phone calls.

Endpoints (one port, `VLPIPE_GATEWAY_PORT`):

* `/v1/subscribe?session=ID[&format=F][&from=start]`: a session's transcripts and status
  as JSON text messages, its assistant audio as binary messages in format F.
* `/v1/call[?session=ID][&input=pcm16|webm][&rate=16000][&format=F][&instructions=...]`:
  one socket, both directions. The gateway announces the session, publishes the binary
  messages it receives to the session's raw audio stream exactly as any producer would
  (ingest normalizes them), and sends back what a subscriber gets.
* `/twilio` (or `/twilio/TOKEN`): Twilio Media Streams, natively: `connected`, `start`,
  `media`, `mark`, `stop` in; `media`, `mark`, `clear` out; base64 mu-law at 8 kHz.
* `/` and `/console.js`: the web console.

The gateway reads the sessions' output streams (no ownership), so a client may connect to
any egress replica. One shared XREAD follows every session a client of this process
watches. A slow client never slows anyone else: each client has a bounded queue, and the
policy (`VLPIPE_GATEWAY_SLOW_CLIENT`) drops its oldest queued audio and tells it so, or
disconnects it (1013). The JSON protocol is documented in docs/egress.md.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from vlpipe.services.egress.settings import EgressSettings
from vlpipe.shared import telemetry
from vlpipe.shared.audio import AudioFormat, FormatConverter, decode_to_pcm16
from vlpipe.shared.config import is_loopback
from vlpipe.shared.contracts import (
    AddText,
    AudioOut,
    ContractError,
    RawAudio,
    SessionConfig,
    SessionEnd,
    SessionStart,
    Status,
    TranscriptPiece,
    decode,
    encode,
    playback_ms,
    validated,
)
from vlpipe.shared.keys import check_session_id
from vlpipe.shared.service import ServiceContext
from vlpipe.shared.sessions import session_reader
from vlpipe.shared.streams import Entry

log = logging.getLogger("vlpipe.gateway")

STATIC = Path(__file__).parent / "static"
MAX_CLIENT_MESSAGE = 1 << 20


class Slow(Exception):
    """A client whose queue is full of messages that cannot be dropped."""


@dataclass(eq=False)
class Client:
    """One connected socket and its bounded outgoing queue."""

    ws: ServerConnection
    sid: str
    audio_format: AudioFormat
    limit: int
    policy: str
    twilio_stream: str | None = None
    queue: deque[str | bytes] = field(default_factory=deque)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    dropped: int = 0
    notice_due: bool = False
    closed: bool = False
    converter: FormatConverter | None = None
    converter_response: str | None = None

    def offer(self, message: str | bytes) -> None:
        """Queue without waiting; apply the slow-client policy when the queue is full."""
        if self.closed:
            return
        if len(self.queue) >= self.limit:
            if self.policy != "drop_audio":
                raise Slow("client too slow")
            for i, queued in enumerate(self.queue):
                if _is_audio(queued):
                    del self.queue[i]
                    self.dropped += 1
                    self.notice_due = True
                    break
            else:
                raise Slow("client too slow to take its transcripts")
        self.queue.append(message)
        self.ready.set()

    async def pump(self) -> None:
        while not self.closed:
            await self.ready.wait()
            self.ready.clear()
            while self.queue:
                if self.notice_due:
                    self.notice_due = False
                    await self.ws.send(
                        json.dumps(
                            {
                                "type": "notice",
                                "kind": "audio_dropped",
                                "chunks": self.dropped,
                                "message": "this client read too slowly; its oldest audio was dropped",
                            }
                        )
                    )
                await self.ws.send(self.queue.popleft())


def _is_audio(message: str | bytes) -> bool:
    if isinstance(message, bytes):
        return True
    return message.startswith('{"event":"media"')


@dataclass
class Followed:
    clients: set[Client] = field(default_factory=set)


class Gateway:
    def __init__(self, ctx: ServiceContext, settings: EgressSettings) -> None:
        self.ctx = ctx
        self.settings = settings
        self.redis = ctx.redis
        self.keys = ctx.keys
        self.tokens = settings.tokens()
        if not self.tokens and not is_loopback(settings.gateway_host):
            raise ValueError(
                "the gateway needs VLPIPE_GATEWAY_TOKENS to listen beyond loopback "
                f"(VLPIPE_GATEWAY_HOST={settings.gateway_host})"
            )
        self.followed: dict[str, Followed] = {}
        self.reader = session_reader(ctx, settings, purpose="gateway")
        self.server: Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0
        meter = telemetry.meter("gateway")
        self.clients_gauge = meter.create_up_down_counter("vlpipe.gateway.clients")
        self.dropped = meter.create_counter("vlpipe.gateway.dropped_audio")
        self.first_audio = meter.create_histogram(
            "vlpipe.turn.first_audio_to_client",
            unit="ms",
            description="End to end: from the end of the user's speech to the answer's first "
            "audio handed to a gateway client",
            explicit_bucket_boundaries_advisory=telemetry.TURN_BUCKETS_MS,
        )

    async def run(self) -> None:
        self.server = await serve(
            self._connection, self.settings.gateway_host, self.settings.gateway_port,
            process_request=self._check_request, max_size=MAX_CLIENT_MESSAGE,
            ping_interval=20, ping_timeout=20,
        )  # fmt: skip
        self.port = next(iter(self.server.sockets)).getsockname()[1]
        log.info("gateway listening", extra={"host": self.settings.gateway_host, "port": self.port})
        reader = asyncio.create_task(self.reader.run(self.ctx.stop))
        try:
            await self.ctx.stop.wait()
        finally:
            self.server.close()
            await self.server.wait_closed()
            self.reader.wake()
            await reader

    # ---------------------------------------------------------------- HTTP side

    def _authorized(self, request: Request) -> bool:
        if not self.tokens:
            return True
        query = parse_qs(urlsplit(request.path).query)
        offered = query.get("token", [""])[0]
        scheme, _, bearer = (request.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() == "bearer":
            offered = offered or bearer.strip()
        path = urlsplit(request.path).path
        if path.startswith("/twilio/"):
            offered = offered or path.removeprefix("/twilio/")
        return any(hmac.compare_digest(offered, t) for t in self.tokens)

    def _check_request(self, conn: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path in ("/", "/index.html", "/console.js", "/console.css"):
            return _static(path)
        if path == "/healthz":
            return _text(HTTPStatus.OK, "ok\n")
        if path not in ("/v1/subscribe", "/v1/call", "/twilio") and not path.startswith("/twilio/"):
            return _text(
                HTTPStatus.NOT_FOUND, "unknown path; use /v1/subscribe, /v1/call or /twilio\n"
            )
        if path == "/twilio" and self.tokens:
            return None  # Twilio sends no headers of ours: the token comes in `start`
        if not self._authorized(request):
            return _text(HTTPStatus.UNAUTHORIZED, "missing or wrong token (?token= or Bearer)\n")
        return None

    # ---------------------------------------------------------------- sockets

    async def _connection(self, ws: ServerConnection) -> None:
        request = ws.request
        assert request is not None
        parts = urlsplit(request.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        try:
            if parts.path == "/v1/subscribe":
                await self._subscribe(ws, query)
            elif parts.path == "/v1/call":
                await self._call(ws, query)
            else:
                # Twilio cannot send headers: a token in the path or query, else in `start`.
                await self._twilio(ws, authorized=self._authorized(request))
        except BadRequest as exc:
            await ws.close(1008, str(exc)[:120])
        except ConnectionClosed:
            pass

    async def _attach(self, client: Client, from_start: bool) -> None:
        sid = client.sid
        followed = self.followed.get(sid)
        streams = (self.keys.transcript(sid), self.keys.audio_out(sid), self.keys.status(sid))
        if followed is None:
            followed = self.followed[sid] = Followed()
            for key in streams:
                start = "0-0" if from_start else await _last_id(self.redis, key)
                self.reader.add(key, start, self._on_output)
        elif from_start:  # catch up on what was written before this client came
            for key in streams:
                upto = self.reader.position(key) or "+"
                backlog: Any = await self.redis.xrange(key, "-", upto)
                for entry_id, fields in backlog:
                    self._deliver(client, Entry(key, entry_id.decode(), fields))
        followed.clients.add(client)
        self.clients_gauge.add(1)

    def _detach(self, client: Client) -> None:
        if client.closed:
            return
        client.closed = True
        followed = self.followed.get(client.sid)
        if followed is None:
            return
        followed.clients.discard(client)
        self.clients_gauge.add(-1)
        if not followed.clients:
            del self.followed[client.sid]
            for key in (self.keys.transcript(client.sid), self.keys.audio_out(client.sid),
                        self.keys.status(client.sid)):  # fmt: skip
                self.reader.remove(key)

    async def _serve_client(self, client: Client, inbound: Coroutine[Any, Any, None]) -> None:
        """Pump the client's queue until it or `inbound` (its messages) ends; the caller,
        which attached the client, detaches it."""
        tasks = {asyncio.create_task(client.pump()), asyncio.create_task(inbound)}
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = task.exception()
                if exc is not None and not isinstance(exc, ConnectionClosed):
                    raise exc
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _subscribe(self, ws: ServerConnection, query: dict[str, str]) -> None:
        sid = _session_id(query.get("session"))
        client = self._client(ws, sid, query)
        await self._attach(client, from_start=query.get("from") == "start")

        async def listen() -> None:
            async for message in ws:
                await self._client_message(client, message, call=False)

        try:
            await ws.send(json.dumps({"type": "subscribed", "session": sid,
                                      "format": client.audio_format.value}))  # fmt: skip
            await self._serve_client(client, listen())
        finally:
            self._detach(client)

    async def _call(self, ws: ServerConnection, query: dict[str, str]) -> None:
        sid = _session_id(query.get("session") or f"call-{uuid.uuid4().hex[:12]}")
        client = self._client(ws, sid, query)
        source = query.get("input", "pcm16").lower()
        if source not in ("pcm16", "webm", "ogg"):
            raise BadRequest(f"input {source!r}: expected pcm16, webm or ogg")
        config = _json_object(query.get("config"), "config")
        if query.get("instructions"):
            config["instructions"] = query["instructions"]
        try:
            # Everything is checked before the session is announced: a bad rate must not
            # open a session whose audio would then be refused chunk by chunk.
            rate = query.get("rate", "16000") if source == "pcm16" else None
            audio = validated(RawAudio, {"audio": b"", "format": source, "rate": rate})
            start = SessionStart(session=sid, config=validated(SessionConfig, config),
                                 audio_out=client.audio_format)  # fmt: skip
        except ContractError as exc:
            raise BadRequest(str(exc)) from None
        await self._attach(client, from_start=True)
        await self.redis.xadd(self.keys.sessions, encode(start))  # type: ignore[arg-type]
        seq = 0

        async def listen() -> None:
            nonlocal seq
            async for message in ws:
                if isinstance(message, bytes):
                    chunk = audio.model_copy(update={"audio": message, "seq": seq})
                    seq += 1
                    await self.redis.xadd(self.keys.audio(sid), encode(chunk))  # type: ignore[arg-type]
                elif await self._client_message(client, message, call=True):
                    break

        try:  # from here on, however the socket goes, the session ends with it
            await ws.send(json.dumps({"type": "session", "session": sid,
                                      "format": client.audio_format.value}))  # fmt: skip
            await self._serve_client(client, listen())
        finally:
            self._detach(client)
            await self._end(sid, "caller hung up")

    async def _twilio(self, ws: ServerConnection, authorized: bool) -> None:
        client: Client | None = None
        sid = ""
        try:
            async for raw in ws:
                try:
                    message = json.loads(raw)
                    event = message["event"]
                except (ValueError, KeyError, TypeError):
                    await self._status_for(
                        sid, "error", "twilio: a message that is not Media Streams JSON"
                    )
                    continue
                if event == "start" and client is None:
                    start = _object(message.get("start"))
                    params = _object(start.get("customParameters"))
                    if not authorized and not any(
                        hmac.compare_digest(str(params.get("token", "")), t) for t in self.tokens
                    ):
                        await ws.close(1008, 'missing or wrong token (a <Parameter name="token">)')
                        return
                    sid = _session_id(
                        params.get("session")
                        or f"tw-{start.get('callSid') or uuid.uuid4().hex[:12]}"
                    )
                    instructions = params.get("instructions")
                    try:
                        config = validated(
                            SessionConfig, {"instructions": instructions} if instructions else {}
                        )
                    except ContractError as exc:
                        await ws.close(1008, str(exc)[:120])
                        return
                    client = Client(ws, sid, AudioFormat.G711_ULAW, self.settings.client_buffer,
                                    self.settings.slow_client,
                                    twilio_stream=str(message.get("streamSid") or start.get("streamSid")))  # fmt: skip
                    await self._attach(client, from_start=True)
                    session = SessionStart(
                        session=sid, config=config, audio_out=AudioFormat.G711_ULAW
                    )
                    await self.redis.xadd(self.keys.sessions, encode(session))  # type: ignore[arg-type]
                    pump = asyncio.create_task(self._pump_until_closed(client))
                    self._tasks.add(pump)
                    pump.add_done_callback(self._tasks.discard)
                elif event == "media" and client is not None:
                    media = _object(message.get("media"))
                    if media.get("track", "inbound") != "inbound":
                        continue
                    try:
                        audio = base64.b64decode(media.get("payload", ""), validate=True)
                    except (binascii.Error, ValueError):
                        await self._status_for(sid, "error", "twilio: media payload is not base64")
                        continue
                    try:
                        chunk = validated(RawAudio, {"audio": audio, "format": "g711_ulaw",
                                                     "rate": 8000,
                                                     "seq": _int(message.get("sequenceNumber"))})  # fmt: skip
                    except ContractError as exc:
                        await self._status_for(sid, "error", f"twilio: {exc}")
                        continue
                    await self.redis.xadd(self.keys.audio(sid), encode(chunk))  # type: ignore[arg-type]
                elif event == "mark" and client is not None:
                    name = str(_object(message.get("mark")).get("name") or "")
                    response_id, _, played = name.rpartition("|")
                    if response_id:
                        await self._played(sid, response_id, playback_ms(played))
                elif event == "stop":
                    break
        finally:
            if client is not None:
                self._detach(client)
                await self._end(sid, "call ended")

    async def _pump_until_closed(self, client: Client) -> None:
        with contextlib.suppress(ConnectionClosed):
            await client.pump()

    def _client(self, ws: ServerConnection, sid: str, query: dict[str, str]) -> Client:
        try:
            fmt = AudioFormat(query.get("format", "pcm16").lower())
        except ValueError:
            raise BadRequest(f"format {query.get('format')!r}: expected one of "
                             f"{', '.join(f.value for f in AudioFormat)}") from None  # fmt: skip
        return Client(ws, sid, fmt, self.settings.client_buffer, self.settings.slow_client)

    async def _client_message(self, client: Client, message: str | bytes, call: bool) -> bool:
        """A JSON message from a client; True when the client ends the call."""
        try:
            data = json.loads(message)
            kind = data["type"]
        except (ValueError, KeyError, TypeError):
            client.offer(
                json.dumps({"type": "error", "message": "expected a JSON object with a type"})
            )
            return False
        if kind == "played":
            await self._played(
                client.sid, str(data.get("response_id", "")), playback_ms(data.get("ms"))
            )
        elif kind == "end" and call:
            return True
        elif kind == "text":
            try:
                text = validated(AddText, {"text": data.get("text")})
            except ContractError as exc:
                client.offer(json.dumps({"type": "error", "message": str(exc)}))
                return False
            await self.redis.xadd(self.keys.ctl(client.sid), encode(text))  # type: ignore[arg-type]
        else:
            client.offer(json.dumps({"type": "error", "message": f"unknown message type {kind!r}"}))
        return False

    async def _played(self, sid: str, response_id: str, ms: float | None) -> None:
        """A consumer reports how much of a response it played: the broker cuts there."""
        if ms is None or not response_id:
            return
        current: Any = await self.redis.hget(self.keys.playback(sid), "response_id")
        if current is not None and current.decode() == response_id:
            await self.redis.hset(self.keys.playback(sid), "played_ms", round(ms, 1))

    async def _end(self, sid: str, reason: str) -> None:
        if sid:
            end = SessionEnd(session=sid, reason=reason)
            await self.redis.xadd(self.keys.sessions, encode(end))  # type: ignore[arg-type]

    async def _status_for(self, sid: str, kind: str, message: str) -> None:
        if sid:
            status = Status(session=sid, service="gateway", kind=kind, message=message)
            await self.redis.xadd(self.keys.status(sid), encode(status), maxlen=2000)  # type: ignore[arg-type]

    # ---------------------------------------------------------------- fan-out

    async def _on_output(self, key: str, entries: list[Entry]) -> None:
        sid = key[key.index("{") + 1 : key.rindex("}")]
        followed = self.followed.get(sid)
        if followed is None:
            return
        for entry in entries:
            for client in list(followed.clients):
                self._deliver(client, entry)

    def _deliver(self, client: Client, entry: Entry) -> None:
        dropped = client.dropped
        try:
            for message in self._render(client, entry):
                client.offer(message)
        except Slow as exc:
            self._detach(client)
            closing = asyncio.create_task(client.ws.close(1013, str(exc)))
            self._tasks.add(closing)
            closing.add_done_callback(self._tasks.discard)
        except ContractError as exc:
            log.warning(
                "unreadable output entry", extra={"stream": entry.stream, "error": str(exc)}
            )
        if client.dropped > dropped:
            self.dropped.add(client.dropped - dropped)

    def _render(self, client: Client, entry: Entry) -> list[str | bytes]:
        stream = entry.stream
        if stream == self.keys.audio_out(client.sid):
            chunk: AudioOut = decode(AudioOut, entry.fields)
            return self._render_audio(client, chunk)
        if stream == self.keys.transcript(client.sid):
            piece: TranscriptPiece = decode(TranscriptPiece, entry.fields)
            if client.twilio_stream is not None:
                return []
            body = piece.model_dump(exclude={"v", "traceparent", "session"}, exclude_none=True)
            return [json.dumps({"type": "transcript", **body})]
        status: Status = decode(Status, entry.fields)
        if client.twilio_stream is not None:
            return []
        return [json.dumps({"type": "status", "service": status.service, "kind": status.kind,
                            "message": status.message, "detail": status.detail})]  # fmt: skip

    def _render_audio(self, client: Client, chunk: AudioOut) -> list[str | bytes]:
        twilio = client.twilio_stream
        if chunk.kind == "clear":
            client.converter = None
            if twilio is not None:
                return [json.dumps({"event": "clear", "streamSid": twilio})]
            return [json.dumps({"type": "audio.clear", "response_id": chunk.response_id})]
        if chunk.kind == "end":
            if twilio is not None:
                return []
            return [json.dumps({"type": "audio.end", "response_id": chunk.response_id,
                                "offset_ms": chunk.offset_ms})]  # fmt: skip
        if chunk.speech_end is not None:
            # The user stopped speaking; now this client's first audio of the answer.
            self.first_audio.record(max(0.0, time.time() * 1000 - chunk.speech_end))
        audio = chunk.audio
        if chunk.format is not client.audio_format:
            if client.converter is None or client.converter_response != chunk.response_id:
                client.converter = FormatConverter(chunk.format.rate, client.audio_format)
                client.converter_response = chunk.response_id
            audio = client.converter.process(decode_to_pcm16(audio, chunk.format))
        if twilio is None:
            return [audio]
        end_ms = chunk.offset_ms + chunk.format.ms_for_bytes(len(chunk.audio))
        return [
            '{"event":"media","streamSid":' + json.dumps(twilio)
            + ',"media":{"payload":"' + base64.b64encode(audio).decode() + '"}}',
            json.dumps({"event": "mark", "streamSid": twilio,
                        "mark": {"name": f"{chunk.response_id}|{end_ms:.0f}"}}),
        ]  # fmt: skip


class BadRequest(ValueError):
    pass


def _session_id(value: str | None) -> str:
    if not value:
        raise BadRequest("missing session id (?session=...)")
    try:
        return check_session_id(value)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _object(value: Any) -> dict[str, Any]:
    """A JSON object from a client's message, or an empty one for anything else."""
    return value if isinstance(value, dict) else {}


def _json_object(text: str | None, name: str) -> dict[str, Any]:
    """A query parameter holding a JSON object; BadRequest naming it otherwise."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRequest(
            f"invalid {name}: not valid JSON ({exc.msg} at position {exc.pos})"
        ) from None
    if not isinstance(value, dict):
        raise BadRequest(f"invalid {name}: expected a JSON object")
    return value


async def _last_id(redis: Any, key: str) -> str:
    reply = await redis.xrevrange(key, count=1)
    return reply[0][0].decode() if reply else "0-0"


def _text(status: HTTPStatus, body: str) -> Response:
    data = body.encode()
    headers = Headers(
        [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(data)))]
    )
    return Response(status.value, status.phrase, headers, data)


_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8"}  # fmt: skip


def _static(path: str) -> Response:
    name = "index.html" if path in ("/", "/index.html") else path.lstrip("/")
    file = STATIC / name
    if not file.is_file():
        return _text(HTTPStatus.NOT_FOUND, "the web console is not installed\n")
    data = file.read_bytes()
    headers = Headers([("Content-Type", _TYPES[file.suffix]), ("Content-Length", str(len(data))),
                       ("Cache-Control", "no-store")])  # fmt: skip
    return Response(HTTPStatus.OK.value, "OK", headers, data)
