"""A process that configures telemetry from OTEL_* variables and emits one message hop.

python -m tests.shared.telemetry_worker produce|consume TRACEPARENT_FILE
"""

from __future__ import annotations

import sys
from pathlib import Path

from opentelemetry import trace

from vlpipe.shared import telemetry


def main(mode: str, path: str) -> None:
    telemetry.configure(mode)
    tracer = telemetry.tracer(mode)
    counter = telemetry.meter(mode).create_counter("vlpipe.test.hops")
    if mode == "produce":
        attrs = telemetry.messaging_attributes("send", "vl:frames:{s1}", session_id="s1")
        with tracer.start_as_current_span(
            "send frames", kind=trace.SpanKind.PRODUCER, attributes=attrs
        ):
            Path(path).write_text(telemetry.current_traceparent() or "")
    else:
        parent = telemetry.extract(Path(path).read_text())
        attrs = telemetry.messaging_attributes("process", "vl:frames:{s1}", "1-0", session_id="s1")
        with tracer.start_as_current_span(
            "process frames", context=parent, kind=trace.SpanKind.CONSUMER, attributes=attrs
        ):
            pass
    counter.add(1)
    telemetry.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
