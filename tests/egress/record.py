"""Record a real event sequence from the local engine into `data/turn.jsonl`.

    .venv/bin/python -m tests.egress.record

One turn of the sample recording against the `local` model, with input transcription:
every server event as the engine sent it, one JSON object per line. To keep the file
small only the first `KEEP_AUDIO_DELTAS` audio deltas keep their audio (each is 100 ms).
"""

from __future__ import annotations

import asyncio
import base64
import json
import wave
from pathlib import Path

import websockets

from vlpipe.services.engine.server import running_engine

HERE = Path(__file__).parent
SPEECH = HERE.parents[1] / "samples" / "speech-16k-beckett.wav"
KEEP_AUDIO_DELTAS = 12


async def record() -> list[dict[str, object]]:
    with wave.open(str(SPEECH)) as w:
        pcm = w.readframes(w.getnframes())
    events: list[dict[str, object]] = []
    async with (
        running_engine(model="local", output_pace=0) as engine,
        websockets.connect(engine.url, max_size=None) as ws,
    ):
        await ws.send(json.dumps({"type": "session.update", "session": {
            "input_audio_format": "pcm16", "input_audio_sampling_rate": 16000,
            "input_audio_transcription": {"model": "whisper-1"},
            "turn_detection": {"type": "server_vad", "silence_duration_ms": 1500},
        }}))  # fmt: skip
        step = 3200
        for start in range(0, len(pcm), step):
            chunk = base64.b64encode(pcm[start : start + step]).decode()
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
        silence = base64.b64encode(b"\0" * 32000 * 2).decode()
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": silence}))
        deltas = 0
        async for raw in ws:
            event = json.loads(raw)
            if event["type"] == "response.audio.delta":
                deltas += 1
                if deltas > KEEP_AUDIO_DELTAS:
                    continue
            events.append(event)
            if event["type"] == "response.done":
                break
    return events


def main() -> None:
    events = asyncio.run(record())
    with open(HERE / "data" / "turn.jsonl", "w") as out:
        for event in events:
            out.write(json.dumps(event) + "\n")
    print(f"recorded {len(events)} events")


if __name__ == "__main__":
    main()
