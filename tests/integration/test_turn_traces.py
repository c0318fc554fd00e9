"""Turn traces beyond a single turn, over the real pipeline and the local engine: a session
of several user turns is several traces, and a turn the user talked over is marked.

What the broker wrote is followed on the session's events stream (each event carries the
`traceparent` of the turn it was written in); what the services traced arrives at an
in-process OTLP receiver.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import re
import socket
import threading
import wave
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis

from tests.integration.pipeline import outputs_done, running_pipeline
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan, otlp_receiver
from tests.waiting import wait_until
from vlpipe.services.engine.server import running_engine
from vlpipe.shared.contracts import Event, decode
from vlpipe.shared.keys import StreamKeys

RATE = 16000
CHUNK = 3200  # 100 ms of 16 kHz PCM16, sent every 25 ms: 4x real time, as a live call
T = TypeVar("T")


def silence(ms: int) -> bytes:
    return b"\0\0" * (RATE * ms // 1000)


def read_speech(path: Path) -> bytes:
    with wave.open(str(path)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (RATE, 1, 2)
        return bytes(w.readframes(w.getnframes()))


def only(items: list[T], what: str) -> T:
    assert len(items) == 1, f"expected one {what}, got {len(items)}: {items}"
    return items[0]


def trace_of(traceparent: str | None) -> str:
    assert traceparent, "an event written during a turn carries the turn's traceparent"
    return traceparent.split("-")[1]


@dataclass
class Run:
    """A session driven through the pipeline: what the broker wrote, what was traced."""

    sid: str
    events: list[Event] = field(default_factory=list)
    spans: list[ReceivedSpan] = field(default_factory=list)
    metrics: dict[str, list[Any]] = field(default_factory=dict)

    def of_type(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.type == kind]

    def named(self, name: str) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.name == name]

    def traces(self) -> dict[str, list[ReceivedSpan]]:
        grouped: dict[str, list[ReceivedSpan]] = defaultdict(list)
        for span in self.spans:
            grouped[span.trace_id].append(span)
        return grouped

    def turn_in(self, trace_id: str) -> ReceivedSpan:
        """The one `vlpipe.turn` of a trace (one turn, one trace)."""
        turns = [s for s in self.traces()[trace_id] if s.name == "vlpipe.turn"]
        return only(turns, f"vlpipe.turn in trace {trace_id}")

    def turn_answering(self, response_id: str) -> ReceivedSpan:
        turns = self.named("vlpipe.turn")
        answering = [s for s in turns if s.attributes.get("gen_ai.response.id") == response_id]
        return only(answering, f"vlpipe.turn answering {response_id}")

    def histogram_count(self, name: str) -> int:
        """Cumulative count in the last export (none exported: nothing was recorded)."""
        exported = self.metrics.get(name)
        return sum(p.count for p in exported[-1].histogram.data_points) if exported else 0

    def counter(self, name: str) -> int:
        exported = self.metrics.get(name)
        return sum(p.as_int for p in exported[-1].sum.data_points) if exported else 0


class Talk:
    """The producer's side of a live call: speech in, the broker's events watched."""

    def __init__(self, redis: aioredis.Redis, keys: StreamKeys, run: Run) -> None:
        self.redis, self.keys, self.run = redis, keys, run
        self.seq = 0

    async def say(self, pcm: bytes) -> None:
        for start in range(0, len(pcm), CHUNK):
            await self.redis.xadd(
                self.keys.audio(self.run.sid),
                {"audio": pcm[start : start + CHUNK], "rate": str(RATE), "seq": str(self.seq)},
            )
            self.seq += 1
            await asyncio.sleep(0.025)

    async def until(self, seen: Callable[[list[Event]], bool], within: float = 30) -> None:
        async def met() -> bool:
            return seen(self.run.events)

        await wait_until(met, within=within)


class StreamTap(threading.Thread):
    """Every entry written to one stream, in order, as Redis's MONITOR reports the XADDs.

    Reading the stream itself would not do: egress trims it behind what it has read, as
    it goes, so a reader that falls a few milliseconds behind (the in-process engine keeps
    the test's process busy) loses entries. Redis queues MONITOR's output for as long as
    it takes, so nothing written is missed.
    """

    ARG = re.compile(rb'"((?:[^"\\]|\\.)*)"')  # one quoted argument, escapes kept

    def __init__(self, redis_url: str, key: str) -> None:
        super().__init__(daemon=True)
        url = urlsplit(redis_url)
        self.sock = socket.create_connection((url.hostname or "127.0.0.1", url.port or 6379))
        self.sock.sendall(b"MONITOR\r\n")
        reply = b""
        while not reply.endswith(b"\r\n"):
            reply += self.sock.recv(1)
        assert reply == b"+OK\r\n", reply
        self.xadd = b'"XADD" "%s"' % key.encode()
        self.events: list[Event] = []

    def run(self) -> None:
        pending = b""
        while chunk := self._recv():
            *lines, pending = (pending + chunk).split(b"\r\n")
            for line in lines:
                if self.xadd in line:
                    self.events.append(decode(Event, self._fields(line)))

    def _recv(self) -> bytes:
        """The next bytes; none once the connection closed, by either side or by a reset
        (redis-server stopping at the end of the run resets it)."""
        try:
            return self.sock.recv(1 << 20)
        except ConnectionResetError:
            return b""

    def close(self) -> None:
        with suppress(OSError):  # already reset
            self.sock.shutdown(socket.SHUT_RDWR)
        self.join()
        self.sock.close()

    def _fields(self, line: bytes) -> dict[bytes, bytes]:
        """`+TIME [DB CLIENT] "XADD" "KEY" [options] "ID" "FIELD" "VALUE" ...`, each argument
        escaped as Python escapes bytes (\\xHH, \\n, \\", ...)."""
        args = [
            codecs.escape_decode(m.group(1))[0]
            for m in self.ARG.finditer(line, line.index(b'] "') + 2)
        ]
        i = 2
        while args[i].upper() in (b"NOMKSTREAM", b"MAXLEN", b"MINID", b"=", b"~", b"LIMIT") or (
            args[i - 1].upper() in (b"MAXLEN", b"MINID", b"=", b"~", b"LIMIT")
        ):
            i += 1  # an option, or an option's value
        values = args[i + 1 :]  # after the entry's id
        return dict(zip(values[::2], values[1::2], strict=True))


@asynccontextmanager
async def live_session(
    redis_url: str,
    redis: aioredis.Redis,
    keys: StreamKeys,
    otlp: OtlpReceiver,
    sid: str,
    config: dict[str, Any],
    **engine: Any,
) -> AsyncIterator[Talk]:
    """Engine, pipeline and a subscribed listener; the session starts on entry and is ended
    (and fully delivered by egress) on exit."""
    run = Run(sid)
    async with (
        running_engine(**engine) as upstream,
        running_pipeline(
            redis_url, keys.prefix, upstream.endpoint,
            OTEL_EXPORTER_OTLP_ENDPOINT=otlp.endpoint, OTEL_BSP_SCHEDULE_DELAY="200",
            OTEL_METRIC_EXPORT_INTERVAL="500",
        ) as pipeline,
        pipeline.connect(f"/v1/subscribe?session={sid}") as client,
    ):  # fmt: skip
        await client.recv()  # subscribed: a consumer hears the answers
        tap = StreamTap(redis_url, keys.events(sid))
        run.events = tap.events
        tap.start()
        try:
            await redis.xadd(
                keys.sessions, {"type": "start", "session": sid, "config": json.dumps(config)}
            )
            talk = Talk(redis, keys, run)
            yield talk
            await redis.xadd(keys.sessions, {"type": "end", "session": sid})

            async def delivered() -> bool:
                return await outputs_done(redis, keys, sid)

            await wait_until(delivered, within=60)
            await talk.until(lambda evs: any(e.type == "vlpipe.session.ended" for e in evs))
        finally:
            tap.close()
    # The services exported their last spans and metrics as they stopped.
    with otlp.lock:
        run.spans = list(otlp.spans)
        run.metrics = {name: list(ms) for name, ms in otlp.metrics.items()}
    # Numbered from 0 without a gap: every event the broker wrote, once.
    assert [e.seq for e in run.events] == list(range(len(run.events)))


async def test_each_user_turn_of_a_session_is_a_trace_of_its_own(
    redis_url: str, redis: aioredis.Redis, keys: StreamKeys, speech_wav: Path
) -> None:
    # A short silence makes each of the recording's phrases a turn of its own.
    config = {"input_audio_format": "pcm16_16000hz",
              "turn_detection": {"type": "server_vad", "silence_duration_ms": 500}}  # fmt: skip
    with otlp_receiver() as otlp:
        async with live_session(
            redis_url, redis, keys, otlp, "mt1", config, model="local", output_pace=0
        ) as talk:
            await talk.say(read_speech(speech_wav) + silence(2000))
        run = talk.run

    # How many turns the engine made, as the events stream says: several.
    speech = run.of_type("input_audio_buffer.speech_started")
    assert len(speech) >= 2, [e.type for e in run.events]
    start = only(run.named("vlpipe.session.start"), "session start")
    traces = run.traces()

    # Each utterance opened a turn in a trace of its own, the root of that trace.
    speech_traces = [trace_of(e.traceparent) for e in speech]
    assert len(set(speech_traces)) == len(speech)
    for trace_id in speech_traces:
        turn = run.turn_in(trace_id)
        assert turn.parent_span_id == ""
        assert turn.attributes["session.id"] == "mt1"
        assert turn.attributes["vlpipe.turn.start"] == "speech_started"
    # Ingest's span of an utterance's first frame joins that utterance's turn. (Ingest makes
    # it only if it writes again after the turn started: audio sent faster than real time
    # may be all written by then, so a late turn may lack it.)
    utterances = run.named("ingest.utterance")
    assert utterances
    for ingest in utterances:
        turn = run.turn_in(ingest.trace_id)
        assert ingest.trace_id in speech_traces and ingest.parent_span_id == turn.span_id
        assert ingest.attributes["vlpipe.frame.seq"] == turn.attributes["vlpipe.turn.first_frame"]
    assert len({s.trace_id for s in utterances}) == len(utterances)

    # Every turn, whatever opened it, is alone in its trace and linked to the session's
    # start span: the session's trace is where a turn's context is found.
    turns = run.named("vlpipe.turn")
    for turn in turns:
        assert run.turn_in(turn.trace_id) == turn
        assert (start.trace_id, start.span_id) in turn.links

    # Each response is a `vlpipe.response` child of the turn it was created in, and that
    # turn carries its id: no two turns share a response.
    created = [e.event["response"]["id"] for e in run.of_type("response.created")]
    assert len(set(created)) == len(created) >= 1
    for event in run.of_type("response.created"):
        response_id = event.event["response"]["id"]
        turn = run.turn_in(trace_of(event.traceparent))
        assert turn.attributes["gen_ai.response.id"] == response_id
        responses = [
            s
            for s in traces[turn.trace_id]
            if s.name == "vlpipe.response" and s.attributes["gen_ai.response.id"] == response_id
        ]
        response = only(responses, f"vlpipe.response {response_id}")
        assert response.parent_span_id == turn.span_id
    answering = [
        t.attributes["gen_ai.response.id"] for t in turns if "gen_ai.response.id" in t.attributes
    ]
    assert len(set(answering)) == len(answering)

    # Egress's spans are in the trace of the turn they belong to: the answer's first audio
    # and the assistant's transcript in the turn of their response, under its span.
    answered = {e.event["response_id"] for e in run.of_type("response.audio.delta")}
    assert answered, "the last phrase at least is answered"
    first_audio = run.named("broker.first_audio")
    assert sorted(s.attributes["gen_ai.response.id"] for s in first_audio) == sorted(answered)
    transcripts = run.named("broker.transcript")
    assert transcripts
    for span in first_audio + transcripts:
        assert span.attributes["session.id"] == "mt1"
        turn = run.turn_in(span.trace_id)
        assert span.parent_span_id == turn.span_id
        if span.attributes["gen_ai.response.id"]:  # the assistant's, not the user's
            assert turn.attributes["gen_ai.response.id"] == span.attributes["gen_ai.response.id"]

    # One turn per utterance, and nothing else: an answer an utterance cancelled, finishing
    # after it began, does not end the new turn nor make its response open another.
    assert len(turns) == len(speech)
    # The user's transcript is in the trace of the speech it transcribes, even when it
    # arrives after the next utterance began (the turn is found by the item it names).
    speech_trace = {e.event["item_id"]: trace_of(e.traceparent) for e in speech}
    heard = run.of_type("conversation.item.input_audio_transcription.completed")
    assert heard
    for event in heard:
        assert trace_of(event.traceparent) == speech_trace[event.event["item_id"]]
    finals = len(heard) + len(run.of_type("response.audio_transcript.done"))
    assert len(transcripts) == finals, "every final transcript joined its turn's trace"

    # Time to first audio: every answered turn has it, on its span and in the histogram.
    timed = [t for t in turns if "vlpipe.turn.time_to_first_audio_ms" in t.attributes]
    assert sorted(t.attributes["gen_ai.response.id"] for t in timed) == sorted(answered)
    assert run.histogram_count("vlpipe.turn.time_to_first_audio") == len(answered)
    assert all(t.attributes["turn.was_interrupted"] in (True, False) for t in turns)


@pytest.mark.parametrize(
    "when",
    [
        # The engine still generating the answer in real time: the upstream cancels it.
        pytest.param("generating", id="while-generating"),
        # The whole answer generated at once (as a fast service does) and still playing:
        # its response is done, but the user talks over what they are hearing.
        pytest.param("playing", id="while-playing"),
    ],
)
async def test_a_turn_the_user_talked_over_is_marked_interrupted(
    redis_url: str, redis: aioredis.Redis, keys: StreamKeys, speech_wav: Path, when: str
) -> None:
    speech = read_speech(speech_wav)
    # A long silence keeps the whole recording one utterance, so the echo's answer plays
    # for ten seconds in real time: the user has time to talk over it.
    config = {"input_audio_format": "pcm16_16000hz",
              "turn_detection": {"type": "server_vad", "silence_duration_ms": 1500}}  # fmt: skip
    pace = 1.0 if when == "generating" else 0.0
    first_sign = "response.audio.delta" if when == "generating" else "response.done"
    with otlp_receiver() as otlp:
        async with live_session(
            redis_url, redis, keys, otlp, "bi1", config, model="echo", output_pace=pace
        ) as talk:
            await talk.say(speech + silence(2000))
            await talk.until(lambda evs: any(e.type == first_sign for e in evs))
            # While the answer plays, the user speaks again ("Ever tried.").
            await talk.say(speech[: int(RATE * 1.3) * 2] + silence(2000))

            def answered_in_full(evs: list[Event]) -> bool:
                return any(
                    e.type == "response.done" and e.event["response"]["status"] == "completed"
                    for e in evs
                )

            await talk.until(answered_in_full)  # the answer to the interruption, heard out
        run = talk.run

    # The scenario: the broker cut the first answer while it was in progress.
    barge_in = only(run.of_type("vlpipe.barge_in"), "barge-in")
    cut = barge_in.event["response_id"]
    done = {e.event["response"]["id"]: e for e in run.of_type("response.done")}
    statuses = {rid: e.event["response"]["status"] for rid, e in done.items()}
    if when == "generating":
        assert statuses[cut] == "cancelled"
        assert done[cut].seq > barge_in.seq
    else:
        assert statuses[cut] == "completed"
        assert done[cut].seq < barge_in.seq
    speech_started = run.of_type("input_audio_buffer.speech_started")
    first_turn, second_turn = (trace_of(e.traceparent) for e in speech_started)

    # The turn whose answer was cut says so, and the metric counted it.
    interrupted = run.turn_answering(cut)
    assert interrupted.trace_id == first_turn
    assert interrupted.attributes["turn.was_interrupted"] is True
    assert run.counter("vlpipe.turn.interrupted") == 1

    # The answer heard to the end is not marked, nor the turn the interruption opened.
    completed = only(
        [rid for rid, status in statuses.items() if status == "completed" and rid != cut],
        "answer heard to the end",
    )
    for turn in (run.turn_answering(completed), run.turn_in(second_turn)):
        assert turn.attributes["turn.was_interrupted"] is False
    # The cut response's span says how it ended.
    response = only(
        [s for s in run.named("vlpipe.response") if s.attributes["gen_ai.response.id"] == cut],
        "vlpipe.response of the cut answer",
    )
    assert response.attributes["gen_ai.response.status"] == statuses[cut]
