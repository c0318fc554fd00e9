"""`vlpipe publish FILE --session ID`: publish an audio file as a session, as any producer would.

WAV files go out as PCM16 chunks of 100 ms at their own rate and channel count; other
files go out as chunks of their container (`ogg`, `webm`, `mp3`, `raw` G.711 with
`--format`), which ingest decodes. By default at real-time pace (`--pace 1`); `--pace 0`
publishes as fast as Redis takes it. The session is announced first (`--instructions`,
`--config JSON`, `--audio-out FORMAT`) and ended after the last chunk.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import wave
from pathlib import Path

from vlpipe.shared.contracts import (
    InputFormat,
    RawAudio,
    SessionConfig,
    SessionEnd,
    SessionStart,
    encode,
)
from vlpipe.shared.keys import StreamKeys, check_session_id
from vlpipe.tools.target import add_redis_options, redis_client, redis_target

CHUNK_MS = 100
_EXTENSIONS = {".ogg": "ogg", ".opus": "ogg", ".webm": "webm", ".mp3": "mp3",
               ".ulaw": "g711_ulaw", ".alaw": "g711_alaw"}  # fmt: skip


def wav_chunks(path: Path) -> tuple[list[RawAudio], float]:
    with wave.open(str(path)) as w:
        if w.getsampwidth() != 2:
            raise ValueError(
                f"{path}: only 16-bit WAV files (this one has {8 * w.getsampwidth()}-bit samples)"
            )
        rate, channels = w.getframerate(), w.getnchannels()
        frames = w.readframes(w.getnframes())
    step = rate * CHUNK_MS // 1000 * 2 * channels
    chunks = [
        RawAudio(
            audio=frames[i : i + step],
            format=InputFormat.PCM16,
            rate=rate,
            channels=channels,
            seq=n,
        )
        for n, i in enumerate(range(0, len(frames), step))
    ]
    return chunks, len(frames) / (2 * channels * rate)


def file_chunks(path: Path, fmt: str) -> tuple[list[RawAudio], float | None]:
    data = path.read_bytes()
    step = 800 if fmt.startswith("g711") else 8192
    rate = 8000 if fmt.startswith("g711") else None
    chunks = [
        RawAudio(audio=data[i : i + step], format=InputFormat(fmt), rate=rate, seq=n)
        for n, i in enumerate(range(0, len(data), step))
    ]
    seconds = len(data) / 8000 if fmt.startswith("g711") else None
    return chunks, seconds


def load(path: Path, fmt: str | None) -> tuple[list[RawAudio], float | None]:
    kind = fmt or ("wav" if path.suffix.lower() == ".wav" else _EXTENSIONS.get(path.suffix.lower()))
    if kind is None:
        raise ValueError(f"{path}: unknown audio type; say which with --format "
                         f"(wav, {', '.join(sorted(set(_EXTENSIONS.values())))})")  # fmt: skip
    if kind == "wav":
        return wav_chunks(path)
    return file_chunks(path, kind)


async def publish(
    redis_url: str, keys: StreamKeys, sid: str, chunks: list[RawAudio], seconds: float | None,
    start: SessionStart, pace: float, progress: bool = True,
) -> None:  # fmt: skip
    redis = redis_client(redis_url, "vlpipe-publish")
    try:
        await redis.xadd(keys.sessions, encode(start))  # type: ignore[arg-type]
        began = time.monotonic()
        per_chunk = (seconds / len(chunks)) if seconds and chunks else 0.0
        for n, chunk in enumerate(chunks):
            await redis.xadd(keys.audio(sid), encode(chunk))  # type: ignore[arg-type]
            if progress and sys.stderr.isatty():
                done = (
                    f"{(n + 1) * per_chunk:5.1f}/{seconds:.1f} s"
                    if seconds
                    else f"{n + 1}/{len(chunks)} chunks"
                )
                print(f"\rpublishing {sid}: {done}", end="", file=sys.stderr, flush=True)
            if pace > 0 and per_chunk:
                delay = began + (n + 1) * per_chunk / pace - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
        await redis.xadd(keys.sessions, encode(SessionEnd(session=sid, reason="file published")))  # type: ignore[arg-type]
        if progress:
            total = f"{seconds:.1f} s of audio" if seconds else f"{len(chunks)} chunks"
            print(
                ("\r" if sys.stderr.isatty() else "") + f"published {sid}: {total}", file=sys.stderr
            )
    finally:
        await redis.aclose()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vlpipe publish", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("file", type=Path)
    parser.add_argument("--session", required=True, help="session id (letters, digits, . _ : -)")
    parser.add_argument(
        "--pace", type=float, default=1.0, help="1 = real time, 0 = as fast as possible"
    )
    parser.add_argument("--format", choices=["wav", "ogg", "webm", "mp3", "g711_ulaw", "g711_alaw"])
    parser.add_argument("--instructions", help="the assistant's instructions")
    parser.add_argument("--config", help="session config as JSON (see docs/contracts)")
    parser.add_argument("--audio-out", default="pcm16", help="format of the audio-out stream")
    add_redis_options(parser)
    args = parser.parse_args(argv)
    try:
        sid = check_session_id(args.session)
        chunks, seconds = load(args.file, args.format)
        config = SessionConfig.model_validate(json.loads(args.config) if args.config else {})
        if args.instructions:
            config = config.merged({"instructions": args.instructions})
        start = SessionStart.model_validate(
            {"session": sid, "config": config, "audio_out": args.audio_out}
        )
    except (OSError, ValueError, wave.Error, EOFError) as exc:
        print(f"vlpipe publish: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    url, keys = redis_target(args)
    asyncio.run(publish(url, keys, sid, chunks, seconds, start, args.pace))
    return 0
