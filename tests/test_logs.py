"""Logs and request ids: ``MTRANK_LOG_FORMAT=json`` lines from a real ``mtrank serve``, the
JSON formatter itself, and ``X-Request-ID`` accepted, validated, echoed and logged."""

from __future__ import annotations

import json
import logging
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mtrank.bench.server import RemoteServer
from mtrank.service.logs import BlockHandler, JsonFormatter
from tests.conftest import _need
from tests.server import build_toy_version, rank_body

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy_repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("logs-repo")
    build_toy_version(repo, "toy", 1)
    return repo


def test_json_log_lines_parse_and_carry_the_request_id(toy_repo):
    server = RemoteServer(toy_repo, env={"MTRANK_LOG_FORMAT": "json", "MTRANK_LOG_LEVEL": "info"})
    body = rank_body(user_id="u7", n=12)
    del body["request_id"]
    r = server.post("/v1/rank", json=body, headers={"X-Request-ID": "trace-abc-123"})
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == "trace-abc-123" and r.json()["request_id"] == "trace-abc-123"
    bad = server.post("/v1/rank", content=b"{not json", headers={"X-Request-ID": "trace-bad-1"})
    assert bad.status_code == 422 and bad.headers["x-request-id"] == "trace-bad-1"
    server.stop()
    lines = server.output().splitlines()

    records = [json.loads(line) for line in lines]  # every line, uvicorn's included, is JSON
    assert len(records) >= 5
    assert all({"ts", "level", "logger", "message"} <= rec.keys() for rec in records)
    (ok,) = [rec for rec in records if rec.get("request_id") == "trace-abc-123"]
    assert ok["status"] == 200 and ok["bucket"] == "default" and ok["model"] == "toy" and ok["version"] == 1
    assert ok["user_group"] == "high" and ok["candidates"] == 12 and 0 < ok["latency_ms"] < 5000
    (failed,) = [rec for rec in records if rec.get("request_id") == "trace-bad-1"]
    assert failed["status"] == 422 and failed["level"] == "INFO"
    events = {rec.get("event") for rec in records}
    assert {"startup", "model_loaded"} <= events
    assert any(rec["logger"].startswith("uvicorn") for rec in records)


def test_request_id_precedence_and_validation(toy_repo):
    s = RemoteServer(toy_repo, env={"MTRANK_LOG_LEVEL": "info"})
    try:
        # The body's request_id names the answer; the header's names the request (and its log line).
        r = s.post("/v1/rank", json=rank_body(n=3), headers={"X-Request-ID": "hdr-1"})
        assert r.json()["request_id"] == "r-u1-3-0" and r.headers["x-request-id"] == "hdr-1"
        # Without a header, the body's id is echoed.
        r = s.post("/v1/rank", json=rank_body(n=3))
        assert r.headers["x-request-id"] == "r-u1-3-0"
        # Unusable ids (too long, control characters) are replaced by a generated one.
        anonymous = rank_body(n=3)
        del anonymous["request_id"]
        for given in ("x" * 129, "bad\tid"):
            r = s.post("/v1/rank", json=anonymous, headers={"X-Request-ID": given})
            assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"]), r.headers
        r = s.post("/v1/rank", json=rank_body(n=3), headers={"X-Request-ID": "x" * 128})
        assert r.headers["x-request-id"] == "x" * 128
        # Every route echoes it, errors included.
        assert s.get("/healthz", headers={"X-Request-ID": "probe-1"}).headers["x-request-id"] == "probe-1"
        assert s.get("/nope", headers={"X-Request-ID": "lost-1"}).headers["x-request-id"] == "lost-1"
        assert re.fullmatch(r"[0-9a-f]{32}", s.get("/v1/models").headers["x-request-id"])
    finally:
        s.stop()
    lines = s.output().splitlines()
    # Text lines name the request too.
    (line,) = [ln for ln in lines if "request_id=hdr-1" in ln]
    assert " INFO mtrank.access: POST /v1/rank 200 " in line and "model=toy v1" in line, line


def test_json_formatter_keeps_the_traceback_in_one_line():
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.getLogger("x").makeRecord("x", logging.ERROR, __file__, 1, "failed %s", ("it",),
                                                   exc_info=sys.exc_info(), extra={"request_id": "r-9"})
    text = JsonFormatter().format(record)
    assert "\n" not in text
    line = json.loads(text)
    assert line["message"] == "failed it" and line["request_id"] == "r-9" and line["level"] == "ERROR"
    assert "Traceback" in line["exc"] and "ValueError: boom" in line["exc"]


# -- lines written in blocks ---------------------------------------------------------------


def _pipe_handler(flush_s: float, limit: int = 64 * 1024) -> tuple[BlockHandler, int, logging.Logger]:
    """A BlockHandler writing into a real pipe; its read end (non-blocking) and a logger of its own."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    handler = BlockHandler(os.fdopen(write_fd, "w"), flush_s, limit=limit)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger(f"test-block-{read_fd}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    return handler, read_fd, logger


def _waiting(fd: int) -> str:
    """What the pipe holds now ("" when nothing)."""
    if not select.select([fd], [], [], 0)[0]:
        return ""
    return os.read(fd, 1 << 20).decode()


def test_block_handler_holds_info_lines_and_writes_them_before_a_warning_in_order():
    handler, fd, logger = _pipe_handler(flush_s=60.0)
    try:
        logger.info("one")
        logger.debug("two")
        assert _waiting(fd) == ""
        logger.warning("three")
        assert _waiting(fd) == "INFO one\nDEBUG two\nWARNING three\n"
        logger.info("four")
        handler.flush()
        assert _waiting(fd) == "INFO four\n"
        logger.info("five")
        handler.close()  # as logging.shutdown does at exit
        assert _waiting(fd) == "INFO five\n"
        logger.info("six")  # after close, each line at once
        assert _waiting(fd) == "INFO six\n"
    finally:
        handler.close()
        os.close(fd)


def test_block_handler_writes_when_its_block_is_full_and_every_interval():
    handler, fd, logger = _pipe_handler(flush_s=60.0, limit=100)
    try:
        for i in range(4):
            logger.info("line %d %s", i, "x" * 20)  # 32 characters each
        assert _waiting(fd) == "".join(f"INFO line {i} {'x' * 20}\n" for i in range(4))
    finally:
        handler.close()
        os.close(fd)
    handler, fd, logger = _pipe_handler(flush_s=0.05)
    try:
        logger.info("soon")
        deadline, seen = time.monotonic() + 5.0, ""
        while "soon" not in seen and time.monotonic() < deadline:
            time.sleep(0.01)
            seen += _waiting(fd)
        assert seen == "INFO soon\n"
    finally:
        handler.close()
        os.close(fd)


def test_block_handler_survives_a_reader_that_is_gone(capsys):
    handler, fd, logger = _pipe_handler(flush_s=60.0)
    os.close(fd)
    logger.info("lost")
    logger.error("also lost")  # the write fails (EPIPE): reported on stderr, not raised
    handler.close()
    assert "also lost" in capsys.readouterr().err


_WRITER = """
import logging, sys
from mtrank.service.logs import BlockHandler
handler = BlockHandler(sys.stderr, flush_s=60.0)
logger = logging.getLogger("w")
logger.addHandler(handler)
logger.setLevel(logging.INFO)
for i in range(4000):
    logger.info("w%s %06d %s", sys.argv[1], i, "x" * 180)
