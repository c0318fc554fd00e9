"""`vlpipe sessions`: the live sessions, which replica of each service owns them, and lag.

A session is live while a service still holds its start entry (it has not finished it).
Lag is what waits unread for each service: raw audio entries for ingest, frames for the
broker (20 ms each), events for egress.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from vlpipe.shared.keys import StreamKeys
from vlpipe.tools.target import add_redis_options, redis_client, redis_target

SERVICES = ("ingest", "broker", "egress")


async def live_sessions(url: str, keys: StreamKeys) -> list[dict[str, Any]]:
    redis = redis_client(url, "vlpipe-sessions")
    try:
        owners: dict[str, dict[str, Any]] = {}
        groups: Any = (
            await redis.xinfo_groups(keys.sessions) if await redis.exists(keys.sessions) else []
        )
        for group in groups:
            name = group["name"].decode()
            pending: Any = await redis.xpending_range(keys.sessions, name, "-", "+", 10_000)
            for entry in pending:
                entry_id = entry["message_id"].decode()
                owners.setdefault(entry_id, {})[name] = {
                    "replica": entry["consumer"].decode(), "idle_ms": entry["time_since_delivered"],
                }  # fmt: skip
        rows = []
        for entry_id, by_service in sorted(owners.items()):
            found: Any = await redis.xrange(keys.sessions, entry_id, entry_id)
            if not found:
                continue
            sid = found[0][1].get(b"session", b"?").decode()
            async with redis.pipeline(transaction=False) as pipe:
                pipe.xlen(keys.audio(sid))
                pipe.xlen(keys.frames(sid))
                pipe.xlen(keys.events(sid))
                pipe.hget(keys.session_state(sid), "ended")
                audio, frames, events, ended = await pipe.execute()
            rows.append({
                "session": sid, "started": entry_id.split("-")[0],
                "owners": {s: by_service.get(s, {}).get("replica") for s in SERVICES},
                "lag": {"ingest_audio_entries": audio, "broker_frames": frames, "egress_events": events},
                "input_ended": ended == b"1",
            })  # fmt: skip
        return rows
    finally:
        await redis.aclose()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vlpipe sessions", description=__doc__)
    parser.add_argument("--json", action="store_true")
    add_redis_options(parser)
    args = parser.parse_args(argv)
    url, keys = redis_target(args)
    rows = asyncio.run(live_sessions(url, keys))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no live sessions")
        return 0
    print(f"{'session':<28} {'ingest':<22} {'broker':<22} {'egress':<22} lag (audio/frames/events)")
    for row in rows:
        owners = [str(row["owners"][s] or "-")[:22] for s in SERVICES]
        lag = row["lag"]
        print(f"{row['session']:<28} {owners[0]:<22} {owners[1]:<22} {owners[2]:<22} "
              f"{lag['ingest_audio_entries']}/{lag['broker_frames']}/{lag['egress_events']}"
              + ("  (input ended)" if row["input_ended"] else ""))  # fmt: skip
    return 0
