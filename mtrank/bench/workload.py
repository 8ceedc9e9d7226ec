"""Request bodies a recommender front end would send, built from a model version's manifest.

:class:`Catalog` reads what the service knows (store-table ids, graph vocabularies, dense-feature
statistics) from ``REPO/<model>/<version>/``, so the bench and the locust scenario work for any
exported model without its training data. Users and items are drawn Zipf-distributed over the
tables (a few hot ids, a long tail, as in real traffic); an item's categorical features are a
fixed function of its id, as they would be in an item catalogue; dense values follow the
manifest's normalisation statistics.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mtrank.manifest import Manifest, load_manifest, read_ids, version_dir


@dataclass
class Catalog:
    manifest: Manifest
    store_ids: dict[str, list[str]]
    """Store-held field → its table's ids (in table order)."""

    @classmethod
    def from_repo(cls, repo: str | Path, model: str, version: int | None = None) -> Catalog:
        vdir = version_dir(repo, model, version)
        manifest = load_manifest(vdir, verify=False)
        ids = {f: read_ids(vdir / t.ids_file) for f, t in manifest.tables.items()}
        return cls(manifest, ids)

    def ids(self, field: str) -> list[str]:
        if field in self.store_ids:
            return self.store_ids[field]
        sparse = next((s for s in self.manifest.sparse if s.name == field), None)
        return list(sparse.vocab or []) if sparse else []

    @property
    def users(self) -> list[str]:
        return self.ids("user_id") or [f"u{i}" for i in range(1000)]

    @property
    def items(self) -> list[str]:
        return self.ids("item_id") or [f"v{i}" for i in range(5000)]


def zipf_indices(rng: np.random.Generator, n: int, size: int, exponent: float = 1.1) -> np.ndarray:
    """``size`` indices in ``[0, n)``, index k drawn with probability ∝ 1 / (k + 1)^exponent."""
    weights = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** exponent
    return rng.choice(n, size=size, p=weights / weights.sum())


def zipf_distinct(rng: np.random.Generator, n: int, size: int, exponent: float = 1.1) -> np.ndarray:
    """``size`` distinct indices in ``[0, n)`` drawn by Zipf weight without replacement (a
    candidate list never repeats an item); ``size`` may exceed ``n``: the rest is ``n, n+1, …``
    (ids the tables do not hold: new items)."""
    take = min(size, n)
    weights = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** exponent
    # Efraimidis–Spirakis: the `take` largest u^(1/w) are a weighted sample without replacement.
    keys = np.log(rng.random(n)) / weights
    chosen = np.argpartition(-keys, take - 1)[:take] if take < n else np.arange(n)
    return np.concatenate([chosen, np.arange(n, n + size - take)])


def _stable_pick(values: list[str], key: str, salt: str) -> str:
    return values[zlib.crc32(f"{salt}:{key}".encode()) % len(values)]


def _dense_value(rng: np.random.Generator, mean: float, std: float, log1p: bool) -> float:
    return _dense_values(rng, mean, std, log1p, 1)[0]


def _dense_values(rng: np.random.Generator, mean: float, std: float, log1p: bool, n: int) -> list[float]:
    """``n`` raw values whose normalised form is standard normal (inverts the manifest's transform)."""
    z = mean + std * rng.standard_normal(n)
    values = np.expm1(np.minimum(z, 20.0)) if log1p else z
    return np.maximum(values, 0.0).round(3).tolist()


