"""The A/B report (``mtrank ab-report``): impression log + feedback table → per bucket engagement,
value per impression, calibration, differences to the control bucket with confidence intervals
clustered by user, and a sample-ratio-mismatch test. docs/ab-report.md describes the method.

numpy and pyarrow only (no torch, no pandas, no scipy); the plots of the Markdown report need
matplotlib (the ``train`` extra), imported only by :func:`write_report`.

Every metric is a ratio of sums over the shown items of a bucket's top k: ``Σ y / Σ n``, where a
binary task's ``y`` is its 0/1 label and ``n`` counts the impression, a regression task's ``y`` is
its value and ``n`` counts the impressions that have one, and the value per impression is
``y = Σ_k v_k · label_k`` (labels without feedback count 0, the definition ``tune-fusion`` uses).
A user contributes many impressions, which are correlated; the interval of a difference therefore
comes from per-user sums (delta method for a ratio of means, users the independent units).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mtrank.impression_log import FEEDBACK_KEYS, FeedbackError, LogError, log_files, read_feedback

KEYS = FEEDBACK_KEYS
Z95 = 1.959963984540054
"""Two-sided 95 % normal quantile."""
SRM_ALPHA = 0.001
"""An SRM test p-value below this flags the experiment."""
BINS = 10


class ReportError(ValueError):
    """Bad input to the report (missing file, unknown task, unknown bucket): one line, exit 2."""


# -- statistics -----------------------------------------------------------------------------------


def user_sums(users: np.ndarray, y: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-user totals ``(Σ y, Σ n)`` of the rows of each user (users in sorted order)."""
    _, inverse = np.unique(users, return_inverse=True)
    return (np.bincount(inverse, weights=y).astype(np.float64),
            np.bincount(inverse, weights=n).astype(np.float64))


def ratio_and_variance(y: np.ndarray, n: np.ndarray) -> tuple[float, float]:
    """Ratio of means ``R = Σ y / Σ n`` over independent units (users) with per-unit totals ``y``,
    ``n``, and its delta-method variance ``Σ (y_u − R n_u)² / (U (U − 1) n̄²)`` (units of ``R``²)."""
    units = len(y)
    total = float(n.sum())
    if units < 2 or total <= 0:
        return (float(y.sum()) / total if total > 0 else math.nan), math.nan
    r = float(y.sum()) / total
    residual = y - r * n
    n_bar = total / units
    return r, float((residual ** 2).sum()) / (units * (units - 1) * n_bar ** 2)


def difference_ci(control: tuple[np.ndarray, np.ndarray], treatment: tuple[np.ndarray, np.ndarray],
                  z: float = Z95) -> dict[str, float]:
    """``R_treatment − R_control`` with its ``z`` interval; each argument is the per-unit totals
    ``(y, n)`` of one bucket (buckets independent: a user is in one bucket)."""
    r_c, var_c = ratio_and_variance(*control)
    r_t, var_t = ratio_and_variance(*treatment)
    diff = r_t - r_c
    se = math.sqrt(var_c + var_t) if math.isfinite(var_c + var_t) else math.nan
    return {"diff": diff, "se": se, "lo": diff - z * se, "hi": diff + z * se,
            "relative": diff / r_c if r_c else math.nan}


def chi2_sf(x: float, dof: int) -> float:
    """P(χ²_dof ≥ x), exact: ``Q(x; 1) = erfc(√(x/2))``, ``Q(x; 2) = e^(−x/2)``, and
    ``Q(x; k+2) = Q(x; k) + (x/2)^(k/2) e^(−x/2) / Γ(k/2 + 1)``."""
    if dof < 1:
        raise ValueError(f"degrees of freedom must be ≥ 1, got {dof}")
    if x <= 0:
        return 1.0
    k = 2 if dof % 2 == 0 else 1
    q = math.exp(-x / 2) if k == 2 else math.erfc(math.sqrt(x / 2))
    while k < dof:
        q += math.exp((k / 2) * math.log(x / 2) - x / 2 - math.lgamma(k / 2 + 1))
        k += 2
    return min(1.0, q)


