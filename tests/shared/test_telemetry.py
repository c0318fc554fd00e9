"""Telemetry configured from OTEL_* variables; trace context crosses processes in fields."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from opentelemetry.trace import SpanKind

from tests.otlp_receiver import otlp_receiver
from tests.shared.procs import ROOT


def _run(mode: str, path: Path, env: dict[str, str]) -> None:
    subprocess.run(
        [sys.executable, "-m", "tests.shared.telemetry_worker", mode, str(path)],
        cwd=ROOT, env={**os.environ, **env}, check=True, timeout=60,
    )  # fmt: skip


def test_a_message_hop_between_processes_is_one_trace_exported_over_otlp(tmp_path: Path) -> None:
    carrier = tmp_path / "traceparent"
    with otlp_receiver() as otlp:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint, "OTEL_SDK_DISABLED": "false"}
        _run("produce", carrier, {**env, "OTEL_SERVICE_NAME": "vlpipe-ingest"})
        _run("consume", carrier, {**env, "OTEL_SERVICE_NAME": "vlpipe-broker"})
        spans = {s.name: s for s in otlp.spans}
        assert set(spans) == {"send frames", "process frames"}
        send, process = spans["send frames"], spans["process frames"]
        assert send.service == "vlpipe-ingest" and process.service == "vlpipe-broker"
        assert send.kind == SpanKind.PRODUCER.value + 1  # OTLP enums are offset by one
        assert process.kind == SpanKind.CONSUMER.value + 1
        assert process.trace_id == send.trace_id and process.parent_span_id == send.span_id
        assert carrier.read_text().startswith(f"00-{send.trace_id}-{send.span_id}-")
        assert process.attributes["messaging.system"] == "redis"
        assert process.attributes["messaging.destination.name"] == "vl:frames:{s1}"
        assert process.attributes["messaging.message.id"] == "1-0"
        assert process.attributes["session.id"] == "s1"
        assert "vlpipe.test.hops" in otlp.metric_names()


def test_sdk_disabled_exports_nothing_and_propagates_nothing(tmp_path: Path) -> None:
    carrier = tmp_path / "traceparent"
    with otlp_receiver() as otlp:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint, "OTEL_SDK_DISABLED": "true"}
        _run("produce", carrier, env)
        assert otlp.spans == [] and otlp.metric_names() == set()
    assert carrier.read_text() == ""
