"""What the pipeline costs next to an app that uses the official SDK directly (issue #14).

    .venv/bin/python bench/pipeline_vs_direct.py [--sessions 1,25,50,100] [--seconds 20]
        [--warmup 5] [--appendfsync everysec|always] [--telemetry on|off]
        [--input direct|ingest] [--start staggered|together] [--phases 1] [--rounds 1]
        [--busy-above 25] [--busy-wait 120] [--outputs broker|egress|events]

The measured baseline and how to read it: docs/performance.md.

Both modes run in one invocation, for each session count N in turn, against the same
upstream:

* **Upstream.** A null Voice Live server (`NullVoiceLive`, a process of its own) speaks
  enough of the realtime protocol for the `azure-ai-voicelive` SDK and for the broker
  (`session.created`, `session.updated`, a response's events). It counts appended audio
  without parsing it (`appended_bytes`: the size of the base64 string, found by searching
  the raw message). Every 3 s of a connection's audio (24 kHz PCM16) it answers with one
  response: `response.created`, the output item and content part, a transcript delta,
  1 s of audio as ten 100 ms `response.audio.delta`s paced 100 ms apart, then the
  `...done` events. The first 8 bytes of each delta's audio carry the server's clock when
  it sent the delta; the response id carries the answer's number (`resp_3`: the answer to
  the connection's 3rd block of 3 s).
* **When calls begin.** With `--start staggered` (the default) the N calls begin one
  after another over one 3 s block (call i on tick `i * 150 // N`), so their turns end on
  different ticks, as real calls' do; every call is sending by the end of the warm-up.
  With `--start together` all begin on the first tick: every call completes its blocks on
  the same tick, and all N answers start in the same millisecond, a burst of N answers'
  events that the transport works through one after another (the worst case, and what
  this benchmark measured before `--start` existed).
* **When in each tick calls send.** `--phases 1` (the default): every call's chunk is
  sent on the shared 20 ms tick, in both modes. `--phases K`: call i sends `i % K / K`
  of a tick later, so the calls' 20 ms clocks are spread over the tick, as those of calls
  that began at unrelated moments are; latencies are taken from each call's own send
  time.
* **Direct mode.** One process holds N `azure.ai.voicelive.aio.connect` clients. A shared
  ticker sends each of them 20 ms of 24 kHz PCM16 every 20 ms (`input_audio_buffer.append`,
  base64-encoded per send as an app would); each client reads the SDK's typed events and
  takes the decoded audio of every `response.audio.delta`. With `--direct-processes K`
  the app runs K such processes (call i in process `i % K`), as an app that needs more
  than one core for its calls would: one process is one core at most, and on a slow
  host it cannot keep 250 calls in real time (the pipeline's services are processes of
  their own). Its CPU is the sum of its processes'.
* **Pipeline mode.** A private redis-server (AOF on, `appendfsync everysec` as production
  would run it unless `--appendfsync always`), and ingest, broker and egress as real
  processes with their default settings, the broker pointed at the null server. Sessions
  are announced with server VAD (the null server ignores it and answers on its own every
  3 s, so no VAD events are sent and no barge-in happens). A producer process XADDs the
  same 20 ms chunk for every session each tick, in one pipeline
  (`XADD vl:audio:{ID} * audio <960 bytes> format pcm16 rate 24000`); a consumer process
  follows every `vl:audio-out:{ID}` with one `XREAD`. Both talk to redis-server through
  hiredis directly (`RespConnection`: packed and parsed in C, each session's XADD packed
  once), so that they take little of the cores the pipeline is measured on. With `--input direct` (the default)
  the sessions' starts say `audio_in pcm16`, as a producer of 24 kHz PCM16 should: the
  broker reads the chunks itself (direct input, docs/producers.md); `--input ingest`
  leaves it out, so every chunk goes through ingest and a frames stream. The broker
  makes the outputs in its own writes (`VLPIPE_OUTPUTS_BY=broker`, `--outputs broker`,
  its default; egress claims each session and lets it go at its first event);
  `--outputs egress` has egress make them from the events streams.
  `--outputs events` is an experiment: egress does not run and the consumer follows the
  broker's `vl:events:{ID}` instead, taking each `response.audio.delta`'s audio.

Measurements, over a window of `--seconds` that starts `--warmup` seconds after the first
tick:

* **CPU.** Transport CPU is the sum over ingest, broker, egress and redis-server of
  psutil's user + system time (of each process, its reaped children, e.g. redis' AOF
  rewrite, and its live children). The producer and consumer are left out, as the direct
  app's own audio source and player are (their CPU is printed apart, with the null
  server's); the direct figure is the whole direct process.
  Printed: ms of CPU per second of audio (input audio, summed over sessions), the ratio,
  each process in % of one core, and the whole machine's CPU over the window
  (psutil.cpu_percent) with its core count, so that a saturated run shows. The null
  server's share is printed too; it is in neither mode's figure.
* **Turn latency.** From the tick that sent the chunk completing a 3 s block to the first
  audio of its answer reaching the app (direct) or the consumer (pipeline). The added
  latency is the pipeline's percentile minus the direct mode's: both modes are measured
  end to end with the same clock and the same null server, so the null server's own
  reaction cancels out, and the uplink (producer to ingest to broker) counts, which a
  stamp taken by the server alone would miss (turns cannot be paired across the modes, so
  it is a difference of percentiles, not a percentile of differences). The server's
  stamp in the audio still splits each turn into uplink (tick to the server starting the
  answer) and downlink (server to app or consumer), printed per mode. A tick is stamped
  when it starts, before any session's chunk is sent; its lateness against the 20 ms
  schedule is printed ("ticker late") so a source that could not keep pace shows.
* **Real time.** Of the answers due to blocks completed within the window (one second
  of audio each), the share of audio that reached the app or consumer by 2 s after the
  window (an answer takes 1 s to play; a transport that lags more loses the rest); also
  the share of the window's input audio the null server received within the window.
  Sending goes on during those 2 s, so the load does not drop while the last answers
  arrive.
* **Memory.** Resident memory of each process at the end of the window minus its idle
  figure (services: ready, before any session; direct: after imports, before
  connecting), divided by N.
* **Wake-ups.** How often each process's main thread blocked and was woken in the window
  (voluntary context switches, from the kernel), a second. On a virtual machine a wake-up
  costs tens of µs of CPU (`bench/wakeup_cost.py`), and each hop of the pipeline is one
  on each side; it is where most of the pipeline's extra CPU at N=25 goes.
* **Garbage collection.** Each service's GC pauses in the window, from its /metrics
  (`vlpipe.process.gc_pause`, `vlpipe.process.gc_longest_pause`): all of them and the
  longest, in ms.
* **Redis commands** per input frame over the window (`INFO commandstats`), with
  redis-server's own time in each: where the round trips go.

The machine is shared: before each mode the benchmark waits (up to `--busy-wait` s) for
the machine's CPU use to drop to `--busy-above` %, and prints it before and during.

Every child process is stopped on exit, on Ctrl-C and on SIGTERM; one that does not start
(or exits early) stops the run with its log's tail. The children are this same file run
with `--role NAME` (null server, direct app, producer, consumer) and the services'
`python -m vlpipe.services.NAME`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import os
import platform
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import psutil

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parents[1]

RATE = 24_000  # Hz; PCM16 mono, the upstream's own input format (no resampling anywhere)
TICK_S = 0.020
CHUNK = (b"\x10\x00\xf0\xff" * 240)[: RATE * 2 // 50]  # 20 ms: 960 bytes, a faint square wave
BLOCK_BYTES = RATE * 2 * 3  # every 3 s of a connection's audio, one answer
BLOCK_TICKS = BLOCK_BYTES // len(CHUNK)  # 150
ANSWER_DELTAS = 10
DELTA_S = 0.100
DELTA_BYTES = RATE * 2 // 10  # 100 ms
STAMP = struct.Struct("<d")  # the server's clock in the first 8 bytes of each delta's audio
GRACE_S = 2.0  # after the window: the last answers take 1 s to play out
SERVICES = ("ingest", "broker", "egress")
SESSION_CONFIG: dict[str, Any] = {
    "modalities": ["text", "audio"],
    "voice": "alloy",
    "input_audio_format": "pcm16",
    "output_audio_format": "pcm16",
    "input_audio_transcription": None,
    "turn_detection": {"type": "server_vad"},
}


def emit(**message: Any) -> None:
    """A child's one-line JSON report to the orchestrator (its stdout)."""
    print(json.dumps(message), flush=True)


