"""The request id: one rule (:data:`mtrank.service.schemas.VALID_REQUEST_ID`, 1 to 128 visible ASCII
characters) for the body's ``request_id`` (broken: a 422, :func:`mtrank.service.schemas.decode_request`)
and the ``X-Request-ID`` header (broken: replaced by a generated id, and the answer's
``X-Request-ID-Replaced`` header says why: ``empty``, ``too-long`` or ``invalid-characters``).

An id is echoed in a response header and written to logs: uvicorn drops the connection, without a
status line, on a header value with a control character, and a raw CR or LF in a log line forges
a line of its own.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from mtrank.service.schemas import VALID_REQUEST_ID

HEADER = b"x-request-id"
REPLACED_HEADER = b"x-request-id-replaced"


def new_request_id() -> str:
    """32 random hex digits. ``random`` (seeded from the OS, and again in a forked child) rather than
    ``uuid4``, which asks the kernel for random bytes on every call: 0.8 µs against 4.8 µs, on every
    refused request too (py-spy, event loop under a retry storm: uuid4 5.8 % of it)."""
    return f"{random.getrandbits(128):032x}"


def client_request_id(headers: Iterable[tuple[bytes, bytes]]) -> tuple[str | None, str | None]:
    """The client's ``X-Request-ID`` (the first one): ``(id, None)`` when it keeps the rule,
    ``(None, why)`` when it breaks it, ``(None, None)`` when there is none."""
    for name, value in headers:
        if name == HEADER:
            rid = value.decode("latin-1")
            if VALID_REQUEST_ID.fullmatch(rid):
                return rid, None
            return None, why_invalid(rid)
    return None, None


def why_invalid(rid: str) -> str:
    """Which part of the rule ``rid`` breaks, as ``X-Request-ID-Replaced`` says it."""
    if not rid:
        return "empty"
    if not (rid.isascii() and rid.isprintable()) or " " in rid:
        return "invalid-characters"
    return "too-long"  # visible ASCII, yet it failed the rule: over MAX_REQUEST_ID_CHARS
