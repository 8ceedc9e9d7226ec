"""Offline fusion tuning (``mtrank tune-fusion``): search the fusion weights on logged data and hand
the result to the service as two A/B buckets.

The run's model scores the logged rows (``mtrank.training.evaluate.predict_frame``: the values the exported
graphs give the service), the rows are grouped into ranking lists (one per request, session or user),
and CMA-ES (pycma) searches the exponents ``w_k`` of ``score = Π_k p_k^{w_k} × f(video_len)`` (and
``f``'s parameters) on the valid split. Scores and order come from ``mtrank.fusion`` — the module the
service ranks with — so a list is ordered here exactly as ``/v1/rank`` would order it, ties included
(stable: logged order). The test split, which the search never sees, gives the held-out figures.

Objectives, per ranking list, averaged over lists:

- ``ndcg``: NDCG@k of the per-impression value ``g = Σ_k v_k · label_k`` (unitless). ``DCG@k =
  Σ_{r<k} g_(r) / log2(r + 2)`` over the ranked list (r = 0 is the top), ``IDCG@k`` the same with the
  rows sorted by ``g``; ``NDCG = DCG / IDCG``. Values may be negative (``skip=-1``): NDCG is then
  still ≤ 1 (the ideal order maximises DCG) and may fall below 0. Lists with ``IDCG ≤ 0`` (nothing
  worth showing) cannot be normalised and are left out of the mean.
- ``watch_time``: the watch time of the top k, ``Σ_{r<k} vcr_(r) × video_len_(r)`` in seconds
  (an unplayed row watches 0 s).

Labels outside a task's sample space (``vcr`` where nothing played) count 0. On data with oracle
columns (``oracle_<task>``, the synthetic generator's true probabilities, docs/data.md) the same
objectives are computed from the truth, so a gain cannot be a fit to label noise. An oracle column of
a task with a sample space is conditional on it (``oracle_vcr = E[vcr | played]``); the data has no
true P(play), so it is multiplied by the realised space column.

Guardrails: each task's own NDCG@k (of its label; of ``1 − label`` for tasks whose value is negative,
e.g. ``skip``, whose bad outcome should rank low) for the baseline and the tuned weights; with
``max_task_loss`` no task's valid NDCG may drop by more than that percentage (a constraint: the best
*feasible* candidate wins, and violations are penalised in the search).
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from mtrank.fusion import BucketConfig, LengthFn, check_buckets, log_scores
from mtrank.spec import FeatureSpec, SpecError
from mtrank.training.fusion_report import write_outputs

SEARCH_SPLIT = "valid"
HELDOUT_SPLIT = "test"
GROUP_COLUMNS = ("request_id", "session_id")
"""Ranking-list columns used when the data has them (first found), before falling back to ``user_id``."""
LENGTH_KINDS = ("none", "log1p", "sigmoid", "power")
CONSTRAINT_PENALTY = 10.0
"""Search loss per unit of relative guardrail shortfall (1 % below the allowed NDCG costs 0.1 of
relative objective: far more than any gain, so the search moves back inside)."""
MAX_INVERSE_WIDTH = 0.5
"""sigmoid: the search covers 1 / width in [-0.5, 0.5] per second (|width| ≥ 2 s)."""


@dataclass(frozen=True)
class TuningConfig:
    """What ``tune_fusion`` searches and how."""

    value: dict[str, float] | None = None
    """Value per task of one impression, ``g = Σ_k v_k · label_k`` (ndcg); optional for watch_time,
    where its signs only orient the guardrails."""
    objective: Literal["ndcg", "watch_time"] = "ndcg"
    k: int = 10
    """Cut-off of NDCG@k and of the watch-time top k (rows)."""
    length_fn: Literal["none", "log1p", "sigmoid", "power"] = "none"
    """Kind of f(video_len) the treatment uses; its parameters are searched (``none``: f = 1)."""
    budget: int = 200
    """Objective evaluations of the search (the baseline's evaluation not counted)."""
    seed: int = 0
    treatment_share: float = 10.0
    """Percent of users in the ``treatment`` bucket; ``control`` gets the rest."""
    max_task_loss: float | None = None
    """Percent a task's own valid NDCG@k may drop against the baseline; None: unconstrained."""
    baseline_weights: dict[str, float] | None = None
    """Untuned weights (the ``control`` bucket and the search's start); None: 1 for every task."""
    group_by: str | None = None
    """Ranking-list column; None: ``request_id`` or ``session_id`` if present, else ``user_id``."""
    weight_bound: float = 4.0
    """The search keeps every weight in [-bound, bound] (widened to cover the baseline)."""
    watch_task: str = "vcr"
    """Completion-ratio task of the watch_time objective (label and prediction in [0, 1])."""
    model: str | None = None
    """Model name both buckets serve; None: the repository's first model."""


# -- ranking lists and objectives -----------------------------------------------------------


class RankingLists:
    """Rows of one split grouped into ranking lists of at least 2 rows (smaller lists cannot be
    mis-ordered and are left out). Internally rows are held grouped by list, in logged order."""

    def __init__(self, list_ids: np.ndarray | pd.Series, k: int):
        if k < 1:
            raise ValueError(f"k must be ≥ 1, got {k}")
        codes, _ = pd.factorize(pd.Series(list_ids), sort=False)  # missing ids get -1
        counts = np.bincount(codes[codes >= 0], minlength=1)
        keep = (codes >= 0) & (counts[np.maximum(codes, 0)] >= 2)
        rows = np.flatnonzero(keep)
        rows = rows[np.argsort(codes[rows], kind="stable")]
        self.rows = rows
        """Split row index of each grouped row."""
        _, self.list_index = np.unique(codes[rows], return_inverse=True)
        self.sizes = np.bincount(self.list_index) if len(rows) else np.zeros(0, dtype=np.int64)
        starts = np.concatenate(([0], np.cumsum(self.sizes)[:-1])).astype(np.int64)
        position = np.arange(len(rows)) - starts[self.list_index] if len(rows) else np.zeros(0, dtype=np.int64)
        self.k = k
        self.top_k = position < k
        self.discount = np.where(self.top_k, 1.0 / np.log2(position + 2.0), 0.0)
        """1 / log2(rank + 2) at each rank within its list, 0 from rank k on."""

    @property
    def n_lists(self) -> int:
        return len(self.sizes)

    def order(self, score: np.ndarray) -> np.ndarray:
        """Grouped-row indices ranked by descending score within each list; ties keep logged order."""
        return np.lexsort((-np.asarray(score, dtype=np.float64)[self.rows], self.list_index))

    def gain(self, per_row: np.ndarray) -> Gain:
        """A per-row gain of the split (NaN counts 0), with its ideal DCG@k per list."""
        values = np.nan_to_num(np.asarray(per_row, dtype=np.float64)[self.rows], nan=0.0)
        ideal = np.lexsort((-values, self.list_index))
        return Gain(values, self._per_list(values[ideal] * self.discount))

    def ndcg(self, order: np.ndarray, gain: Gain) -> float:
        """Mean NDCG@k over lists whose ideal DCG is > 0 (NaN when there is none)."""
        dcg = self._per_list(gain.values[order] * self.discount)
        usable = gain.ideal_dcg > 0
        return float(np.mean(dcg[usable] / gain.ideal_dcg[usable])) if usable.any() else math.nan

    def top_k_mean(self, order: np.ndarray, gain: Gain) -> float:
        """Mean over lists of the sum of the gain over the top k ranked rows."""
        return float(np.mean(self._per_list(np.where(self.top_k, gain.values[order], 0.0))))

    def _per_list(self, weights: np.ndarray) -> np.ndarray:
        return np.bincount(self.list_index, weights=weights, minlength=self.n_lists)


@dataclass(frozen=True)
class Gain:
    values: np.ndarray
    """Gain per grouped row."""
    ideal_dcg: np.ndarray
    """DCG@k of each list in its ideal order."""


def ndcg_at_k(list_ids: np.ndarray, score: np.ndarray, gain: np.ndarray, k: int) -> float:
    """Mean NDCG@k of ``gain`` when each list is ranked by ``score`` (see the module docstring)."""
    lists = RankingLists(list_ids, k)
    return lists.ndcg(lists.order(score), lists.gain(gain))


def top_k_watch_time(list_ids: np.ndarray, score: np.ndarray, watch_seconds: np.ndarray, k: int) -> float:
    """Mean over lists of the watch time (s) of the k best-scored rows."""
    lists = RankingLists(list_ids, k)
    return lists.top_k_mean(lists.order(score), lists.gain(watch_seconds))


# -- one split, ready to evaluate fusion parameters on --------------------------------------


@dataclass
class SplitTargets:
    """A split's ranking lists, predictions and gains (labels and, where present, the oracle)."""

    name: str
    group_by: str
    """The column whose values name the ranking lists."""
    lists: RankingLists
    predictions: dict[str, np.ndarray]
    video_len: np.ndarray
    objective: Gain
    task_gains: dict[str, Gain]
    oracle_objective: Gain | None
    oracle_task_gains: dict[str, Gain]


def _label(frame: pd.DataFrame, spec: FeatureSpec, task: str) -> np.ndarray:
    return np.nan_to_num(frame[spec.task(task).label_column].to_numpy(dtype=np.float64), nan=0.0)


def _oracle(frame: pd.DataFrame, spec: FeatureSpec, task: str) -> np.ndarray | None:
    """The task's true unconditional expectation per row, or None without an oracle column."""
    column = (spec.extra.get("oracles") or {}).get(task, f"oracle_{task}")
    if column not in frame.columns:
        return None
    truth = frame[column].to_numpy(dtype=np.float64)
    space = spec.task(task).space
    if space is not None:
        truth = truth * frame[space].to_numpy(dtype=np.float64)
    return truth


def _value_gain(per_task: Mapping[str, np.ndarray | None], value: Mapping[str, float]) -> np.ndarray | None:
    if any(per_task[t] is None for t in value):
        return None
    return sum(v * per_task[t] for t, v in value.items())


def _directed(x: np.ndarray | None, negative: bool) -> np.ndarray | None:
    return None if x is None else (1.0 - x if negative else x)


def prepare_split(
    name: str, frame: pd.DataFrame, predictions: dict[str, np.ndarray], spec: FeatureSpec, cfg: TuningConfig,
    group_by: str,
) -> SplitTargets:
    """Group ``frame`` into ranking lists and precompute every gain the search and report need."""
    lists = RankingLists(frame[group_by].to_numpy(), cfg.k)
    if lists.n_lists == 0:
        raise ValueError(f"{name} split: no ranking list of 2 or more rows when grouped by {group_by!r}")
    video_len = (
        frame["video_len"].to_numpy(dtype=np.float64) if "video_len" in frame.columns else np.zeros(len(frame))
    )
    labels = {t: _label(frame, spec, t) for t in spec.task_names}
    oracles = {t: _oracle(frame, spec, t) for t in spec.task_names}
    value = cfg.value or {}
    if cfg.objective == "ndcg":
        objective, oracle_objective = _value_gain(labels, value), _value_gain(oracles, value)
    else:
        objective = labels[cfg.watch_task] * video_len
        truth = oracles[cfg.watch_task]
        oracle_objective = None if truth is None else truth * video_len
    task_gains, oracle_task_gains = {}, {}
    for t in spec.task_names:
        negative = value.get(t, 0.0) < 0
        task_gains[t] = lists.gain(_directed(labels[t], negative))
        if oracles[t] is not None:
            oracle_task_gains[t] = lists.gain(_directed(oracles[t], negative))
    objective_gain = lists.gain(objective)
    if cfg.objective == "ndcg" and not (objective_gain.ideal_dcg > 0).any():
        raise ValueError(f"{name} split: no ranking list has a row of positive value under --value")
    return SplitTargets(
        name=name, group_by=group_by, lists=lists, predictions=predictions, video_len=video_len,
        objective=objective_gain,
        task_gains=task_gains, oracle_objective=None if oracle_objective is None else lists.gain(oracle_objective),
        oracle_task_gains=oracle_task_gains,
    )


def evaluate(
    split: SplitTargets, weights: Mapping[str, float], fn: LengthFn, objective: str, with_oracle: bool = False
) -> dict[str, Any]:
    """The objective and each task's own NDCG@k when ``split`` is ranked with these fusion parameters."""
    order = split.lists.order(log_scores(split.predictions, weights, split.video_len, fn))

    def measure(gain: Gain) -> float:
        return split.lists.ndcg(order, gain) if objective == "ndcg" else split.lists.top_k_mean(order, gain)

    out: dict[str, Any] = {
        "objective": measure(split.objective),
        "tasks": {t: split.lists.ndcg(order, g) for t, g in split.task_gains.items()},
    }
    if with_oracle:
        out["oracle_objective"] = None if split.oracle_objective is None else measure(split.oracle_objective)
        out["oracle_tasks"] = {t: split.lists.ndcg(order, g) for t, g in split.oracle_task_gains.items()}
    return out


# -- the search space ---------------------------------------------------------------------------


def _sig(x: float) -> float:
    """Six significant digits: what buckets.json holds, so every reported figure is of that value."""
    return float(f"{x:.6g}")


@dataclass(frozen=True)
class SearchSpace:
    """Unit cube ↔ (weights, f). Weights are linear in [-bound, bound]; lengths and scales in
    seconds are log-uniform; sigmoid's width is searched as its inverse (0 = f flat)."""

    tasks: tuple[str, ...]
    bound: float
    kind: str

    @property
    def length_dims(self) -> int:
        return {"none": 0, "log1p": 2, "sigmoid": 2, "power": 2}[self.kind]

    @property
    def dims(self) -> int:
        return len(self.tasks) + self.length_dims

    def decode(self, x: np.ndarray) -> tuple[dict[str, float], LengthFn]:
        x = np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0)
        weights = {t: _sig(-self.bound + 2 * self.bound * x[i]) for i, t in enumerate(self.tasks)}
        a, b = x[len(self.tasks):] if self.length_dims else (0.0, 0.0)

        def log_uniform(u: float, lo: float, hi: float) -> float:
            return _sig(math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))))

        if self.kind == "log1p":
            fn = LengthFn(kind="log1p", alpha=_sig(4.0 * a), scale=log_uniform(b, 1.0, 3600.0))
        elif self.kind == "sigmoid":
            inverse = (2 * b - 1) * MAX_INVERSE_WIDTH
            width = 86400.0 if abs(inverse) < 1 / 86400 else _sig(1.0 / inverse)
            fn = LengthFn(kind="sigmoid", center=log_uniform(a, 1.0, 3600.0), width=width)
        elif self.kind == "power":
            fn = LengthFn(kind="power", beta=_sig(-4.0 + 8.0 * a), offset=log_uniform(b, 0.1, 3600.0))
        else:
            fn = LengthFn()
        return weights, fn

    def start(self, weights: Mapping[str, float]) -> np.ndarray:
        """The baseline's point: its weights and a flat f (log1p alpha 0, sigmoid 1/width 0, power beta 0)."""
        x = [(weights.get(t, 0.0) + self.bound) / (2 * self.bound) for t in self.tasks]
        neutral_length = {"none": [], "log1p": [0.0, 0.0], "sigmoid": [math.log(30.0) / math.log(3600.0), 0.5],
                          "power": [0.5, math.log(10.0) / math.log(36000.0)]}[self.kind]
        return np.array(x + neutral_length, dtype=np.float64)


