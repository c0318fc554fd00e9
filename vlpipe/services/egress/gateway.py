"""The WebSocket gateway: the pipeline's edge for browsers, apps and phone calls.

Endpoints (one port, `VLPIPE_GATEWAY_PORT`):

* `/v1/subscribe?session=ID[&format=F][&from=start]`: a session's transcripts and status
  as JSON text messages, its assistant audio as binary messages in format F.
* `/v1/call[?session=ID][&input=pcm16|webm][&rate=16000][&format=F][&instructions=...]`:
  one socket, both directions. The gateway announces the session, publishes the binary
  messages it receives to the session's raw audio stream exactly as any producer would
  (ingest normalizes them), and sends back what a subscriber gets.
* `/twilio`: Twilio Media Streams, natively: `connected`, `start`, `media`, `mark`, `stop`
  in; `media`, `mark`, `clear` out; base64 mu-law at 8 kHz.
* `/` (the web console), `/console/session` (a call token for the console's next call).

Access (`access.py`): every socket needs a token for its session and scope, checked before
the session is touched (HTTP 401/403 at the handshake; 1008 on the socket for what only
shows later, such as a listener sending or Twilio's token in `start`), and browsers'
`Origin` must be allowed. Limits (`limits.py`): inbound audio speed, message rate and
size per connection, audio waiting in Redis per session; going over closes with 1008
(1009 for size) and counts in `vlpipe.gateway.refused`. See docs/security.md.

The gateway reads the sessions' output streams (no ownership), so a client may connect to
any egress replica. One shared XREAD follows every session a client of this process
watches (`fanout.py`). A slow client never slows anyone else: each client has a bounded
queue, and the policy (`VLPIPE_GATEWAY_SLOW_CLIENT`) drops its oldest queued audio and
tells it so, or disconnects it (1013). The JSON protocol is documented in docs/egress.md.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import secrets
import time
import uuid
import weakref
from collections.abc import Coroutine
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from opentelemetry.metrics import Observation
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from vlpipe.services.egress.access import (
    SUBPROTOCOL,
    AccessPolicy,
    AccessRefused,
    Grant,
    OriginPolicy,
    Scope,
    basic_password,
    is_loopback_host,
    mint_token,
)
from vlpipe.services.egress.fanout import Client, OutputFanout, Slow
from vlpipe.services.egress.limits import ConnectionLimits, LimitExceeded, audio_bytes_per_s
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
ENDPOINTS = {"/v1/subscribe": Scope.LISTEN, "/v1/call": Scope.CALL, "/twilio": Scope.CALL}
"""Each socket endpoint and the scope its token needs."""
CONSOLE_PAGES = ("/", "/index.html", "/console/session")


class Gateway:
    def __init__(self, ctx: ServiceContext, settings: EgressSettings) -> None:
        self.ctx = ctx
        self.settings = settings
        self.redis = ctx.redis
        self.keys = ctx.keys
        configured_key = settings.signing_key.get_secret_value() if settings.signing_key else None
        open_access = configured_key is None and not settings.tokens()
        if open_access and not is_loopback(settings.gateway_host):
            raise ValueError(
                "the gateway needs VLPIPE_GATEWAY_SIGNING_KEY or VLPIPE_GATEWAY_TOKENS to "
                f"listen beyond loopback (VLPIPE_GATEWAY_HOST={settings.gateway_host})"
            )
        # The console's call tokens are signed with the configured key, else with a key of
        # this process's own (they then open calls on this replica only).
        self.console_key = configured_key or secrets.token_urlsafe(32)
        self.access = AccessPolicy(
            signing_key=self.console_key, static_tokens=settings.tokens(),
            audience=settings.audience, allow_url_token=settings.allow_query_token,
            open_access=open_access,
        )  # fmt: skip
        self.origins = OriginPolicy(settings.allowed_origins())
        self.limits = settings.limits()
        self._grants: weakref.WeakKeyDictionary[ServerConnection, Grant | None] = (
            weakref.WeakKeyDictionary()
        )
        self.reader = session_reader(ctx, settings, purpose="gateway")
        self.server: Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0
        meter = telemetry.meter("gateway")
        self.clients_gauge = meter.create_up_down_counter("vlpipe.gateway.clients")
        self.fanout = OutputFanout(
            ctx.redis, ctx.keys, self.reader, self._deliver, on_count=self.clients_gauge.add
        )
        meter.create_observable_gauge(
            "vlpipe.gateway.followed_streams",
            callbacks=[lambda _: [Observation(len(self.reader))]],
            description="Output streams the gateway's shared read follows for its clients",
        )
        self.dropped = meter.create_counter("vlpipe.gateway.dropped_audio")
        self.refused = meter.create_counter(
            "vlpipe.gateway.refused",
            description="Clients refused or closed by the gateway, by reason (token, expired, "
            "scope, session, origin, url_token, audio_rate, message_rate, message_size, ...)",
        )
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
            process_request=self._check_request, max_size=self.settings.max_message_bytes,
            select_subprotocol=_select_subprotocol, ping_interval=20, ping_timeout=20,
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

    def _check_request(self, conn: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        endpoint = "/twilio" if path.startswith("/twilio/") else path
        try:
            if self.access.open and not is_loopback_host(request.headers.get("Host")):
                # Without credentials only this machine is trusted: a page whose own domain
                # resolves to 127.0.0.1 (DNS rebinding) names that domain, not loopback.
                raise AccessRefused(
                    HTTPStatus.FORBIDDEN,
                    "this gateway has no credentials configured and answers to loopback "
                    "names only (Host)",
                    "host",
                )
            if path in ("/console.js", "/console.css"):
                return _static(path)
            if path == "/healthz":
                return _text(HTTPStatus.OK, "ok\n")
            if path in CONSOLE_PAGES:
                return self._console(request, path)
            needed = ENDPOINTS.get(endpoint)
            if needed is None:
                return _text(
                    HTTPStatus.NOT_FOUND, "unknown path; use /v1/subscribe, /v1/call or /twilio\n"
                )
            self.origins.check(request.headers.get("Origin"), request.headers.get("Host"))
            token = self.access.offered_token(
                request.path, request.headers.get("Authorization", ""), _subprotocols(request)
            )
            if endpoint == "/twilio" and token is None and not self.access.open:
                self._grants[conn] = None  # Twilio sends no headers: the token is in `start`
                return None
            grant = self.access.grant(token)
            session = parse_qs(urlsplit(request.path).query).get("session", [None])[0]
            grant.check(session, needed)
            self._grants[conn] = grant
            return None
        except AccessRefused as exc:
            self._count_refusal(exc.kind, exc.reason, endpoint)
            headers = [("WWW-Authenticate", 'Basic realm="vlpipe console"')] if (
                path in ("/", "/index.html") and exc.status is HTTPStatus.UNAUTHORIZED
            ) else []  # fmt: skip
            return _text(exc.status, exc.reason + "\n", headers)

    def _console(self, request: Request, path: str) -> Response:
        """The console page, and a call token for its next call, the way an app's backend
        hands its page a token: only to someone with the admin credential (a browser asks
        for it with HTTP Basic: any user name, the token as password) or on an open gateway."""
        authorization = request.headers.get("Authorization", "")
        offered = basic_password(authorization) or self.access.offered_token("/", authorization, [])
        self.access.grant(offered).check(None, Scope.ADMIN)
        if path != "/console/session":
            return _static("/")
        sid = f"console-{uuid.uuid4().hex[:12]}"
        token = mint_token(self.console_key, sid, Scope.CALL,
                           ttl_s=self.settings.console_token_ttl_s, audience=self.settings.audience)  # fmt: skip
        return _json(HTTPStatus.OK, {"session": sid, "token": token})

    def _count_refusal(self, kind: str, reason: str, endpoint: str) -> None:
        self.refused.add(1, {"reason": kind})
        # The reason names the problem, never the token; the endpoint, never the URL.
        log.info("refused a client", extra={"why": kind, "detail": reason, "endpoint": endpoint})

    # ---------------------------------------------------------------- sockets

    async def _connection(self, ws: ServerConnection) -> None:
        request = ws.request
        assert request is not None
        parts = urlsplit(request.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        endpoint = "/twilio" if parts.path.startswith("/twilio") else parts.path
        grant = self._grants.pop(ws, None)
        try:
            if parts.path == "/v1/subscribe":
                assert grant is not None
                await self._subscribe(ws, query, grant)
            elif parts.path == "/v1/call":
                assert grant is not None
                await self._call(ws, query, grant)
            else:
                await self._twilio(ws, grant)
        except BadRequest as exc:
            await ws.close(1008, _reason(str(exc)))
        except AccessRefused as exc:
            self._count_refusal(exc.kind, exc.reason, endpoint)
            await ws.close(1008, _reason(exc.reason))
        except LimitExceeded as exc:
            self._count_refusal(exc.kind, exc.reason, endpoint)
            await ws.close(exc.code, _reason(exc.reason))
        except Slow as exc:  # its queue filled with replies to its own messages
            await ws.close(1013, str(exc))
        except ConnectionClosed:
            self._count_oversize(ws, endpoint)
        else:
            self._count_oversize(ws, endpoint)

    def _count_oversize(self, ws: ServerConnection, endpoint: str) -> None:
        """websockets itself closes a socket whose message is over max_message_bytes."""
        sent = ws.protocol.close_sent
        if sent is not None and sent.code == 1009:
            self._count_refusal("message_size", sent.reason, endpoint)

    async def _serve_client(self, client: Client, inbound: Coroutine[Any, Any, None]) -> None:
        """Catch the client up and pump its queue until it or `inbound` (its messages)
        ends; the caller, which attached the client, detaches it."""
        feeding = asyncio.create_task(self.fanout.feed(client))
        tasks = {asyncio.create_task(client.pump()), asyncio.create_task(inbound), feeding}
        try:
            running = set(tasks)
            while running:
                done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    exc = task.exception()
                    if exc is not None and not isinstance(exc, ConnectionClosed):
                        raise exc
                if done != {feeding}:
                    return  # the socket or its messages ended; catching up alone does not
        finally:
            # Closed first: a task whose cancellation is swallowed on the way (as a Redis
            # command may do) still sees that its client is gone and ends.
            client.close()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _subscribe(self, ws: ServerConnection, query: dict[str, str], grant: Grant) -> None:
        sid = _session_id(query.get("session") or grant.session)
        grant.check(sid, Scope.LISTEN)
        client = self._client(ws, sid, query)
        limits = ConnectionLimits(self.limits, audio_bytes_per_s("pcm16", 16000))

        async def listen() -> None:
            async for message in ws:
                limits.message(time.monotonic())
                await self._client_message(client, grant, message, call=False)

        self.fanout.attach(client, from_start=query.get("from") == "start")
        try:
            await self.fanout.joined(client)
            await ws.send(json.dumps({"type": "subscribed", "session": sid,
                                      "format": client.audio_format.value}))  # fmt: skip
            await self._serve_client(client, listen())
        finally:
            self.fanout.detach(client)

    async def _call(self, ws: ServerConnection, query: dict[str, str], grant: Grant) -> None:
        sid = _session_id(query.get("session") or grant.session or f"call-{uuid.uuid4().hex[:12]}")
        grant.check(sid, Scope.CALL)
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
            session_config = validated(SessionConfig, config)
            upstream = session_config.input_audio_format
            # Audio already in the upstream's format goes to the broker as it is (direct
            # input), not through ingest.
            start = SessionStart(session=sid, config=session_config,
                                 audio_out=client.audio_format,
                                 audio_in=upstream if audio.is_format(upstream) else None)  # fmt: skip
        except ContractError as exc:
            raise BadRequest(str(exc)) from None
        limits = ConnectionLimits(self.limits, audio_bytes_per_s(source, audio.rate))
        seq = 0

        async def listen() -> None:
            nonlocal seq
            async for message in ws:
                now = time.monotonic()
                limits.message(now)
                if isinstance(message, bytes):
                    limits.audio_chunk(len(message), now)
                    await self._publish_audio(
                        sid, audio.model_copy(update={"audio": message, "seq": seq})
                    )
                    seq += 1
                elif await self._client_message(client, grant, message, call=True):
                    break

        self.fanout.attach(client, from_start=True)
        announced = False
        try:  # from the announcement on, however the socket goes, the session ends with it
            await self.redis.xadd(self.keys.sessions, encode(start))  # type: ignore[arg-type]
            announced = True
            await self.fanout.joined(client)
            await ws.send(json.dumps({"type": "session", "session": sid,
                                      "format": client.audio_format.value}))  # fmt: skip
            await self._serve_client(client, listen())
        finally:
            self.fanout.detach(client)
            if announced:
                await self._end(sid, "caller hung up")

    async def _twilio(self, ws: ServerConnection, grant: Grant | None) -> None:
        """A Twilio Media Stream. Its token (a `<Parameter name="token">`) comes in `start`,
        so `start` is the first message acted on: nothing else is accepted before it."""
        limits = ConnectionLimits(self.limits, audio_bytes_per_s("g711_ulaw", 8000))
        start: dict[str, Any] | None = None
        stream_sid = ""
        async for raw in ws:
            limits.message(time.monotonic())
            event, message = _twilio_message(raw)
            if event == "connected":
                continue
            if event != "start":
                raise BadRequest(f"expected Media Streams `start` first, got {event or raw[:40]!r}")
            start = _object(message.get("start"))
            stream_sid = str(message.get("streamSid") or start.get("streamSid"))
            break
        if start is None:
            return  # hung up before `start`
        params = _object(start.get("customParameters"))
        if grant is None:
            token = params.get("token")
            if not token:
                raise AccessRefused(
                    HTTPStatus.UNAUTHORIZED,
                    'missing token: a <Parameter name="token"> in the <Stream>',
                    "token",
                )
            grant = self.access.grant(str(token))
        sid = _session_id(
            params.get("session") or grant.session
            or f"tw-{start.get('callSid') or uuid.uuid4().hex[:12]}"
        )  # fmt: skip
        grant.check(sid, Scope.CALL)
        instructions = params.get("instructions")
        try:
            # The caller's 8 kHz µ-law goes upstream as it is (Voice Live takes g711_ulaw
            # input): direct input, no ingest, no resampling.
            config = validated(SessionConfig, {
                "input_audio_format": AudioFormat.G711_ULAW.value,
                **({"instructions": instructions} if instructions else {}),
            })  # fmt: skip
        except ContractError as exc:
            raise BadRequest(str(exc)) from None
        client = Client(ws, sid, AudioFormat.G711_ULAW, self.settings.client_buffer,
                        self.settings.slow_client, twilio_stream=stream_sid)  # fmt: skip
        self.fanout.attach(client, from_start=True)
        announced = False
        try:
            session = SessionStart(session=sid, config=config, audio_out=AudioFormat.G711_ULAW,
                                   audio_in=AudioFormat.G711_ULAW)  # fmt: skip
            await self.redis.xadd(self.keys.sessions, encode(session))  # type: ignore[arg-type]
            announced = True
            await self._serve_client(client, self._twilio_media(ws, sid, limits))
        finally:
            self.fanout.detach(client)
            if announced:
                await self._end(sid, "call ended")

    async def _twilio_media(self, ws: ServerConnection, sid: str, limits: ConnectionLimits) -> None:
        """A Twilio call's messages after `start`, until `stop`."""
        async for raw in ws:
            now = time.monotonic()
            limits.message(now)
            event, message = _twilio_message(raw)
            if event is None:
                await self._status_for(
                    sid, "error", "twilio: a message that is not Media Streams JSON"
                )
                continue
            if event == "media":
                media = _object(message.get("media"))
                if media.get("track", "inbound") != "inbound":
                    continue
                try:
                    audio = base64.b64decode(media.get("payload", ""), validate=True)
                except (binascii.Error, ValueError):
                    await self._status_for(sid, "error", "twilio: media payload is not base64")
                    continue
                limits.audio_chunk(len(audio), now)
                try:
                    # Numbered by `chunk`, which counts media messages only: `sequenceNumber`
                    # counts every message, mark echoes too, and would leave a hole per mark.
                    chunk = validated(RawAudio, {"audio": audio, "format": "g711_ulaw",
                                                 "rate": 8000, "seq": _int(media.get("chunk"))})  # fmt: skip
                except ContractError as exc:
                    await self._status_for(sid, "error", f"twilio: {exc}")
                    continue
                await self._publish_audio(sid, chunk)
            elif event == "mark":
                name = str(_object(message.get("mark")).get("name") or "")
                response_id, _, played = name.rpartition("|")
                if response_id:
                    await self._played(sid, response_id, playback_ms(played))
            elif event == "stop":
                return

    def _client(self, ws: ServerConnection, sid: str, query: dict[str, str]) -> Client:
        try:
            fmt = AudioFormat(query.get("format", "pcm16").lower())
        except ValueError:
            raise BadRequest(f"format {query.get('format')!r}: expected one of "
                             f"{', '.join(f.value for f in AudioFormat)}") from None  # fmt: skip
        return Client(ws, sid, fmt, self.settings.client_buffer, self.settings.slow_client)

    async def _client_message(
        self, client: Client, grant: Grant, message: str | bytes, call: bool
    ) -> bool:
        """A JSON message from a client; True when the client ends the call. Anything that
        writes (a text turn, a played position) needs the `call` scope: AccessRefused."""
        try:
            data = json.loads(message)
            kind = data["type"]
        except (ValueError, KeyError, TypeError):
            client.offer(
                json.dumps({"type": "error", "message": "expected a JSON object with a type"})
            )
            return False
        if kind in ("played", "text", "end"):
            grant.check(client.sid, Scope.CALL)
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

    async def _publish_audio(self, sid: str, chunk: RawAudio) -> None:
        """Append a caller's chunk to the session's raw audio stream; LimitExceeded when
        more audio than allowed now waits there for ingest (which trims what it has read)."""
        key = self.keys.audio(sid)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xadd(key, encode(chunk))  # type: ignore[arg-type]
            pipe.xlen(key)
            _, waiting = await pipe.execute()
        if waiting > self.settings.max_waiting_audio:
            raise LimitExceeded(
                f"{waiting} audio chunks of this session wait in Redis for ingest (limit "
                f"{self.settings.max_waiting_audio}, VLPIPE_GATEWAY_MAX_WAITING_AUDIO)",
                "waiting_audio",
            )

    async def _played(self, sid: str, response_id: str, ms: float | None) -> None:
        """A consumer reports how much of a response it played: the broker cuts there."""
        if ms is None or not response_id:
            return
        current: Any = await self.redis.hget(self.keys.playback(sid), "response_id")
        if current is not None and current.decode() == response_id:
            await self.redis.hset(self.keys.playback(sid), "played_ms", round(ms, 1))

    async def _end(self, sid: str, reason: str) -> None:
        end = SessionEnd(session=sid, reason=reason)
        await self.redis.xadd(self.keys.sessions, encode(end))  # type: ignore[arg-type]

    async def _status_for(self, sid: str, kind: str, message: str) -> None:
        status = Status(session=sid, service="gateway", kind=kind, message=message)
        await self.redis.xadd(self.keys.status(sid), encode(status), maxlen=2000)  # type: ignore[arg-type]

    # ---------------------------------------------------------------- fan-out

    def _deliver(self, client: Client, entry: Entry) -> None:
        dropped = client.dropped
        try:
            for message in self._render(client, entry):
                client.offer(message)
        except Slow as exc:
            self.fanout.detach(client)
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