# ==================================================================== the null upstream

APPEND_TYPE = b'"input_audio_buffer.append"'
AUDIO_KEY = b'"audio"'


def appended_bytes(message: bytes) -> int | None:
    """The decoded size of an `input_audio_buffer.append`'s audio, or None for another event.

    The JSON is not parsed: base64 has no `"`, `.` or `_`, so neither the type nor the key
    can occur inside the audio, and the audio string runs from the quote after `"audio":`
    to the next quote. Works for any key order (the SDK puts `type` last, the broker first).
    """
    if APPEND_TYPE not in message:
        return None
    key = message.find(AUDIO_KEY)
    if key < 0:
        return 0
    start = message.index(b'"', message.index(b":", key + len(AUDIO_KEY))) + 1
    end = message.index(b'"', start)
    padding = (message[end - 1] == ord("=")) + (message[end - 2] == ord("="))
    return (end - start) // 4 * 3 - padding


def _event(kind: str, **fields: Any) -> str:
    return json.dumps({"type": kind, "event_id": f"event_{time.monotonic_ns():x}", **fields})


def answer_events(response_id: str, item_id: str) -> tuple[list[str], list[str]]:
    """The events before and after a response's audio deltas, as Voice Live orders them."""
    response = {"id": response_id, "object": "realtime.response", "status": "in_progress",
                "status_details": None, "output": [], "usage": None,
                "modalities": ["text", "audio"], "voice": "alloy",
                "output_audio_format": "pcm16"}  # fmt: skip
    item = {"id": item_id, "object": "realtime.item", "type": "message", "role": "assistant",
            "status": "in_progress", "content": []}  # fmt: skip
    where = {"response_id": response_id, "item_id": item_id, "output_index": 0}
    transcript = "A null answer."
    part = {"type": "audio", "transcript": transcript}
    done_item = {**item, "status": "completed", "content": [part]}
    head = [
        _event("response.created", response=response),
        _event("response.output_item.added", response_id=response_id, output_index=0, item=item),
        _event("conversation.item.created", previous_item_id=None, item=item),
        _event(
            "response.content_part.added",
            **where,
            content_index=0,
            part={"type": "audio", "transcript": ""},
        ),
        _event("response.audio_transcript.delta", **where, content_index=0, delta=transcript),
    ]
    tail = [
        _event("response.audio.done", **where, content_index=0),
        _event("response.audio_transcript.done", **where, content_index=0, transcript=transcript),
        _event("response.content_part.done", **where, content_index=0, part=part),
        _event(
            "response.output_item.done", response_id=response_id, output_index=0, item=done_item
        ),
        _event(
            "response.done", response={**response, "status": "completed", "output": [done_item]}
        ),
    ]
    return head, tail


# The delta's audio is a 9-byte stamp (8 used) and 4791 bytes of constant tone: 9 is a
# multiple of 3, so the base64 of the whole is the stamp's base64 plus a constant.
_TONE_B64 = base64.b64encode((b"\x00\x08\x00\xf8" * DELTA_BYTES)[: DELTA_BYTES - 9]).decode()


def audio_delta(response_id: str, item_id: str) -> str:
    stamp = base64.b64encode(STAMP.pack(time.time()) + b"\x00").decode()
    return (
        f'{{"type":"response.audio.delta","event_id":"event_{time.monotonic_ns():x}",'
        f'"response_id":"{response_id}","item_id":"{item_id}","output_index":0,'
        f'"content_index":0,"delta":"{stamp}{_TONE_B64}"}}'
    )


@dataclass
class NullStats:
    connections: int = 0
    open: int = 0
    appends: int = 0
    append_bytes: int = 0
    answers: int = 0