# -- inputs ---------------------------------------------------------------------------------------


def parse_task_values(text: str, option: str) -> dict[str, float]:
    """``'vtr=1,finish=2,skip=-1'`` → ``{"vtr": 1.0, "finish": 2.0, "skip": -1.0}``."""
    out: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        name, sep, number = part.partition("=")
        try:
            v = float(number)
        except ValueError:
            v = math.nan
        if not sep or not name.strip() or not math.isfinite(v):
            raise ValueError(f"{option}: expected TASK=NUMBER[,TASK=NUMBER...], got {part!r}")
        if name.strip() in out:
            raise ValueError(f"{option}: task {name.strip()!r} given twice")
        out[name.strip()] = v
    return out


def _check_config(cfg: TuningConfig, tasks: list[str]) -> None:
    for option, mapping in (("--value", cfg.value), ("--baseline-weights", cfg.baseline_weights)):
        unknown = sorted(set(mapping or {}) - set(tasks))
        if unknown:
            raise ValueError(f"{option}: unknown task {unknown[0]!r}; the run's tasks are {tasks}")
    if cfg.objective == "ndcg" and not any((cfg.value or {}).values()):
        raise ValueError("--value must give a non-zero value to at least one task for the ndcg objective")
    if cfg.objective == "watch_time" and cfg.watch_task not in tasks:
        raise ValueError(f"watch_time needs a completion-ratio task {cfg.watch_task!r}; the run's tasks are {tasks}")
    if cfg.objective not in ("ndcg", "watch_time"):
        raise ValueError(f"--objective must be ndcg or watch_time, got {cfg.objective!r}")
    if cfg.length_fn not in LENGTH_KINDS:
        raise ValueError(f"--length-fn must be one of {', '.join(LENGTH_KINDS)}, got {cfg.length_fn!r}")
    if cfg.k < 1 or cfg.budget < 1:
        raise ValueError(f"--k and --budget must be ≥ 1, got {cfg.k} and {cfg.budget}")
    if not 0 < cfg.treatment_share < 100:
        raise ValueError(f"--treatment-share must be between 0 and 100 (exclusive), got {cfg.treatment_share}")
    if cfg.max_task_loss is not None and not 0 <= cfg.max_task_loss < 100:
        raise ValueError(f"--max-task-loss is a percentage in [0, 100), got {cfg.max_task_loss}")
    if not 0 < cfg.weight_bound <= 100:
        raise ValueError(f"--weight-bound must be in (0, 100], got {cfg.weight_bound}")


