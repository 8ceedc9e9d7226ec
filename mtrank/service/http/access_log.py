"""The one log line of a request (logger ``mtrank.access``): method, path, status, latency and
request id, plus what the ranker served. Client-controlled text in it (the path) is escaped by
the formatters (:mod:`mtrank.service.logs`)."""

from __future__ import annotations

import logging
from typing import Any

from starlette.types import Scope

from mtrank.service.ranking import RequestContext

access_log = logging.getLogger("mtrank.access")


def log_request(level: int, scope: Scope, request_id: str, status: int, elapsed_s: float,
                ctx: RequestContext | None, replaced: str | None) -> None:
    """Log the request at ``level``; its fields are the JSON line's keys. ``replaced``: why the
    client's ``X-Request-ID`` was replaced, if it was."""
    fields: dict[str, Any] = {
        "request_id": request_id, "method": scope.get("method"), "path": scope.get("path"), "status": status,
        "latency_ms": round(elapsed_s * 1000.0, 3),
    }
    if replaced is not None:
        fields["request_id_replaced"] = replaced
    if ctx is not None:
        fields.update(bucket=ctx.bucket, model=ctx.model, version=ctx.version, user_group=ctx.user_group,
                      candidates=ctx.candidates, missing_ids=ctx.missing_ids)
    served = f" model={ctx.model} v{ctx.version} bucket={ctx.bucket} group={ctx.user_group} " \
             f"candidates={ctx.candidates}" if ctx is not None and ctx.model is not None else ""
    if replaced is not None:
        served += f" (X-Request-ID replaced: {replaced})"
    access_log.log(level, "%s %s %d %.1f ms request_id=%s%s", fields["method"], fields["path"], status,
                   fields["latency_ms"], request_id, served, extra=fields)
