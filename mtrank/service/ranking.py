"""The ranking call: query → bucket → model version → user group → features → embeddings →
batcher (the group's graph only) → fusion → order → response body.

Features come from :mod:`mtrank.transform`, the transform training used, applied to the
request's columns; the only per-candidate Python work is building key lists and response items.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from mtrank import fusion
from mtrank.fusion import BucketConfig
from mtrank.manifest import DENSE_INPUT, IDS_INPUT, ITEM_FACET_INPUT, emb_input
from mtrank.service import metrics, tracing
from mtrank.service.errors import NotReady, RequestError
from mtrank.service.schemas import ModelRef, RankedItem, RankQuery, RankResponse, task_scores_type
from mtrank.service.stores import EmbeddingStore
from mtrank.service.version import GroupGraph, LoadedVersion
from mtrank.transform import FeatureTransform, TransformError

if TYPE_CHECKING:
    from mtrank.service.repository import Repository


@dataclass
class RequestContext:
    """What is known about one request as it flows: filled by the ranker, read by the HTTP layer
    for metrics labels and the request log line."""

    request_id: str
    bucket: str = "none"
    model: str | None = None
    version: int | None = None
    user_group: str | None = None
    candidates: int = 0
    missing_ids: int = 0
    served_rows: np.ndarray | None = None
    """The returned candidates' indices in rank order (the impression log reads them)."""
    task_scores: dict[str, np.ndarray] | None = None
    """Each task's predictions for every candidate, in request order."""


class Ranker:
    def __init__(self, repository: Repository, store: EmbeddingStore):
        self.repository = repository
        self.store = store
        self._lookup_seconds = metrics.LOOKUP_DURATION.labels(store.name)

    async def rank(self, query: RankQuery, deadline: float, ctx: RequestContext) -> RankResponse:
        """The response body for ``query`` (docs/architecture.md §5); ``deadline`` is time.monotonic() seconds."""
        bucket = self._bucket(query.user_id)
        ctx.bucket = bucket.name
        lv = self.repository.resolve(bucket.model, bucket.version)
        if lv is None:
            raise NotReady(self.repository.not_ready_reason() or f"model {bucket.model} not loaded")
        ctx.model, ctx.version, ctx.candidates = lv.name, lv.version, query.n
        group = _user_group(lv.transform, query)
        ctx.user_group = group
        graph = lv.graph_for(group)
        metrics.CANDIDATES.observe(query.n)

        with tracing.span("features", candidates=query.n):
            feed, degraded = await self._features(lv, graph, query, ctx)
        # Queue wait and inference: the request's rows ride in a batch shared with others.
        with tracing.span("batch", model=lv.name, version=lv.version, group=group or ""):
            outputs = await graph.batcher.submit(feed, deadline)
        with tracing.span("fusion"):
            task_scores = {task: outputs[out] for task, out in graph.task_outputs}
            log_score = fusion.log_scores(task_scores, _weights(bucket, task_scores), query.video_len,
                                          bucket.length_fn, ranges=lv.fusion_ranges)
            order = fusion.rank_order(log_score)
        if query.top_k is not None:
            order = order[: query.top_k]
        metrics.record_predictions(bucket.name, lv.name, lv.version, task_scores, order, lv.fusion_ranges)
        ctx.served_rows, ctx.task_scores = order, task_scores
        return RankResponse(
            request_id=query.request_id or ctx.request_id,
            model=ModelRef(lv.name, lv.version),
            bucket=bucket.name,
            user_group=group,
            degraded=degraded,
            missing_ids=ctx.missing_ids,
            items=_items(query, order, np.exp(log_score[order]), task_scores if query.return_task_scores else None),
        )

    def _bucket(self, user_id: str) -> BucketConfig:
        table = self.repository.buckets
        if table is None:
            raise NotReady(self.repository.not_ready_reason() or "no model loaded")
        return table.assign(user_id)

    async def _features(
        self, lv: LoadedVersion, graph: GroupGraph, query: RankQuery, ctx: RequestContext
    ) -> tuple[dict[str, np.ndarray], bool]:
        """The graph's inputs for the query's rows, and whether the store answered degraded."""
        n = query.n
        transform = lv.transform
        columns = _columns(transform, query)
        feed: dict[str, np.ndarray] = {}
        try:
            if DENSE_INPUT in graph.input_names:
                feed[DENSE_INPUT] = transform.dense_matrix(columns, n)
            if IDS_INPUT in graph.input_names:
                feed[IDS_INPUT] = transform.graph_ids(columns, n)
            if ITEM_FACET_INPUT in graph.input_names:
                rule_columns = {r.feature: query.item_column(r.feature) for r in transform.item_facet.rules}
                feed[ITEM_FACET_INPUT] = transform.facet(transform.item_facet, rule_columns, n)
            keys = [transform.store_keys(name, columns.get(name), n) for name in graph.store_fields]
        except TransformError as e:
            raise RequestError(_located(transform, e)) from None
        if not graph.store_fields:
            return feed, False
        started = time.perf_counter()
        tables = [lv.tables[name] for name in graph.store_fields]
        with tracing.span("lookup", store=self.store.name, fields=len(tables)):
            lookups, degraded = await self.store.lookup_many(list(zip(tables, keys, strict=True)))
        self._lookup_seconds.observe(time.perf_counter() - started)
        for name, result in zip(graph.store_fields, lookups, strict=True):
            vectors = result.vectors
            feed[emb_input(name)] = np.repeat(vectors, n, axis=0) if len(vectors) != n else vectors
            ctx.missing_ids += result.missing
        return feed, degraded


def _columns(transform: FeatureTransform, query: RankQuery) -> dict[str, Any]:
    """Raw columns of the model's fields: a scalar for a user feature, a list for an item feature."""
    return {
        f.name: query.user_value(f.name) if f.side == "user" else query.item_column(f.name)
        for f in (*transform.dense, *transform.sparse)
    }


def _user_group(transform: FeatureTransform, query: RankQuery) -> str | None:
    """The explicit group if given (checked), else the manifest rule on the user's features."""
    facet = transform.user_groups
    if facet is None:
        return None
    if query.user_group is not None:
        if query.user_group not in facet.values:
            raise RequestError(
                f"user.group: unknown user group {query.user_group!r}; this model has {list(facet.values)}"
            )
        return query.user_group
    user = {rule.feature: query.user_value(rule.feature) for rule in facet.rules}
    try:
        return facet.values[transform.facet_one(facet, user)]
    except TransformError as e:
        raise RequestError(f"user.features.{e}") from None


def _located(transform: FeatureTransform, e: TransformError) -> str:
    """The transform's message with where the feature sits in the request."""
    sides = {f.name: f.side for f in (*transform.dense, *transform.sparse)}
    return f"user.features.{e}" if sides.get(e.feature) == "user" else f"candidates[].features.{e}"


def _weights(bucket: BucketConfig, task_scores: dict[str, np.ndarray]) -> dict[str, float]:
    if bucket.weights is None:
        return dict.fromkeys(task_scores, 1.0)
    return {t: w for t, w in bucket.weights.items() if t in task_scores}


def _items(
    query: RankQuery, order: np.ndarray, scores: np.ndarray, task_scores: dict[str, np.ndarray] | None
) -> list[RankedItem]:
    """The ranked items, built column-wise: ``map`` calls the struct types from C."""
    ids = query.item_ids
    item_ids = [ids[i] for i in order.tolist()]
    ranks = range(1, len(item_ids) + 1)
    if task_scores is None:
        return list(map(RankedItem, item_ids, ranks, scores.tolist()))
    columns = [v[order].tolist() for v in task_scores.values()]
    tasks = map(task_scores_type(tuple(task_scores)), *columns)
    return list(map(RankedItem, item_ids, ranks, scores.tolist(), tasks))

