"""Records `mediarecorder-chrome.webm`: what Chromium's MediaRecorder makes of 3 s of a
440 Hz tone (WebM Opus, as a browser call sends it), and the sizes of the chunks it handed
out every 100 ms (`mediarecorder-chrome.sizes`). Run once by hand:

    .venv/bin/python tests/ingest/data/record_mediarecorder.py
"""

from __future__ import annotations

import asyncio
import base64
import shutil
from pathlib import Path

from playwright.async_api import async_playwright

HERE = Path(__file__).parent

RECORD = """
async () => {
  const ctx = new AudioContext({sampleRate: 48000});
  const tone = ctx.createOscillator();
  tone.frequency.value = 440;
  const level = ctx.createGain();
  level.gain.value = 0.3;
  const out = ctx.createMediaStreamDestination();
  tone.connect(level).connect(out);
  tone.start();
  const recorder = new MediaRecorder(out.stream, {mimeType: "audio/webm;codecs=opus"});
  const parts = [];
  recorder.ondataavailable = (e) => parts.push(e.data);
  recorder.start(100);
  await new Promise((r) => setTimeout(r, 3000));
  const stopped = new Promise((r) => (recorder.onstop = r));
  recorder.stop();
  await stopped;
  const chunks = [];
  for (const part of parts) {
    const bytes = new Uint8Array(await part.arrayBuffer());
    chunks.push(btoa(Array.from(bytes, (b) => String.fromCharCode(b)).join("")));
  }
  return chunks;
}
"""


async def main() -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "needs Debian's chromium: apt-get install chromium"
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = await browser.new_page()
        chunks = [base64.b64decode(c) for c in await page.evaluate(RECORD)]
        await browser.close()
    (HERE / "mediarecorder-chrome.webm").write_bytes(b"".join(chunks))
    (HERE / "mediarecorder-chrome.sizes").write_text(",".join(str(len(c)) for c in chunks))


if __name__ == "__main__":
    asyncio.run(main())
