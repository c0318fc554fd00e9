"""The web console in headless Chromium with a fake microphone playing the sample speech."""

from __future__ import annotations

import os
import shutil
import subprocess
import wave
from pathlib import Path

from playwright.async_api import async_playwright

from tests.integration.pipeline import TOKEN, running_pipeline
from tests.shared.procs import ROOT
from vlpipe.services.engine.server import running_engine
from vlpipe.shared.keys import StreamKeys
from vlpipe.shared.streams import connect

ARTIFACTS = ROOT / "test-artifacts"


def find_chromium() -> str:
    """Debian's chromium; installed with apt-get on a fresh Debian machine (as root)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and shutil.which("apt-get") and os.geteuid() == 0:
        install = ["apt-get", "install", "-y", "-q", "chromium"]
        # A fresh machine may have no package lists yet: read them only when needed.
        for step in (install, ["apt-get", "update", "-q"], install):
            subprocess.run(step, check=False, capture_output=True, timeout=900)
            found = shutil.which("chromium")
            if found:
                break
    assert found, "the console test needs Debian's chromium: apt-get install chromium"
    return found


async def test_talking_to_the_console_shows_both_sides_and_plays_the_reply(
    redis_url: str, keys: StreamKeys, speech_wav: Path, tmp_path: Path
) -> None:
    chromium = find_chromium()
    ARTIFACTS.mkdir(exist_ok=True)
    # Chromium loops the file: the speech, then a pause long enough to hear the reply whole.
    microphone = tmp_path / "caller.wav"
    with wave.open(str(speech_wav)) as src, wave.open(str(microphone), "wb") as dst:
        dst.setparams(src.getparams())
        dst.writeframes(src.readframes(src.getnframes()) + b"\0\0" * 16000 * 15)
    async with (
        running_engine(model="local", output_pace=1.0) as engine,
        running_pipeline(redis_url, keys.prefix, engine.endpoint) as pipeline,
        async_playwright() as pw,
    ):
        browser = await pw.chromium.launch(
            executable_path=chromium,
            args=[
                "--use-fake-ui-for-media-stream",  # grant the microphone without asking
                "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={microphone}",
                "--autoplay-policy=no-user-gesture-required",
                "--no-sandbox",
            ],
        )
        try:
            # The operator's credential goes in the browser's HTTP Basic prompt, never in
            # the URL; the page then gets a call token for each call from the gateway.
            context = await browser.new_context(
                http_credentials={"username": "operator", "password": TOKEN}
            )
            page = await context.new_page()
            await page.goto(f"http://127.0.0.1:{pipeline.gateway_port}/")
            await page.click("#start")
            user = page.locator('#transcript li.user[data-final="1"]').first
            reply = page.locator('#transcript li.assistant[data-final="1"]').first
            await user.wait_for(timeout=90_000)
            await reply.wait_for(timeout=90_000)
            await page.wait_for_function(
                "document.getElementById('played').textContent !== '0.0 s'", timeout=60_000
            )
            await page.screenshot(path=str(ARTIFACTS / "console.png"), full_page=True)
            heard = (await user.inner_text()).lower()
            said = await reply.inner_text()
            played = await page.inner_text("#played")
            latency = await page.inner_text("#latency")
            await page.click("#stop")
        finally:
            await browser.close()
        # 24 kHz PCM16 is the session's input format: direct input, no frames from ingest.
        redis = connect(redis_url)
        try:
            states = [await redis.hgetall(key) for key in await redis.keys(keys.session_state("*"))]
        finally:
            await redis.aclose()
    assert len(states) == 1 and states[0].get(b"broker.frames_id")
    assert b"ingest.next_seq" not in states[0] and states[0].get(b"ingest.done") == b"1"
    assert any(word in heard for word in ("tried", "failed", "matter", "again", "better"))
    assert "You said:" in said
    assert float(played.split()[0]) > 0
    assert latency.endswith(" ms")
