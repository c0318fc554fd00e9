"""`vlpipe engine`: run the local Voice Live engine until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import signal
import sys

from vlpipe.services.engine.server import EngineServer
from vlpipe.services.engine.settings import EngineSettings
from vlpipe.shared import logs
from vlpipe.shared.config import ServiceSettings
from vlpipe.shared.usage import service_parser

READS = [
    name
    for name in EngineSettings.model_fields
    if name not in ServiceSettings.model_fields or name == "log_level"
]
"""The settings the engine reads: its own and the log level (no Redis, no health port)."""


def main(argv: list[str] | None = None) -> int:
    """Parse `--host --port --model --api-key` over the `VLPIPE_ENGINE_*` settings; serve."""
    parser = service_parser(
        "engine",
        EngineSettings,
        "Serve the Voice Live realtime protocol on /voice-live/realtime, offline. The options "
        "override the settings of the same name.",
        only=READS,
    )
    parser.add_argument("--host", help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="listen port (default 8765; 0 picks one)")
    parser.add_argument("--model", choices=["local", "echo"], help="engine model")
    parser.add_argument("--api-key", help="key clients must send (prefer VLPIPE_ENGINE_API_KEY)")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    settings = EngineSettings(**overrides)
    logs.configure("engine", settings.log_level)
    try:
        settings.check_exposure()
    except ValueError as exc:
        print(f"vlpipe engine: {exc}", file=sys.stderr)
        return 2
    asyncio.run(serve_until_signalled(settings))
    return 0


async def serve_until_signalled(settings: EngineSettings) -> None:
    """Serve until SIGTERM/SIGINT, then close every session and stop."""
    server = EngineServer(settings)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await server.close()


if __name__ == "__main__":
    sys.exit(main())