def _check_tasks_match(run_spec: FeatureSpec, data_dir: Path) -> None:
    """A run trained on other tasks than the data's cannot be tuned on it."""
    spec_path = data_dir / "spec.yaml"
    if spec_path.is_file():
        data_tasks = FeatureSpec.load(spec_path).task_names
        if sorted(data_tasks) != sorted(run_spec.task_names):
            raise SpecError(f"the run's tasks {run_spec.task_names} do not match {spec_path}'s tasks {data_tasks}")


def _group_column(frame: pd.DataFrame, cfg: TuningConfig) -> str:
    if cfg.group_by is not None:
        if cfg.group_by not in frame.columns:
            raise ValueError(f"--group-by: the data has no column {cfg.group_by!r}")
        return cfg.group_by
    for column in (*GROUP_COLUMNS, "user_id"):
        if column in frame.columns:
            return column
    raise ValueError(f"no ranking-list column ({', '.join((*GROUP_COLUMNS, 'user_id'))}): pass --group-by")


# -- the search -----------------------------------------------------------------------------------


def _shortfalls(tasks: Mapping[str, float], base: Mapping[str, float], max_loss: float | None) -> dict[str, float]:
    """Relative shortfall of each task below ``(1 − max_loss %) × baseline`` (0 = within the guardrail)."""
    if max_loss is None:
        return {}
    out = {}
    for t, b in base.items():
        if math.isnan(b) or math.isnan(tasks[t]) or b <= 0:
            continue
        out[t] = max(0.0, (1 - max_loss / 100) * b - tasks[t]) / b
    return out


def search(
    valid: SplitTargets, cfg: TuningConfig, space: SearchSpace, baseline: dict[str, float], progress: bool = True
) -> tuple[dict[str, float], LengthFn, list[dict[str, Any]], dict[str, Any]]:
    """CMA-ES over ``space`` on the valid split. Returns the best feasible weights and f, the search
    history (evaluation 0 is the baseline) and the baseline's valid evaluation."""
    import cma
    from tqdm import tqdm

    base = evaluate(valid, baseline, LengthFn(), cfg.objective)
    scale = abs(base["objective"]) or 1.0

    history = [{"evaluation": 0, "objective": base["objective"], "feasible": True, "best": base["objective"]}]
    best = (base["objective"], baseline, LengthFn())

    def loss(x: np.ndarray) -> float:
        nonlocal best
        weights, fn = space.decode(x)
        result = evaluate(valid, weights, fn, cfg.objective)
        short = _shortfalls(result["tasks"], base["tasks"], cfg.max_task_loss)
        feasible = not any(short.values())
        value = result["objective"]
        if feasible and value > best[0]:
            best = (value, weights, fn)
        history.append({"evaluation": len(history), "objective": value, "feasible": feasible, "best": best[0]})
        return -value / scale + CONSTRAINT_PENALTY * sum(short.values())

    options = {
        "bounds": [[0.0] * space.dims, [1.0] * space.dims],
        # pycma seeds numpy's global generator; 0 would mean "from the clock", so shift by one.
        "seed": cfg.seed + 1,
        "verbose": -9,
        "maxfevals": cfg.budget,
    }
    es = cma.CMAEvolutionStrategy(space.start(baseline).tolist(), 0.2, options)
    with tqdm(total=cfg.budget, desc="tune-fusion", unit="eval", disable=not progress, file=sys.stderr) as bar:
        while len(history) - 1 < cfg.budget and not es.stop():
            candidates = es.ask()
            left = cfg.budget - (len(history) - 1)
            fitness = []
            for x in candidates[:left]:
                fitness.append(loss(x))
                bar.update(1)
                bar.set_postfix(best=f"{best[0]:.5g}")
            if len(fitness) < len(candidates):
                break  # the budget ends inside this generation: nothing left to learn from it
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # flat-fitness notices on plateaus of the ranking metric
                es.tell(candidates, fitness)
    return best[1], best[2], history, base


# -- the whole command ----------------------------------------------------------------------------


def tune_fusion(
    run_dir: str | Path, data_dir: str | Path, out_dir: str | Path, cfg: TuningConfig, progress: bool = True
) -> dict[str, Any]:
    """Search fusion weights on the valid split, report on the test split, and write
    ``OUT/buckets.json``, ``OUT/report.json``, ``OUT/report.md`` and its plots. Returns the report."""
    from mtrank.training.checkpoint import load_run
    from mtrank.training.evaluate import predict_frame
    from mtrank.training.streaming import load_split

    started = time.perf_counter()
    run_dir, data_dir, out_dir = Path(run_dir), Path(data_dir), Path(out_dir)
    run = load_run(run_dir)
    tasks = run.spec.task_names
    _check_config(cfg, tasks)
    _check_tasks_match(run.spec, data_dir)
    baseline = {t: 1.0 for t in tasks} if cfg.baseline_weights is None else dict(cfg.baseline_weights)

    splits: dict[str, SplitTargets] = {}
    for split in (SEARCH_SPLIT, HELDOUT_SPLIT):
        frame = load_split(data_dir, split, run.spec)
        group_by = _group_column(frame, cfg)
        if (cfg.length_fn != "none" or cfg.objective == "watch_time") and "video_len" not in frame.columns:
            raise ValueError(f"{split} split: no video_len column for --length-fn {cfg.length_fn} / watch_time")
        predictions, _ = predict_frame(run, frame)
        splits[split] = prepare_split(split, frame, predictions, run.spec, cfg, group_by)
    predicted = time.perf_counter()

    bound = max(cfg.weight_bound, *(abs(w) for w in baseline.values()))
    space = SearchSpace(tuple(tasks), bound, cfg.length_fn)
    weights, fn, history, base_valid = search(splits[SEARCH_SPLIT], cfg, space, baseline, progress)
    searched = time.perf_counter()

    control = BucketConfig(name="control", share=_sig(100.0 - cfg.treatment_share), model=cfg.model,
                           weights=baseline, length_fn=LengthFn())
    treatment = BucketConfig(name="treatment", share=cfg.treatment_share, model=cfg.model, weights=weights,
                             length_fn=fn)
    buckets = [bucket_json(b) for b in check_buckets([control, treatment])]
    if [BucketConfig(**b) for b in buckets] != [control, treatment]:
        raise AssertionError("buckets.json would not read back as the searched buckets")

    heldout = splits[HELDOUT_SPLIT]
    base_held = evaluate(heldout, baseline, LengthFn(), cfg.objective, with_oracle=True)
    tuned_held = evaluate(heldout, weights, fn, cfg.objective, with_oracle=True)
    tuned_valid = evaluate(splits[SEARCH_SPLIT], weights, fn, cfg.objective)
    evaluations = len(history) - 1
    report = {
        "run": str(run_dir),
        "data": str(data_dir),
        "config": asdict(cfg),
        "group_by": splits[SEARCH_SPLIT].group_by,
        "splits": {"search": SEARCH_SPLIT, "heldout": HELDOUT_SPLIT},
        "lists": {name: _list_stats(s.lists) for name, s in splits.items()},
        "objective": {"name": cfg.objective, "k": cfg.k, "unit": "NDCG" if cfg.objective == "ndcg" else "seconds"},
        "baseline": _side(baseline, LengthFn(), base_valid, base_held),
        "tuned": _side(weights, fn, tuned_valid, tuned_held),
        "found_better": tuned_valid["objective"] > base_valid["objective"],
        "improvement": {
            "valid": _relative(tuned_valid["objective"], base_valid["objective"]),
            "heldout": _relative(tuned_held["objective"], base_held["objective"]),
            "heldout_oracle": _relative(tuned_held["oracle_objective"], base_held["oracle_objective"]),
        },
        "guardrails": _guardrails(base_valid, tuned_valid, base_held, tuned_held, cfg),
        "buckets": buckets,
        "search": {
            "optimiser": "CMA-ES (pycma)",
            "evaluations": evaluations,
            "seconds": round(searched - predicted, 3),
            "evaluations_per_second": round(evaluations / max(searched - predicted, 1e-9), 1),
        },
        "seconds": {"predict": round(predicted - started, 3), "total": round(time.perf_counter() - started, 3)},
        "history": history,
    }
    write_outputs(out_dir, report)
    return report


