"""The benchmark's null Voice Live server, driven by the official SDK over a real socket.

The figures of `bench/pipeline_vs_direct.py` are only worth something if its upstream
stand-in counts the audio it is sent and answers as the benchmark says; nothing here
times anything.
"""

from __future__ import annotations

import base64
import time

import pytest
from azure.ai.voicelive.aio import connect
from azure.ai.voicelive.models import RequestSession, ServerEventType, ServerVad
from azure.core.credentials import AzureKeyCredential

from bench.pipeline_vs_direct import (
    ANSWER_DELTAS,
    BLOCK_TICKS,
    CHUNK,
    DELTA_BYTES,
    STAMP,
    TICK_S,
    NullVoiceLive,
    appended_bytes,
    merged_turns,
    phase_offset_s,
    sends,
    start_ticks,
    turn_figures,
)


def test_append_sizes_are_read_without_parsing_in_either_key_order() -> None:
    broker = b'{"type":"input_audio_buffer.append","audio":"QUJDRA=="}'
    sdk = b'{"audio": "QUJDREU=", "type": "input_audio_buffer.append"}'
    assert appended_bytes(broker) == 4
    assert appended_bytes(sdk) == 5
    assert appended_bytes(b'{"type":"session.update","session":{}}') is None


async def test_three_seconds_of_sdk_audio_get_one_answer_of_ten_stamped_deltas() -> None:
    server = NullVoiceLive()
    await server.start()
    try:
        async with connect(
            endpoint=server.endpoint, credential=AzureKeyCredential("bench"), model="null"
        ) as connection:
            await connection.session.update(
                session=RequestSession(input_audio_format="pcm16", turn_detection=ServerVad())
            )
            for _ in range(BLOCK_TICKS):  # 3 s of 20 ms chunks
                await connection.input_audio_buffer.append(audio=base64.b64encode(CHUNK).decode())
            kinds: list[str] = []
            deltas: list[bytes] = []
            async for event in connection:
                kinds.append(event.type)
                if event.type == ServerEventType.RESPONSE_AUDIO_DELTA:
                    assert event.response_id == "resp_1"
                    deltas.append(event.delta)
                if event.type == ServerEventType.RESPONSE_DONE:
                    break
    finally:
        await server.close()
    assert kinds[:3] == ["session.created", "session.updated", "response.created"]
    assert [len(d) for d in deltas] == [DELTA_BYTES] * 10, "1 s of 24 kHz PCM16"
    stamps = [STAMP.unpack_from(d)[0] for d in deltas]
    assert stamps == sorted(stamps), "each delta carries the server's clock when sent"
    assert server.stats.append_bytes == BLOCK_TICKS * len(CHUNK)
    assert server.stats.answers == 1


def test_staggered_calls_begin_one_after_another_within_one_block() -> None:
    assert start_ticks(3, "together") == [0, 0, 0]
    assert start_ticks(3, "staggered") == [0, 50, 100]
    starts = start_ticks(250, "staggered")
    assert starts == sorted(starts) and starts[-1] < BLOCK_TICKS
    assert len(set(starts)) == BLOCK_TICKS, "a block ends on every tick of the 150"


def test_a_staggered_calls_turn_is_timed_from_its_own_completing_tick() -> None:
    t0, starts = 1000.0, [0, 75]
    ticks = [t0 + k * TICK_S for k in range(2 * BLOCK_TICKS + 74)]
    completing = 75 + BLOCK_TICKS - 1  # call 1's 150th chunk
    rows = [[1, 1, ticks[completing] + 0.010, ticks[completing] + 0.004, DELTA_BYTES * 10]]
    turns = turn_figures(t0, ticks, rows, starts, warmup=0.0, seconds=len(ticks) * TICK_S)
    # Call 0 completes blocks 1 and 2, call 1 only block 1 within the ticks sent.
    assert turns.expected == 3
    assert [round(v, 6) for v in turns.latency_ms] == [10.0]
    assert [round(v, 6) for v in turns.uplink_ms] == [4.0]
    assert [round(v, 6) for v in turns.downlink_ms] == [6.0]
    assert turns.to_redis_ms == [] and turns.from_redis_ms == []  # (the direct app's rows)


