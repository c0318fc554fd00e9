"""JSON-lines logs with trace, span and session ids; never audio bytes or secrets."""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar
from typing import Any

from opentelemetry import trace

#: The session the current task works on; set by session tasks, read by every log line.
current_session: ContextVar[str | None] = ContextVar("vlpipe_session", default=None)

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_SECRET_WORDS = ("password", "secret", "token", "api_key", "apikey", "authorization", "key")


def _safe(name: str, value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    if any(word in name.lower() for word in _SECRET_WORDS):
        return "***"
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return repr(value)[:500]


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, service, logger, message, ids, extras."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            out["trace_id"] = format(span.trace_id, "032x")
            out["span_id"] = format(span.span_id, "016x")
        session = current_session.get()
        if session:
            out["session"] = session
        for name, value in record.__dict__.items():
            if name not in _STANDARD and not name.startswith("_"):
                out[name] = _safe(name, value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure(service: str, level: str = "INFO") -> None:
    """Send every log line of this process to stderr as JSON."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("websockets", "faster_whisper", "azure"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
