"""The FastAPI app (docs/architecture.md §5): thin routes over :class:`mtrank.service.ranking.Ranker`.

``create_app(settings)`` builds the app; its lifespan owns the :class:`Engine` (store,
repository, batchers). Routes parse, call one function and format; errors map to JSON bodies
``{"error": message}`` with 408/413/422/499/503/504 (:func:`error_response`), never a 500 for bad
input; ``POST /v1/rank`` is a plain ASGI endpoint the request middleware calls directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mtrank.service import metrics, tracing
from mtrank.service.admission import Admission
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
from mtrank.service.ranking import Ranker, RequestContext, new_request_id
from mtrank.service.repository import Repository
from mtrank.service.schemas import RESPONSE_ENCODER, decode_request, openapi_schemas
from mtrank.service.settings import Settings, load_settings
from mtrank.service.stores import EmbeddingStore, open_store
from mtrank.service.workers import worker_index

log = logging.getLogger("mtrank.app")
access_log = logging.getLogger("mtrank.access")

RANK_ROUTE = "/v1/rank"
ROUTES = (RANK_ROUTE, "/v1/models", "/healthz", "/readyz", "/metrics", "/admin/reload")
PROBE_ROUTES = ("/healthz", "/readyz", "/metrics")
"""Polled by orchestrators and Prometheus: logged at DEBUG only."""
MAX_REQUEST_ID = 128
"""Longest accepted X-Request-ID, characters."""


class Engine:
    """Everything a running service owns: the embedding store, the repository and the ranker."""

    def __init__(self, settings: Settings, store: EmbeddingStore, repository: Repository):
        self.settings = settings
        self.store = store
        self.repository = repository
        self.ranker = Ranker(repository, store)
        self.admission = Admission(repository.load, parallel=repository.load.parallelism)
        self.draining = False
        self._lag_watch = asyncio.get_running_loop().create_task(watch_event_loop_lag())

    @classmethod
    async def start(cls, settings: Settings) -> Engine:
        """Load the repository. Raises StartupError / DeviceError for configuration problems."""
        store = open_store(settings)
        repository = Repository(settings, store)
        try:
            await repository.start()
        except BaseException:
            await repository.close()
            await store.close()
            raise
        metrics.LOOKUP_DURATION.labels(store.name)
        return cls(settings, store, repository)

    async def not_ready_reason(self) -> str | None:
        """Why this replica must not get traffic: draining, or no servable model version."""
        if self.draining:
            return "shutting down"
        return self.repository.not_ready_reason()

    def describe(self) -> dict[str, Any]:
        repo = self.repository
        models: dict[str, dict[str, Any]] = {}
        for lv in sorted(repo.loaded_versions(), key=lambda v: (v.name, v.version)):
            entry = models.setdefault(lv.name, {"name": lv.name, "kind": lv.manifest.kind,
                                                "newest": repo.newest(lv.name), "versions": []})
            facet = lv.transform.user_groups
            entry["versions"].append({
                "version": lv.version,
                "device": lv.device,
                "provider": lv.provider,
                "user_groups": list(facet.values) if facet else [],
                "graphs": {k: g.info.tasks for k, g in lv.graphs.items()},
                "tasks": lv.task_names,
                "store_tables": sorted(lv.tables),
                "created_at": lv.manifest.created_at,
            })
        for name, refused in sorted(repo.refused.items()):
            entry = models.setdefault(name, {"name": name, "kind": None, "newest": repo.newest(name), "versions": []})
            entry["refused"] = [{"version": v, "reason": r} for v, r in sorted(refused.items())]
        buckets = [b.model_dump() for b in repo.buckets.buckets] if repo.buckets else []
        return {
            "models": list(models.values()),
            "buckets": buckets,
            "store": {"kind": self.store.name, "degraded": self.store.degraded},
            "batching": self.settings.batching,
            "errors": repo.errors,
        }

    async def close(self) -> None:
        self._lag_watch.cancel()
        await self.repository.close()
        await self.store.close()


async def watch_event_loop_lag(interval_s: float = 0.05) -> None:
    """Record in ``mtrank_event_loop_lag_seconds`` how late a timer fires, every ``interval_s``.

    Decoding, features and responses share one event loop; when it is the bottleneck, requests
    wait for it before any of their own work starts, and that wait is in no other metric (the
    request duration starts when the handler runs). The lag is that wait."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + interval_s
        await asyncio.sleep(interval_s)
        metrics.EVENT_LOOP_LAG.observe(max(0.0, loop.time() - due))


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return _json({"error": message}, status, headers)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


