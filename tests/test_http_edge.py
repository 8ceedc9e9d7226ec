"""The HTTP edge of a real ``mtrank serve`` against hostile clients (issue 31): CR, LF, ESC and NUL
in every client-controlled string leave one log line per request with no raw control byte, and the
admin endpoint takes its token only as ``Bearer`` (scheme name in any case)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from mtrank.bench.server import RemoteServer
from tests.server import build_toy_version, rank_body, raw_request, send_raw

ADMIN_TOKEN = "edge-admin-token"
CONTROLS = {"\r": "\\r", "\n": "\\n", "\x1b": "\\x1b", "\x00": "\\x00"}
"""Each control character and how a text log line shows it."""
TEXT_RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING) [\w.]+: ")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo: Path = tmp_path_factory.mktemp("edge-repo")
    build_toy_version(repo, "toy", 1)
    s = RemoteServer(repo, env={"MTRANK_LOG_LEVEL": "info", "MTRANK_ADMIN_TOKEN": ADMIN_TOKEN})
    _lines_of(s, lambda: None)  # past the start-up lines
    yield s
    s.stop()


def _lines_of(server: RemoteServer, send) -> list[str]:
    """The log lines written while ``send()`` ran: a request with a fresh id follows it, and its
    access line, once read, closes the span (lines of one process come in order)."""
    since = len(server.log_lines())
    send()
    marker = f"sync-{time.monotonic_ns()}"
    server.get("/v1/models", headers={"X-Request-ID": marker})
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        lines = server.log_lines()[since:]
        end = next((i for i, line in enumerate(lines) if marker in line), None)
        if end is not None:
            return lines[:end]
        time.sleep(0.02)
    raise AssertionError(f"no access line for {marker}")


def _assert_one_clean_line(lines: list[str], must_contain: str) -> None:
    assert len(lines) == 1, lines
    text = lines[0].removesuffix("\n")
    assert TEXT_RECORD.match(text) and must_contain in text, text
    assert all(c.isprintable() for c in text), f"raw control byte in {text!r}"


def _get(server: RemoteServer, target: bytes, headers: list[tuple[bytes, bytes]] = ()) -> int | None:
    return send_raw(server.port, raw_request(b"GET", target, headers))[0]


@pytest.mark.parametrize("char", list(CONTROLS), ids=["CR", "LF", "ESC", "NUL"])
def test_a_control_character_in_the_path_is_escaped_in_its_one_log_line(server, char):
    encoded = f"%{ord(char):02X}".encode()
    lines = _lines_of(server, lambda: _get(server, b"/inj-path-x" + encoded + b"FORGED"))
    _assert_one_clean_line(lines, f"GET /inj-path-x{CONTROLS[char]}FORGED 404 ")


@pytest.mark.parametrize("char", list(CONTROLS), ids=["CR", "LF", "ESC", "NUL"])
def test_a_control_character_in_the_query_leaves_one_log_line(server, char):
    encoded = f"%{ord(char):02X}".encode()
    lines = _lines_of(server, lambda: _get(server, b"/inj-query?q=x" + encoded + b"FORGED"))
    _assert_one_clean_line(lines, "GET /inj-query 404 ")


@pytest.mark.parametrize("char", list(CONTROLS), ids=["CR", "LF", "ESC", "NUL"])
@pytest.mark.parametrize("header", [b"User-Agent", b"X-Request-ID", b"traceparent"])
def test_a_raw_control_character_in_a_header_value_leaves_one_log_line(server, header, char):
    """HTTP forbids these bytes in a header value: the parser answers 400 and logs one warning."""
    statuses = []
    lines = _lines_of(server, lambda: statuses.append(
        _get(server, b"/inj-header", [(header, b"x" + char.encode() + b"FORGED")])))
    assert statuses == [400]
    _assert_one_clean_line(lines, "WARNING uvicorn.error: Invalid HTTP request received.")


@pytest.mark.parametrize("char", list(CONTROLS), ids=["CR", "LF", "ESC", "NUL"])
def test_a_control_character_in_the_body_request_id_leaves_one_log_line(server, char):
    body = {**rank_body(n=3), "request_id": f"x{char}FORGED"}
    statuses = []
    lines = _lines_of(server, lambda: statuses.append(server.post(
        "/v1/rank", content=json.dumps(body), headers={"X-Request-ID": "inj-body-id"}).status_code))
    assert statuses == [422]
    _assert_one_clean_line(lines, "POST /v1/rank 422 ")
    assert "request_id=inj-body-id" in lines[0] and "FORGED" not in lines[0]


@pytest.mark.parametrize("authorization, status", [
    (None, 401),
    (ADMIN_TOKEN, 401),  # a bare token: the scheme is required
    (f"Basic {ADMIN_TOKEN}", 401),
    ("Bearer wrong", 401),
    ("Bearer", 401),
    (f"Bearer {ADMIN_TOKEN}", 200),
    (f"bearer {ADMIN_TOKEN}", 200),
    (f"BEARER {ADMIN_TOKEN}", 200),
])
def test_admin_reload_takes_the_token_only_with_the_bearer_scheme_in_any_case(server, authorization, status):
    r = server.post("/admin/reload", headers={"Authorization": authorization} if authorization else {})
    assert r.status_code == status, r.text
    if status == 401:
        assert r.headers["www-authenticate"] == "Bearer" and "Authorization: Bearer" in r.json()["error"]
    else:
        assert r.json()["served"] == {"toy": [1]}
