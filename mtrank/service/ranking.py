"""The ranking call: query → bucket → model version → user group → features → embeddings →
batcher (the group's graph only) → fusion → order → response body.

Features come from :mod:`mtrank.transform`, the transform training used, applied to the
request's columns; the only per-candidate Python work is building key lists and response items.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from mtrank import fusion, kinds
from mtrank.fusion import BucketConfig
from mtrank.histories import HistoryFields
from mtrank.kinds import sequence
from mtrank.service import errors, metrics, tracing
from mtrank.service.errors import NotReady, RequestError
from mtrank.service.schemas import ModelRef, RankedItem, RankQuery, RankResponse, task_scores_type
from mtrank.service.stores import EmbeddingStore, HistoryAnswer, HistoryQuery
from mtrank.service.stores.histories import FOUND, MISSING
from mtrank.service.version import GroupGraph, LoadedVersion
from mtrank.transform import FeatureTransform, ListTooLong, TransformError

if TYPE_CHECKING:
    from mtrank.service.repository import Repository

HISTORY_TABLE = "histories"
"""The ``table`` label of ``mtrank_embedding_missing_total`` for requests whose user has no history record."""


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
    served_ids: list[str] | None = None
    """The returned item ids, in rank order."""
    scores: np.ndarray | None = None
    """The returned candidates' scores, in rank order."""
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
        ids, scores = query.item_ids, np.exp(log_score[order])
        served_ids = [ids[i] for i in order.tolist()]
        ctx.served_rows, ctx.served_ids, ctx.scores, ctx.task_scores = order, served_ids, scores, task_scores
        return RankResponse(
            request_id=query.request_id or ctx.request_id,
            model=ModelRef(lv.name, lv.version),
            bucket=bucket.name,
            user_group=group,
            degraded=degraded,
            missing_ids=ctx.missing_ids,
            items=_items(served_ids, order, scores, task_scores if query.return_task_scores else None),
        )

    def _bucket(self, user_id: str) -> BucketConfig:
        table = self.repository.buckets
        if table is None:
            raise NotReady(self.repository.not_ready_reason() or "no model loaded")
        return table.assign(user_id)

    async def _features(
        self, lv: LoadedVersion, graph: GroupGraph, query: RankQuery, ctx: RequestContext
    ) -> tuple[dict[str, np.ndarray], bool]:
        """The graph's inputs for the query (its user's side once, its candidates' per row) through
        the feature kinds, and whether the store answered degraded. Sequence fields the request
        leaves out come from the user's history record, read with the embeddings."""
        transform = lv.transform
        feed = _feed(transform, _rows(transform, query), graph.inputs)
        fields = _history_fields(transform)
        absent = [name for name in fields.names if query.user_features.get(name) is None] if fields else []
        history = HistoryQuery(lv.name, lv.version, lv.dir, query.user_id, fields) if absent else None
        if not feed.needs and history is None:
            return feed.arrays, False
        started = time.perf_counter()
        found, record, degraded = await self._lookup(lv, feed, ctx, history)
        arrays = feed.resolve(found)
        if record is not None:
            from_record, record_degraded = await self._history_arrays(lv, graph, absent, record, ctx)
            arrays.update(from_record)
            degraded = degraded or record_degraded
        self._lookup_seconds.observe(time.perf_counter() - started)
        return arrays, degraded

    async def _history_arrays(
        self, lv: LoadedVersion, graph: GroupGraph, absent: list[str], record: HistoryAnswer, ctx: RequestContext
    ) -> tuple[dict[str, np.ndarray], bool]:
        """The graph inputs of the ``absent`` sequence fields from the user's record (none: the
        request's feed already holds empty histories), and whether their lookup was degraded."""
        if record.status == MISSING:
            metrics.MISSING.labels(HISTORY_TABLE).inc()
        if record.status != FOUND:
            return {}, False
        fields = _history_fields(lv.transform)
        user = {name: [record.lists[j]] for j, name in enumerate(fields.names) if name in absent}
        wanted = {name for name, i in graph.inputs.items() if user.keys() & set(i.fields)}
        feed = kinds.Feed()
        # Only the sequence kind: the record holds nothing else (its lists are already cut at max_len).
        try:
            sequence.feed(lv.transform, kinds.Rows({}, user, 0, 1, np.zeros(0, dtype=np.int64)), feed)
        except TransformError as e:
            raise RequestError(_located(lv.transform, e)) from None
        feed.arrays = {k: v for k, v in feed.arrays.items() if k in wanted}
        feed.needs = [n for n in feed.needs if n.input in wanted]
        if not feed.needs:
            return feed.arrays, False
        # The entries' own vectors (a history sharing a store table) can only be asked for once the
        # record is known: a second lookup, which the in-process cache mostly answers.
        found, _, degraded = await self._lookup(lv, feed, ctx, None)
        return feed.resolve(found), degraded

    async def _lookup(
        self, lv: LoadedVersion, feed: kinds.Feed, ctx: RequestContext, history: HistoryQuery | None
    ) -> tuple[dict[str, np.ndarray], HistoryAnswer | None, bool]:
        """The vectors of ``feed``'s store needs by input (and ``history``'s record) in one store call."""
        # One lookup per table: a history's ids ride with the candidates' own (one cache pass, one MGET).
        keys: dict[str, list[str]] = {}
        for need in feed.needs:
            keys.setdefault(need.table, []).extend(need.keys)
        with tracing.span("lookup", store=self.store.name, fields=len(keys)):
            lookups, record, degraded = await self.store.lookup_with_history(
                [(lv.tables[t], k) for t, k in keys.items()], history)
        found, taken = {}, dict.fromkeys(keys, 0)
        vectors = {t: r.vectors for t, r in zip(keys, lookups, strict=True)}
        for need in feed.needs:
            start = taken[need.table]
            taken[need.table] = start + len(need.keys)
            found[need.input] = vectors[need.table][start : taken[need.table]]
        ctx.missing_ids += sum(r.missing for r in lookups)
        return found, record, degraded