def _select_subprotocol(conn: ServerConnection, offered: Any) -> Subprotocol | None:
    """Answer `vlpipe` to a browser that offers it (with `vlpipe.bearer.<token>`): a
    browser fails a socket whose server picks none of the subprotocols it offered."""
    return Subprotocol(SUBPROTOCOL) if SUBPROTOCOL in offered else None


def _subprotocols(request: Request) -> list[str]:
    return [
        p.strip()
        for header in request.headers.get_all("Sec-WebSocket-Protocol")
        for p in header.split(",")
        if p.strip()
    ]


def _reason(text: str) -> str:
    """A close frame's reason: at most 123 bytes of UTF-8."""
    return text.encode()[:123].decode(errors="ignore")


def _twilio_message(raw: str | bytes) -> tuple[str | None, dict[str, Any]]:
    """A Media Streams message's event and body; (None, {}) when it is not one."""
    try:
        message = json.loads(raw)
        return str(message["event"]), message
    except (ValueError, KeyError, TypeError):
        return None, {}


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


def _text(status: HTTPStatus, body: str, extra: list[tuple[str, str]] | None = None) -> Response:
    data = body.encode()
    headers = Headers(
        [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(data))),
         *(extra or [])]
    )  # fmt: skip
    return Response(status.value, status.phrase, headers, data)


def _json(status: HTTPStatus, body: dict[str, Any]) -> Response:
    data = json.dumps(body).encode()
    headers = Headers([("Content-Type", "application/json"), ("Content-Length", str(len(data))),
                       ("Cache-Control", "no-store")])  # fmt: skip
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
