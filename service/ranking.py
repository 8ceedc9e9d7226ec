"""The ranking hot path: request → bucket → model version → user group → features → embeddings
→ batcher (the group's graph only) → fusion → order.

Features are assembled column by column with numpy; the only per-candidate Python work is
building id lists and the response items.
"""

from __future__ import annotations

import math
import operator
import time
import uuid
from dataclasses import dataclass, field
from functools import cached_property
from itertools import repeat
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mtrank import fusion
from mtrank.fusion import BucketConfig
from mtrank.manifest import ALL_GROUPS, GraphInfo, Manifest
from mtrank.spec import Facet
from service import metrics
from service.batcher import Batcher
from service.schemas import RankRequest, User
from service.settings import Settings
from service.stores import EmbeddingStore, LocalTable

if TYPE_CHECKING:
    from service.repository import Repository
    from service.runner import GraphRunner

DENSE_INPUT = "dense"
IDS_INPUT = "ids"
EMB_PREFIX = "emb."
DENSE_LIMIT = 1e6
"""Normalised dense inputs are clipped to ±this so absurd (finite) values cannot overflow float32."""
_SCALAR_OPS = {"lt": operator.lt, "le": operator.le, "gt": operator.gt, "ge": operator.ge, "eq": operator.eq}
"""The comparisons of :class:`mtrank.spec.FacetRule` on Python floats."""


class RequestError(ValueError):
    """The request is well-formed but does not fit the model (a feature of the wrong type,
    an unknown user group): answered with 422."""


class NotReady(RuntimeError):
    """No model version serves the request's bucket: answered with 503."""


# -- what the repository builds per version -------------------------------------------------


@dataclass(frozen=True)
class DenseColumn:
    name: str
    side: str
    log1p: bool
    mean: float
    std: float
    default: float


@dataclass(frozen=True)
class GraphField:
    name: str
    side: str
    vocab: dict[str, int]
    """Value → index; 0 (absent) is out of vocabulary."""


@dataclass(frozen=True)
class StoreField:
    name: str
    side: str
    table: LocalTable


@dataclass
class FeaturePlan:
    """How to turn a request into a version's graph inputs (from its manifest)."""

    dense: list[DenseColumn]
    graph_fields: list[GraphField]
    store_fields: dict[str, StoreField]
    group_facet: Facet | None
    group_rule_defaults: dict[str, float]

    @classmethod
    def build(cls, manifest: Manifest, tables: dict[str, LocalTable]) -> FeaturePlan:
        dense = [
            DenseColumn(d.name, d.side, d.transform == "log1p", float(d.mean), float(d.std) or 1.0, float(d.default))
            for d in manifest.dense
        ]
        graph_fields = [
            GraphField(s.name, s.side, {v: i for i, v in enumerate(s.vocab or [], start=1)})
            for s in manifest.sparse
            if s.location == "graph"
        ]
        store_fields = {}
        for s in manifest.sparse:
            if s.location == "store":
                if s.name not in tables:
                    raise ValueError(f"store field {s.name!r} has no table in the manifest")
                store_fields[s.name] = StoreField(s.name, s.side, tables[s.name])
        facet = manifest.group_facet()
        defaults = {d.name: d.default for d in dense}
        rule_defaults = {r.feature: defaults.get(r.feature, math.nan) for r in (facet.rules if facet else ())}
        return cls(dense, graph_fields, store_fields, facet, rule_defaults)

    def check_graph(self, key: str, info: GraphInfo, runner: GraphRunner) -> None:
        """The ONNX graph's inputs and outputs match the manifest and this plan."""
        for spec in runner.inputs:
            if spec.name == DENSE_INPUT:
                expected = len(self.dense)
            elif spec.name == IDS_INPUT:
                expected = len(self.graph_fields)
            elif spec.name.startswith(EMB_PREFIX) and spec.name[len(EMB_PREFIX):] in self.store_fields:
                expected = self.store_fields[spec.name[len(EMB_PREFIX):]].table.width
            else:
                raise ValueError(f"graph {key!r}: unexpected input {spec.name!r}")
            if spec.width is not None and spec.width != expected:
                raise ValueError(f"graph {key!r}: input {spec.name} has width {spec.width}, expected {expected}")
        declared = [o.name for o in info.outputs]
        if sorted(runner.output_names) != sorted(declared) or len(info.tasks) != len(declared):
            raise ValueError(f"graph {key!r}: outputs {runner.output_names} do not match the manifest's {declared}")

    def user_group(self, user: User) -> str | None:
        """The explicit group if given (checked), else the manifest rule on the user's features."""
        facet = self.group_facet
        if facet is None:
            return None
        if user.group is not None:
            if user.group not in facet.values:
                raise RequestError(
                    f"user.group: unknown user group {user.group!r}; this model has {list(facet.values)}"
                )
            return user.group
        values = {f: _number(user.features.get(f), d) for f, d in self.group_rule_defaults.items()}
        # Facet.assign's ordered rules on one user's scalars, without numpy (2 µs instead of 17 µs);
        # a NaN compares false in both.
        for rule in facet.rules:
            if _SCALAR_OPS[rule.op](values[rule.feature], rule.threshold):
                return rule.value
        return facet.default

    def dense_matrix(self, req: RankRequest, video_len: np.ndarray) -> np.ndarray:
        """``[n, n_dense]`` float32: raw value (request or default) → transform → (x − mean) / std."""
        n = len(req.candidates)
        raw = np.empty((n, len(self.dense)), dtype=np.float64)
        for j, col in enumerate(self.dense):
            if col.side == "user":
                raw[:, j] = _user_number(req.user, col)
            elif col.name == "video_len":
                raw[:, j] = video_len
            else:
                raw[:, j] = _item_numbers(req, col)
        logs = [j for j, col in enumerate(self.dense) if col.log1p]
        raw[:, logs] = np.log1p(np.maximum(raw[:, logs], 0.0))
        mean = np.array([c.mean for c in self.dense])
        std = np.array([c.std for c in self.dense])
        return np.clip((raw - mean) / std, -DENSE_LIMIT, DENSE_LIMIT).astype(np.float32)

    def id_matrix(self, req: RankRequest) -> np.ndarray:
        """``[n, n_graph_fields]`` int64 vocabulary indices (0 = out of vocabulary)."""
        n = len(req.candidates)
        ids = np.empty((n, len(self.graph_fields)), dtype=np.int64)
        for j, f in enumerate(self.graph_fields):
            if f.side == "user":
                ids[:, j] = f.vocab.get(_user_key(req.user, f.name), 0)
            else:
                ids[:, j] = np.fromiter((f.vocab.get(k, 0) for k in _item_keys(req, f.name)), dtype=np.int64, count=n)
        return ids

    def store_ids(self, req: RankRequest, fields: list[str]) -> list[tuple[LocalTable, list[str]]]:
        """Per store field: the ids to look up (one id for a user field, one per candidate otherwise)."""
        out = []
        for name in fields:
            f = self.store_fields[name]
            keys = [_user_key(req.user, name)] if f.side == "user" else _item_keys(req, name)
            out.append((f.table, keys))
        return out


def _number(v: Any, default: float) -> float:
    if v is None:
        return default
    if isinstance(v, str):
        return math.nan
    return float(v)


def _user_number(user: User, col: DenseColumn) -> float:
    v = user.features.get(col.name)
    if v is None:
        return col.default
    if isinstance(v, str):
        raise RequestError(f"user.features.{col.name}: must be a number, got a string")
    return float(v)


def _item_numbers(req: RankRequest, col: DenseColumn) -> np.ndarray:
    default = col.default
    name = col.name
    try:
        return np.fromiter((c.features.get(name, default) for c in req.candidates), dtype=np.float64,
                           count=len(req.candidates))
    except (ValueError, TypeError):
        raise RequestError(f"candidates[].features.{name}: must be a number") from None


def _key(v: Any) -> str:
    # Training indexes values with pandas .astype(str): 3 → "3", True → "True".
    return v if isinstance(v, str) else str(v)


def _user_key(user: User, name: str) -> str:
    if name == "user_id":
        return user.user_id
    v = user.features.get(name)
    return "" if v is None else _key(v)


def _item_keys(req: RankRequest, name: str) -> list[str]:
    if name == "item_id":
        return [c.item_id for c in req.candidates]
    values = [c.features.get(name, "") for c in req.candidates]
    return [v if type(v) is str else _key(v) for v in values]


@dataclass
class GroupGraph:
    key: str
    info: GraphInfo
    runner: GraphRunner
    batcher: Batcher

    @cached_property
    def task_outputs(self) -> list[tuple[str, str]]:
        """(task, output name) in output order."""
        return [(task, out.name) for task, out in zip(self.info.tasks, self.info.outputs, strict=True)]

    @cached_property
    def store_fields(self) -> list[str]:
        return [i.name[len(EMB_PREFIX):] for i in self.runner.inputs if i.name.startswith(EMB_PREFIX)]

    @cached_property
    def input_names(self) -> set[str]:
        return {i.name for i in self.runner.inputs}


