"""One trace per turn across ingest, the broker and egress, exported over OTLP, and turn metrics."""

from __future__ import annotations

import asyncio
import json
import wave
from pathlib import Path

import redis.asyncio as aioredis

from tests.integration.pipeline import outputs_done, running_pipeline
from tests.otlp_receiver import otlp_receiver
from tests.waiting import wait_until
from vlpipe.services.engine.server import running_engine
from vlpipe.shared.keys import StreamKeys

SPAN_KIND_INTERNAL, SPAN_KIND_PRODUCER, SPAN_KIND_CONSUMER = 1, 4, 5


async def test_a_turn_is_one_trace_from_the_broker_to_egress(
    redis_url: str, redis: aioredis.Redis, keys: StreamKeys, speech_wav: Path
) -> None:
    with wave.open(str(speech_wav)) as w:
        pcm = w.readframes(w.getnframes()) + b"\0\0" * 16000 * 2
    config = {"input_audio_format": "pcm16_16000hz",
              "turn_detection": {"type": "server_vad", "silence_duration_ms": 1500}}  # fmt: skip
    with otlp_receiver() as otlp:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "200",
               "OTEL_METRIC_EXPORT_INTERVAL": "500"}  # fmt: skip
        async with (
            running_engine(model="local", output_pace=0) as engine,
            running_pipeline(redis_url, keys.prefix, engine.endpoint, **env) as pipeline,
            pipeline.connect("/v1/subscribe?session=tr1") as client,
        ):
            await client.recv()  # subscribed: a consumer will hear the answer
            await redis.xadd(
                keys.sessions, {"type": "start", "session": "tr1", "config": json.dumps(config)}
            )
            for seq, start in enumerate(range(0, len(pcm), 3200)):
                await redis.xadd(keys.audio("tr1"), {"audio": pcm[start : start + 3200],
                                                     "rate": "16000", "seq": str(seq)})  # fmt: skip
                # 100 ms of audio every 100 ms, as a live call. Faster, a VAD that lags
                # (the local engine on a busy machine) reports the speech start after
                # the broker let go of the silence before it (SILENCE_KEEP_MS of audio),
                # and the turn has no first frame to begin at.
                await asyncio.sleep(0.1)
            await redis.xadd(keys.sessions, {"type": "end", "session": "tr1"})

            async def done() -> bool:
                return await outputs_done(redis, keys, "tr1")

            await wait_until(done, within=90)
        # The services exported their last spans and metrics as they stopped.
        spans = list(otlp.spans)
        metrics = otlp.metric_names()
        first_audio = otlp.metrics["vlpipe.turn.time_to_first_audio"][-1]
        to_client = otlp.metrics["vlpipe.turn.first_audio_to_client"][-1]
    turns = [s for s in spans if s.name == "vlpipe.turn"]
    assert len(turns) == 1, [s.name for s in spans]
    turn = turns[0]
    assert turn.service == "vlpipe-broker" and turn.kind == SPAN_KIND_CONSUMER
    assert turn.attributes["messaging.destination.name"] == keys.frames("tr1")
    assert turn.attributes["session.id"] == "tr1"
    trace = [s for s in spans if s.trace_id == turn.trace_id]
    response = next(s for s in trace if s.name == "vlpipe.response")
    assert response.parent_span_id == turn.span_id
    assert response.attributes["gen_ai.usage.output_tokens"] > 0
    assert response.attributes["gen_ai.response.id"] == turn.attributes["gen_ai.response.id"]
    # Ingest's span of the utterance's first frame, the broker's turn and outputs.
    ingest = [s for s in trace if s.service == "vlpipe-ingest"]
    assert [s.name for s in ingest] == ["ingest.utterance"]
    assert ingest[0].parent_span_id == turn.span_id and ingest[0].kind == SPAN_KIND_PRODUCER
    assert ingest[0].attributes["vlpipe.frame.seq"] == turn.attributes["vlpipe.turn.first_frame"]
    assert ingest[0].attributes["messaging.destination.name"] == keys.frames("tr1")
    # The outputs' spans, by the broker, which makes them (its default `outputs_by`).
    outputs = {s.name: s for s in trace if s.name.endswith((".first_audio", ".transcript"))}
    assert set(outputs) == {"broker.first_audio", "broker.transcript"}
    for span in outputs.values():
        assert span.service == "vlpipe-broker"
        assert span.parent_span_id == turn.span_id and span.kind == SPAN_KIND_PRODUCER
        assert span.attributes["messaging.system"] == "redis"
        assert span.attributes["session.id"] == "tr1"
    # The session's own trace (start, end) is linked from the turn.
    session = {s.name: s for s in spans if s.name.startswith("vlpipe.session.")}
    assert set(session) == {"vlpipe.session.start", "vlpipe.session.end"}
    start = session["vlpipe.session.start"]
    assert session["vlpipe.session.end"].parent_span_id == start.span_id
    assert (start.trace_id, start.span_id) in turn.links
    assert sum(p.count for p in first_audio.histogram.data_points) == 1  # the one turn
    assert sum(p.count for p in to_client.histogram.data_points) == 1  # its one listener
    assert "vlpipe.turn.time_to_first_audio" in metrics
    assert "vlpipe.broker.frame_to_upstream" in metrics
    assert "vlpipe.sessions.owned" in metrics
