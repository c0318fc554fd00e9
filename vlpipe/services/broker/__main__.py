"""`vlpipe broker` / `python -m vlpipe.services.broker`: run the session broker."""

from __future__ import annotations

import sys

from vlpipe.services.broker.service import BrokerService
from vlpipe.services.broker.settings import BrokerSettings
from vlpipe.shared.service import ServiceContext, run_process
from vlpipe.shared.usage import service_parser

DESCRIPTION = (
    "Own one Voice Live (or local engine) WebSocket per session: frames and controls in, "
    "events out on vl:events:{session}."
)


def main(argv: list[str] | None = None) -> int:
    service_parser("broker", BrokerSettings, DESCRIPTION).parse_args(argv)  # --help exits here
    settings = BrokerSettings()

    async def body(ctx: ServiceContext) -> None:
        await BrokerService(ctx, settings).run()

    return run_process("broker", settings, body)


if __name__ == "__main__":
    sys.exit(main())
