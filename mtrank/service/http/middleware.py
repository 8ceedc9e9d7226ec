"""The one wrapper around every HTTP request (:class:`RequestMiddleware`), which applies each
cross-cutting piece in turn: the request id (:mod:`.request_id`), the body deadline
(:class:`.body.BodyDeadline`), the trace span (:mod:`mtrank.service.tracing`), request metrics,
the access line (:mod:`.access_log`) and the 500 answer (:mod:`.errors`).

One pure-ASGI layer rather than one per piece: each layer wraps ``send`` and ``receive`` again,
and ``POST /v1/rank`` pays for every layer on the event loop (FastAPI's own middleware stack cost
~40 µs a request, refusals included)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mtrank.service import metrics, tracing
from mtrank.service.http.access_log import access_log, log_request
from mtrank.service.http.body import BodyDeadline
from mtrank.service.http.errors import answer_internal_error
from mtrank.service.http.request_id import HEADER, REPLACED_HEADER, client_request_id, new_request_id

RANK_ROUTE = "/v1/rank"
ROUTES = (RANK_ROUTE, "/v1/models", "/healthz", "/readyz", "/metrics", "/admin/reload")
PROBE_ROUTES = ("/healthz", "/readyz", "/metrics")
"""Polled by orchestrators and Prometheus: logged at DEBUG only, not traced."""


class RequestMiddleware:
    """Pure ASGI middleware around every HTTP request; ``POST /v1/rank`` goes to ``rank`` directly.

    The request id is in ``scope["state"]["request_id"]``: the client's valid ``X-Request-ID``, a
    generated id when the client's broke the rule, else None until the rank endpoint has read the
    body's (``scope["state"]["context"]``, a :class:`mtrank.service.ranking.RequestContext`)."""

    def __init__(self, app: ASGIApp, request_timeout_s: float, rank: ASGIApp | None = None):
        self.app = app
        self.request_timeout_s = request_timeout_s
        self.rank = rank

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        route = path if path in ROUTES else "other"
        is_rank = route == RANK_ROUTE
        status = 500
        response_started = False
        started = time.perf_counter()
        state = scope.setdefault("state", {})
        given, replaced = client_request_id(scope.get("headers", ()))
        state["request_id"] = new_request_id() if replaced is not None else given
        body_receive = BodyDeadline(receive, asyncio.get_running_loop().time() + self.request_timeout_s,
                                    self.request_timeout_s)

        def request_id() -> str:
            ctx = state.get("context")
            if ctx is not None:
                return ctx.request_id
            if state["request_id"] is None:
                state["request_id"] = new_request_id()
            return state["request_id"]

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                headers = [*message.get("headers", ()), (HEADER, request_id().encode())]
                if replaced is not None:
                    headers.append((REPLACED_HEADER, replaced.encode()))
                message = {**message, "headers": headers}
            await send(message)

        if is_rank:
            metrics.INFLIGHT.inc()
        traced = route not in PROBE_ROUTES
        with tracing.request_span(scope.get("method", ""), route, scope.get("headers", ())) if traced \
                else contextlib.nullcontext() as root:
            try:
                endpoint = self.rank if is_rank and self.rank is not None else self.app
                await endpoint(scope, body_receive, send_with_id)
            except Exception as e:
                if response_started:
                    raise
                await answer_internal_error(e, request_id(), scope, receive, send_with_id)
            finally:
                if is_rank:
                    metrics.INFLIGHT.dec()
                elapsed = time.perf_counter() - started
                ctx = state.get("context") if is_rank else None
                bucket = ctx.bucket if ctx is not None else ("none" if is_rank else "")
                metrics.record_request(route, status, bucket, elapsed)
                level = logging.DEBUG if route in PROBE_ROUTES or state.get("shed") else logging.INFO
                if access_log.isEnabledFor(level):
                    log_request(level, scope, request_id(), status, elapsed, ctx, replaced)
                if root is not None:
                    root.set_attributes(tracing.request_attributes(request_id(), status, ctx))
