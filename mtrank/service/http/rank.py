"""``POST /v1/rank`` as a plain ASGI endpoint (:class:`RankEndpoint`): admission, body, one call
into the ranker, the encoded answer or the error's. The hot path skips the framework's routing,
request objects and exception middleware; :class:`.middleware.RequestMiddleware` calls it directly."""

from __future__ import annotations

import asyncio
import time

from fastapi.responses import Response
from starlette.types import Receive, Scope, Send

from mtrank.service import metrics, tracing
from mtrank.service.errors import Overloaded
from mtrank.service.http.body import read_body
from mtrank.service.http.disconnect import unless_disconnected
from mtrank.service.http.errors import error, error_response
from mtrank.service.http.request_id import new_request_id
from mtrank.service.ranking import RequestContext
from mtrank.service.schemas import RESPONSE_ENCODER, decode_request
from mtrank.service.serving import ServingState
from mtrank.service.settings import Settings


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


class RankEndpoint:
    """``POST /v1/rank`` over :attr:`serving`."""

    serving: ServingState
    """Set by the app's lifespan once it has started: no request comes before."""

    def __init__(self, settings: Settings):
        self.timeout_s = settings.request_timeout_ms / 1000.0
        self.max_body_bytes = settings.max_body_bytes
        self.max_candidates = settings.max_candidates

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("method") != "POST":
            await error(405, "method not allowed: use POST", headers={"Allow": "POST"})(scope, receive, send)
            return
        started = time.monotonic()
        serving = self.serving
        try:
            response = await self._rank(serving, scope, receive, started)
        except Exception as e:
            response = error_response(e)
            if response is None:
                raise
            if isinstance(e, Overloaded):
                await self._pace_refusal(serving, scope, e, started)
        await response(scope, receive, send)

    async def _rank(self, serving: ServingState, scope: Scope, receive: Receive, started: float) -> Response:
        admission = serving.admission
        declared = _header(scope, b"content-length")
        # Before the body is read: a request that cannot finish in time costs next to nothing.
        admission.check(declared, self.timeout_s)
        admission.admitted()
        refused = False
        try:
            body = await read_body(receive, declared, self.max_body_bytes)
            with tracing.span("parse", bytes=len(body)):
                query = decode_request(body, self.max_candidates)
            admission.learn(len(body), query.n)
            state = scope["state"]
            ctx = RequestContext(request_id=state["request_id"] or query.request_id or new_request_id())
            state["context"] = ctx
            deadline = started + self.timeout_s
            async with asyncio.timeout(deadline - time.monotonic()):
                result = await unless_disconnected(receive, serving.ranker.rank(query, deadline, ctx))
            if serving.impressions is not None:
                serving.impressions.offer(ctx, body, query, result)
            return Response(RESPONSE_ENCODER.encode(result), media_type="application/json")
        except Overloaded:
            refused = True
            raise
        finally:
            admission.answered(time.monotonic() - started, refused=refused)

    async def _pace_refusal(self, serving: ServingState, scope: Scope, e: Overloaded, started: float) -> None:
        """Refused for load: counted in mtrank_rejected_total; a request line each would turn an
        overload into a log storm, so they go to debug and a warning sums them up. Held until its
        turn when refusals outrun answers (:mod:`mtrank.service.admission`)."""
        scope["state"]["shed"] = True
        serving.admission.note_refusal(str(e))
        hold = serving.admission.refusal_hold_s(started + self.timeout_s - time.monotonic())
        if hold > 0:
            metrics.REFUSALS_PACED.inc()
            await asyncio.sleep(hold)