class RequestFactory:
    """Bodies of ``POST /v1/rank`` for one catalog."""

    def __init__(self, catalog: Catalog, zipf_exponent: float = 1.1):
        self.catalog = catalog
        self.zipf_exponent = zipf_exponent
        m = catalog.manifest
        self.user_dense = [d for d in m.dense if d.side == "user"]
        self.item_dense = [d for d in m.dense if d.side == "item" and d.name != "video_len"]
        self.video_len = next((d for d in m.dense if d.name == "video_len"), None)
        self.user_sparse = [s for s in m.sparse if s.side == "user" and s.name != "user_id"]
        self.item_sparse = [s for s in m.sparse if s.side == "item" and s.name != "item_id"]
        self.users = catalog.users
        self.items = catalog.items
        self._item_values = {s.name: catalog.ids(s.name) or ["x"] for s in self.item_sparse}
        self._user_values = {s.name: catalog.ids(s.name) or ["x"] for s in self.user_sparse}
        self._item_features: dict[str, dict[str, Any]] = {}
        self.user_lists = [f for f in m.lists if f.side == "user"]
        self.item_lists = [f for f in m.lists if f.side == "item"]
        self._list_values = {f.name: (catalog.ids(f.share) if f.share else list(f.vocab or [])) or ["x"]
                             for f in m.lists}

    def user(self, rng: np.random.Generator, new: bool = False) -> dict[str, Any]:
        """A known user drawn by Zipf weight, or (``new``) an id the store has never seen."""
        if new:
            user_id = f"new-{rng.integers(1 << 40):x}"
        else:
            user_id = self.users[int(zipf_indices(rng, len(self.users), 1, self.zipf_exponent)[0])]
        features: dict[str, Any] = {}
        for d in self.user_dense:
            features[d.name] = _dense_value(rng, d.mean, d.std, d.transform == "log1p")
        if new:
            # A new user: a young account with little history (the "new" user group's rule).
            for name in ("account_age_days", "watch_minutes_30d"):
                if name in features:
                    features[name] = round(float(rng.uniform(0, 5)), 3)
        for s in self.user_sparse:
            features[s.name] = _stable_pick(self._user_values[s.name], user_id, s.name)
        for f in self.user_lists:  # a full history (the most entries a model keeps), Zipf-drawn
            values = self._list_values[f.name]
            picks = zipf_indices(rng, len(values), f.max_len, self.zipf_exponent).tolist()
            features[f.name] = [values[k] for k in picks]
        return {"user_id": user_id, "features": features}

    def candidates(self, rng: np.random.Generator, n: int) -> list[dict[str, Any]]:
        rows = zipf_distinct(rng, len(self.items), n, self.zipf_exponent).tolist()
        item_ids = [self.items[k] if k < len(self.items) else f"vnew{k}" for k in rows]
        dense = {d.name: _dense_values(rng, d.mean, d.std, d.transform == "log1p", n) for d in self.item_dense}
        v = self.video_len
        lengths = (_dense_values(rng, v.mean, v.std, v.transform == "log1p", n) if v is not None
                   else rng.uniform(5, 300, n).round(3).tolist())
        out = []
        for j, item_id in enumerate(item_ids):
            features = self._item_sparse_features(item_id).copy()
            for name, values in dense.items():
                features[name] = values[j]
            out.append({"item_id": item_id, "video_len": min(lengths[j], 86400.0), "features": features})
        return out

    def _item_sparse_features(self, item_id: str) -> dict[str, Any]:
        """The item's categorical features: a fixed function of its id, as in an item catalogue."""
        features = self._item_features.get(item_id)
        if features is None:
            features = {s.name: _stable_pick(self._item_values[s.name], item_id, s.name) for s in self.item_sparse}
            for f in self.item_lists:  # an item's tags: a few, fixed by its id
                values = self._list_values[f.name]
                features[f.name] = [_stable_pick(values, item_id, f"{f.name}{j}")
                                    for j in range(1 + zlib.crc32(item_id.encode()) % f.max_len)]
            self._item_features[item_id] = features
        return features

    def request(self, rng: np.random.Generator, n_candidates: int, new_user: bool = False,
                top_k: int | None = None, return_task_scores: bool = True) -> dict[str, Any]:
        body: dict[str, Any] = {
            "request_id": f"r-{rng.integers(1 << 48):x}",
            "user": self.user(rng, new=new_user),
            "candidates": self.candidates(rng, n_candidates),
            "return_task_scores": return_task_scores,
        }
        if top_k is not None:
            body["top_k"] = top_k
        return body