def _feed(transform: FeatureTransform, rows: kinds.Rows, wanted: dict[str, kinds.GraphInput]) -> kinds.Feed:
    """The kinds' feed of ``rows``; a bad value is the request's error (422, or 413 for a list too long)."""
    try:
        feed = kinds.feed(transform, rows, wanted)
    except ListTooLong as e:
        raise errors.ListTooLong(_located(transform, e)) from None
    except TransformError as e:
        raise RequestError(_located(transform, e)) from None
    for name, rows_cut in feed.truncated.items():
        metrics.LIST_TRUNCATED.labels(name).inc(rows_cut)
    return feed


@functools.lru_cache(maxsize=64)
def _history_fields(transform: FeatureTransform) -> HistoryFields:
    """The version's sequence fields: what its history records hold."""
    return HistoryFields.of(transform.lists)


def _rows(transform: FeatureTransform, query: RankQuery) -> kinds.Rows:
    """The request's raw columns: the user's values once, a list per candidate feature."""
    user = {f.name: query.user_value(f.name) for f in _fields(transform) if f.side == "user"}
    item = {f.name: query.item_column(f.name) for f in _fields(transform) if f.side != "user"}
    if transform.item_facet is not None:  # its rules may read features the model does not take
        item |= {r.feature: query.item_column(r.feature) for r in transform.item_facet.rules if r.feature not in item}
    return kinds.Rows.one_request(user, item, query.n)


def _fields(transform: FeatureTransform) -> tuple:
    return (*transform.dense, *transform.sparse, *transform.lists)


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
    sides = {f.name: f.side for f in _fields(transform)}
    return f"user.features.{e}" if sides.get(e.feature) == "user" else f"candidates[].features.{e}"


def _weights(bucket: BucketConfig, task_scores: dict[str, np.ndarray]) -> dict[str, float]:
    if bucket.weights is None:
        return dict.fromkeys(task_scores, 1.0)
    return {t: w for t, w in bucket.weights.items() if t in task_scores}


def _items(
    item_ids: list[str], order: np.ndarray, scores: np.ndarray, task_scores: dict[str, np.ndarray] | None
) -> list[RankedItem]:
    """The ranked items (``item_ids``: the candidates' ids at ``order``), built column-wise: ``map``
    calls the struct types from C."""
    ranks = range(1, len(item_ids) + 1)
    if task_scores is None:
        return list(map(RankedItem, item_ids, ranks, scores.tolist()))
    columns = [v[order].tolist() for v in task_scores.values()]
    tasks = map(task_scores_type(tuple(task_scores)), *columns)
    return list(map(RankedItem, item_ids, ranks, scores.tolist(), tasks))

