"""mtrank ab-report: the statistics on simulated data whose truth the test knows (the clustered
interval's coverage, a known lift, sample-ratio mismatch), calibration by hand, and the CLI end to
end on files in the impression log's format."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mtrank.ab_report import (
    Shown,
    ab_report,
    calibration,
    chi2_sf,
    jsonable,
    ratio_and_variance,
    read_shown,
    requests_per_user,
    srm_requests_test,
    srm_test,
    user_sums,
)
from mtrank.cli import main
from mtrank.impression_log import schema


def _expit(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _simulate(rng: np.random.Generator, users: int, lift: dict[str, float], sd: float = 1.5,
              thin: float = 0.0) -> Shown:
    """``users`` users assigned 50/50 to control/treatment; each sees 1 + Poisson(20) items; a
    user's logit for vtr is ``-0.5 + N(0, sd)`` (the user effect) and for finish ``-1.5 + the same
    effect``, plus ``lift[task]`` in treatment. ``thin``: share of treatment users dropped."""
    bucket = np.where(rng.random(users) < 0.5, "control", "treatment").astype(object)
    keep = ~((bucket == "treatment") & (rng.random(users) < thin))
    bucket = bucket[keep]
    effect = rng.normal(0.0, sd, len(bucket))
    treated = bucket == "treatment"
    p = {"vtr": _expit(-0.5 + effect + lift.get("vtr", 0.0) * treated),
         "finish": _expit(-1.5 + effect + lift.get("finish", 0.0) * treated)}
    m = 1 + rng.poisson(20, len(bucket))
    user = np.repeat(np.arange(len(bucket)), m)
    labels = {t: (rng.random(len(user)) < np.repeat(p[t], m)).astype(np.float64) for t in p}
    return Shown(bucket=np.repeat(bucket, m), user_id=user, request_id=user.astype(object),
                 rank=np.ones(len(user), dtype=np.int64), predicted={t: np.repeat(p[t], m) for t in p},
                 label=labels, requests={})


def _naive_covers(shown: Shown, task: str) -> bool:
    """A per-impression interval (impressions taken as independent) of the difference covers 0."""
    a = shown.label[task][shown.bucket == "control"]
    b = shown.label[task][shown.bucket == "treatment"]
    se = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    return abs(b.mean() - a.mean()) <= 1.959964 * se


def test_clustered_interval_covers_zero_in_aa_and_naive_does_not() -> None:
    rng = np.random.default_rng(30)
    value = {"vtr": 1.0, "finish": 2.0}
    clustered = naive = 0
    for _ in range(200):
        shown = _simulate(rng, users=400, lift={})
        d = ab_report(shown, value, k=10)["differences"]["treatment"]["value"]
        clustered += d["lo"] <= 0.0 <= d["hi"]
        naive += _naive_covers(shown, "vtr")
    print(f"A/A coverage of 0 over 200 replicates: clustered {clustered / 200:.3f}, naive {naive / 200:.3f}")
    assert 0.93 <= clustered / 200 <= 0.985
    assert naive / 200 < 0.8  # the user effect makes impressions of one user correlated


def test_known_lift_is_inside_the_interval_and_zero_is_not() -> None:
    rng = np.random.default_rng(7)
    lift = {"vtr": 0.15, "finish": 0.15}
    shown = _simulate(rng, users=4000, lift=lift)
    report = ab_report(shown, {"vtr": 1.0, "finish": 2.0}, k=10)
    # The truth: E[p] per bucket over the user effect's distribution (Poisson counts are independent
    # of the effect, so the ratio of sums estimates the mean of p), by quadrature on a fine grid.
    z = np.linspace(-8, 8, 200001)
    w = np.exp(-z ** 2 / 2) / math.sqrt(2 * math.pi) * (z[1] - z[0])

    def mean_p(offset: float) -> float:
        return float((_expit(offset + 1.5 * z) * w).sum())

    true = {t: mean_p(base + lift[t]) - mean_p(base) for t, base in (("vtr", -0.5), ("finish", -1.5))}
    true["value"] = true["vtr"] + 2 * true["finish"]
    for metric, truth in true.items():
        d = report["differences"]["treatment"][metric]
        print(f"{metric}: true lift {truth:+.4f}, estimate {d['diff']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]")
        assert d["lo"] <= truth <= d["hi"]
        assert d["lo"] > 0
    for bucket in ("control", "treatment"):  # the value per impression is Σ v·label
        got = report["buckets"][bucket]["metrics"]
        assert got["value"]["mean"] == pytest.approx(got["vtr"]["mean"] + 2 * got["finish"]["mean"])
    assert report["differences"]["treatment"]["value"]["diff"] == pytest.approx(
        report["buckets"]["treatment"]["metrics"]["value"]["mean"]
        - report["buckets"]["control"]["metrics"]["value"]["mean"])


def test_sample_ratio_mismatch() -> None:
    rng = np.random.default_rng(3)
    shares = {"control": 50.0, "treatment": 50.0}
    thinned = ab_report(_simulate(rng, 20000, {}, thin=0.1), {"vtr": 1.0}, k=10, shares=shares)["srm"]
    even = ab_report(_simulate(rng, 20000, {}), {"vtr": 1.0}, k=10, shares=shares)["srm"]
    print(f"SRM: thinned {thinned['observed']} p={thinned['p_value']:.3g}; even {even['observed']} "
          f"p={even['p_value']:.3g}")
    assert thinned["flagged"] and thinned["p_value"] < 1e-6
    assert not even["flagged"] and even["p_value"] > 0.001
    # The chi-square tail against tabulated 5 % and 0.1 % points, and a hand computation.
    assert chi2_sf(3.841459, 1) == pytest.approx(0.05, abs=1e-6)
    assert chi2_sf(5.991465, 2) == pytest.approx(0.05, abs=1e-6)
    assert chi2_sf(16.26624, 3) == pytest.approx(0.001, abs=1e-7)
    hand = srm_test({"a": 520, "b": 480}, {"a": 50, "b": 50})
    assert hand["chi2"] == pytest.approx(1.6)
    assert hand["p_value"] == pytest.approx(math.erfc(math.sqrt(0.8)))
    assert srm_test({"a": 300, "b": 700}, {"a": 30, "b": 70})["chi2"] == pytest.approx(0.0)


def test_requests_srm_by_hand() -> None:
    # Requests per user: a = (1, 3), b = (2): T = 6, S2 = 1 + 9 + 4 = 14, X = (4, 2) against (3, 3):
    # χ² = 1 / (0.5 · 14) + 1 / (0.5 · 14) = 2 / 7, one degree of freedom.
    got = srm_requests_test({"a": np.array([1, 3]), "b": np.array([2])}, {"a": 50, "b": 50})
    assert got["chi2"] == pytest.approx(2 / 7) and got["p_value"] == pytest.approx(math.erfc(math.sqrt(1 / 7)))
    assert got["observed"] == {"a": 4, "b": 2} and got["design_effect"] == pytest.approx(14 / 6)
    # One request per user: the users' test.
    ones = srm_requests_test({"a": np.ones(520), "b": np.ones(480)}, {"a": 50, "b": 50})
    assert ones["chi2"] == pytest.approx(srm_test({"a": 520, "b": 480}, {"a": 50, "b": 50})["chi2"])
    users = np.array(["u1", "u2", "u1", "u1", "u2"], dtype=object)
    assert list(requests_per_user(users, np.array(["r1", "r2", "r1", "r3", "r2"], dtype=object))) == [2, 1]


def test_requests_srm_holds_its_level_and_sees_lost_requests_that_the_users_test_misses() -> None:
    """Users with 1 + Poisson(15) requests each (a heavy tail: a tenth send 5× as many), 50/50.
    A/A (2000 users): the requests' test rejects at 5 % about 5 % of the time (a naive per-request
    χ² far more often). 20 000 users, 10 % of one bucket's requests lost: the requests' test flags it,
    the users' test cannot (a user loses all of 16 requests with probability 1e-16)."""
    rng = np.random.default_rng(11)
    shares = {"a": 50.0, "b": 50.0}
    rejected = naive = 0
    for _ in range(300):
        n = 1 + rng.poisson(15 * np.where(rng.random(2000) < 0.1, 5.0, 1.0))
        in_b = rng.random(2000) < 0.5
        rejected += srm_requests_test({"a": n[~in_b], "b": n[in_b]}, shares)["p_value"] < 0.05
        naive += srm_test({"a": int(n[~in_b].sum()), "b": int(n[in_b].sum())}, shares)["p_value"] < 0.05
    print(f"requests' SRM test at 5 % over 300 A/A: clustered {rejected / 300:.3f}, naive {naive / 300:.3f}")
    assert 0.02 <= rejected / 300 <= 0.09 and naive / 300 > 0.3
    n = 1 + rng.poisson(15 * np.where(rng.random(20000) < 0.1, 5.0, 1.0))
    in_b = rng.random(20000) < 0.5
    kept_b = rng.binomial(n[in_b], 0.9)  # each of b's requests lost with probability 0.1
    lost = srm_requests_test({"a": n[~in_b], "b": kept_b[kept_b > 0]}, shares)
    users = srm_test({"a": int((~in_b).sum()), "b": int((kept_b > 0).sum())}, shares)
    print(f"10 % of b's requests lost: requests' test p = {lost['p_value']:.3g}, users' test p = "
          f"{users['p_value']:.3g}")
    assert lost["flagged"] and not users["flagged"]


