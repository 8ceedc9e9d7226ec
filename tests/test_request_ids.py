"""Request ids and other client-controlled strings through a real ``mtrank serve`` (issue 27).

One rule for request ids from the body and from the ``X-Request-ID`` header: visible ASCII
(0x21-0x7E), 1 to 128 characters. A body id that breaks it is a 422 naming ``request_id``; a
header id that breaks it is replaced by a generated one and ``X-Request-ID-Replaced`` says why.
Whatever a client sends, it gets a status line, never a 5xx, and the server logs no ERROR, no
traceback and no raw control character. Fixed cases name each kind of bad input; seeded fuzz
cases mix characters inside and outside the rule at lengths around the limit. Requests go out on
raw sockets: httpx refuses to send most of these header values.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from mtrank.bench.server import RemoteServer
from tests.server import build_toy_version, rank_body, raw_request, send_raw

GENERATED = re.compile(rb"[0-9a-f]{32}")
TEXT_RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING) [\w.]+: ")
PARSER_REFUSAL = b"Invalid HTTP request received."
"""uvicorn's 400 body for bytes its HTTP parser refuses (raw control characters in a header or target)."""

VALID_IDS = ["r-1", "x" * 128, "!", "~", "a.b:c/d_e@f#g$h%i^&*()[]{}<>?;'\"\\|`"]
INVALID_IDS = [
    "", " ", "a b", "a\tb", "a\nb", "\r\n", "\x00", "a\x00b", "a\x1b[31mb", "\x7f", "\x85", "\u2028",
    "é", "日本語", "x" * 129, "x" * 20_000, "x" * 127 + "\n",
]
HEADER_VALUES = [
    b"", b"a b", b"a\tb", b"\x00", b"a\x00b", b"a\x1b[31mb", b"a\rb", b"a\nb", b"\x7f", b"x" * 129, b"x" * 20_000,
    "é".encode(), "日本語".encode(), b"\xc2\x9b", b"\xff\xfe", b"\xc3\x28", b"\x80",
]
TARGETS = [
    b"/x%0Ay", b"/x%0D%0Ay", b"/x%00", b"/x%1B[31m", b"/x%7F", b"/x%C2%9B", b"/%ff%fe", b"/a\x1bb", b"/\xff",
    b"/a b", b"/" + b"a" * 20_000, b"/healthz?q=%0A%00%1B", b"/healthz?q=\x1b", b"/v1/rank%00", b"/v1/rank\x00",
]


RULE = re.compile(r"[!-~]{1,128}")
FUZZ_CHARS = [chr(c) for c in (*range(0x00, 0x21), 0x7F, *range(0x80, 0xA0), 0xA0, 0xE9, 0x2028, 0xFEFF, 0x1F600)]
"""Characters outside the rule, mixed by the fuzz tests with characters inside it."""


