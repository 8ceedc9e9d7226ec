"""Service logging (``MTRANK_LOG_FORMAT``): plain text for a terminal, one JSON object per line
for a log pipeline. Both go through the stdlib ``logging`` root handler, uvicorn's loggers
included, so every line of the process has the same format.

Structured fields ride on a record as ``extra={...}``; the JSON formatter writes them as
top-level keys (``request_id``, ``status``, ``latency_ms``, ``event``...), the text formatter
leaves them out (the message already says what a person needs).

A log line is one record: a character that is not printable (CR, LF, ESC, NUL, any other C0 or C1
control, DEL, a Unicode line separator) is written escaped, whoever put it in the message (a
client's path, header value or id), so that a client can neither forge a line nor drive a
terminal. Text lines show it as ``\\n``, ``\\x1b``, ``\\u2028``; JSON lines as ``\\u001b``
(the encoder escapes C0 itself; DEL, C1 and separators are escaped here). Tracebacks keep their
lines.

Lines are written in blocks (:class:`BlockHandler`, ``MTRANK_LOG_FLUSH_MS``): one write per line
was a system call and a wake-up of the reader (a container runtime, a log shipper) per request.
"""

from __future__ import annotations

import datetime as dt
import logging
import select
import sys
import threading
from typing import Any, Literal

import orjson

# Attributes every LogRecord has; anything else on a record came from ``extra=`` (uvicorn adds
# ``color_message``, the message with terminal colour codes: left out too).
_RECORD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message", "asctime", "color_message"
}
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def escape_unprintable(text: str) -> str:
    """``text`` with each character that is not printable as its Python escape (``\\n``, ``\\x00``)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _json_escape(c: str) -> str:
    code = ord(c)
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    code -= 0x10000  # beyond the BMP: a UTF-16 surrogate pair, as JSON spells it
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


class TextFormatter(logging.Formatter):
    """:data:`TEXT_FORMAT`, its message escaped by :func:`escape_unprintable`."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        if not record.message.isprintable():
            record.message = escape_unprintable(record.message)
        return super().formatMessage(record)


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
        text = orjson.dumps(line, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
        if text.isprintable():
            return text
        # orjson escapes C0 controls but writes DEL, C1 and separators raw; outside strings it
        # writes only printable ASCII, so escaping them anywhere in the text is exact.
        return "".join(c if c.isprintable() else _json_escape(c) for c in text)


PIPE_BUF = getattr(select, "PIPE_BUF", 4096)
"""Largest write to a pipe that POSIX keeps in one piece when several processes write to it."""


class BlockHandler(logging.StreamHandler):
    """A stream handler that writes its lines in blocks: every ``flush_s`` seconds (a thread of its
    own), as soon as ``limit`` bytes wait, and at once, with every line before it, for a warning or
    worse, on :meth:`flush` and at close (``logging.shutdown`` at exit). A line is thus held back at
    most ``flush_s``, except when the process is killed outright.

    Each write holds whole lines and at most :data:`PIPE_BUF` bytes (a longer line goes alone), so
    that the workers of ``MTRANK_WORKERS``, which share one stderr pipe, never interleave inside a
    line, as with one write per line.

    Per line, a write to a pipe is a system call that also wakes the reader: in the server, at 20
    candidates and concurrency 32, that write was 12 % of the event loop's samples (py-spy).
    """

    def __init__(self, stream: Any, flush_s: float, limit: int = 64 * 1024):
        super().__init__(stream)
        self.flush_s = flush_s
        self.limit = limit
        self._lines: list[tuple[str, int]] = []
        """Waiting lines with their length in bytes."""
        self._size = 0
        self._stopping = threading.Event()
        self._flusher: threading.Thread | None = None

    def emit(self, record: logging.LogRecord) -> None:
        # Called with the handler's lock held (Handler.handle), which also orders the blocks.
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        size = len(line) if line.isascii() else len(line.encode("utf-8", "backslashreplace"))
        self._lines.append((line, size))
        self._size += size
        if record.levelno >= logging.WARNING or self._size >= self.limit or self._stopping.is_set():
            self.flush()
        elif self._flusher is None:
            self._flusher = threading.Thread(target=self._flush_every, name="mtrank-log-flush", daemon=True)
            self._flusher.start()

    def flush(self) -> None:
        """Write every waiting line now."""
        with self.lock:
            if not self._lines:
                return
            lines, self._lines, self._size = self._lines, [], 0
            try:
                for block in _blocks(lines, PIPE_BUF):
                    self.stream.write(block)
                    self.stream.flush()
            except Exception:
                # The reader is gone (a closed pipe): logging must not take the server down with it.
                self.handleError(logging.makeLogRecord({"msg": lines[-1][0].rstrip(self.terminator)}))

    def _flush_every(self) -> None:
        while not self._stopping.wait(self.flush_s):
            self.flush()

    def close(self) -> None:
        self._stopping.set()
        self.flush()
        super().close()


def _blocks(lines: list[tuple[str, int]], most: int) -> list[str]:
    """Consecutive lines joined into blocks of at most ``most`` bytes (a longer line is a block alone)."""
    blocks: list[str] = []
    part: list[str] = []
    size = 0
    for line, n in lines:
        if part and size + n > most:
            blocks.append("".join(part))
            part, size = [], 0
        part.append(line)
        size += n
    if part:
        blocks.append("".join(part))
    return blocks


def configure_logging(level: str, log_format: Literal["text", "json"], flush_s: float = 0.0,
                      stream: Any = None) -> logging.Handler:
    """Send every logger (uvicorn's too) to one handler on ``stream`` (stderr) in ``log_format`` at
    ``level``; returns it. ``flush_s`` > 0 writes the lines in blocks at least that often
    (:class:`BlockHandler`), except to a terminal, where a person reads them as they come."""
    stream = sys.stderr if stream is None else stream
    blocks = flush_s > 0 and not _is_terminal(stream)
    handler = BlockHandler(stream, flush_s) if blocks else logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.flush()
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in UVICORN_LOGGERS:
        # uvicorn's own config would give these handlers of their own in its text format.
        uv = logging.getLogger(name)
        uv.handlers.clear()
        uv.propagate = True
        uv.setLevel(level.upper())
    return handler


def _is_terminal(stream: Any) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def flush_logs() -> None:
    """Write what the root handlers hold, before a line printed straight to stderr."""
    for handler in logging.getLogger().handlers:
        handler.flush()
