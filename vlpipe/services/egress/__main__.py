"""`vlpipe egress` / `python -m vlpipe.services.egress`: egress and its WebSocket gateway."""

from __future__ import annotations

import asyncio
import sys

from vlpipe.services.egress.service import EgressService
from vlpipe.services.egress.settings import EgressSettings
from vlpipe.shared.service import ServiceContext, run_process
from vlpipe.shared.usage import service_parser

DESCRIPTION = (
    "Turn each session's events into transcripts, audio out and status streams, and serve "
    "the WebSocket gateway."
)


def main(argv: list[str] | None = None) -> int:
    service_parser("egress", EgressSettings, DESCRIPTION).parse_args(argv)  # --help exits here
    settings = EgressSettings()

    async def body(ctx: ServiceContext) -> None:
        work = [EgressService(ctx, settings).run()]
        if settings.gateway:
            from vlpipe.services.egress.gateway import Gateway

            work.append(Gateway(ctx, settings).run())
        await asyncio.gather(*work)

    return run_process("egress", settings, body)


if __name__ == "__main__":
    sys.exit(main())
