"""`vlpipe ingest` / `python -m vlpipe.services.ingest`: run the ingest service."""

from __future__ import annotations

import asyncio
import sys

from vlpipe.services.ingest.service import IngestService
from vlpipe.services.ingest.settings import IngestSettings
from vlpipe.shared.service import ServiceContext, run_service


def main(argv: list[str] | None = None) -> int:
    settings = IngestSettings()

    async def body(ctx: ServiceContext) -> None:
        await IngestService(ctx, settings).run()

    return asyncio.run(run_service("ingest", settings, body))


if __name__ == "__main__":
    sys.exit(main())