class NullVoiceLive:
    """The null upstream: a WebSocket server on a loopback port (port 0: a free one)."""

    def __init__(self, port: int = 0) -> None:
        self.requested_port = port
        self.stats = NullStats()
        self._server: Any = None

    @property
    def port(self) -> int:
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def endpoint(self) -> str:
        """What the SDK's `connect(endpoint=...)` and `VLPIPE_BROKER_ENDPOINT` take."""
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        from websockets.asyncio.server import serve

        self._server = await serve(
            self._serve, "127.0.0.1", self.requested_port, process_request=self._http,
            compression=None, max_size=None, max_queue=None,
        )  # fmt: skip

    async def close(self) -> None:
        self._server.close()
        await self._server.wait_closed()

    def _http(self, connection: Any, request: Any) -> Any:
        if request.path.startswith("/stats"):
            body = json.dumps(self.stats.__dict__) + "\n"
            return connection.respond(HTTPStatus.OK, body)
        return None  # any other path: the realtime WebSocket

    async def _serve(self, ws: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        stats = self.stats
        stats.connections += 1
        stats.open += 1
        session = {"id": f"sess_{stats.connections}", "object": "realtime.session",
                   "model": "null", **SESSION_CONFIG}  # fmt: skip
        blocks: asyncio.Queue[int] = asyncio.Queue()
        answering = asyncio.create_task(self._answer(ws, blocks))
        received = done = 0
        try:
            await ws.send(_event("session.created", session=session))
            while True:
                message = await ws.recv(decode=False)  # bytes: no UTF-8 decoding either
                size = appended_bytes(message)
                if size is not None:
                    stats.appends += 1
                    stats.append_bytes += size
                    received += size
                    while received >= (done + 1) * BLOCK_BYTES:
                        done += 1
                        blocks.put_nowait(done)
                    continue
                event = json.loads(message)
                if event.get("type") == "session.update":
                    session.update(event.get("session") or {})
                    await ws.send(_event("session.updated", session=session))
        except ConnectionClosed:
            pass
        finally:
            stats.open -= 1
            answering.cancel()

    async def _answer(self, ws: Any, blocks: asyncio.Queue[int]) -> None:
        """One answer per block, one at a time (as Voice Live answers one turn at a time)."""
        from websockets.exceptions import ConnectionClosed

        with contextlib.suppress(ConnectionClosed):  # the client went away mid-answer
            while True:
                await self._answer_block(ws, await blocks.get())

    async def _answer_block(self, ws: Any, number: int) -> None:
        """The answer's events, its 1 s of audio paced in real time (100 ms apart)."""
        loop = asyncio.get_running_loop()
        response_id, item_id = f"resp_{number}", f"item_{number}"
        head, tail = answer_events(response_id, item_id)
        for text in head:
            await ws.send(text)
        start = loop.time()
        for i in range(ANSWER_DELTAS):
            delay = start + i * DELTA_S - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await ws.send(audio_delta(response_id, item_id))
        for text in tail:
            await ws.send(text)
        self.stats.answers += 1


async def null_server_role(params: dict[str, Any]) -> None:
    server = NullVoiceLive(params["port"])
    await server.start()
    emit(ready=True, endpoint=server.endpoint)
    await asyncio.Event().wait()


# ==================================================================== answers as received


@dataclass
class Answers:
    """What one app or consumer received: per (session, answer number), when the first
    audio arrived, the server's stamp in it, the bytes that arrived by `until`, and (the
    pipeline's consumer) when Redis wrote that first audio's entry (its id's time)."""

    until: float
    seen: dict[tuple[int, int], list[float]] = field(default_factory=dict)

    def audio(
        self, session: int, response_id: str, audio: bytes, now: float, written: float = math.nan
    ) -> None:
        number = int(response_id.rpartition("_")[2])
        got = self.seen.get((session, number))
        if got is None:
            got = self.seen[session, number] = [now, STAMP.unpack_from(audio)[0], 0, written]
        if now <= self.until:
            got[2] += len(audio)

    def rows(self) -> list[list[float]]:
        return [[s, m, *got] for (s, m), got in self.seen.items()]


# ==================================================================== direct mode


async def direct_role(params: dict[str, Any]) -> None:
    """The SDK clients of this process's sessions (`indices`, of all N; all of them unless
    the app runs several processes), fed by one ticker; reports ticks and answers, by each
    session's number among all N."""
    # Imported here, before the idle figure: the app's resident SDK is not per session.
    from azure.ai.voicelive.aio import VoiceLiveConnection, connect
    from azure.ai.voicelive.models import (
        RequestSession,
        ServerEventResponseAudioDelta,
        ServerEventType,
        ServerVad,
    )
    from azure.core.credentials import AzureKeyCredential

    n, warmup, seconds = params["sessions"], params["warmup"], params["seconds"]
    starts: list[int] = params["starts"]
    indices: list[int] = params.get("indices") or list(range(n))
    idle_rss = psutil.Process().memory_info().rss
    managers: list[Any] = []

    async def open_client() -> VoiceLiveConnection:
        manager = connect(
            endpoint=params["endpoint"], credential=AzureKeyCredential("bench"),
            model="gpt-realtime",
        )  # fmt: skip
        connection: VoiceLiveConnection = await manager.__aenter__()
        managers.append(manager)
        await connection.session.update(
            session=RequestSession(
                modalities=["text", "audio"],
                voice="alloy",
                input_audio_format="pcm16",
                output_audio_format="pcm16",
                turn_detection=ServerVad(),
            )
        )
        return connection

    opened: list[VoiceLiveConnection] = []
    for first in range(0, len(indices), 50):  # in batches: no connection storm on the server
        opened += await asyncio.gather(
            *(open_client() for _ in range(first, min(len(indices), first + 50)))
        )
    connections = dict(zip(indices, opened, strict=True))
    t0 = time.time() + 0.5
    answers = Answers(until=t0 + warmup + seconds + GRACE_S)

    async def listen(index: int, connection: VoiceLiveConnection) -> None:
        async for event in connection:  # the SDK's typed events, as an app reads them
            if event.type == ServerEventType.RESPONSE_AUDIO_DELTA:
                # The SDK has decoded the base64 into bytes already.
                delta = cast(ServerEventResponseAudioDelta, event)
                answers.audio(index, delta.response_id, delta.delta, time.time())

    listeners = [asyncio.create_task(listen(i, c)) for i, c in connections.items()]
    emit(ready=True, t0=t0, idle_rss=idle_rss)
    ticks: list[float] = []
    tick_count = round((warmup + seconds + GRACE_S) / TICK_S)
    async for calls in sends(t0, tick_count, starts, params["phases"], ticks):
        for i in calls:
            connection = connections.get(i)
            if connection is None:  # another process's call
                continue
            audio = base64.b64encode(CHUNK).decode()  # each call's audio is its own
            await connection.input_audio_buffer.append(audio=audio)
    for manager in managers:
        with contextlib.suppress(Exception):
            await manager.__aexit__(None, None, None)
    for task in listeners:
        task.cancel()
    emit(result=True, t0=t0, ticks=ticks, answers=answers.rows())


async def sends(
    t0: float, tick_count: int, starts: list[int], phases: int, ticks: list[float]
) -> AsyncIterator[list[int]]:
    """The send schedule both modes follow: at each of the `phases` points of each 20 ms
    tick from `t0` (`phase_offset_s`), when it comes, the calls that send then (those of
    that phase that have begun, `starts`). Each tick's start goes into `ticks`."""
    for k in range(tick_count):
        for phase in range(phases):
            delay = t0 + k * TICK_S + phase_offset_s(phase, phases) - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if phase == 0:
                ticks.append(time.time())
            yield [i for i in range(phase, len(starts), phases) if k >= starts[i]]


# ==================================================================== pipeline producer, consumer


class RespConnection:
    """A plain connection to redis-server for the producer and the consumer: commands
    packed by hiredis and replies parsed by `hiredis.Reader`, both in C. These two stand
    for the producer's and the player's own machines but run on the cores the pipeline is
    measured on, so they should take as little of them as they can: through redis-py
    (which packs every argument of every command in Python) the producer took 30% of a
    core at N=100 and the consumer 9%, while the pipeline itself took 115%."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import hiredis

        self.reader = reader
        self.writer = writer
        self.parser = hiredis.Reader()

    @classmethod
    async def open(cls, url: str) -> RespConnection:
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 6379)
        return cls(reader, writer)

    async def call(self, packed: bytes, commands: int = 1) -> list[Any]:
        """Send `packed` (that many commands, pipelined); their replies in order. An error
        reply raises, naming it: a benchmark with a failing producer measures nothing."""
        import hiredis

        self.writer.write(packed)
        replies: list[Any] = []
        while len(replies) < commands:
            reply = self.parser.gets()
            if reply is False:  # not a whole reply yet
                data = await self.reader.read(1 << 18)
                if not data:
                    raise ConnectionError("redis-server closed the connection")
                self.parser.feed(data)
            elif isinstance(reply, hiredis.ReplyError):
                raise RuntimeError(f"redis-server refused a command: {reply}")
            else:
                replies.append(reply)
        return replies

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


async def producer_role(params: dict[str, Any]) -> None:
    """The same 20 ms chunk for every session that has begun, each tick: the XADDs of a
    tick (or of a phase of it, `phase_offset_s`) pipelined in one write. Each session's
    XADD is the same bytes every tick (`*` lets Redis number the entry), so it is packed
    once."""
    import hiredis

    from vlpipe.shared.keys import StreamKeys

    keys = StreamKeys(params["prefix"])
    chunk = ("audio", CHUNK, "format", "pcm16", "rate", RATE)
    xadds = [hiredis.pack_command(("XADD", keys.audio(sid), "*", *chunk))  # type: ignore[arg-type]  # (stub: a 1-tuple)
             for sid in params["sids"]]  # fmt: skip
    redis = await RespConnection.open(params["url"])
    await redis.call(hiredis.pack_command(("PING",)))
    t0 = params["t0"]
    if time.time() > t0:
        emit(error=f"producer ready {time.time() - t0:.1f} s after the start time")
        return
    ticks: list[float] = []
    tick_count = round(params["duration"] / TICK_S)
    async for calls in sends(t0, tick_count, params["starts"], params["phases"], ticks):
        await redis.call(b"".join([xadds[i] for i in calls]), len(calls))
    await redis.close()
    emit(result=True, ticks=ticks)


def answer_audio(follows: str) -> Callable[[dict[bytes, bytes]], tuple[str, bytes] | None]:
    """What finds the answer audio in one entry of the stream the consumer follows: its
    (response id, audio), or None. `follows="audio-out"`: an `AudioOut` of kind `audio` on
    `vl:audio-out:{ID}`; `follows="events"` (the `--outputs events` experiment: the
    broker's events read with no egress between): a `response.audio.delta` `Event` on
    `vl:events:{ID}`."""
    if follows == "audio-out":

        def audio_out(fields: dict[bytes, bytes]) -> tuple[str, bytes] | None:
            if fields[b"kind"] != b"audio":
                return None
            return fields[b"response_id"].decode(), fields[b"audio"]

        return audio_out
    import msgpack

    from vlpipe.shared.contracts import ENVELOPE_FIELD

    envelope = ENVELOPE_FIELD.encode()

    def event(fields: dict[bytes, bytes]) -> tuple[str, bytes] | None:
        message = msgpack.unpackb(fields[envelope])
        if message["type"] != "response.audio.delta":
            return None
        return message["event"]["response_id"], message["audio"]

    return event


async def consumer_role(params: dict[str, Any]) -> None:
    """Follows every session's audio-out stream (or events stream, `follows`) with one
    XREAD until `until`."""
    import hiredis

    from vlpipe.shared.keys import StreamKeys
    from vlpipe.shared.streams import packed_args, packed_xread

    keys = StreamKeys(params["prefix"])
    follows = params["follows"]
    answer_of = answer_audio(follows)
    stream_of = keys.audio_out if follows == "audio-out" else keys.events
    streams = [stream_of(sid).encode() for sid in params["sids"]]
    packed_keys = packed_args(*streams)  # once: only the positions change between reads
    index = {key: i for i, key in enumerate(streams)}
    positions: list[bytes] = [b"0-0"] * len(streams)
    answers = Answers(until=params["until"])
    redis = await RespConnection.open(params["url"])
    await redis.call(hiredis.pack_command(("PING",)))
    emit(ready=True)
    while time.time() < answers.until:
        # XREAD COUNT 100 BLOCK 200 STREAMS <every followed key> <its last id>
        (reply,) = await redis.call(packed_xread(100, 200, packed_keys, positions))
        now = time.time()
        for key, entries in reply or ():
            i = index[key]
            for entry_id, flat in entries:
                positions[i] = entry_id
                audio = answer_of(dict(zip(flat[::2], flat[1::2], strict=True)))
                if audio is not None:
                    answers.audio(i, *audio, now, int(entry_id.partition(b"-")[0]) / 1000)
    await redis.close()
    emit(result=True, answers=answers.rows())


ROLES = {
    "null": null_server_role,
    "direct": direct_role,
    "producer": producer_role,
    "consumer": consumer_role,
}


# ==================================================================== figures (pure)


def start_ticks(n: int, start: str) -> list[int]:
    """The tick at which each session sends its first chunk. `together`: all at tick 0, so
    every session completes its 3 s blocks on the same tick and all N answers start in the
    same millisecond (a worst case: a burst of N answers' events at once). `staggered`:
    spread evenly over one block, as calls that began at different times (one in
    `BLOCK_TICKS / n` ticks completes a block on each tick)."""
    if start == "together":
        return [0] * n
    return [i * BLOCK_TICKS // n for i in range(n)]


def phase_offset_s(phase: int, phases: int) -> float:
    """When, within each 20 ms tick, the calls of `phase` send (call i is in phase
    `i % phases`): `--phases 1` sends every call's chunk on the tick itself; more spread
    the calls' clocks over the tick, as calls that began at unrelated moments are."""
    return phase * TICK_S / phases


def percentile(values: list[float], q: int) -> float:
    if not values:
        return math.nan
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


@dataclass
class Turns:
    expected: int  # answers due to blocks completed within the window
    latency_ms: list[float]  # tick of the completing chunk -> first answer audio
    uplink_ms: list[float]  # that tick -> the server starting the answer
    downlink_ms: list[float]  # the server starting the answer -> first audio received
    delivered: float  # share of the expected answer audio received by the deadline
    ticker_late_ms: list[float]  # each tick's start against the 20 ms schedule
    # The pipeline's downlink split at its audio-out entry's id (Redis's clock, whole ms):
    to_redis_ms: list[float] = field(default_factory=list)  # the server -> the entry
    from_redis_ms: list[float] = field(default_factory=list)  # the entry -> the consumer


def turn_figures(
    t0: float, ticks: list[float], rows: Iterable[list[float]], starts: list[int],
    warmup: float, seconds: float, phases: int = 1, sessions: Iterable[int] | None = None,
) -> Turns:  # fmt: skip
    """Turns of answers to blocks completed by ticks in the window [warmup, warmup+seconds)
    (session i sent its first chunk on tick `starts[i]`, `phase_offset_s` into each tick),
    of `sessions` (all of them unless said: those one process of the direct app ran)."""
    first_tick, end_tick = round(warmup / TICK_S), round((warmup + seconds) / TICK_S)
    seen = {(int(r[0]), int(r[1])): r[2:] for r in rows}
    turns = Turns(expected=0, latency_ms=[], uplink_ms=[], downlink_ms=[], delivered=0.0,
                  ticker_late_ms=[(t - t0 - k * TICK_S) * 1000 for k, t in enumerate(ticks)])  # fmt: skip
    delivered = 0.0
    for session in range(len(starts)) if sessions is None else sessions:
        start = starts[session]
        # The tick that completes block m: the session's (m * BLOCK_TICKS)th chunk.
        completing = {m: start + m * BLOCK_TICKS - 1
                      for m in range(1, (len(ticks) - start) // BLOCK_TICKS + 1)}  # fmt: skip
        numbers = [m for m, k in completing.items() if first_tick <= k < end_tick]
        turns.expected += len(numbers)
        for m in numbers:
            got = seen.get((session, m))
            if got is None:
                continue
            first, stamp, in_time, *written = got
            tick = ticks[completing[m]] + phase_offset_s(session % phases, phases)
            turns.latency_ms.append((first - tick) * 1000)
            turns.uplink_ms.append((stamp - tick) * 1000)
            turns.downlink_ms.append((first - stamp) * 1000)
            if written and not math.isnan(written[0]):
                turns.to_redis_ms.append((written[0] - stamp) * 1000)
                turns.from_redis_ms.append((first - written[0]) * 1000)
            delivered += in_time
    if turns.expected:
        turns.delivered = delivered / (turns.expected * ANSWER_DELTAS * DELTA_BYTES)
    return turns


def merged_turns(parts: list[Turns]) -> Turns:
    """The turns of the direct app's processes as one app's (each process's ticker is timed
    against its own schedule)."""
    expected = sum(t.expected for t in parts)
    return Turns(
        expected=expected,
        latency_ms=[x for t in parts for x in t.latency_ms],
        uplink_ms=[x for t in parts for x in t.uplink_ms],
        downlink_ms=[x for t in parts for x in t.downlink_ms],
        delivered=sum(t.delivered * t.expected for t in parts) / expected if expected else 0.0,
        ticker_late_ms=[x for t in parts for x in t.ticker_late_ms],
    )


# ==================================================================== child processes


class StartFailed(RuntimeError):
    pass


@dataclass
class Child:
    """A child process with its output in a log file (roles: JSON lines on stdout)."""

    name: str
    proc: asyncio.subprocess.Process
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "\n".join(f"    {line[:300]}" for line in text)

    async def message(self, key: str, within: float) -> dict[str, Any]:
        """The next JSON line that has `key` (a role's `ready` or `result`)."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + within
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = await asyncio.wait_for(self.proc.stdout.readline(), max(0.1, remaining))
            except TimeoutError:
                raise StartFailed(
                    f"{self.name} did not report {key!r} within {within:.0f} s; its log:\n"
                    + self.tail()
                ) from None
            if not line:
                await self.proc.wait()
                raise StartFailed(
                    f"{self.name} exited with {self.proc.returncode} before reporting "
                    f"{key!r}; its log:\n{self.tail()}"
                )
            with contextlib.suppress(ValueError):
                message: dict[str, Any] = json.loads(line)
                if "error" in message:
                    raise StartFailed(f"{self.name}: {message['error']}")
                if key in message:
                    return message


class Children:
    """Every process this run started, stopped on the way out whatever happens."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.running: list[Child] = []

    async def start(self, name: str, args: list[str], env: dict[str, str] | None = None,
                    stdout_pipe: bool = False) -> Child:  # fmt: skip
        log = self.logs / f"{name}.log"
        with log.open("ab") as out:
            proc = await asyncio.create_subprocess_exec(
                *args, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE if stdout_pipe else out, stderr=out,
                limit=64 * 2**20,  # a role's result is one JSON line: every tick and answer
            )  # fmt: skip
        child = Child(name, proc, log)
        self.running.append(child)
        return child

    async def role(self, name: str, role: str, params: dict[str, Any]) -> Child:
        args = [sys.executable, str(SCRIPT), "--role", role, json.dumps(params)]
        return await self.start(name, args, stdout_pipe=True)

    async def stop(self, *children: Child, within: float = 15.0) -> None:
        """SIGTERM (the services hand their sessions over and exit), then SIGKILL."""
        for child in children:
            if child.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(signal.SIGTERM)
        for child in children:
            try:
                await asyncio.wait_for(child.proc.wait(), within)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.kill()
                await child.proc.wait()
            if child in self.running:
                self.running.remove(child)

    async def stop_all(self) -> None:
        await self.stop(*self.running, within=5.0)


def http_get(port: int, path: str) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as reply:
            text: str = reply.read().decode()
            return text
    except OSError:
        return None


def says_ready(port: int) -> Callable[[], bool]:
    """Whether the service whose HTTP port is `port` says it is ready (`/readyz`)."""
    return lambda: "ready" in (http_get(port, "/readyz") or "")


async def wait_for(what: str, ready: Callable[[], bool], within: float,
                   watch: Iterable[Child] = (), tails: Iterable[Child] = ()) -> None:  # fmt: skip
    """Poll `ready` until true; fail with the logs if a watched child exits or time runs out."""
    deadline = time.monotonic() + within
    while not await asyncio.to_thread(ready):
        for child in watch:
            if child.proc.returncode is not None:
                raise StartFailed(f"{child.name} exited with {child.proc.returncode} while "
                                  f"waiting for {what}; its log:\n{child.tail()}")  # fmt: skip
        if time.monotonic() > deadline:
            logs = "".join(f"\n  {c.name}:\n{c.tail()}" for c in tails)
            raise StartFailed(f"{what}: not within {within:.0f} s{logs}")
        await asyncio.sleep(0.2)


# ==================================================================== measuring a window


def cpu_seconds(proc: psutil.Process) -> float:
    """User + system CPU of `proc`, of its children it has reaped, and of live children."""
    times = proc.cpu_times()
    total: float = times.user + times.system + times.children_user + times.children_system
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            child_times = child.cpu_times()
            total += child_times.user + child_times.system
    return total


def wake_ups(proc: psutil.Process) -> int:
    """How many times the main threads of `proc` and of its live children blocked and were
    woken (voluntary context switches): on a virtual machine each costs tens of µs of CPU
    (`bench/wakeup_cost.py`), and a pipeline of processes pays it at every hop."""
    total: int = proc.num_ctx_switches().voluntary
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += child.num_ctx_switches().voluntary
    return total


@dataclass
class Window:
    wall_s: float
    cpu_s: dict[str, float]  # per measured process
    rss: dict[str, int]  # at the end of the window
    machine_percent: float  # all cores, 100 = every core busy
    null_appends: int
    null_bytes: int
    redis_calls: dict[str, tuple[int, int]]  # pipeline: command -> (calls, server usec)
    gc_ms: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Per service: its processes' garbage collection pauses in the window, (total,
    longest), from their /metrics (`vlpipe.process.gc_pause`, `gc_longest_pause`)."""
    wakes: dict[str, int] = field(default_factory=dict)
    """Per measured process: its wake-ups in the window (`wake_ups`)."""


def gc_pauses(port: int) -> tuple[float, float]:
    """A service's total GC pause so far and its longest since the last scrape, in ms."""
    total = longest = 0.0
    for line in (http_get(port, "/metrics") or "").splitlines():
        if line.startswith("vlpipe_process_gc_pause_milliseconds_total{"):
            total += float(line.rpartition(" ")[2])
        elif line.startswith("vlpipe_process_gc_longest_pause_milliseconds"):
            longest = float(line.rpartition(" ")[2])
    return total, longest


async def commandstats(redis: Any) -> dict[str, tuple[int, int]]:
    """`INFO commandstats`: per command, calls and the server's time in it (usec)."""
    info = await redis.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): (int(stat["calls"]), int(stat["usec"]))
        for name, stat in info.items()
    }


async def sleep_until(wall: float) -> None:
    await asyncio.sleep(max(0.0, wall - time.time()))


async def measure_window(pids: dict[str, int | list[int]], null_port: int, start: float,
                         seconds: float, redis: Any = None,
                         metrics_ports: dict[str, list[int]] | None = None) -> Window:  # fmt: skip
    """CPU, memory and the null server's input over [start, start + seconds] (wall clock);
    with `redis`, also the commands the pipeline sent it; with `metrics_ports` (a
    service's processes' HTTP ports), their GC pauses. A name with several pids (the
    replicas of a service) gets their sums."""
    ports = metrics_ports or {}
    procs = {name: [psutil.Process(pid) for pid in (pid_or if isinstance(pid_or, list)
                                                     else [pid_or])]
             for name, pid_or in pids.items()}  # fmt: skip
    await sleep_until(start)
    began = time.monotonic()
    psutil.cpu_percent(interval=None)  # starts the machine-wide count
    cpu0 = {name: sum(map(cpu_seconds, ps)) for name, ps in procs.items()}
    wakes0 = {name: sum(map(wake_ups, ps)) for name, ps in procs.items()}
    stats0 = await asyncio.to_thread(http_get, null_port, "/stats")
    null0 = json.loads(stats0 or "{}")
    calls0 = await commandstats(redis) if redis is not None else {}
    gc0 = {name: [await asyncio.to_thread(gc_pauses, p) for p in ps] for name, ps in ports.items()}
    await sleep_until(start + seconds)
    gc1 = {name: [await asyncio.to_thread(gc_pauses, p) for p in ps] for name, ps in ports.items()}
    cpu1 = {name: sum(map(cpu_seconds, ps)) for name, ps in procs.items()}
    wakes1 = {name: sum(map(wake_ups, ps)) for name, ps in procs.items()}
    machine = psutil.cpu_percent(interval=None)
    stats1 = await asyncio.to_thread(http_get, null_port, "/stats")
    null1 = json.loads(stats1 or "{}")
    calls1 = await commandstats(redis) if redis is not None else {}
    wall = time.monotonic() - began
    calls = {
        name: (c - calls0.get(name, (0, 0))[0], u - calls0.get(name, (0, 0))[1])
        for name, (c, u) in calls1.items()
        if name != "info"  # this function's own
    }
    return Window(
        wall_s=wall, cpu_s={name: cpu1[name] - cpu0[name] for name in procs},
        rss={name: sum(p.memory_info().rss for p in ps) for name, ps in procs.items()},
        machine_percent=machine,
        null_appends=null1.get("appends", 0) - null0.get("appends", 0),
        null_bytes=null1.get("append_bytes", 0) - null0.get("append_bytes", 0),
        redis_calls={name: got for name, got in calls.items() if got[0] > 0},
        gc_ms={name: (sum(b[0] - a[0] for a, b in zip(gc0[name], gc1[name], strict=True)),
                      max(b[1] for b in gc1[name]))
               for name in ports},
        wakes={name: wakes1[name] - wakes0[name] for name in procs},
    )  # fmt: skip


@dataclass
class ModeResult:
    mode: str
    n: int
    window: Window
    transport: tuple[str, ...]  # the processes whose CPU is the mode's cost
    idle_rss: dict[str, int]
    turns: Turns
    busy_before: float = math.nan  # the machine's CPU use (%) just before the mode ran

    @property
    def cpu_ms_per_audio_s(self) -> float:
        cpu = sum(self.window.cpu_s[name] for name in self.transport)
        return cpu * 1000 / (self.n * self.window.wall_s)

    def core_percent(self, name: str) -> float:
        return self.window.cpu_s.get(name, math.nan) * 100 / self.window.wall_s

    def wakes_per_s(self, name: str) -> float:
        return self.window.wakes.get(name, math.nan) / self.window.wall_s

    def rss_per_session_kib(self, name: str) -> float:
        if name not in self.idle_rss:
            return math.nan
        return (self.window.rss[name] - self.idle_rss[name]) / self.n / 1024

    @property
    def input_share(self) -> float:
        """Share of the window's input audio that the null server received in the window."""
        return self.window.null_bytes / (self.n * len(CHUNK) * self.window.wall_s / TICK_S)


# ==================================================================== the two modes


@dataclass
class Bench:
    children: Children
    null: Child
    null_port: int
    warmup: float
    seconds: float
    appendfsync: str
    telemetry: bool
    tmp: Path
    audio_in: bool
    """Sessions announce `audio_in pcm16` (direct input: the broker reads the chunks)."""
    start: str = "staggered"
    """`staggered` or `together` (`start_ticks`)."""
    replicas: int = 1
    """Processes of each service (sessions spread over them through the consumer groups)."""
    phases: int = 1
    """How many points in each 20 ms tick the calls send at (`phase_offset_s`)."""
    direct_processes: int = 1
    """Processes the direct app runs, the sessions dealt out over them (`--direct-processes`)."""
    pipelines: int = 0
    """Pipeline runs so far: each gets a Redis of its own (`--rounds` repeats an N)."""
    outputs: str = "broker"
    """Which service makes the outputs (`broker` or `egress`, `VLPIPE_OUTPUTS_BY`), or
    `events`: an experiment, egress not run and the consumer reading the broker's events
    (the pipeline's cost with no outputs made at all)."""

    @property
    def services(self) -> tuple[str, ...]:
        """The services the pipeline mode runs."""
        return ("ingest", "broker") if self.outputs == "events" else SERVICES

    def open_upstreams(self) -> int:
        return int(json.loads(http_get(self.null_port, "/stats") or '{"open": -1}')["open"])

    async def quiet_upstream(self) -> None:
        await wait_for("the null server's connections from the last run to close",
                       lambda: self.open_upstreams() == 0, 30)  # fmt: skip

    async def direct(self, n: int) -> ModeResult:
        await self.quiet_upstream()
        starts = start_ticks(n, self.start)
        params = {"endpoint": f"http://127.0.0.1:{self.null_port}", "sessions": n,
                  "warmup": self.warmup, "seconds": self.seconds, "starts": starts,
                  "phases": self.phases}  # fmt: skip
        shares = [list(range(p, n, self.direct_processes)) for p in range(self.direct_processes)]
        shares = [share for share in shares if share]
        apps = [await self.children.role(f"direct-{n}" + (f"-{p}" if p else ""), "direct",
                                         {**params, "indices": share})
                for p, share in enumerate(shares)]  # fmt: skip
        try:
            ready = [await app.message("ready", within=60 + n * 0.5) for app in apps]
            window = await measure_window(
                {"direct": [app.pid for app in apps], "null server": self.null.pid},
                self.null_port, max(r["t0"] for r in ready) + self.warmup, self.seconds,
            )  # fmt: skip
            results = [await app.message("result", within=self.seconds + GRACE_S + 60)
                       for app in apps]  # fmt: skip
        finally:
            await self.children.stop(*apps)
        turns = merged_turns([
            turn_figures(r["t0"], r["ticks"], r["answers"], starts, self.warmup, self.seconds,
                         self.phases, sessions=share)
            for r, share in zip(results, shares, strict=True)
        ])  # fmt: skip
        idle = {"direct": sum(r["idle_rss"] for r in ready)}
        return ModeResult("direct", n, window, ("direct",), idle, turns)

    def service_env(self, name: str, redis_url: str, prefix: str, http_port: int) -> dict[str, str]:
        env = {
            **os.environ,
            "VLPIPE_REDIS_URL": redis_url,
            "VLPIPE_STREAM_PREFIX": prefix,
            "VLPIPE_HTTP_HOST": "127.0.0.1",
            "VLPIPE_HTTP_PORT": str(http_port),
            "VLPIPE_BROKER_ENDPOINT": f"http://127.0.0.1:{self.null_port}",
            "VLPIPE_GATEWAY": "0",  # the consumer reads Redis; no WebSocket clients
            "VLPIPE_OUTPUTS_BY": "egress" if self.outputs == "egress" else "broker",
        }
        if not self.telemetry:
            env["OTEL_SDK_DISABLED"] = "true"
        return env

    async def pipeline(self, n: int) -> ModeResult:
        from vlpipe.shared.keys import StreamKeys
        from vlpipe.shared.redis_server import RedisServer, free_port
        from vlpipe.shared.streams import connect

        await self.quiet_upstream()
        prefix = f"pvd{n}"
        keys = StreamKeys(prefix)
        sids = [f"s{i}" for i in range(n)]
        # The class runs AOF with `always` (every acknowledged write survives a crash, which
        # the fault tests need); production runs `everysec` unless told otherwise.
        self.pipelines += 1
        server = RedisServer(
            self.tmp / f"redis-{n}-{self.pipelines}", extra_args=("--appendfsync", self.appendfsync)
        )
        server.start()
        started: list[Child] = []
        redis = connect(server.url)
        try:
            fsync = (await redis.config_get("appendfsync")).get("appendfsync")
            if fsync != self.appendfsync:
                raise StartFailed(f"redis-server runs appendfsync {fsync}, not {self.appendfsync}")
            replicas = [(name, r) for name in self.services for r in range(self.replicas)]
            ports = {replica: free_port() for replica in replicas}
            for name, r in replicas:
                started.append(await self.children.start(
                    f"{name}-{n}" + (f"-{r}" if r else ""),
                    [sys.executable, "-m", f"vlpipe.services.{name}"],
                    env=self.service_env(name, server.url, prefix, ports[name, r]),
                ))  # fmt: skip
            for child, replica in zip(started, replicas, strict=True):
                port = ports[replica]
                await wait_for(f"{replica[0]} ready (/readyz)", says_ready(port), 60,
                               watch=started, tails=[child])  # fmt: skip
            assert server.proc is not None
            pids: dict[str, int | list[int]] = {
                name: [c.pid for c, (of, _) in zip(started, replicas, strict=True) if of == name]
                for name in self.services
            }
            pids["redis-server"] = server.proc.pid
            idle_rss = {name: sum(psutil.Process(pid).memory_info().rss
                                  for pid in (p if isinstance(p, list) else [p]))
                        for name, p in pids.items()}  # fmt: skip
            audio_in = ("audio_in", "pcm16") if self.audio_in else ()
            async with redis.pipeline(transaction=False) as pipe:
                for sid in sids:
                    pipe.execute_command("XADD", keys.sessions, "*", "type", "start", "session",
                                         sid, "config", json.dumps(SESSION_CONFIG),
                                         "audio_out", "pcm16", *audio_in)  # fmt: skip
                await pipe.execute()
            await wait_for(f"the broker to open {n} upstream sessions",
                           lambda: self.open_upstreams() == n, 60 + n * 0.5, watch=started,
                           tails=started)  # fmt: skip
            t0 = time.time() + 3.0  # the producer and consumer start in well under that
            until = t0 + self.warmup + self.seconds + GRACE_S
            starts = start_ticks(n, self.start)
            base = {"url": server.url, "prefix": prefix, "sids": sids, "starts": starts,
                    "phases": self.phases}  # fmt: skip
            follows = "events" if self.outputs == "events" else "audio-out"
            consumer = await self.children.role(f"consumer-{n}", "consumer",
                                                {**base, "until": until, "follows": follows})  # fmt: skip
            producer = await self.children.role(
                f"producer-{n}", "producer", {**base, "t0": t0, "duration": until - t0}
            )
            started += [consumer, producer]
            await consumer.message("ready", within=t0 - time.time())
            metrics_ports = {name: [ports[of, r] for of, r in replicas if of == name]
                             for name in self.services}  # fmt: skip
            harness = {"null server": self.null.pid, "producer": producer.pid,
                       "consumer": consumer.pid}  # fmt: skip
            window = await measure_window({**pids, **harness},
                                          self.null_port, t0 + self.warmup, self.seconds,
                                          redis, metrics_ports)  # fmt: skip
            produced = await producer.message("result", within=until - time.time() + 60)
            consumed = await consumer.message("result", within=until - time.time() + 60)
        finally:
            await redis.aclose()
            await self.children.stop(*started)
            server.stop()
        turns = turn_figures(t0, produced["ticks"], consumed["answers"], starts, self.warmup,
                             self.seconds, self.phases)  # fmt: skip
        transport = (*self.services, "redis-server")
        return ModeResult("pipeline", n, window, transport, idle_rss, turns)


# ==================================================================== report


def fmt(value: float, digits: int = 1) -> str:
    return "—" if math.isnan(value) else f"{value:.{digits}f}"


def ms_pair(values: list[float]) -> str:
    return f"{fmt(percentile(values, 50))} / {fmt(percentile(values, 99))}"


def signed(value: float) -> str:
    if math.isnan(value):
        return "—"
    return f"+{value:.1f}" if value >= 0 else f"{value:.1f}"


def machine_line(args: argparse.Namespace) -> str:
    cpu_model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    from vlpipe.shared.redis_server import find_redis_server

    redis_version = subprocess.run([find_redis_server() or "redis-server", "--version"],
                                   capture_output=True, text=True).stdout.split()  # fmt: skip
    version = next((w.removeprefix("v=") for w in redis_version if w.startswith("v=")), "?")
    return (
        f"{psutil.cpu_count()} cores ({cpu_model}), Python {platform.python_version()}, "
        f"redis-server {version} with AOF appendfsync {args.appendfsync}, telemetry "
        f"{args.telemetry}, {args.input} input, sessions started {args.start}, "
        f"{args.replicas} process(es) of each service, {args.direct_processes} of the "
        f"direct app, calls sending at "
        f"{args.phases} point(s) of each 20 ms tick; "
        f"window {args.seconds:g} s after a "
        f"{args.warmup:g} s warm-up"
        + {"broker": "; outputs made by the broker", "egress": "; outputs made by egress",
           "events": "; egress not run, the consumer reads the broker's events "
                     "(`--outputs events`)"}[args.outputs]
    )  # fmt: skip


def per_process_table(
    results: list[tuple[ModeResult, ModeResult]],
    figure: Callable[[ModeResult, str], float],
    digits: int,
) -> list[str]:
    """A table of one figure per process (`figure(result, name)`): the pipeline's
    services and redis-server, their sum, the direct app, and the processes in neither
    mode's cost (the null server in both modes, the pipeline's producer and consumer)."""

    def cell(result: ModeResult, name: str) -> str:
        return fmt(figure(result, name), digits)

    rows = [
        "| N | ingest | broker | egress | redis-server | pipeline total | direct app "
        "| null server (pipeline / direct) | producer / consumer |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for pipe, direct in results:
        services = " | ".join(cell(pipe, name) for name in (*SERVICES, "redis-server"))
        total = fmt(sum(figure(pipe, name) for name in pipe.transport), digits)
        rows.append(
            f"| {pipe.n} | {services} | {total} | {cell(direct, 'direct')} "
            f"| {cell(pipe, 'null server')} / {cell(direct, 'null server')} "
            f"| {cell(pipe, 'producer')} / {cell(pipe, 'consumer')} |"
        )
    return rows


def report(results: list[tuple[ModeResult, ModeResult]]) -> str:
    out = [
        "| N | pipeline ms CPU / audio-s | direct | ratio | added turn latency p50 / p99 "
        "| audio in time pipeline / direct | machine CPU during (before) pipeline / direct |",
        "|---|---|---|---|---|---|---|",
    ]
    for pipe, direct in results:
        p, d = pipe.turns, direct.turns
        added = (f"{signed(percentile(p.latency_ms, 50) - percentile(d.latency_ms, 50))} / "
                 f"{signed(percentile(p.latency_ms, 99) - percentile(d.latency_ms, 99))} ms")  # fmt: skip
        out.append(
            f"| {pipe.n} | {fmt(pipe.cpu_ms_per_audio_s)} | {fmt(direct.cpu_ms_per_audio_s)} "
            f"| {pipe.cpu_ms_per_audio_s / direct.cpu_ms_per_audio_s:.1f}× | {added} "
            f"| {p.delivered:.1%} / {d.delivered:.1%} "
            f"| {pipe.window.machine_percent:.0f}% ({pipe.busy_before:.0f}%) / "
            f"{direct.window.machine_percent:.0f}% ({direct.busy_before:.0f}%) |"
        )
    out += [
        "",
        "CPU in % of one core (the null server, the upstream stand-in, and the pipeline's "
        "producer and consumer, the callers' own machines, are in neither figure):",
        "",
        *per_process_table(results, ModeResult.core_percent, digits=1),
        "",
        "Wake-ups a second (each time a process's main thread blocked and was woken; on a "
        "virtual machine each costs tens of µs):",
        "",
        *per_process_table(results, ModeResult.wakes_per_s, digits=0),
    ]
    out += [
        "",
        "Resident memory per session, KiB (RSS at the window's end minus idle, / N):",
        "",
        "| N | ingest | broker | egress | redis-server | direct app |",
        "|---|---|---|---|---|---|",
    ]
    for pipe, direct in results:
        cells = [fmt(pipe.rss_per_session_kib(name), 0) for name in (*SERVICES, "redis-server")]
        out.append(
            f"| {pipe.n} | {' | '.join(cells)} | {fmt(direct.rss_per_session_kib('direct'), 0)} |"
        )
    out += [
        "",
        "Turns, ms p50 / p99: end to end (tick to first answer audio), split at the null "
        "server's stamp into uplink (tick to answer started) and downlink (to first audio "
        "received); input = the window's input audio the null server got within it; "
        "appends/s = input_audio_buffer.append messages it got per second:",
        "",
        "| N | mode | turns (due) | end to end | uplink | downlink | ticker late | input "
        "| appends/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for pair in results:
        for r in pair:
            t = r.turns
            out.append(
                f"| {r.n} | {r.mode} | {len(t.latency_ms)} ({t.expected}) | {ms_pair(t.latency_ms)} "
                f"| {ms_pair(t.uplink_ms)} | {ms_pair(t.downlink_ms)} | {ms_pair(t.ticker_late_ms)} "
                f"| {r.input_share:.1%} | {r.window.null_appends / r.window.wall_s:.0f} |"
            )
    out += [
        "",
        "The pipeline's downlink split at its first audio-out entry's id (Redis's clock, in "
        "whole ms, so each part is ±1 ms): the null server to that entry written (the broker "
        "receiving, writing, Redis running the write) / the entry to the consumer, ms p50 / "
        "p99:",
        "",
    ]
    for pipe, _ in results:
        t = pipe.turns
        out.append(f"- N={pipe.n}: {ms_pair(t.to_redis_ms)} / {ms_pair(t.from_redis_ms)}")
    out += ["", "Garbage collection pauses in the window, ms in all / the longest:", ""]
    for pipe, _ in results:
        pauses = ", ".join(f"{name} {fmt(total)} / {fmt(longest)}"
                           for name, (total, longest) in pipe.window.gc_ms.items())  # fmt: skip
        out.append(f"- N={pipe.n}: {pauses}")
    out += [
        "",
        "Redis commands per input frame (N × 50 frames/s) in the pipeline, and redis-server's "
        "own time in each (µs per frame):",
        "",
    ]
    for pipe, _ in results:
        frames = pipe.n * pipe.window.wall_s / TICK_S
        ranked = sorted(pipe.window.redis_calls.items(), key=lambda kv: -kv[1][0])
        total = sum(c for c, _ in pipe.window.redis_calls.values())
        commands = ", ".join(f"{name} {c / frames:.2f} ({u / frames:.1f} µs)"
                             for name, (c, u) in ranked)  # fmt: skip
        out.append(f"- N={pipe.n}: {total / frames:.2f} commands per frame: {commands}")
    return "\n".join(out)


def ratio_spread(results: list[tuple[ModeResult, ModeResult]]) -> str:
    """Per N, the pipeline/direct CPU ratio of each round and their median: on a shared
    host one run's ratio moves by ±10% with the host's own speed."""
    by_n: dict[int, list[float]] = {}
    for pipe, direct in results:
        by_n.setdefault(pipe.n, []).append(pipe.cpu_ms_per_audio_s / direct.cpu_ms_per_audio_s)
    lines = ["Pipeline / direct CPU over the rounds (each round runs both modes):", ""]
    for n, ratios in by_n.items():
        each = ", ".join(f"{r:.2f}×" for r in ratios)
        lines.append(f"- N={n}: median {statistics.median(ratios):.2f}× ({each})")
    return "\n".join(lines)


# ==================================================================== main


async def quiet_machine(busy_above: float, patience: float) -> float:
    """The machine's CPU use (%) over 2 s, after waiting up to `patience` seconds for it to
    drop to `busy_above` or less: others' work on a shared machine skews the figures."""
    deadline = time.monotonic() + patience
    while True:
        busy: float = await asyncio.to_thread(psutil.cpu_percent, 2.0)
        if busy <= busy_above or time.monotonic() > deadline:
            if busy > busy_above:
                print(f"machine still {busy:.0f}% busy after {patience:.0f} s; measuring anyway "
                      "(figures will be noisy)", flush=True)  # fmt: skip
            return busy
        print(f"machine {busy:.0f}% busy; waiting for it to calm down", flush=True)
        await asyncio.sleep(10)


async def run(args: argparse.Namespace) -> None:
    sessions = [int(s) for s in args.sessions.split(",") if s.strip()]
    print(machine_line(args), flush=True)
    results: list[tuple[ModeResult, ModeResult]] = []
    with tempfile.TemporaryDirectory(prefix="vlpipe-pvd-") as tmp:
        children = Children(Path(tmp))
        try:
            from vlpipe.shared.redis_server import free_port

            null_port = free_port()
            null = await children.role("null server", "null", {"port": null_port})
            await null.message("ready", within=30)
            bench = Bench(children, null, null_port, args.warmup, args.seconds,
                          args.appendfsync, args.telemetry == "on", Path(tmp),
                          args.input == "direct", args.start, args.replicas,
                          args.phases, args.direct_processes,
                          outputs=args.outputs)  # fmt: skip
            for n in sessions:
                for round_ in range(args.rounds):
                    # Alternate which mode goes first: the host's speed drifts over minutes.
                    order = [bench.direct, bench.pipeline][:: -1 if round_ % 2 else 1]
                    modes = {}
                    for mode in order:
                        before = await quiet_machine(args.busy_above, args.busy_wait)
                        result = await mode(n)
                        result.busy_before = before
                        print(f"N={n} {result.mode:<8} {result.cpu_ms_per_audio_s:6.1f} ms "
                              f"CPU/audio-s, machine {before:.0f}% before, "
                              f"{result.window.machine_percent:.0f}% during; audio in time "
                              f"{result.turns.delivered:.1%}", flush=True)  # fmt: skip
                        modes[result.mode] = result
                    results.append((modes["pipeline"], modes["direct"]))
        except StartFailed as exc:
            raise SystemExit(f"benchmark stopped: {exc}") from None
        finally:
            await children.stop_all()
            if results:  # also what was measured before a failure or Ctrl-C
                done = len(results) == len(sessions) * args.rounds
                print(f"\n{machine_line(args)}" + ("" if done else "; stopped early") + "\n")
                print(report(results), flush=True)
                if args.rounds > 1:
                    print("\n" + ratio_spread(results), flush=True)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--role":
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(ROLES[sys.argv[2]](json.loads(sys.argv[3])))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sessions", default="1,25,50,100", help="comma-separated N")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured window")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument(
        "--busy-above",
        type=float,
        default=25.0,
        help="before each mode, wait while the machine is busier than this %%",
    )
    parser.add_argument(
        "--busy-wait", type=float, default=120.0, help="...but at most this many seconds"
    )
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure each N this many times, both modes each time, "
                        "alternating which goes first; prints the ratio's median")  # fmt: skip
    parser.add_argument("--appendfsync", choices=["everysec", "always"], default="everysec")
    parser.add_argument("--telemetry", choices=["on", "off"], default="on",
                        help="off: the services run with OTEL_SDK_DISABLED=true")  # fmt: skip
    parser.add_argument(
        "--replicas", type=int, default=1, help="processes of each service (default 1)"
    )
    parser.add_argument("--phases", type=int, default=1,
                        help="the points of each 20 ms tick the calls send at (call i at "
                        "i %% PHASES / PHASES of it): 1, every call on the tick; more, "
                        "calls whose clocks are not aligned, as real calls' are not")  # fmt: skip
    parser.add_argument("--direct-processes", type=int, default=1,
                        help="processes of the direct app, the sessions dealt out over them "
                        "(1: one process holds every client; one a core is how an app "
                        "would run hundreds of calls)")  # fmt: skip
    parser.add_argument("--input", choices=["direct", "ingest"], default="direct",
                        help="direct: sessions announce audio_in pcm16, so the broker reads "
                        "the producer's chunks itself; ingest: they go through ingest")  # fmt: skip
    parser.add_argument("--start", choices=["staggered", "together"], default="staggered",
                        help="staggered: the calls begin one after another over a 3 s block, "
                        "so their turns end at different ticks; together: all on the first "
                        "tick, so all N answers start at once (a burst)")  # fmt: skip
    parser.add_argument("--outputs", choices=["broker", "egress", "events"], default="broker",
                        help="the service that makes the outputs (VLPIPE_OUTPUTS_BY); events "
                        "(an experiment): egress does not run and the consumer reads the "
                        "broker's events streams, no outputs made at all")  # fmt: skip
    args = parser.parse_args()
    if args.start == "staggered" and args.warmup < BLOCK_TICKS * TICK_S:
        parser.error(f"--start staggered needs --warmup >= {BLOCK_TICKS * TICK_S:g} s: the "
                     "last call begins one block after the first")  # fmt: skip

    async def guarded() -> None:
        # Ctrl-C and SIGTERM cancel the run, so every child is stopped on the way out (also
        # when started from a script that ignores SIGINT for background jobs).
        task = asyncio.current_task()
        assert task is not None
        for signum in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(signum, task.cancel)
        await run(args)

    with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):
        asyncio.run(guarded())


if __name__ == "__main__":
    main()
