"""Exceptions → JSON answers ``{"error": message}``: 408/413/422/499/503/504 for a request that
failed for a reason of its own or of load (:func:`error_response`, counted in
``mtrank_rejected_total``), never a 500 for bad input; a 500 only for a fault of the server
(:func:`answer_internal_error`, logged once with its traceback)."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from mtrank.service import metrics
from mtrank.service.errors import (
    BodyTimeout,
    BodyTooLarge,
    ClientGone,
    DeadlineExceeded,
    MalformedBody,
    NotReady,
    Overloaded,
    RequestError,
    TooManyCandidates,
)

log = logging.getLogger("mtrank.app")


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


def error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """The JSON error answer ``{"error": message}``."""
    return json_response({"error": message}, status, headers)


def _rejected(reason: str, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    metrics.REJECTED.labels(reason).inc()
    return error(status, message, headers)


def error_response(e: Exception) -> Response | None:
    """The answer to a request that failed for a reason of its own or of load (4xx, 503, 504),
    counted in ``mtrank_rejected_total``; None for a fault of the server (500)."""
    if isinstance(e, MalformedBody | RequestError):
        return _rejected("invalid", 422, str(e))
    if isinstance(e, BodyTooLarge | TooManyCandidates):
        return _rejected("too_large", 413, str(e))
    if isinstance(e, Overloaded):
        return _rejected("overloaded", 503, f"overloaded: {e}", headers={"Retry-After": str(e.retry_after_s)})
    if isinstance(e, NotReady):
        return _rejected("not_ready", 503, f"not ready: {e}", headers={"Retry-After": "1"})
    if isinstance(e, DeadlineExceeded):
        return _rejected("deadline", 504, f"deadline exceeded: {e}")
    if isinstance(e, TimeoutError):
        return _rejected("deadline", 504, "deadline exceeded: the request took longer than MTRANK_REQUEST_TIMEOUT_MS")
    if isinstance(e, ClientGone | ClientDisconnect):
        return _rejected("client_gone", 499, "client closed the request")
    if isinstance(e, BodyTimeout):
        # Closing the connection stops a slow sender from holding it (uvicorn closes on this header).
        return _rejected("body_timeout", 408, str(e), headers={"Connection": "close"})
    return None


async def answer_internal_error(e: Exception, request_id: str, scope: Scope, receive: Receive, send: Send) -> None:
    """Log an unexpected exception once, with its traceback, and answer 500 naming only its type."""
    log.error("internal error in %s %s", scope.get("method"), scope.get("path"), exc_info=e,
              extra={"request_id": request_id, "event": "error"})
    await error(500, f"internal error: {type(e).__name__}")(scope, receive, send)


_HANDLED = (MalformedBody, RequestError, BodyTooLarge, TooManyCandidates, Overloaded, NotReady, DeadlineExceeded,
            TimeoutError, ClientGone, ClientDisconnect, BodyTimeout)


def install_error_handlers(app: FastAPI) -> None:
    """Answer the request failures of FastAPI's routes as :func:`error_response` does."""
    async def handle(_: Request, e: Exception) -> Response:
        response = error_response(e)
        if response is None:
            raise e
        return response

    for cls in _HANDLED:
        app.add_exception_handler(cls, handle)