async def _read_body(receive: Receive, declared: str | None, limit: int) -> bytes:
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"request body of {declared} bytes is over the limit of {limit} (MTRANK_MAX_BODY_BYTES)")
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone("client disconnected while sending the body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"request body is over the limit of {limit} bytes (MTRANK_MAX_BODY_BYTES)")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _unless_disconnected(receive: Receive, work: Awaitable[Any]) -> Any:
    """Await ``work``; if the client disconnects first, cancel it (its queued rows are then
    dropped by the batcher) and raise ClientGone.

    The work runs in this task (no task of its own whose failure could go unobserved); a watcher
    task waits for the disconnect and cancels this one.
    """
    current = asyncio.current_task()
    gone = False

    async def watch() -> None:
        nonlocal gone
        while (await receive())["type"] != "http.disconnect":
            pass
        gone = True
        current.cancel()

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if gone:
            current.uncancel()
            raise ClientGone("client disconnected") from None
        raise
    finally:
        watcher.cancel()
        watcher.add_done_callback(_consume_outcome)


def _consume_outcome(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()


def _given_request_id(scope: Scope) -> str | None:
    """The client's ``X-Request-ID`` if it is usable in logs and headers: printable ASCII,
    1 to 128 characters; else None (a new id is generated)."""
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            rid = value.decode("latin-1")
            return rid if 0 < len(rid) <= MAX_REQUEST_ID and rid.isascii() and rid.isprintable() else None
    return None


class RequestMetrics:
    """Pure ASGI middleware around every HTTP request: requests_total, request_duration_seconds,
    inflight_requests; the request id (``X-Request-ID`` in, echoed out); the body deadline
    (``request_timeout_s`` from arrival, else :class:`BodyTimeout`); one log line per request; and
    the 500 answer for an unexpected exception (logged once, with its traceback)."""

    def __init__(self, app: ASGIApp, request_timeout_s: float, rank: ASGIApp | None = None):
        self.app = app
        self.request_timeout_s = request_timeout_s
        self.rank = rank
        """The ranking endpoint, called directly for ``POST /v1/rank``."""

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
        # None when the client sent none: the rank handler then prefers the body's request_id.
        state["request_id"] = _given_request_id(scope)
        body_deadline = asyncio.get_running_loop().time() + self.request_timeout_s
        body_done = False

        async def receive_in_time() -> Message:
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                async with asyncio.timeout_at(body_deadline):
                    message = await receive()
            except TimeoutError:
                # A busy loop may not have read yet what the client did send: look once more after
                # one loop iteration (it polls the sockets) before calling the client slow.
                await asyncio.sleep(0)
                try:
                    async with asyncio.timeout(0):
                        message = await receive()
                except TimeoutError:
                    raise BodyTimeout(
                        f"request body not received within {self.request_timeout_s * 1000:.0f} ms"
                        " (MTRANK_REQUEST_TIMEOUT_MS)"
                    ) from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                headers = [*message.get("headers", ()), (b"x-request-id", request_id().encode())]
                message = {**message, "headers": headers}
            await send(message)

        def request_id() -> str:
            ctx = state.get("context")
            if ctx is None and state["request_id"] is None:
                state["request_id"] = new_request_id()
            return ctx.request_id if ctx is not None else state["request_id"]

        if is_rank:
            metrics.INFLIGHT.inc()
        traced = route not in PROBE_ROUTES
        with tracing.request_span(scope.get("method", ""), route, scope.get("headers", ())) if traced \
                else contextlib.nullcontext() as root:
            try:
                endpoint = self.rank if is_rank and self.rank is not None else self.app
                await endpoint(scope, receive_in_time, send_with_id)
            except Exception as e:
                if response_started:
                    raise
                log.exception("internal error in %s %s", scope.get("method"), path,
                              extra={"request_id": request_id(), "event": "error"})
                await _error(500, f"internal error: {type(e).__name__}")(scope, receive, send_with_id)
            finally:
                if is_rank:
                    metrics.INFLIGHT.dec()
                elapsed = time.perf_counter() - started
                ctx = state.get("context") if is_rank else None
                bucket = ctx.bucket if ctx is not None else ("none" if is_rank else "")
                metrics.REQUESTS.labels(route, str(status), bucket).inc()
                metrics.REQUEST_DURATION.labels(route, bucket).observe(elapsed)
                level = logging.DEBUG if route in PROBE_ROUTES or state.get("shed") else logging.INFO
                if access_log.isEnabledFor(level):
                    _log_request(level, scope, request_id(), status, elapsed, ctx)
                if root is not None:
                    root.set_attributes(_span_attributes(request_id(), status, ctx))


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


def _span_attributes(request_id: str, status: int, ctx: RequestContext | None) -> dict[str, Any]:
    attributes: dict[str, Any] = {"http.response.status_code": status, "mtrank.request_id": request_id}
    if ctx is not None and ctx.model is not None:
        attributes.update({"mtrank.bucket": ctx.bucket, "mtrank.model": ctx.model, "mtrank.version": ctx.version,
                           "mtrank.user_group": ctx.user_group or "", "mtrank.candidates": ctx.candidates})
    return attributes


def _log_request(level: int, scope: Scope, request_id: str, status: int, elapsed_s: float,
                 ctx: RequestContext | None) -> None:
    """The one log line of a request; its fields are the JSON line's keys."""
    fields: dict[str, Any] = {
        "request_id": request_id, "method": scope.get("method"), "path": scope.get("path"), "status": status,
        "latency_ms": round(elapsed_s * 1000.0, 3),
    }
    if ctx is not None:
        fields.update(bucket=ctx.bucket, model=ctx.model, version=ctx.version, user_group=ctx.user_group,
                      candidates=ctx.candidates, missing_ids=ctx.missing_ids)
    served = f" model={ctx.model} v{ctx.version} bucket={ctx.bucket} group={ctx.user_group} " \
             f"candidates={ctx.candidates}" if ctx is not None and ctx.model is not None else ""
    access_log.log(level, "%s %s %d %.1f ms request_id=%s%s", fields["method"], fields["path"], status,
                   fields["latency_ms"], request_id, served, extra=fields)


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    """The app. With ``engine`` (already started, as ``mtrank serve`` does to report start-up
    errors in one line) the lifespan takes it over; without, the lifespan starts one."""
    settings = settings or load_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.engine = engine or await Engine.start(settings)
        try:
            yield
        finally:
            await app.state.engine.close()

    app = FastAPI(title="mtrank", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    timeout_s = settings.request_timeout_ms / 1000.0
    admin_token = settings.admin_token.get_secret_value() if settings.admin_token else None

    async def rank(scope: Scope, receive: Receive, send: Send) -> None:
        """POST /v1/rank as a plain ASGI endpoint: the hot path skips the framework's routing,
        request objects and exception middleware (the request middleware calls it directly)."""
        started = time.monotonic()
        state = scope["state"]
        if scope.get("method") != "POST":
            await _error(405, "method not allowed: use POST", headers={"Allow": "POST"})(scope, receive, send)
            return
        try:
            engine: Engine = app.state.engine
            declared = _header(scope, b"content-length")
            # Before the body is read: a request that cannot finish in time costs next to nothing.
            engine.admission.check(declared, timeout_s)
            engine.admission.admitted()
            refused = False
            try:
                body = await _read_body(receive, declared, settings.max_body_bytes)
                with tracing.span("parse", bytes=len(body)):
                    query = decode_request(body, settings.max_candidates)
                engine.admission.learn(len(body), query.n)
                ctx = RequestContext(request_id=state["request_id"] or query.request_id or new_request_id())
                state["context"] = ctx
                async with asyncio.timeout(started + timeout_s - time.monotonic()):
                    result = await _unless_disconnected(receive, engine.ranker.rank(query, started + timeout_s, ctx))
                response = Response(RESPONSE_ENCODER.encode(result), media_type="application/json")
            except Overloaded:
                refused = True
                raise
            finally:
                engine.admission.answered(time.monotonic() - started, refused=refused)
        except Exception as e:
            response = error_response(e)
            if response is None:
                raise
            if isinstance(e, Overloaded):
                # Refused for load: counted in mtrank_rejected_total; a request line each would turn
                # an overload into a log storm, so they go to debug and a warning sums them up.
                state["shed"] = True
                engine.admission.note_refusal(str(e))
                hold = engine.admission.refusal_hold_s(started + timeout_s - time.monotonic())
                if hold > 0:
                    metrics.REFUSALS_PACED.inc()
                    await asyncio.sleep(hold)
        await response(scope, receive, send)

    app.add_middleware(RequestMetrics, request_timeout_s=timeout_s, rank=rank)
    app.state.rank_stack = RequestMetrics(app, request_timeout_s=timeout_s, rank=rank)
    request_schema, response_schema, schema_components = openapi_schemas()

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schema.setdefault("components", {}).setdefault("schemas", {}).update(schema_components)
            schema["paths"][RANK_ROUTE] = {"post": {
                "summary": "Rank candidates for a user",
                "description": "Fusion score Π_k p_k^w_k × f(video_len) of the bucket's model, best first.",
                "operationId": "rank",
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

    app.openapi = openapi

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return _json(request.app.state.engine.describe())

    @app.get("/healthz")
    async def healthz() -> Response:
        return _json({"status": "ok"})

    @app.get("/readyz")
    async def readyz(request: Request) -> Response:
        engine = request.app.state.engine
        reason = await engine.not_ready_reason()
        if reason:
            return _json({"ready": False, "reason": reason}, 503)
        body: dict[str, Any] = {"ready": True}
        # A store outage degrades answers (default vectors) but keeps the replica in rotation:
        # failing readiness here would take every replica out at once during a Redis blip.
        store_problem = await engine.store.health()
        if store_problem:
            body["degraded"] = True
        # A refused version with an older one served is worth a look, not a reason to stop serving.
        reasons = [r for r in (store_problem, engine.repository.refusal_notice()) if r]
        if reasons:
            body["reason"] = "; ".join(reasons)
        return _json(body)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    @app.post("/admin/reload")
    async def admin_reload(request: Request) -> Response:
        if admin_token is None:
            return _error(403, "admin endpoints are disabled: set MTRANK_ADMIN_TOKEN")
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), admin_token.encode()):
            return _error(401, "missing or wrong admin token (Authorization: Bearer <MTRANK_ADMIN_TOKEN>)",
                          headers={"WWW-Authenticate": "Bearer"})
        report = await request.app.state.engine.repository.reload()
        if worker_index() is not None:
            os.kill(os.getppid(), signal.SIGHUP)  # the supervisor has the other workers reload too
        return _json(report.to_dict(), 200 if not report.errors else 409)

    _install_error_handlers(app)
    return app


def _rejected(reason: str, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    metrics.REJECTED.labels(reason).inc()
    return _error(status, message, headers)


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


_HANDLED = (MalformedBody, RequestError, BodyTooLarge, TooManyCandidates, Overloaded, NotReady, DeadlineExceeded,
            TimeoutError, ClientGone, ClientDisconnect, BodyTimeout)


def _install_error_handlers(app: FastAPI) -> None:
    async def handle(_: Request, e: Exception) -> Response:
        response = error_response(e)
        if response is None:
            raise e
        return response

    for cls in _HANDLED:
        app.add_exception_handler(cls, handle)
