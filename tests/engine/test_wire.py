"""The engine driven by a plain `websockets` client sending raw JSON."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import jiwer
import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.engine.conftest import RawClient, resample, silence
from vlpipe.services.engine.server import REALTIME_PATH, running_engine
from vlpipe.services.engine.settings import EngineSettings
from vlpipe.shared.audio import AudioFormat, decode_to_pcm16, encode_pcm16

ROOT = Path(__file__).resolve().parents[2]
FIRST_TWO_PHRASES = "Ever tried. Ever failed."


def words(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9']+", text.lower()))


def envelope_correlation(a: bytes, b: bytes) -> float:
    """Correlation of the 20 ms loudness envelopes of two PCM16 16 kHz signals.

    espeak-ng output varies slightly between runs, so samples cannot be compared; the
    envelope tells speech in the right rate and codec (about 0.99) from wrong ones (< 0.9).
    """

    def envelope(pcm: bytes) -> np.ndarray:
        x = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
        frames = x.size // 320
        return np.sqrt((x[: frames * 320].reshape(frames, 320) ** 2).mean(axis=1))

    x, y = envelope(a), envelope(b)
    n = min(x.size, y.size)
    return float(np.corrcoef(x[:n], y[:n])[0, 1])


@pytest.mark.parametrize("fmt", list(AudioFormat))
async def test_speech_in_and_out_in_every_audio_format(fmt: AudioFormat, speech_16k: bytes) -> None:
    async with (
        running_engine(model="local", output_pace=0) as engine,
        connect(engine.url) as ws,
    ):
        client = RawClient(ws)
        await client.wait_for("session.created")
        await client.send(
            {
                "type": "session.update",
                "session": {
                    "input_audio_format": fmt.wire_name,
                    "input_audio_sampling_rate": fmt.rate,
                    "output_audio_format": fmt.value,
                    "input_audio_transcription": {"model": "whisper-1"},
                    "turn_detection": {"type": "server_vad", "silence_duration_ms": 1000},
                },
            }
        )
        session = (await client.wait_for("session.updated"))["session"]
        assert session["output_audio_format"] == fmt.value
        # "Ever tried. Ever failed." then silence, at about 8x real time.
        spoken = speech_16k[: 16000 * 2 * 34 // 10] + silence(1500)
        wire = encode_pcm16(resample(spoken, 16000, fmt.rate), fmt)
        await client.append_audio(wire, fmt.bytes_for_ms(40), pace_s=0.005)

        stopped = await client.wait_for("input_audio_buffer.speech_stopped")
        started = client.of_type("input_audio_buffer.speech_started")[0]
        assert started["item_id"] == stopped["item_id"]
        heard = await client.wait_for("conversation.item.input_audio_transcription.completed")
        assert jiwer.wer(words(FIRST_TWO_PHRASES), words(heard["transcript"])) <= 0.25
        done = await client.wait_for("response.done")
        assert done["response"]["status"] == "completed"
        assert done["response"]["output_audio_format"] == fmt.value

        # The audio decodes, in this format and rate, to the speech of the transcript.
        wire_out = b"".join(
            base64.b64decode(e["delta"]) for e in client.of_type("response.audio.delta")
        )
        heard_out = resample(decode_to_pcm16(wire_out, fmt), fmt.rate, 16000)
        said = client.of_type("response.audio_transcript.done")[0]["transcript"]
        assert said == f"You said: {heard['transcript']}"
        assert engine.backends is not None and engine.backends.tts is not None
        tts = engine.backends.tts
        reference = resample(tts.synthesize(said, session["voice"]), tts.sample_rate, 16000)
        assert abs(len(heard_out) / len(reference) - 1) < 0.05
        assert envelope_correlation(heard_out, reference) > 0.95


async def test_echo_answers_a_turn_with_the_users_audio(speech_16k: bytes) -> None:
    async with running_engine(model="echo", output_pace=0) as engine, connect(engine.url) as ws:
        client = RawClient(ws)
        await client.send(
            {"type": "session.update", "session": {"input_audio_sampling_rate": 16000}}
        )
        await client.wait_for("session.updated")
        pcm = speech_16k[: 16000 * 2 * 2]  # "Ever tried." and a pause
        await client.append_audio(pcm + silence(1000), 1280)
        stopped = await client.wait_for("input_audio_buffer.speech_stopped")
        started = client.of_type("input_audio_buffer.speech_started")[0]
        done = await client.wait_for("response.done")
        assert done["response"]["status"] == "completed"
        echoed = sum(
            len(base64.b64decode(e["delta"])) for e in client.of_type("response.audio.delta")
        )
        turn_ms = stopped["audio_end_ms"] - started["audio_start_ms"]
        assert abs(echoed / 48 - turn_ms) < 50  # 24 kHz PCM16 out
        assert not client.of_type("conversation.item.input_audio_transcription.completed")


async def test_malformed_json_gets_an_error_and_the_session_goes_on() -> None:
    async with running_engine(model="echo") as engine, connect(engine.url) as ws:
        client = RawClient(ws)
        await ws.send("{this is not json")
        await ws.send(b'{"type": "input_audio_buffer.clear"}')
        error = await client.wait_for("error")
        assert error["error"]["code"] == "invalid_json"
        await client.wait_for("input_audio_buffer.cleared")


async def test_a_message_over_the_size_limit_closes_with_1009() -> None:
    async with running_engine(model="echo", max_message_bytes=4096) as engine:
        async with connect(engine.url, max_size=None) as ws:
            client = RawClient(ws)
            await client.wait_for("session.created")
            audio = base64.b64encode(b"\0" * 8192).decode()
            await client.send({"type": "input_audio_buffer.append", "audio": audio})
            with pytest.raises(ConnectionClosed):
                while True:
                    await client.next_event(5)
            assert ws.close_code == 1009


async def test_handshake_checks_path_version_and_key() -> None:
    async with running_engine(model="echo", api_key="s3cret") as engine:
        base = f"ws://127.0.0.1:{engine.port}"
        cases = [
            (f"{base}/other?api-version=1", {"api-key": "s3cret"}, 404),
            (f"{base}{REALTIME_PATH}", {"api-key": "s3cret"}, 400),
            (engine.url, {}, 401),
            (engine.url, {"api-key": "wrong"}, 401),
            (engine.url, {"Authorization": "Bearer wrong"}, 401),
        ]
        for url, headers, status in cases:
            with pytest.raises(InvalidStatus) as refused:
                async with connect(url, additional_headers=headers):
                    pass
            assert refused.value.response.status_code == status, url
        for headers in ({"api-key": "s3cret"}, {"Authorization": "Bearer s3cret"}):
            async with connect(engine.url, additional_headers=headers) as ws:
                assert json.loads(await ws.recv())["type"] == "session.created"


async def test_health_and_readiness_answer_plain_http() -> None:
    async with running_engine(model="echo", api_key="k") as engine:
        for path in ("/healthz", "/readyz"):
            url = f"http://127.0.0.1:{engine.port}{path}"
            with await asyncio.to_thread(urllib.request.urlopen, url, timeout=5) as response:
                assert response.status == 200


def test_without_a_key_the_engine_refuses_to_leave_loopback() -> None:
    EngineSettings(host="127.0.0.1").check_exposure()
    EngineSettings(host="0.0.0.0", api_key="k").check_exposure()
    with pytest.raises(ValueError, match="API key"):
        EngineSettings(host="0.0.0.0").check_exposure()


def test_the_command_serves_until_sigterm() -> None:
    engine = subprocess.Popen(
        [sys.executable, "-m", "vlpipe.services.engine", "--port", "0", "--model", "echo"],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert engine.stderr is not None
        url = None
        for line in engine.stderr:
            record = json.loads(line)
            if record["msg"] == "engine listening":
                url = record["url"]
                break
        assert url is not None
        port = int(re.findall(r":(\d+)/", url)[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
            assert response.status == 200
        engine.send_signal(signal.SIGTERM)
        assert engine.wait(timeout=10) == 0
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
    finally:
        engine.kill()
        engine.wait()
