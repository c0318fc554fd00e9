"""`vlpipe ingest` / `python -m vlpipe.services.ingest`: run the ingest service."""

from __future__ import annotations

import sys

from vlpipe.services.ingest.service import IngestService
from vlpipe.services.ingest.settings import IngestSettings
from vlpipe.shared.service import ServiceContext, run_process
from vlpipe.shared.usage import service_parser

DESCRIPTION = (
    "Normalize producers' audio (PCM16, float32, G.711, WAV, Ogg/WebM Opus, MP3) from "
    "vl:audio:{session} into fixed frames on vl:frames:{session}."
)


def main(argv: list[str] | None = None) -> int:
    service_parser("ingest", IngestSettings, DESCRIPTION).parse_args(argv)  # --help exits here
    settings = IngestSettings()

    async def body(ctx: ServiceContext) -> None:
        await IngestService(ctx, settings).run()

    return run_process("ingest", settings, body)


if __name__ == "__main__":
    sys.exit(main())