def _fuzz_ids(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    ids = []
    for _ in range(n):
        length = rng.choice([0, 1, 2, 5, 40, 127, 128, 129, 300])
        bad_share = rng.choice([0.0, 0.01, 0.1, 0.5])
        ids.append("".join(rng.choice(FUZZ_CHARS) if rng.random() < bad_share else chr(rng.randint(0x21, 0x7E))
                           for _ in range(length)))
    return ids


@pytest.fixture(scope="module")
def toy_repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("request-ids-repo")
    build_toy_version(repo, "toy", 1)
    return repo


@pytest.fixture(scope="module", params=["text", "json"])
def server(request, toy_repo):
    s = RemoteServer(toy_repo, env={"MTRANK_LOG_FORMAT": request.param, "MTRANK_LOG_LEVEL": "info"})
    s.log_format = request.param
    yield s
    s.stop()


def _anonymous_body(**fields) -> bytes:
    body = rank_body(n=3)
    del body["request_id"]
    return json.dumps({**body, **fields}).encode()


def _rank(server, headers=(), body: bytes | None = None) -> tuple[int | None, dict[bytes, bytes], bytes]:
    headers = [(b"Content-Type", b"application/json"), *headers]
    body = _anonymous_body() if body is None else body
    return send_raw(server.port, raw_request(b"POST", b"/v1/rank", headers, body))


def _new_log_lines(server, since: int, marker: str) -> list[str]:
    """The server's log lines from index ``since``, once the access line of a request with
    request id ``marker`` (sent now) shows that every earlier line has been read."""
    import time

    server.get("/v1/models", headers={"X-Request-ID": marker})
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        lines = server.log_lines()[since:]
        if any(marker in line for line in lines):
            return lines
        time.sleep(0.02)
    raise AssertionError(f"the access line of {marker} never came:\n{''.join(server.log_lines()[since:])}")


def _assert_clean_log(server, lines: list[str]) -> None:
    """No ERROR, no traceback, every line a whole record (no line forged by a client's CR or LF),
    and no raw control character (nor DEL, C1 or a Unicode line separator) anywhere."""
    for line in lines:
        text = line.removesuffix("\n")
        assert "Traceback" not in text and " ERROR " not in text and '"level":"ERROR"' not in text, line
        assert not [c for c in text if not c.isprintable()], f"raw control character in a log line: {text!r}"
        if server.log_format == "json":
            json.loads(text)
        else:
            assert TEXT_RECORD.match(text), f"not a log record of its own: {text!r}"


@pytest.mark.parametrize("rid", VALID_IDS)
def test_a_valid_body_request_id_is_echoed(server, rid):
    status, headers, body = _rank(server, body=_anonymous_body(request_id=rid))
    assert status == 200, body
    assert json.loads(body)["request_id"] == rid and headers[b"x-request-id"] == rid.encode()
    assert b"x-request-id-replaced" not in headers


def test_every_invalid_body_request_id_is_a_422_naming_it(server):
    since = len(server.log_lines())
    for rid in INVALID_IDS:
        status, headers, body = _rank(server, body=_anonymous_body(request_id=rid))
        assert status == 422, (rid[:40], status, body[:200])
        message = json.loads(body)["error"]
        assert message.startswith("invalid request: request_id: ") and "0x21-0x7E" in message, message
        assert GENERATED.fullmatch(headers[b"x-request-id"]), headers
    # JSON that is not UTF-8, or with a raw control character in the string: malformed, still a 422.
    template = _anonymous_body(request_id="@@")
    for raw in (b"\xff\xfe", b"a\x00b", b"a\nb", b"\xc3\x28"):
        status, _, body = _rank(server, body=template.replace(b"@@", raw))
        assert status == 422 and json.loads(body)["error"].startswith("malformed JSON"), (raw, status, body)
    _assert_clean_log(server, _new_log_lines(server, since, "body-ids-done"))


@pytest.mark.parametrize("rid", VALID_IDS[:3])
def test_a_valid_header_request_id_is_echoed_and_names_the_request(server, rid):
    status, headers, body = _rank(server, headers=[(b"X-Request-ID", rid.encode())])
    assert status == 200, body
    assert headers[b"x-request-id"] == rid.encode() and json.loads(body)["request_id"] == rid
    assert b"x-request-id-replaced" not in headers


def test_every_invalid_header_request_id_is_replaced_and_the_answer_says_so(server):
    since = len(server.log_lines())
    reached_the_app = 0
    for value in HEADER_VALUES:
        status, headers, body = _rank(server, headers=[(b"X-Request-ID", value)])
        assert status is not None and status < 500, (value[:40], status)
        if status == 400:  # bytes HTTP itself forbids (raw CR, LF, NUL, ESC, DEL): refused by the parser
            assert body == PARSER_REFUSAL, (value[:40], body)
            continue
        reached_the_app += 1
        assert status == 200, (value[:40], status, body[:200])
        generated = headers[b"x-request-id"]
        assert GENERATED.fullmatch(generated) and json.loads(body)["request_id"] == generated.decode()
        expected = b"empty" if not value.strip() else b"too-long" if value.isascii() and b" " not in value \
            and b"\t" not in value else b"invalid-characters"
        assert headers[b"x-request-id-replaced"] == expected, (value[:40], headers)
    assert reached_the_app >= 11
    # With a valid body id beside it, the body's id still names the answer.
    status, headers, body = _rank(server, headers=[(b"X-Request-ID", "é".encode())],
                                  body=_anonymous_body(request_id="body-1"))
    assert status == 200 and json.loads(body)["request_id"] == "body-1"
    assert GENERATED.fullmatch(headers[b"x-request-id"]) and headers[b"x-request-id-replaced"] == b"invalid-characters"
    _assert_clean_log(server, _new_log_lines(server, since, "header-ids-done"))


def test_bad_header_values_and_targets_get_a_status_line_and_a_clean_log(server):
    since = len(server.log_lines())
    for value in HEADER_VALUES:
        for name in (b"User-Agent", b"traceparent", b"Authorization", b"Content-Length"):
            status, _, body = _rank(server, headers=[(name, value)])
            assert status is not None and status < 500, (name, value[:40], status, body[:200])
    for target in TARGETS:
        for method in (b"GET", b"POST"):
            status, _, body = send_raw(server.port, raw_request(method, target))
            assert status is not None and status < 500, (method, target[:40], status, body[:200])
    _assert_clean_log(server, _new_log_lines(server, since, "targets-done"))


def test_fuzzed_body_request_ids_are_answered_by_the_rule(server):
    since = len(server.log_lines())
    for rid in _fuzz_ids(seed=27, n=150):
        status, headers, body = _rank(server, body=_anonymous_body(request_id=rid))
        if RULE.fullmatch(rid):
            assert status == 200 and headers[b"x-request-id"] == rid.encode(), (rid, status, body[:200])
        else:
            assert status == 422 and GENERATED.fullmatch(headers[b"x-request-id"]), (rid[:40], status, body[:200])
    _assert_clean_log(server, _new_log_lines(server, since, "fuzz-body-done"))


def test_fuzzed_header_request_ids_are_echoed_or_replaced_by_the_rule(server):
    since = len(server.log_lines())
    rng = random.Random(28)
    values = [rid.encode("utf-8", "surrogatepass") for rid in _fuzz_ids(seed=28, n=150)]
    values += [bytes(rng.randrange(256) for _ in range(rng.choice([1, 16, 128, 129]))) for _ in range(50)]
    for value in values:
        status, headers, body = _rank(server, headers=[(b"X-Request-ID", value)])
        assert status in (200, 400), (value[:40], status, body[:200])
        if status == 400:
            assert body == PARSER_REFUSAL and re.search(rb"[\x00-\x08\x0a-\x1f\x7f]", value), value[:40]
            continue
        given = value.strip(b" \t")  # the parser trims optional whitespace around a header value
        if RULE.fullmatch(given.decode("latin-1")):
            assert headers[b"x-request-id"] == given and b"x-request-id-replaced" not in headers
        else:
            assert GENERATED.fullmatch(headers[b"x-request-id"]) and headers[b"x-request-id-replaced"], value[:40]
    _assert_clean_log(server, _new_log_lines(server, since, "fuzz-header-done"))
