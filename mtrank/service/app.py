"""The FastAPI app (docs/architecture.md §5): thin routes over the :class:`ServingState`.

``create_app(settings)`` builds the app; its lifespan owns the :class:`ServingState` (store,
repository, ranker). ``POST /v1/rank`` is :class:`mtrank.service.http.rank.RankEndpoint`, which
the request middleware calls directly; the HTTP edge's pieces (request id, body deadline, access
log, error answers) live in :mod:`mtrank.service.http`.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from mtrank.service import metrics
from mtrank.service.http.auth import is_admin
from mtrank.service.http.errors import error, install_error_handlers, json_response
from mtrank.service.http.middleware import RANK_ROUTE, RequestMiddleware
from mtrank.service.http.rank import RankEndpoint
from mtrank.service.schemas import REQUEST_ID_RULE, openapi_schemas
from mtrank.service.serving import ServingState
from mtrank.service.settings import Settings, load_settings
from mtrank.service.workers import worker_index


def create_app(settings: Settings | None = None, serving: ServingState | None = None) -> FastAPI:
    """The app. With ``serving`` (already started, as ``mtrank serve`` does to report start-up
    errors in one line) the lifespan takes it over; without, the lifespan starts one."""
    settings = settings or load_settings()

    rank = RankEndpoint(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.serving = rank.serving = serving or await ServingState.start(settings)
        try:
            yield
        finally:
            await app.state.serving.close()

    app = FastAPI(title="mtrank", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    timeout_s = settings.request_timeout_ms / 1000.0
    app.add_middleware(RequestMiddleware, request_timeout_s=timeout_s, rank=rank)
    app.state.rank_stack = RequestMiddleware(app, request_timeout_s=timeout_s, rank=rank)
    app.openapi = _openapi(app)
    _add_routes(app, settings)
    install_error_handlers(app)
    return app


def served_app(app: FastAPI) -> ASGIApp:
    """The ASGI app ``mtrank serve`` runs: ``/v1/rank`` goes straight to the request middleware
    and the ranking endpoint; everything else (and the lifespan) through FastAPI. Same answers as
    the app itself (the tests use that), without FastAPI's and Starlette's middleware layers on
    the hot path: ~40 µs of event-loop time per request, also per refused one."""
    rank_stack = app.state.rank_stack

    async def entry(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == RANK_ROUTE:
            await rank_stack(scope, receive, send)
        else:
            await app(scope, receive, send)

    return entry


def _add_routes(app: FastAPI, settings: Settings) -> None:
    admin_token = settings.admin_token.get_secret_value() if settings.admin_token else None

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return json_response(request.app.state.serving.describe())

    @app.get("/healthz")
    async def healthz() -> Response:
        return json_response({"status": "ok"})

    @app.get("/readyz")
    async def readyz(request: Request) -> Response:
        serving: ServingState = request.app.state.serving
        reason = await serving.not_ready_reason()
        if reason:
            return json_response({"ready": False, "reason": reason}, 503)
        body: dict[str, Any] = {"ready": True}
        # A store outage degrades answers (default vectors) but keeps the replica in rotation:
        # failing readiness here would take every replica out at once during a Redis blip.
        store_problem = await serving.store.health()
        if store_problem:
            body["degraded"] = True
        # A refused version with an older one served is worth a look, not a reason to stop serving.
        reasons = [r for r in (store_problem, serving.repository.refusal_notice()) if r]
        if reasons:
            body["reason"] = "; ".join(reasons)
        return json_response(body)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    @app.post("/admin/reload")
    async def admin_reload(request: Request) -> Response:
        if admin_token is None:
            return error(403, "admin endpoints are disabled: set MTRANK_ADMIN_TOKEN")
        if not is_admin(request.headers.get("authorization"), admin_token):
            return error(401, "missing or wrong admin token (Authorization: Bearer <MTRANK_ADMIN_TOKEN>)",
                         headers={"WWW-Authenticate": "Bearer"})
        report = await request.app.state.serving.repository.reload()
        if worker_index() is not None:
            os.kill(os.getppid(), signal.SIGHUP)  # the supervisor has the other workers reload too
        return json_response(report.to_dict(), 200 if not report.errors else 409)


def _openapi(app: FastAPI) -> Any:
    """``/openapi.json``: FastAPI's routes plus ``/v1/rank``, whose schemas come from msgspec."""
    request_schema, response_schema, schema_components = openapi_schemas()

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schema.setdefault("components", {}).setdefault("schemas", {}).update(schema_components)
            schema["paths"][RANK_ROUTE] = {"post": {
                "summary": "Rank candidates for a user",
                "description": "Fusion score Π_k p_k^w_k × f(video_len) of the bucket's model, best first.",
                "operationId": "rank",
                "parameters": [{
                    "name": "X-Request-ID", "in": "header", "required": False, "schema": {"type": "string"},
                    "description": f"{REQUEST_ID_RULE}; echoed in the answer's X-Request-ID. One that breaks "
                                   "the rule is replaced by a generated id, and the answer's X-Request-ID-Replaced "
                                   "says why: empty, too-long or invalid-characters.",
                }],
                "requestBody": {"required": True, "content": {"application/json": {"schema": request_schema}}},
                "responses": {
                    "200": {"description": "Candidates in rank order",
                            "content": {"application/json": {"schema": response_schema}}},
                    "413": {"description": "Too many candidates or too large a body"},
                    "422": {"description": "Invalid request (the message names the field)"},
                    "503": {"description": "Overloaded or not ready (Retry-After)"},
                    "504": {"description": "Deadline exceeded"},
                },
            }}
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi
