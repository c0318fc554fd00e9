"""OpenTelemetry tracing and metrics, configured from the standard `OTEL_*` variables.

* `OTEL_SDK_DISABLED=true`: nothing is set up; the API's no-op tracer and meter remain.
* `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`: the resource (read by the SDK).
* `OTEL_TRACES_EXPORTER` / `OTEL_METRICS_EXPORTER`: `otlp` (OTLP/HTTP, endpoint from
  `OTEL_EXPORTER_OTLP_ENDPOINT` or the per-signal variables), `console`, or `none`.
  Unset, they mean `otlp` when an OTLP endpoint is configured and `none` otherwise, so a
  laptop run does not spam connection errors.
* Metrics are also always served in Prometheus format on the service's `/metrics`.

Trace context crosses Redis as a W3C `traceparent` message field (`inject`/`extract`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from opentelemetry import metrics, propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_PROPAGATOR = TraceContextTextMapPropagator()

#: Histogram buckets for a turn's latencies (what a caller hears as silence), in ms.
TURN_BUCKETS_MS = (50, 100, 200, 300, 500, 750, 1000, 1500, 2000, 3000, 5000, 10000)
_configured = False


def disabled() -> bool:
    return os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


def _exporter_names(signal: str) -> list[str]:
    explicit = os.environ.get(f"OTEL_{signal.upper()}_EXPORTER")
    if explicit:
        return [n.strip().lower() for n in explicit.split(",") if n.strip()]
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
        f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT"
    )
    return ["otlp"] if endpoint else []


def configure(service_name: str) -> None:
    """Install the tracer and meter providers for this process (once)."""
    global _configured
    if _configured or disabled():
        return
    _configured = True
    os.environ.setdefault("OTEL_SERVICE_NAME", f"vlpipe-{service_name}")
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import (
        ConsoleMetricExporter,
        MetricReader,
        PeriodicExportingMetricReader,
    )
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    resource = Resource.create()
    tracer_provider = TracerProvider(resource=resource)
    for name in _exporter_names("traces"):
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        elif name == "console":
            tracer_provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(tracer_provider)

    readers: list[MetricReader] = [PrometheusMetricReader()]
    for name in _exporter_names("metrics"):
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter,
            )

            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
        elif name == "console":
            readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
    metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=readers))
    propagate.set_global_textmap(_PROPAGATOR)


def shutdown() -> None:
    """Flush and stop exporters (on service exit)."""
    provider: Any = trace.get_tracer_provider()
    if hasattr(provider, "shutdown"):
        provider.shutdown()
    meter_provider: Any = metrics.get_meter_provider()
    if hasattr(meter_provider, "shutdown"):
        meter_provider.shutdown()


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(f"vlpipe.{name}")


def meter(name: str) -> metrics.Meter:
    return metrics.get_meter(f"vlpipe.{name}")


def current_traceparent(context: Context | None = None) -> str | None:
    """The W3C traceparent of the current (or given) span, or None if there is none."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=context)
    return carrier.get("traceparent")


def extract(traceparent: str | bytes | None) -> Context | None:
    """The remote context a message's traceparent names, or None."""
    if not traceparent:
        return None
    if isinstance(traceparent, bytes):
        traceparent = traceparent.decode("ascii", "replace")
    ctx = _PROPAGATOR.extract({"traceparent": traceparent})
    span = trace.get_current_span(ctx)
    return ctx if span.get_span_context().is_valid else None


def link_from(traceparent: str | bytes | None) -> list[trace.Link]:
    """A span link to the message's producer span, for spans that handle a batch."""
    ctx = extract(traceparent)
    return [trace.Link(trace.get_current_span(ctx).get_span_context())] if ctx else []


def messaging_attributes(
    operation: str, destination: str, message_id: str | None = None, **extra: Any
) -> Mapping[str, Any]:
    """Attributes of the OpenTelemetry messaging semantic conventions for Redis Streams."""
    attrs: dict[str, Any] = {
        "messaging.system": "redis",
        "messaging.operation.type": operation,
        "messaging.destination.name": destination,
    }
    if message_id is not None:
        attrs["messaging.message.id"] = message_id
    attrs.update({k.replace("_", "."): v for k, v in extra.items() if v is not None})
    return attrs