@dataclass
class LoadedVersion:
    manifest: Manifest
    dir: Path
    graphs: dict[str, GroupGraph]
    plan: FeaturePlan
    tables: dict[str, LocalTable]
    loaded_at: float = field(default_factory=time.time)

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def device(self) -> str:
        return next(iter(self.graphs.values())).runner.device

    @property
    def provider(self) -> str:
        return next(iter(self.graphs.values())).runner.provider

    @cached_property
    def task_names(self) -> list[str]:
        names: list[str] = []
        for g in self.graphs.values():
            names += [t for t in g.info.tasks if t not in names]
        return names

    def graph_for(self, group: str | None) -> GroupGraph:
        if group is not None and group in self.graphs:
            return self.graphs[group]
        if ALL_GROUPS in self.graphs:
            return self.graphs[ALL_GROUPS]
        raise NotReady(f"model {self.name} v{self.version} has no graph for user group {group!r}")

    async def close(self) -> None:
        for g in self.graphs.values():
            await g.batcher.close()


# -- the ranking call ----------------------------------------------------------------------


class Ranker:
    def __init__(self, settings: Settings, repository: Repository, store: EmbeddingStore):
        self.settings = settings
        self.repository = repository
        self.store = store
        self._lookup_seconds = metrics.LOOKUP_DURATION.labels(store.name)

    def bucket_for(self, user_id: str) -> BucketConfig:
        table = self.repository.buckets
        if table is None:
            raise NotReady(self.repository.not_ready_reason() or "no model loaded")
        return table.assign(user_id)

    async def rank(self, req: RankRequest, bucket: BucketConfig, deadline: float) -> dict[str, Any]:
        """The response body for ``req`` (DESIGN.md §5); ``deadline`` is time.monotonic() seconds."""
        lv = self.repository.resolve(bucket.model, bucket.version)
        if lv is None:
            raise NotReady(self.repository.not_ready_reason() or f"model {bucket.model} not loaded")
        plan = lv.plan
        group = plan.user_group(req.user)
        graph = lv.graph_for(group)
        metrics.CANDIDATES.observe(len(req.candidates))

        video_len = np.fromiter((c.video_len for c in req.candidates), dtype=np.float64, count=len(req.candidates))
        feed: dict[str, np.ndarray] = {}
        if DENSE_INPUT in graph.input_names:
            feed[DENSE_INPUT] = plan.dense_matrix(req, video_len)
        if IDS_INPUT in graph.input_names:
            feed[IDS_INPUT] = plan.id_matrix(req)
        degraded = False
        if graph.store_fields:
            started = time.perf_counter()
            lookups, degraded = await self.store.lookup_many(plan.store_ids(req, graph.store_fields))
            self._lookup_seconds.observe(time.perf_counter() - started)
            n = len(req.candidates)
            for name, result in zip(graph.store_fields, lookups, strict=True):
                vectors = result.vectors
                feed[EMB_PREFIX + name] = np.repeat(vectors, n, axis=0) if len(vectors) != n else vectors

        outputs = await graph.batcher.submit(feed, deadline)
        task_scores = {task: outputs[out] for task, out in graph.task_outputs}
        weights = self._weights(bucket, task_scores)
        log_score = fusion.log_scores(task_scores, weights, video_len, bucket.length_fn)
        order = fusion.rank_order(log_score)
        if req.top_k is not None:
            order = order[: req.top_k]
        return {
            "request_id": req.request_id or uuid.uuid4().hex,
            "model": {"name": lv.name, "version": lv.version},
            "bucket": bucket.name,
            "user_group": group,
            "degraded": degraded,
            "items": _items(req, order, np.exp(log_score[order]), task_scores if req.return_task_scores else None),
        }

    @staticmethod
    def _weights(bucket: BucketConfig, task_scores: dict[str, np.ndarray]) -> dict[str, float]:
        if bucket.weights is None:
            return dict.fromkeys(task_scores, 1.0)
        return {t: w for t, w in bucket.weights.items() if t in task_scores}


def _items(
    req: RankRequest, order: np.ndarray, scores: np.ndarray, task_scores: dict[str, np.ndarray] | None
) -> list[dict[str, Any]]:
    cands = req.candidates
    item_ids = [cands[i].item_id for i in order.tolist()]
    if task_scores is None:
        return [
            {"item_id": i, "rank": r, "score": s}
            for r, (i, s) in enumerate(zip(item_ids, scores.tolist(), strict=True), start=1)
        ]
    # One [n, tasks] matrix to Python floats at once, and the per-item task dicts built by
    # map/zip in C: 0.52 ms instead of 0.75 ms for 500 items × 6 tasks.
    names = list(task_scores)
    matrix = np.stack([v[order] for v in task_scores.values()], axis=1).astype(np.float64).tolist()
    tasks = map(dict, map(zip, repeat(names), matrix))
    return [
        {"item_id": i, "rank": r, "score": s, "tasks": t}
        for r, (i, s, t) in enumerate(zip(item_ids, scores.tolist(), tasks, strict=True), start=1)
    ]