handler.close()
"""


def test_two_processes_sharing_a_pipe_never_interleave_inside_a_line():
    """As the workers of MTRANK_WORKERS share the supervisor's stderr: each write holds whole lines and
    at most PIPE_BUF bytes, which the kernel keeps in one piece even while the reader lags behind."""
    read_fd, write_fd = os.pipe()
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, str(k)], stderr=write_fd, cwd=ROOT)
               for k in (1, 2)]
    os.close(write_fd)
    data = bytearray()
    with os.fdopen(read_fd, "rb") as pipe:
        while chunk := pipe.read1(8192):  # a slow reader: the writers block on a full pipe, mid-block
            data += chunk
            time.sleep(0.001)
    assert [w.wait(30) for w in writers] == [0, 0]
    lines = data.decode().splitlines()
    pattern = re.compile(r"w[12] \d{6} x{180}")
    assert [ln for ln in lines if not pattern.fullmatch(ln)] == []
    assert sorted(lines) == sorted(f"w{k} {i:06d} {'x' * 180}" for k in (1, 2) for i in range(4000))


def test_a_terminal_gets_each_line_as_it_comes_and_a_pipe_gets_blocks():
    from mtrank.service.logs import configure_logging

    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    primary, secondary = os.openpty()
    read_fd, write_fd = os.pipe()
    try:
        with os.fdopen(secondary, "w") as terminal, os.fdopen(write_fd, "w") as pipe:
            assert type(configure_logging("info", "text", 0.1, stream=terminal)) is logging.StreamHandler
            handler = configure_logging("info", "json", 0.1, stream=pipe)
            assert isinstance(handler, BlockHandler) and handler.flush_s == 0.1
            assert type(configure_logging("info", "text", 0.0, stream=pipe)) is logging.StreamHandler
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
        os.close(primary)
        os.close(read_fd)


def test_a_running_server_writes_its_request_lines_within_the_flush_interval(toy_repo):
    s = RemoteServer(toy_repo, env={"MTRANK_LOG_LEVEL": "info", "MTRANK_LOG_FLUSH_MS": "100"})
    try:
        r = s.post("/v1/rank", json=rank_body(n=4), headers={"X-Request-ID": "flushed-1"})
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 5.0
        while not any("request_id=flushed-1" in line for line in s.log_lines()) and time.monotonic() < deadline:
            time.sleep(0.02)
        (line,) = [ln for ln in s.log_lines() if "request_id=flushed-1" in ln]
        assert " INFO mtrank.access: POST /v1/rank 200 " in line, line
    finally:
        s.stop()


# -- tracing -------------------------------------------------------------------------------


def test_tracing_is_a_shared_no_op_when_off():
    from mtrank.service import tracing

    assert not tracing.enabled()
    assert tracing.span("lookup") is tracing.span("fusion", rows=3)
    assert tracing.request_span("POST", "/v1/rank", []) is tracing.span("batch")


def test_a_traced_rank_request_has_its_stage_spans_under_the_callers_trace(toy_repo):
    try:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    except ImportError as e:
        _need(f"opentelemetry-sdk (the otel extra) is not installed: {e}")
    from fastapi.testclient import TestClient

    from mtrank.service import tracing
    from mtrank.service.app import create_app
    from mtrank.service.settings import load_settings

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    tracing.use(provider)
    try:
        settings = load_settings(model_repo=toy_repo, device="cpu", intra_op_threads=1)
        with TestClient(create_app(settings)) as client:
            r = client.post("/v1/rank", json=rank_body(n=6), headers={
                "X-Request-ID": "traced-1", "traceparent": f"00-{trace_id}-{parent_id}-01"})
            assert r.status_code == 200, r.text
            assert client.get("/healthz").status_code == 200  # probes are not traced
    finally:
        tracing.shutdown()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"POST /v1/rank", "parse", "features", "lookup", "batch", "queue_wait", "inference",
                          "fusion"}, set(spans)
    root = spans["POST /v1/rank"]
    assert f"{root.context.trace_id:032x}" == trace_id and f"{root.parent.span_id:016x}" == parent_id
    assert root.attributes["mtrank.request_id"] == "traced-1" and root.attributes["http.response.status_code"] == 200
    assert root.attributes["mtrank.model"] == "toy" and root.attributes["mtrank.candidates"] == 6
    for name in ("parse", "features", "batch", "fusion"):
        assert spans[name].parent.span_id == root.context.span_id, name
    assert spans["lookup"].parent.span_id == spans["features"].context.span_id
    for name in ("queue_wait", "inference"):
        assert spans[name].parent.span_id == spans["batch"].context.span_id, name
    assert spans["queue_wait"].end_time == spans["inference"].start_time
    assert spans["inference"].attributes["rows"] == 6
    assert spans["batch"].attributes["model"] == "toy"
    assert all(root.start_time <= s.start_time and s.end_time <= root.end_time for s in spans.values())
