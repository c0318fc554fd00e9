"""An in-process OTLP/HTTP receiver: services export real OTLP protobuf to it in tests."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest


@dataclass
class ReceivedSpan:
    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    links: list[tuple[str, str]]


@dataclass
class OtlpReceiver:
    endpoint: str = ""
    spans: list[ReceivedSpan] = field(default_factory=list)
    metrics: dict[str, list[Any]] = field(default_factory=dict)
    payloads: list[bytes] = field(default_factory=list)
    """Every request body as received (to search for what must never be exported)."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def metric_names(self) -> set[str]:
        with self.lock:
            return set(self.metrics)


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def _service(resource: Any) -> str:
    for attr in resource.attributes:
        if attr.key == "service.name":
            return str(_value(attr.value))
    return ""


@contextmanager
def otlp_receiver() -> Iterator[OtlpReceiver]:
    """Serve OTLP/HTTP (protobuf) on a free loopback port until the block ends."""
    received = OtlpReceiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with received.lock:
                received.payloads.append(body)
            if self.path == "/v1/traces":
                req = ExportTraceServiceRequest.FromString(body)
                with received.lock:
                    for rs in req.resource_spans:
                        service = _service(rs.resource)
                        for ss in rs.scope_spans:
                            for s in ss.spans:
                                received.spans.append(
                                    ReceivedSpan(
                                        service=service,
                                        name=s.name,
                                        kind=s.kind,
                                        trace_id=s.trace_id.hex(),
                                        span_id=s.span_id.hex(),
                                        parent_span_id=s.parent_span_id.hex(),
                                        attributes={a.key: _value(a.value) for a in s.attributes},
                                        links=[
                                            (lk.trace_id.hex(), lk.span_id.hex()) for lk in s.links
                                        ],
                                    )
                                )
            elif self.path == "/v1/metrics":
                req = ExportMetricsServiceRequest.FromString(body)
                with received.lock:
                    for rm in req.resource_metrics:
                        for sm in rm.scope_metrics:
                            for m in sm.metrics:
                                received.metrics.setdefault(m.name, []).append(m)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    received.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield received
    finally:
        server.shutdown()
        server.server_close()
