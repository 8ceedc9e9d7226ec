"""Feature spec: the fields, tasks and facets of a data set.

Torch-free and numpy-only: training reads it from ``spec.yaml``, export embeds it in the
manifest, and the service evaluates its facet rules and dense transforms on request features.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

Side = Literal["user", "item"]
_OPS = {"lt": np.less, "le": np.less_equal, "gt": np.greater, "ge": np.greater_equal, "eq": np.equal}


class SpecError(ValueError):
    """A feature spec or a data file does not match what it declares."""


@dataclass(frozen=True)
class DenseField:
    """A numeric feature. Model input = (transform(x) - mean) / std, stats fitted on train."""

    name: str
    side: Side = "item"
    transform: Literal["none", "log1p"] = "none"
    default: float = 0.0
    """Raw value used when a row or a request does not carry the feature."""


@dataclass(frozen=True)
class SparseField:
    """A categorical feature looked up in an embedding table.

    ``location='graph'`` keeps the table inside the ONNX graph (small vocabularies: device,
    category); ``'store'`` keeps it in the embedding store (ids: user, item, author).
    """

    name: str
    side: Side = "item"
    location: Literal["graph", "store"] = "graph"
    min_count: int = 1
    """Values seen fewer times in train share the out-of-vocabulary row 0."""


@dataclass(frozen=True)
class Task:
    """One prediction target. ``space`` names a 0/1 column; the loss ignores rows where it is 0."""

    name: str
    type: Literal["binary", "regression"] = "binary"
    label: str | None = None
    """Label column (defaults to ``name``)."""
    space: str | None = None
    behaviour: str | None = None
    """The behaviour facet value (``vtr`` for ``vtr@new``); defaults to ``name``."""

    @property
    def label_column(self) -> str:
        return self.label or self.name

    @property
    def behaviour_name(self) -> str:
        return self.behaviour or self.name


@dataclass(frozen=True)
class FacetRule:
    """``value`` applies when ``feature <op> threshold``; rules are tried in order."""

    value: str
    feature: str
    op: Literal["lt", "le", "gt", "ge", "eq"]
    threshold: float


@dataclass(frozen=True)
class Facet:
    """A partition of rows (user group, item cold/warm) given by ordered threshold rules."""

    column: str
    values: tuple[str, ...]
    rules: tuple[FacetRule, ...] = ()
    default: str = ""

    def assign(self, features: dict[str, np.ndarray | float]) -> np.ndarray:
        """Facet value index per row (int64) from raw feature arrays or scalars."""
        n = max((np.size(v) for v in features.values()), default=1)
        out = np.full(n, self.values.index(self.default), dtype=np.int64)
        undecided = np.ones(n, dtype=bool)
        for rule in self.rules:
            x = np.asarray(features[rule.feature], dtype=np.float64)
            hit = undecided & _OPS[rule.op](x, rule.threshold)
            out[hit] = self.values.index(rule.value)
            undecided &= ~hit
        return out

    def assign_one(self, features: dict[str, float]) -> str:
        return self.values[int(self.assign(features)[0])]


@dataclass(frozen=True)
class FeatureSpec:
    name: str
    dense: tuple[DenseField, ...]
    sparse: tuple[SparseField, ...]
    tasks: tuple[Task, ...]
    user_groups: Facet | None = None
    item_facet: Facet | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form documentation (generator parameters, ground truth notes)."""

    def __post_init__(self) -> None:
        names = [f.name for f in self.dense] + [f.name for f in self.sparse]
        if len(set(names)) != len(names):
            raise SpecError(f"spec {self.name!r}: duplicate feature names in {names}")
        if not self.tasks:
            raise SpecError(f"spec {self.name!r}: no tasks")
        for facet in (self.user_groups, self.item_facet):
            if facet is None:
                continue
            if facet.default not in facet.values or any(r.value not in facet.values for r in facet.rules):
                raise SpecError(f"spec {self.name!r}: facet {facet.column!r} uses a value outside {facet.values}")

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def task(self, name: str) -> Task:
        for t in self.tasks:
            if t.name == name:
                return t
        raise SpecError(f"spec {self.name!r}: no task {name!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureSpec:
        def facet(f: dict | None) -> Facet | None:
            if not f:
                return None
            rules = tuple(FacetRule(**r) for r in f.get("rules", ()))
            values = tuple(f["values"])
            return Facet(column=f["column"], values=values, rules=rules, default=f.get("default") or values[-1])

        try:
            return cls(
                name=d.get("name", "data"),
                dense=tuple(DenseField(**x) for x in d.get("dense", ())),
                sparse=tuple(SparseField(**x) for x in d.get("sparse", ())),
                tasks=tuple(Task(**x) for x in d["tasks"]),
                user_groups=facet(d.get("user_groups")),
                item_facet=facet(d.get("item_facet")),
                extra=d.get("extra", {}),
            )
        except (KeyError, TypeError) as e:
            raise SpecError(f"bad feature spec: {e}") from e

    @classmethod
    def load(cls, path: str | Path) -> FeatureSpec:
        path = Path(path)
        if not path.is_file():
            raise SpecError(f"feature spec not found: {path}")
        return cls.from_dict(yaml.safe_load(path.read_text()))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(_plain(self.to_dict()), sort_keys=False))


def _plain(obj: Any) -> Any:
    """Tuples to lists so YAML stays readable."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj
