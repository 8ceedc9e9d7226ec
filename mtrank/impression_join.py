"""``mtrank join-log``: the impression log joined with the frontend's feedback into a data set in
the trainer's format (``train/valid/test.parquet`` and ``spec.yaml``; docs/impressions.md).

One row per shown item (each returned item of each logged request): the user's and the item's
features exactly as the request sent them, the served user group, and the task labels of the
feedback row with the same ``(request_id, item_id)``. An impression with no feedback row is a
negative for every binary task, and outside every sample space (space columns 0), so a task
measured only within a space (a completion ratio, given a play) never learns from it. A regression
task without a space has no value to give an impression without feedback: such impressions are
left out, and counted.

Requests go to the splits in time order (the oldest to ``train``), each request whole, so that
``valid`` and ``test`` are later traffic than ``train``, as a served model meets it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from mtrank.impression_log import FEEDBACK_KEYS, FeedbackError, LogError, log_files, read_feedback
from mtrank.manifest import load_manifest
from mtrank.spec import DenseField, FeatureSpec, SparseField, SpecError, Task
from mtrank.transform import sparse_keys

KEYS = FEEDBACK_KEYS
LOG_COLUMNS = ("request_id", "bucket", "model", "version", "rank", "score", "time")
"""Columns of the log kept beside features and labels (the trainer ignores them; tune-fusion
groups ranking lists by ``request_id``)."""


@dataclass
class JoinReport:
    """What a join did: counts of rows, labels and what was left out."""

    requests: int = 0
    impressions: int = 0
    with_feedback: int = 0
    feedback_rows: int = 0
    feedback_unmatched: int = 0
    """Feedback rows whose (request_id, item_id) no logged impression has (not logged, or sampled out)."""
    left_out: dict[str, int] = field(default_factory=dict)
    """Impressions left out per regression task without a space that had no value."""
    splits: dict[str, int] = field(default_factory=dict)
    positives: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def spec_from_manifest(repo: Path, model: str, version: int) -> FeatureSpec:
    """The feature spec a served version was trained with, as far as its manifest says: features,
    tasks (their label columns named as the tasks, no sample spaces) and facets."""
    manifest = load_manifest(Path(repo) / model / str(version))
    tasks = tuple(Task(t["name"], t["type"], behaviour=t.get("behaviour"),
                       output=t.get("output") if t["type"] == "regression" else None) for t in manifest.tasks)
    return FeatureSpec(
        name=manifest.name,
        dense=tuple(DenseField(f.name, f.side, f.transform, f.default) for f in manifest.dense),
        sparse=tuple(SparseField(f.name, f.side, f.location) for f in manifest.sparse),
        tasks=tasks, user_groups=manifest.group_facet(), item_facet=manifest.item_facet_rule(),
    )


def join_log(impressions: Path, feedback: Path, out: Path, spec: FeatureSpec | None = None,
             repo: Path | None = None, valid_frac: float = 0.1, test_frac: float = 0.1) -> JoinReport:
    """Write ``out/{train,valid,test}.parquet`` and ``out/spec.yaml``; the spec is ``spec``, else the
    manifest's of the one model version the log holds, found in ``repo``."""
    import pyarrow.parquet as pq

    log = _read_log(Path(impressions))
    if spec is None:
        if repo is None:
            raise SpecError("join-log needs the model's feature spec: --spec FILE, or --repo REPO to read it "
                            "from the logged version's manifest")
        versions = sorted(set(zip(log["model"], log["version"], strict=True)))
        if len(versions) != 1:
            raise SpecError(f"{impressions}: the log holds several model versions {versions}; give --spec")
        spec = spec_from_manifest(repo, *versions[0])
    report = JoinReport(requests=len(log["request_id"]))
    rows = _impression_rows(log, spec)
    report.impressions = len(rows["request_id"])
    labels = _labels(rows, _read_feedback(Path(feedback), spec), spec, report)
    rows |= labels
    keep = np.ones(report.impressions, dtype=bool)
    for task in spec.tasks:
        if task.type == "regression" and task.space is None:
            missing = np.isnan(rows[task.label_column])
            if missing.any():
                report.left_out[task.name] = int(missing.sum())
            keep &= ~missing
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for split, mask in _splits(rows, keep, valid_frac, test_frac).items():
        table = _table({name: _take(column, mask) for name, column in rows.items()})
        pq.write_table(table, out / f"{split}.parquet")
        report.splits[split] = table.num_rows
    spec.save(out / "spec.yaml")
    for task in spec.tasks:
        if task.type == "binary":
            report.positives[task.name] = int(np.nansum(rows[task.label_column][keep]))
    return report


def _read_log(directory: Path) -> dict[str, list]:
    import pyarrow.dataset as ds

    try:
        files = log_files(directory)
    except LogError as e:
        raise SpecError(str(e)) from None
    table = ds.dataset([str(f) for f in files], format="parquet").to_table()
    return table.to_pydict()


def _impression_rows(log: dict[str, list], spec: FeatureSpec) -> dict[str, Any]:
    """One row per shown item: log columns, the raw features, the served user group."""
    columns: dict[str, list] = {name: [] for name in (*LOG_COLUMNS, "item_id", "user_id", "video_len")}
    user_side = [f.name for f in (*spec.dense, *spec.sparse) if f.side == "user" and f.name != "user_id"]
    item_side = [f.name for f in (*spec.dense, *spec.sparse)
                 if f.side == "item" and f.name not in ("item_id", "video_len")]
    features: dict[str, list] = {name: [] for name in (*user_side, *item_side)}
    groups: list[str | None] = []
    for r in range(len(log["request_id"])):
        request = orjson.loads(log["request"][r])
        user = request["user"].get("features", {})
        candidates = {c["item_id"]: c for c in request["candidates"]}
        for item in log["items"][r]:
            candidate = candidates[item["item_id"]]
            item_features = candidate.get("features", {})
            for name in LOG_COLUMNS:
                columns[name].append(item[name] if name in ("rank", "score") else log[name][r])
            columns["item_id"].append(item["item_id"])
            columns["user_id"].append(log["user_id"][r])
            columns["video_len"].append(candidate["video_len"])
            for name in user_side:
                features[name].append(user.get(name))
            for name in item_side:
                features[name].append(item_features.get(name))
            groups.append(log["user_group"][r])
    out: dict[str, Any] = dict(columns)
    dense = {f.name for f in spec.dense}
    for name, values in features.items():
        out[name] = (np.array([np.nan if v is None else v for v in values], dtype=np.float64) if name in dense
                     else sparse_keys(values))
    if "video_len" in dense:
        out["video_len"] = np.asarray(out["video_len"], dtype=np.float64)
    if spec.user_groups is not None and any(g is not None for g in groups):
        out[spec.user_groups.column] = groups
    return out


def _read_feedback(path: Path, spec: FeatureSpec) -> dict[str, list]:
    try:
        table = read_feedback(path)
    except FeedbackError as e:
        raise SpecError(str(e)) from None
    needed = dict.fromkeys(c for t in spec.tasks for c in (t.label_column, t.space) if c is not None)
    absent = [c for c in needed if c not in table.column_names]
    if absent:
        raise SpecError(f"{path}: feedback has no column {absent[0]!r} (the spec's label and space columns: "
                        f"{list(needed)})")
    return table.select([*KEYS, *needed]).to_pydict()


def _labels(rows: dict[str, Any], feedback: dict[str, list], spec: FeatureSpec, report: JoinReport) -> dict:
    """Label and space columns aligned with ``rows``: the feedback's values, else 0 for binary labels
    and spaces and NaN for regression labels."""
    index = {key: i for i, key in enumerate(zip(rows["request_id"], rows["item_id"], strict=True))}
    report.feedback_rows = len(feedback["request_id"])
    binary = {t.label_column for t in spec.tasks if t.type == "binary"} | {t.space for t in spec.tasks if t.space}
    columns = [c for c in feedback if c not in KEYS]
    out = {c: np.full(len(index), 0.0 if c in binary else np.nan) for c in columns}
    seen = np.zeros(len(index), dtype=bool)
    for j, key in enumerate(zip(feedback["request_id"], feedback["item_id"], strict=True)):
        i = index.get(tuple(str(k) for k in key))
        if i is None:
            report.feedback_unmatched += 1
            continue
        if seen[i]:
            raise SpecError(f"feedback: (request_id, item_id) {key} appears more than once")
        seen[i] = True
        for c in columns:
            value = feedback[c][j]
            if value is not None:
                out[c][i] = float(value)
    report.with_feedback = int(seen.sum())
    return out


def _splits(rows: dict[str, Any], keep: np.ndarray, valid_frac: float, test_frac: float) -> dict[str, np.ndarray]:
    """Row masks of train, valid and test: requests in time order (ties by request id), each whole."""
    if not (0 <= valid_frac < 1 and 0 <= test_frac < 1 and valid_frac + test_frac < 1):
        raise SpecError(f"valid and test fractions must be in [0, 1) and add up to less than 1 "
                        f"(got {valid_frac}, {test_frac})")
    firsts = {}
    for t, rid in zip(rows["time"], rows["request_id"], strict=True):
        firsts.setdefault(rid, t)
    order = sorted(firsts, key=lambda rid: (firsts[rid], rid))
    n = len(order)
    n_test, n_valid = round(n * test_frac), round(n * valid_frac)
    split_of = {rid: "train" for rid in order[: n - n_valid - n_test]}
    split_of |= {rid: "valid" for rid in order[n - n_valid - n_test: n - n_test]}
    split_of |= {rid: "test" for rid in order[n - n_test:]}
    names = np.array([split_of[rid] for rid in rows["request_id"]])
    return {split: keep & (names == split) for split in ("train", "valid", "test")}


def _take(column: Any, mask: np.ndarray) -> Any:
    if isinstance(column, np.ndarray):
        return column[mask]
    return [v for v, m in zip(column, mask.tolist(), strict=True) if m]


def _table(columns: dict[str, Any]) -> Any:
    import pyarrow as pa

    return pa.table({name: pa.array(values) for name, values in columns.items()})