def test_delta_method_by_hand() -> None:
    # users' totals y = (1, 2, 3) over n = (1, 2, 2) impressions: R = 6/5, residuals y − R·n =
    # (−0.2, −0.4, 0.6), variance = 0.56 / (3 · 2 · (5/3)²) = 0.0336.
    r, var = ratio_and_variance(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 2.0]))
    assert (r, var) == (pytest.approx(1.2), pytest.approx(0.0336))
    users, rows_y, rows_n = np.array([5, 9, 9, 7, 7]), np.array([1.0, 1, 1, 2, 1]), np.ones(5)
    assert [list(x) for x in user_sums(users, rows_y, rows_n)] == [[1.0, 3.0, 2.0], [1.0, 2.0, 2.0]]
    # One user: a rate but no interval, written to report.json as null.
    r, var = ratio_and_variance(np.array([3.0]), np.array([4.0]))
    assert r == 0.75 and math.isnan(var)
    assert jsonable({"mean": r, "se": [math.sqrt(var)]}) == {"mean": 0.75, "se": [None]}


def test_calibration_bins_by_hand() -> None:
    c = calibration(np.array([0.05, 0.15, 0.12, 0.95, 1.0]), np.array([0, 1, 0, 1, 1]), binary=True)
    assert c["n"] == 5
    assert c["mean_predicted"] == pytest.approx(0.454)
    assert c["observed"] == pytest.approx(0.6)
    assert [(b["lo"], b["hi"], b["n"]) for b in c["bins"]] == [
        (0.0, pytest.approx(0.1), 1), (pytest.approx(0.1), pytest.approx(0.2), 2), (pytest.approx(0.9), 1.0, 2)]
    assert [b["mean_predicted"] for b in c["bins"]] == pytest.approx([0.05, 0.135, 0.975])
    assert [b["observed"] for b in c["bins"]] == pytest.approx([0.0, 0.5, 1.0])
    # Regression: bins span [min, max] of the predictions.
    r = calibration(np.array([10.0, 20.0, 30.0]), np.array([12.0, 18.0, 40.0]), binary=False, bins=2)
    assert [(b["lo"], b["hi"], b["n"], b["observed"]) for b in r["bins"]] == [(10.0, 20.0, 1, 12.0),
                                                                              (20.0, 30.0, 2, 29.0)]


