"""`vlpipe config [SERVICE]`: the effective settings, with secrets redacted."""

from __future__ import annotations

import argparse
import importlib
import json

from vlpipe.shared.config import ServiceSettings

SETTINGS = {
    "ingest": "vlpipe.services.ingest.settings:IngestSettings",
    "broker": "vlpipe.services.broker.settings:BrokerSettings",
    "egress": "vlpipe.services.egress.settings:EgressSettings",
    "engine": "vlpipe.services.engine.settings:EngineSettings",
}


def settings_class(service: str | None) -> type[ServiceSettings]:
    if service is None:
        return ServiceSettings
    module, _, name = SETTINGS[service].partition(":")
    cls: type[ServiceSettings] = getattr(importlib.import_module(module), name)
    return cls


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vlpipe config", description=__doc__)
    parser.add_argument("service", nargs="?", choices=sorted(SETTINGS))
    args = parser.parse_args(argv)
    settings = settings_class(args.service)()
    print(json.dumps(settings.redacted(), indent=2, default=str))
    return 0
