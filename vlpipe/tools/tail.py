"""`vlpipe tail --session ID`: a session's transcripts, user and assistant, as they come.

In a terminal, partial transcripts update in place and finals stay; `--json` prints one
JSON object per line (transcript pieces and status messages) for scripts. Stops when the
session ends (`--follow` keeps going), or at Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from vlpipe.shared.contracts import ContractError, Status, TranscriptPiece, decode
from vlpipe.shared.keys import StreamKeys, check_session_id
from vlpipe.tools.target import add_redis_options, redis_client, redis_target

SPEAKERS = {"user": "user     ", "assistant": "assistant"}


async def tail(url: str, keys: StreamKeys, sid: str, as_json: bool, follow: bool,
               from_start: bool) -> None:  # fmt: skip
    redis = redis_client(url, "vlpipe-tail")
    streams = {keys.transcript(sid): "0-0", keys.status(sid): "0-0"}
    if not from_start:  # only what comes from now on
        for key in streams:
            last: Any = await redis.xrevrange(key, count=1)
            if last:
                streams[key] = last[0][0].decode()
    partial = False
    tty = sys.stdout.isatty() and not as_json
    try:
        while True:
            reply: Any = await redis.xread(streams, block=1000, count=100)  # type: ignore[arg-type]
            for stream, entries in reply or []:
                key = stream.decode()
                for entry_id, fields in entries:
                    streams[key] = entry_id.decode()
                    try:
                        if key == keys.transcript(sid):
                            piece: TranscriptPiece = decode(TranscriptPiece, fields)
                            if as_json:
                                print(
                                    piece.model_dump_json(
                                        exclude={"v", "traceparent"}, exclude_none=True
                                    ),
                                    flush=True,
                                )
                            elif piece.final or tty:
                                line = f"{SPEAKERS[piece.speaker]} {'>' if piece.final else '…'} {piece.text}"
                                print(
                                    ("\r\033[K" if partial else "") + line,
                                    end="" if not piece.final else "\n",
                                    flush=True,
                                )
                                partial = not piece.final
                            continue
                        status: Status = decode(Status, fields)
                    except ContractError as exc:
                        print(f"(unreadable entry {entry_id.decode()}: {exc})", file=sys.stderr)
                        continue
                    if as_json:
                        print(json.dumps({"status": status.kind, "service": status.service,
                                          "message": status.message, "detail": status.detail}), flush=True)  # fmt: skip
                    elif status.kind in ("error", "gap", "tool_timeout"):
                        print(
                            f"{'':9}   [{status.service} {status.kind}] {status.message}",
                            file=sys.stderr,
                        )
                    if status.kind == "state" and status.message == "ended" and not follow:
                        return
    finally:
        await redis.aclose()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vlpipe tail", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--session", required=True)
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument(
        "--follow", action="store_true", help="only new entries; do not stop at the end"
    )
    add_redis_options(parser)
    args = parser.parse_args(argv)
    try:
        sid = check_session_id(args.session)
    except ValueError as exc:
        print(f"vlpipe tail: {exc}", file=sys.stderr)
        return 2
    url, keys = redis_target(args)
    try:
        asyncio.run(tail(url, keys, sid, args.json, args.follow, from_start=not args.follow))
    except KeyboardInterrupt:
        return 130
    return 0