# -- the CLI on files in the impression log's format ---------------------------------------------


def _write_log(directory: Path, rng: np.random.Generator, requests: int) -> tuple[Path, Path]:
    """An impression log file (the service's schema) and a feedback Parquet: ``requests`` requests
    of 60 users, 4 candidates, 3 returned; feedback rows for some shown items (vtr, finish, vcr)."""
    directory.mkdir()
    records, feedback = [], []
    for r in range(requests):
        user = int(rng.integers(60))
        bucket = "control" if user % 2 else "treatment"
        p = float(rng.uniform(0.1, 0.9))
        items = [{"item_id": f"i{r}-{j}", "rank": j + 1, "score": 1.0 - j / 10,
                  "tasks": [("vtr", p), ("finish", p / 2), ("vcr", 0.5)]} for j in range(3)]
        records.append({"time": 1_765_000_000_000 + r, "request_id": f"r{r}", "bucket": bucket, "model": "m",
                        "version": 1, "user_group": None, "user_id": f"u{user}",
                        "request": json.dumps({"user": {"user_id": f"u{user}"}, "candidates": [
                            {"item_id": f"i{r}-{j}", "video_len": 30.0} for j in range(4)]}), "items": items})
        for item in items:
            if rng.random() < 0.6:
                feedback.append({"request_id": f"r{r}", "item_id": item["item_id"], "vtr": int(rng.random() < p),
                                 "finish": int(rng.random() < p / 2), "vcr": float(rng.random())})
    log = pa.Table.from_pylist(records, schema=schema())
    pq.write_table(log, directory / "impressions-20261206T000000Z-host-1-000001.parquet")
    path = directory.parent / "feedback.parquet"
    pq.write_table(pa.Table.from_pylist(feedback), path)
    return directory, path


