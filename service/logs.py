"""Service logging (``MTRANK_LOG_FORMAT``): plain text for a terminal, one JSON object per line
for a log pipeline. Both go through the stdlib ``logging`` root handler, uvicorn's loggers
included, so every line of the process has the same format.

Structured fields ride on a record as ``extra={...}``; the JSON formatter writes them as
top-level keys (``request_id``, ``status``, ``latency_ms``, ``event``...), the text formatter
leaves them out (the message already says what a person needs).
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
from typing import Any, Literal

import orjson

# Attributes every LogRecord has; anything else on a record came from ``extra=`` (uvicorn adds
# ``color_message``, the message with terminal colour codes: left out too).
_RECORD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message", "asctime", "color_message"
}
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts`` (UTC, ISO 8601, ms), ``level``, ``logger``, ``message``,
    ``pid``, the record's ``extra`` fields, and ``exc`` (the traceback text) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,  # which worker, with MTRANK_WORKERS > 1
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(line, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


def configure_logging(level: str, log_format: Literal["text", "json"]) -> None:
    """Send every logger (uvicorn's too) to one stderr handler in ``log_format`` at ``level``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in UVICORN_LOGGERS:
        # uvicorn's own config would give these handlers of their own in its text format.
        uv = logging.getLogger(name)
        uv.handlers.clear()
        uv.propagate = True
        uv.setLevel(level.upper())