def test_the_pipelines_downlink_is_split_where_redis_wrote_the_audio() -> None:
    t0, starts = 1000.0, [0]
    ticks = [t0 + k * TICK_S for k in range(BLOCK_TICKS)]
    stamp = ticks[-1] + 0.004  # the null server started the answer
    rows = [[0, 1, stamp + 0.006, stamp, DELTA_BYTES * 10, stamp + 0.002]]
    turns = turn_figures(t0, ticks, rows, starts, warmup=0.0, seconds=len(ticks) * TICK_S)
    assert [round(v, 6) for v in turns.downlink_ms] == [6.0]
    assert [round(v, 6) for v in turns.to_redis_ms] == [2.0]
    assert [round(v, 6) for v in turns.from_redis_ms] == [4.0]


def test_a_call_in_a_later_phase_is_timed_from_its_own_send_within_the_tick() -> None:
    t0, starts, phases = 1000.0, [0, 0], 2
    assert [phase_offset_s(p, phases) for p in range(phases)] == [0.0, TICK_S / 2]
    ticks = [t0 + k * TICK_S for k in range(BLOCK_TICKS)]
    sent = ticks[-1] + TICK_S / 2  # call 1's 150th chunk went half a tick after the tick
    rows = [[1, 1, sent + 0.010, sent + 0.004, DELTA_BYTES * 10]]
    turns = turn_figures(t0, ticks, rows, starts, 0.0, len(ticks) * TICK_S, phases)
    assert turns.expected == 2
    assert [round(v, 6) for v in turns.latency_ms] == [10.0]
    assert [round(v, 6) for v in turns.uplink_ms] == [4.0]


async def test_both_modes_send_each_call_in_its_own_phase_once_it_has_begun() -> None:
    ticks: list[float] = []
    schedule = [
        calls async for calls in sends(time.time() - 60, 3, [0, 1, 0, 2], 2, ticks)
    ]  # a start long past: no waiting
    assert schedule == [[0, 2], [], [0, 2], [1], [0, 2], [1, 3]]
    assert len(ticks) == 3, "one start per tick, at its first phase"


ANSWER_BYTES = ANSWER_DELTAS * DELTA_BYTES


def test_the_direct_apps_processes_turns_add_up_to_one_apps() -> None:
    # Four calls begun on tick 0, each completing its first block on tick 149; the app's
    # two processes each ran two of them (call i in process i % 2), on their own tickers.
    starts = [0, 0, 0, 0]
    warmup, seconds = 1.0, 3.0
    t0 = 1000.0
    ticks = [t0 + k * TICK_S for k in range(BLOCK_TICKS + 100)]
    late = [t + 0.004 for t in ticks]  # the second process's ticker runs 4 ms late

    def answer(i: int, ms: float, tick: list[float]) -> list[float]:
        first = tick[BLOCK_TICKS - 1] + ms / 1000
        return [i, 1, first, first - 0.005, ANSWER_BYTES]

    one = turn_figures(t0, ticks, [answer(0, 30, ticks), answer(2, 50, ticks)], starts,
                       warmup, seconds, sessions=[0, 2])  # fmt: skip
    two = turn_figures(t0, late, [answer(1, 40, late)], starts, warmup, seconds,
                       sessions=[1, 3])  # fmt: skip
    assert (one.expected, two.expected) == (2, 2)
    app = merged_turns([one, two])
    assert app.expected == 4
    assert sorted(round(ms) for ms in app.latency_ms) == [30, 40, 50]
    assert app.delivered == 0.75  # three of the four answers, each whole
    assert max(app.ticker_late_ms) == pytest.approx(4.0)
