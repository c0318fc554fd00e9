"""The engine's WebSocket server: a thin asyncio shell around `EngineSession`.

It serves `ws://HOST:PORT/voice-live/realtime?api-version=...&model=...`, the URL the
`azure-ai-voicelive` SDK builds from the endpoint `http://HOST:PORT`, plus `GET /healthz`
(the process is up) and `GET /readyz` (models loaded) over plain HTTP.

Handshake checks: the path, an `api-version` query parameter, and, when a key is
configured, an `api-key` header or `Authorization: Bearer <key>` (else 401). Messages over
`max_message_bytes` close the socket with 1009.

Per connection, the shell sends what the session returns in order, runs the session's
transcription and synthesis jobs on the process's worker threads, and paces response
audio at `output_pace` times real time (after a 300 ms lead) so that a cancel or a barge-in
stops it where the listener is.

In-process use, for tests of other services::

    from vlpipe.services.engine.server import running_engine

    async with running_engine(model="echo") as engine:   # port 0: a free port
        engine.endpoint   # "http://127.0.0.1:PORT", for azure.ai.voicelive.aio.connect
        engine.url        # "ws://127.0.0.1:PORT/voice-live/realtime?api-version=..."
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from vlpipe.services.engine.protocol import EngineSession, SynthesisJob, TranscriptionJob
from vlpipe.services.engine.settings import EngineModel, EngineSettings
from vlpipe.services.engine.speech import SpeechBackends

log = logging.getLogger("vlpipe.engine")

REALTIME_PATH = "/voice-live/realtime"
API_VERSION = "2025-10-01"
AUDIO_LEAD_MS = 300.0  # response audio may run this far ahead of real time


class EngineServer:
    """One engine process's server: models, listening socket and live sessions."""

    def __init__(self, settings: EngineSettings, backends: SpeechBackends | None = None) -> None:
        settings.check_exposure()
        self.settings = settings
        self.backends = backends
        self._server: Server | None = None
        self._key = settings.api_key.get_secret_value() if settings.api_key else None

    @property
    def ready(self) -> bool:
        return self.backends is not None and self._server is not None

    @property
    def port(self) -> int:
        """The bound port (the real one when settings asked for port 0)."""
        assert self._server is not None, "start() first"
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def endpoint(self) -> str:
        """The endpoint to give the Voice Live SDK: `http://HOST:PORT`."""
        return f"http://{_url_host(self.settings.host)}:{self.port}"

    @property
    def url(self) -> str:
        """The realtime WebSocket URL, with api-version and model query parameters."""
        return (
            f"ws://{_url_host(self.settings.host)}:{self.port}{REALTIME_PATH}"
            f"?api-version={API_VERSION}&model={self.settings.model}"
        )

    async def start(self) -> None:
        """Load the models (in a thread) and start listening."""
        if self.backends is None:
            self.backends = await asyncio.to_thread(
                SpeechBackends.load,
                self.settings.model,
                self.settings.stt_threads,
                self.settings.stt_workers,
            )
        self._server = await serve(
            self._serve_connection,
            self.settings.host,
            self.settings.port,
            process_request=self._check_request,
            max_size=self.settings.max_message_bytes,
            compression=None,  # base64 audio barely compresses; save the CPU
        )
        log.info(
            "engine listening",
            extra={"url": self.url, "model": self.settings.model, "auth": self._key is not None},
        )

    async def close(self) -> None:
        """Stop listening, close every session (1001 going away) and stop the workers."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self.backends is not None:
            self.backends.close()

    def _check_request(self, connection: ServerConnection, request: Request) -> Response | None:
        parts = urlsplit(request.path)
        if parts.path in ("/healthz", "/readyz"):
            if parts.path == "/readyz" and self.backends is None:
                return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "models loading\n")
            return connection.respond(HTTPStatus.OK, "ok\n")
        if parts.path.rstrip("/") != REALTIME_PATH:
            return connection.respond(
                HTTPStatus.NOT_FOUND, f"not found: the realtime endpoint is {REALTIME_PATH}\n"
            )
        if "api-version" not in parse_qs(parts.query):
            return connection.respond(
                HTTPStatus.BAD_REQUEST, "missing required query parameter: api-version\n"
            )
        if self._key is not None and not _authorized(request.headers, self._key):
            log.warning("connection refused: bad or missing api key")
            return connection.respond(
                HTTPStatus.UNAUTHORIZED,
                "unauthorized: send the engine's key in an api-key header "
                "or as Authorization: Bearer <key>\n",
            )
        return None

    async def _serve_connection(self, ws: ServerConnection) -> None:
        backends = self.backends
        assert backends is not None
        vad = await asyncio.to_thread(backends.vad_pool.acquire)
        try:
            model = parse_qs(urlsplit(ws.request.path).query if ws.request else "").get("model")
            session = EngineSession(
                vad,
                echo=self.settings.model == "echo",
                model=model[0] if model else self.settings.model,
            )
            await SessionLink(ws, session, backends, self.settings.output_pace).run()
        finally:
            backends.vad_pool.release(vad)


class SessionLink:
    """Wires one WebSocket to one `EngineSession`: I/O, jobs and audio pacing."""

    def __init__(
        self,
        ws: ServerConnection,
        session: EngineSession,
        backends: SpeechBackends,
        output_pace: float,
    ) -> None:
        self.ws = ws
        self.session = session
        self.backends = backends
        self.output_pace = output_pace
        self._outbox: asyncio.Queue[str] = asyncio.Queue()
        self._audio_ready = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Serve the session until the client goes away."""
        log.info("session opened", extra={"session": self.session.session_id})
        writer = asyncio.create_task(self._write())
        pacer = asyncio.create_task(self._pace_audio())
        self._deliver(self.session.start())
        try:
            async for message in self.ws:
                self._deliver(self.session.handle_client_message(message))
        except ConnectionClosed:
            pass
        finally:
            for task in (writer, pacer, *self._tasks):
                task.cancel()
            for task in (writer, pacer, *self._tasks):
                with suppress(asyncio.CancelledError, ConnectionClosed):
                    await task
            log.info(
                "session closed",
                extra={"session": self.session.session_id, "close_code": self.ws.close_code},
            )

    def _deliver(self, events: list[dict[str, Any]]) -> None:
        """Queue `events` for sending, start requested jobs, wake the audio pacer."""
        for event in events:
            if event["type"] == "error":
                log.info(
                    "client error",
                    extra={"session": self.session.session_id, "code": event["error"]["code"]},
                )
            self._outbox.put_nowait(json.dumps(event))
        for job in self.session.take_jobs():
            task = asyncio.create_task(self._run_job(job))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if self.session.audio_pending:
            self._audio_ready.set()

    async def _write(self) -> None:
        while True:
            message = await self._outbox.get()
            await self.ws.send(message)

    async def _run_job(self, job: TranscriptionJob | SynthesisJob) -> None:
        loop = asyncio.get_running_loop()
        backends = self.backends
        if isinstance(job, TranscriptionJob):
            assert backends.stt is not None
            try:
                result = await loop.run_in_executor(
                    backends.stt_executor, backends.stt.transcribe, job.audio
                )
            except Exception as exc:
                log.exception("transcription failed", extra={"session": self.session.session_id})
                self._deliver(self.session.transcription_failed(job.item_id, str(exc)))
            else:
                self._deliver(self.session.transcription_finished(job.item_id, result.segments))
            return
        tts = backends.tts
        assert tts is not None
        try:
            pcm = await loop.run_in_executor(
                backends.tts_executor, tts.synthesize, job.text, job.voice
            )
        except Exception as exc:
            log.exception("synthesis failed", extra={"session": self.session.session_id})
            self._deliver(self.session.synthesis_failed(job.response_id, str(exc)))
        else:
            self._deliver(self.session.speech_synthesized(job.response_id, pcm, tts.sample_rate))

    async def _pace_audio(self) -> None:
        loop = asyncio.get_running_loop()
        response_id: str | None = None
        started = 0.0
        sent_ms = 0.0
        while True:
            await self._audio_ready.wait()
            chunk = self.session.next_audio()
            if chunk is None:
                self._audio_ready.clear()
                continue
            if chunk.response_id != response_id:
                response_id, started, sent_ms = chunk.response_id, loop.time(), 0.0
            self._deliver(chunk.events)
            if chunk.duration_ms and self.output_pace > 0:
                sent_ms += chunk.duration_ms
                due = started + (sent_ms - AUDIO_LEAD_MS) / 1000 / self.output_pace
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)


@asynccontextmanager
async def running_engine(
    host: str = "127.0.0.1",
    port: int = 0,
    model: EngineModel = "echo",
    api_key: str | None = None,
    **settings: Any,
) -> AsyncIterator[EngineServer]:
    """An engine serving in this event loop until the block exits.

    `port=0` binds a free port (read it from `engine.port` / `engine.endpoint`). Further
    keyword arguments are `EngineSettings` fields, e.g. `output_pace=0`.
    """
    engine = EngineServer(
        EngineSettings(host=host, port=port, model=model, api_key=api_key, **settings)
    )
    await engine.start()
    try:
        yield engine
    finally:
        await engine.close()


def _authorized(headers: Headers, key: str) -> bool:
    offered = headers.get("api-key")
    if offered is None:
        scheme, _, token = (headers.get("Authorization") or "").partition(" ")
        offered = token.strip() if scheme.lower() == "bearer" else None
    return offered is not None and hmac.compare_digest(offered.encode(), key.encode())


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


__all__ = ["API_VERSION", "REALTIME_PATH", "EngineServer", "running_engine"]