def srm_test(counts: dict[str, int], shares: dict[str, float]) -> dict[str, Any]:
    """Chi-square goodness of fit of the observed ``counts`` per bucket (users) to the configured
    ``shares`` (any positive scale, e.g. percent); ``flagged`` when p < :data:`SRM_ALPHA`."""
    names = list(shares)
    total_share = sum(shares.values())
    observed = np.array([counts.get(b, 0) for b in names], dtype=np.float64)
    expected = observed.sum() * np.array([shares[b] / total_share for b in names])
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    p = chi2_sf(chi2, len(names) - 1) if len(names) > 1 else 1.0
    return {"unit": "users", "observed": {b: int(o) for b, o in zip(names, observed, strict=True)},
            "expected": {b: float(e) for b, e in zip(names, expected, strict=True)},
            "shares": {b: shares[b] * 100 / total_share for b in names},
            "chi2": chi2, "p_value": p, "alpha": SRM_ALPHA, "flagged": bool(p < SRM_ALPHA)}


def srm_requests_test(requests_per_user: dict[str, np.ndarray], shares: dict[str, float]) -> dict[str, Any]:
    """Sample-ratio test of the *requests* per bucket, clustered by user: ``requests_per_user[b]``
    holds the request count of each of bucket b's users. Buckets split users, so under the
    configured shares ``s`` a bucket's requests ``X_b = Σ_u n_u·[u in b]`` have mean ``s_b T`` and
    covariance ``S2 (diag(s) − s sᵀ)`` (``T = Σ n_u``, ``S2 = Σ n_u²``): Pearson's statistic with
    ``S2`` in place of ``T``, ``Σ_b (X_b − s_b T)² / (s_b S2)``, is χ² with (buckets − 1) degrees of
    freedom. It sees requests lost within users (timeouts, a logging gap), which the users' test
    misses when users send several requests each; ``S2 / T`` is the variance inflation over
    independent requests."""
    names = list(shares)
    share = np.array([shares[b] for b in names], dtype=np.float64)
    share /= share.sum()
    counts = [np.asarray(requests_per_user.get(b, np.zeros(0)), dtype=np.float64) for b in names]
    observed = np.array([c.sum() for c in counts])
    total, squares = float(observed.sum()), float(sum((c ** 2).sum() for c in counts))
    expected = total * share
    chi2 = float(((observed - expected) ** 2 / (share * squares)).sum()) if squares > 0 else 0.0
    p = chi2_sf(chi2, len(names) - 1) if len(names) > 1 else 1.0
    return {"unit": "requests, clustered by user",
            "observed": {b: int(o) for b, o in zip(names, observed, strict=True)},
            "expected": {b: float(e) for b, e in zip(names, expected, strict=True)},
            "design_effect": squares / total if total else math.nan,
            "chi2": chi2, "p_value": p, "alpha": SRM_ALPHA, "flagged": bool(p < SRM_ALPHA)}


def requests_per_user(user_id: np.ndarray, request_id: np.ndarray) -> np.ndarray:
    """The number of distinct requests of each user among rows (one row per shown item; a request
    belongs to one user)."""
    _, first = np.unique(np.asarray(request_id).astype(str), return_index=True)
    return np.unique(np.asarray(user_id)[first].astype(str), return_counts=True)[1]


def calibration(predicted: np.ndarray, observed: np.ndarray, binary: bool, bins: int = BINS) -> dict[str, Any]:
    """Observed against mean predicted, overall and in ``bins`` equal-width bins of the prediction
    ([0, 1] for a binary task, [min, max] of the predictions otherwise; the upper edge belongs to the
    last bin). Empty bins are left out."""
    predicted = np.asarray(predicted, dtype=np.float64)
    observed = np.asarray(observed, dtype=np.float64)
    out: dict[str, Any] = {"n": len(predicted), "mean_predicted": _mean(predicted), "observed": _mean(observed),
                           "bins": []}
    if not len(predicted):
        return out
    lo, hi = (0.0, 1.0) if binary else (float(predicted.min()), float(predicted.max()))
    edges = np.linspace(lo, hi, bins + 1) if hi > lo else np.array([lo, lo + 1.0])
    index = np.clip(np.searchsorted(edges, predicted, side="right") - 1, 0, len(edges) - 2)
    for b in range(len(edges) - 1):
        mask = index == b
        if mask.any():
            out["bins"].append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": int(mask.sum()),
                                "mean_predicted": float(predicted[mask].mean()),
                                "observed": float(observed[mask].mean())})
    return out


def _mean(x: np.ndarray) -> float:
    return float(x.mean()) if len(x) else math.nan


# -- inputs ---------------------------------------------------------------------------------------


@dataclass
class Shown:
    """One row per shown item in the top k, joined with its feedback: ``bucket``, ``user_id``,
    ``request_id`` and ``item_id`` (object arrays; ``item_id`` None when not read), ``rank``
    (1 = first), ``predicted[task]`` (the served prediction, task units) and ``label[task]`` (the
    feedback value; NaN without one); ``requests`` per bucket."""

    bucket: np.ndarray
    user_id: np.ndarray
    request_id: np.ndarray
    rank: np.ndarray
    predicted: dict[str, np.ndarray]
    label: dict[str, np.ndarray]
    requests: dict[str, int]
    item_id: np.ndarray | None = None


def read_shown(impressions: Path, feedback: Path, k: int) -> Shown:
    """The items of the impression log under ``impressions`` with rank ≤ ``k``, each with its
    feedback row from ``feedback`` (Parquet or CSV keyed by ``request_id``, ``item_id``; a task's
    column has the task's name). Tasks are those the log's predictions name."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    if k < 1:
        raise ReportError(f"--k must be ≥ 1, got {k}")
    try:
        files = log_files(Path(impressions))
    except LogError as e:
        raise ReportError(str(e)) from None
    log = ds.dataset([str(f) for f in files], format="parquet").to_table(
        columns=["request_id", "bucket", "user_id", "items"])
    requests = dict(zip(*np.unique(log["bucket"].to_numpy(zero_copy_only=False), return_counts=True), strict=True))
    parent = pc.list_parent_indices(log["items"])
    items = pc.list_flatten(log["items"])
    task_maps = pc.struct_field(items, "tasks")
    tasks = sorted({key for chunk in task_maps.chunks for key in chunk.keys.to_pylist()})
    columns = {"request_id": log["request_id"].take(parent), "bucket": log["bucket"].take(parent),
               "user_id": log["user_id"].take(parent), "item_id": pc.struct_field(items, "item_id"),
               "rank": pc.struct_field(items, "rank")}
    for task in tasks:
        columns[f"pred:{task}"] = pc.map_lookup(pc.struct_field(items, "tasks"), task, "first")
    shown = pa.table(columns)
    shown = shown.filter(pc.less_equal(shown["rank"], k))
    fb = _read_feedback(Path(feedback), tasks)
    joined = shown.join(fb, keys=list(KEYS), join_type="left outer", right_suffix=":fb")
    joined = joined.sort_by([("request_id", "ascending"), ("rank", "ascending")])

    def col(name: str) -> np.ndarray:
        return joined[name].to_numpy(zero_copy_only=False)

    labels = {t: np.asarray(pc.cast(joined[t], pa.float64()).fill_null(math.nan).to_numpy(zero_copy_only=False))
              for t in tasks if t in fb.column_names}
    return Shown(bucket=col("bucket").astype(object), user_id=col("user_id").astype(object),
                 request_id=col("request_id").astype(object), rank=col("rank").astype(np.int64),
                 predicted={t: np.asarray(pc.cast(joined[f"pred:{t}"], pa.float64()).fill_null(math.nan)
                                          .to_numpy(zero_copy_only=False)) for t in labels},
                 label=labels, requests={str(b): int(c) for b, c in requests.items()},
                 item_id=col("item_id").astype(object))


def _read_feedback(path: Path, tasks: list[str]) -> Any:
    try:
        table = read_feedback(path)
    except FeedbackError as e:
        raise ReportError(str(e)) from None
    present = [t for t in tasks if t in table.column_names]
    if not present:
        raise ReportError(f"{path}: feedback has no column of the log's tasks {tasks}")
    return table.select([*KEYS, *present])


# -- the report -----------------------------------------------------------------------------------


def bucket_metric(shown: Shown, mask: np.ndarray, task: str | None,
                  value: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """Per-user totals ``(Σ y, Σ n)`` of one metric within the rows ``mask``: a task's label
    (binary: every impression, missing = 0; regression: impressions with a value), or the value per
    impression (``task`` None)."""
    if task is None:
        y = sum((v * np.nan_to_num(shown.label[t][mask]) for t, v in value.items()),
                np.zeros(int(mask.sum())))
        n = np.ones(int(mask.sum()))
    else:
        label = shown.label[task][mask]
        n = np.ones(len(label)) if _is_binary(shown, task) else (~np.isnan(label)).astype(np.float64)
        y = np.nan_to_num(label)
    return user_sums(shown.user_id[mask], y, n)


def default_value(shown: Shown) -> dict[str, float]:
    """The value when none is given: 1 per positive of every binary task."""
    return {t: 1.0 for t in sorted(shown.label) if _is_binary(shown, t)}


def _is_binary(shown: Shown, task: str) -> bool:
    label = shown.label[task]
    present = label[~np.isnan(label)]
    return bool(np.isin(present, (0.0, 1.0)).all())


def ab_report(shown: Shown, value: dict[str, float], k: int, control: str | None = None,
              shares: dict[str, float] | None = None) -> dict[str, Any]:
    """The report as a JSON-able dict (see docs/ab-report.md). ``value`` maps tasks to their value
    per positive (or per unit of a regression task); ``shares`` the configured percent per bucket
    (default: equal shares of the buckets seen)."""
    unknown = sorted(set(value) - set(shown.label))
    if unknown:
        raise ReportError(f"--value: unknown task {unknown[0]!r}; the log's tasks with feedback are "
                          f"{sorted(shown.label)}")
    buckets = list(shares) if shares else sorted(set(shown.bucket.tolist()))
    extra = sorted(set(shown.bucket.tolist()) - set(buckets))
    if extra:
        raise ReportError(f"bucket {extra[0]!r} is in the log but not in the configured shares {buckets}")
    control = control if control is not None else buckets[0]
    if control not in buckets:
        raise ReportError(f"--control {control!r} is not a bucket; buckets: {buckets}")
    metrics: list[str | None] = [None, *sorted(shown.label)]
    per_bucket: dict[str, Any] = {}
    totals: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for b in buckets:
        mask = shown.bucket == b
        totals[b] = {_name(m): bucket_metric(shown, mask, m, value) for m in metrics}
        per_bucket[b] = {"requests": shown.requests.get(b, 0), "impressions": int(mask.sum()),
                         "users": len(np.unique(shown.user_id[mask])), "metrics": {}, "calibration": {}}
        for m in metrics:
            r, var = ratio_and_variance(*totals[b][_name(m)])
            per_bucket[b]["metrics"][_name(m)] = {"mean": r, "se": math.sqrt(var) if var >= 0 else math.nan}
        for task in sorted(shown.label):
            keep = mask & ~np.isnan(shown.label[task]) if not _is_binary(shown, task) else mask
            label = np.nan_to_num(shown.label[task][keep])
            per_bucket[b]["calibration"][task] = calibration(shown.predicted[task][keep], label,
                                                             _is_binary(shown, task))
    differences = {b: {_name(m): difference_ci(totals[control][_name(m)], totals[b][_name(m)]) for m in metrics}
                   for b in buckets if b != control}
    srm = _srm(shown, per_bucket, shares or dict.fromkeys(buckets, 100 / len(buckets)))
    srm["shares_configured"] = shares is not None
    return {"k": k, "value": value, "control": control, "buckets": per_bucket, "differences": differences,
            "srm": srm, "tasks": {t: "binary" if _is_binary(shown, t) else "regression" for t in shown.label},
            "ci": {"level": 0.95, "method": "delta method on per-user sums (users are the independent units)"}}


def _srm(shown: Shown, per_bucket: dict[str, Any], shares: dict[str, float]) -> dict[str, Any]:
    """The users' test (the top-level keys), the requests' test (``requests``), and ``flagged``
    when either flags the experiment (``users_flagged`` for the users' test alone)."""
    srm = srm_test({b: per_bucket[b]["users"] for b in shares}, shares)
    per_user = {b: requests_per_user(shown.user_id[shown.bucket == b], shown.request_id[shown.bucket == b])
                for b in shares}
    srm["requests"] = srm_requests_test(per_user, shares)
    srm["users_flagged"] = srm["flagged"]
    srm["flagged"] = bool(srm["users_flagged"] or srm["requests"]["flagged"])
    return srm


def _name(metric: str | None) -> str:
    return "value" if metric is None else metric


def parse_shares(text: str) -> dict[str, float]:
    """``'control=50,treatment=50'``, or ``MTRANK_BUCKETS`` JSON (text or a file: a list of
    ``{"name", "share", ...}``) → ``{bucket: percent}``."""
    text = text.strip()
    if text.startswith("[") or Path(text).suffix == ".json":
        try:
            raw = json.loads(text if text.startswith("[") else Path(text).read_text())
            shares = {str(b["name"]): float(b["share"]) for b in raw}
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise ReportError(f"--buckets: expected MTRANK_BUCKETS JSON (a list of {{name, share}}): {e}") from None
    else:
        shares = {}
        for part in (p.strip() for p in text.split(",")):
            name, _, number = part.partition("=")
            try:
                shares[name.strip()] = float(number)
            except ValueError:
                raise ReportError(f"--shares: expected BUCKET=PERCENT[,...], got {part!r}") from None
    if not shares or any(not math.isfinite(s) or s <= 0 for s in shares.values()):
        raise ReportError(f"bucket shares must be positive numbers, got {shares}")
    return shares


# -- output ---------------------------------------------------------------------------------------


def write_report(report: dict[str, Any], out: Path) -> list[Path]:
    """Write ``out/report.json``, ``out/report.md`` and its plots (``value.png``: each bucket's
    difference to control with its interval; ``calibration.png``: observed against mean predicted
    per bin). Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(jsonable(report), indent=2, allow_nan=False) + "\n")
    metrics = list(next(iter(report["buckets"].values()))["metrics"])
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3), squeeze=False)
    for ax, m in zip(axes[0], metrics, strict=True):
        names = list(report["differences"])
        d = [report["differences"][b][m] for b in names]
        ax.errorbar(range(len(names)), [x["diff"] for x in d], fmt="o", capsize=4,
                    yerr=[[x["diff"] - x["lo"] for x in d], [x["hi"] - x["diff"] for x in d]])
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(range(len(names)), names)
        ax.set_title(f"{m} − {report['control']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "value.png", dpi=90)
    plt.close(fig)
    tasks = list(report["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for b, stats in report["buckets"].items():
            bins = stats["calibration"][task]["bins"]
            ax.plot([x["mean_predicted"] for x in bins], [x["observed"] for x in bins], "o-", ms=3, label=b)
        lims = ax.get_xlim()
        ax.plot(lims, lims, color="grey", lw=0.8)
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("mean predicted", fontsize=8)
    axes[0][0].set_ylabel("observed", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "calibration.png", dpi=90)
    plt.close(fig)
    (out / "report.md").write_text(markdown(report))
    return [out / "report.json", out / "report.md", out / "value.png", out / "calibration.png"]


def jsonable(obj: Any) -> Any:
    """``obj`` with every non-finite float (a bucket without users has no rate, one user no
    interval) as None, so that report.json is strict JSON."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def markdown(report: dict[str, Any]) -> str:
    """The Markdown report: buckets, differences to control, SRM, calibration."""
    metrics = list(next(iter(report["buckets"].values()))["metrics"])
    value = ", ".join(f"{t}={v:g}" for t, v in report["value"].items()) or "none"
    lines = [f"# A/B report (top {report['k']})", "", f"Value per impression: Σ v·label with {value}. "
             f"Control: `{report['control']}`. 95 % intervals: {report['ci']['method']}.", "",
             "| bucket | requests | impressions | users | " + " | ".join(metrics) + " |",
             "| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in metrics) + " |"]
    for b, s in report["buckets"].items():
        cells = [f"{s['metrics'][m]['mean']:.4f}" for m in metrics]
        lines.append(f"| {b} | {s['requests']} | {s['impressions']} | {s['users']} | " + " | ".join(cells) + " |")
    lines += ["", "## Differences to control", "", "| bucket | metric | difference | 95 % CI | relative |",
              "| --- | --- | ---: | --- | ---: |"]
    for b, diffs in report["differences"].items():
        for m, d in diffs.items():
            lines.append(f"| {b} | {m} | {d['diff']:+.4f} | [{d['lo']:+.4f}, {d['hi']:+.4f}] | "
                         f"{100 * d['relative']:+.2f} % |")
    srm = report["srm"]
    verdict = "**SAMPLE RATIO MISMATCH**" if srm["flagged"] else "no mismatch"
    lines += ["", "![differences](value.png)", "", "## Sample ratio", "",
              f"Users per bucket {srm['observed']} against shares {srm['shares']}"
              f"{'' if srm['shares_configured'] else ' (not configured: equal shares assumed)'}: "
              f"χ² = {srm['chi2']:.2f}, p = {srm['p_value']:.3g}; requests per bucket "
              f"{srm['requests']['observed']}, clustered by user (design effect "
              f"{srm['requests']['design_effect']:.2f}): χ² = {srm['requests']['chi2']:.2f}, "
              f"p = {srm['requests']['p_value']:.3g} → {verdict} (either p < {srm['alpha']}).", "",
              "## Calibration", "", "| bucket | task | impressions | mean predicted | observed |",
              "| --- | --- | ---: | ---: | ---: |"]
    for b, s in report["buckets"].items():
        for task, c in s["calibration"].items():
            lines.append(f"| {b} | {task} | {c['n']} | {c['mean_predicted']:.4f} | {c['observed']:.4f} |")
    lines += ["", "![calibration](calibration.png)", ""]
    return "\n".join(lines)