_LENGTH_PARAMS = {"none": (), "log1p": ("alpha", "scale"), "sigmoid": ("center", "width"), "power": ("beta", "offset")}


def length_fn_json(fn: LengthFn) -> dict[str, Any]:
    """f as JSON with only its kind's parameters."""
    return {"kind": fn.kind, **{p: getattr(fn, p) for p in _LENGTH_PARAMS[fn.kind]}}


def bucket_json(bucket: BucketConfig) -> dict[str, Any]:
    """One ``MTRANK_BUCKETS`` entry: unset model/version left out, f with its kind's parameters only."""
    return {**bucket.model_dump(mode="json", exclude_none=True), "length_fn": length_fn_json(bucket.length_fn)}


def _list_stats(lists: RankingLists) -> dict[str, Any]:
    return {"lists": lists.n_lists, "rows": int(lists.sizes.sum()), "mean_size": round(float(lists.sizes.mean()), 2)}


def _side(weights: Mapping[str, float], fn: LengthFn, valid: dict, held: dict) -> dict[str, Any]:
    return {
        "weights": dict(weights),
        "length_fn": length_fn_json(fn),
        "valid": valid["objective"],
        "heldout": held["objective"],
        "heldout_oracle": held["oracle_objective"],
    }


def _relative(new: float | None, old: float | None) -> float | None:
    """Relative change in percent."""
    if new is None or old is None or old == 0 or math.isnan(old):
        return None
    return 100.0 * (new - old) / abs(old)


def _guardrails(base_valid: dict, tuned_valid: dict, base_held: dict, tuned_held: dict, cfg: TuningConfig) -> list:
    rows = []
    value = cfg.value or {}
    for t in base_valid["tasks"]:
        row = {
            "task": t,
            "gain": "1 - label" if value.get(t, 0.0) < 0 else "label",
            "baseline_valid": base_valid["tasks"][t],
            "tuned_valid": tuned_valid["tasks"][t],
            "change_valid_pct": _relative(tuned_valid["tasks"][t], base_valid["tasks"][t]),
            "baseline_heldout": base_held["tasks"][t],
            "tuned_heldout": tuned_held["tasks"][t],
            "change_heldout_pct": _relative(tuned_held["tasks"][t], base_held["tasks"][t]),
        }
        if t in base_held["oracle_tasks"]:
            row["baseline_heldout_oracle"] = base_held["oracle_tasks"][t]
            row["tuned_heldout_oracle"] = tuned_held["oracle_tasks"][t]
        if cfg.max_task_loss is not None:
            row["within_guardrail"] = bool(
                row["change_valid_pct"] is None or row["change_valid_pct"] >= -cfg.max_task_loss - 1e-9
            )
        rows.append(row)
    return rows