def test_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log, feedback = _write_log(tmp_path / "log", np.random.default_rng(1), requests=400)
    out = tmp_path / "report"
    args = ["ab-report", "--impressions", str(log), "--feedback", str(feedback), "--out", str(out),
            "--value", "vtr=1,finish=2", "--k", "2", "--shares", "control=50,treatment=50"]
    assert main(args) == 0
    got = json.loads((out / "report.json").read_text())
    want = json.loads(json.dumps(jsonable(ab_report(read_shown(log, feedback, 2), {"vtr": 1.0, "finish": 2.0}, 2,
                                                   shares={"control": 50.0, "treatment": 50.0}))))
    assert got == want
    assert sum(b["impressions"] for b in got["buckets"].values()) == 400 * 2  # top 2 of 3
    assert sum(b["requests"] for b in got["buckets"].values()) == 400
    assert got["tasks"] == {"vtr": "binary", "finish": "binary", "vcr": "regression"}
    assert "| treatment | value |" in (out / "report.md").read_text()
    assert (out / "value.png").stat().st_size > 0 and (out / "calibration.png").stat().st_size > 0
    capsys.readouterr()
    for option, bad in (("--feedback", str(tmp_path / "missing.parquet")), ("--value", "vtr=1,watch=3"),
                        ("--impressions", str(tmp_path)), ("--shares", "control=50,other=50")):
        argv = [*args, option, bad] if option not in args else [bad if i > 0 and args[i - 1] == option else x
                                                                for i, x in enumerate(args)]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("mtrank ab-report: error:"), err


def test_feedback_keys_may_be_large_strings_or_integers(tmp_path: Path) -> None:
    log, feedback = _write_log(tmp_path / "log", np.random.default_rng(2), requests=50)
    table = pq.read_table(feedback)
    want = ab_report(read_shown(log, feedback, 2), {"vtr": 1.0}, 2)
    # What DataFrame.to_parquet writes under pandas 3: large_string keys.
    wide = table.set_column(0, "request_id", table["request_id"].cast(pa.large_string()))
    wide = wide.set_column(1, "item_id", wide["item_id"].cast(pa.large_string()))
    pq.write_table(wide, feedback)
    assert jsonable(ab_report(read_shown(log, feedback, 2), {"vtr": 1.0}, 2)) == jsonable(want)
