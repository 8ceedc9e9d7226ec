"""``mtrank tune-fusion``: exact objectives, a reproducible search, one-line errors, and the buckets it
writes served by a real ``mtrank serve``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from mtrank.bench.server import RemoteServer
from mtrank.cli import main
from mtrank.fusion import BucketConfig, check_buckets, log_scores, rank_order
from mtrank.training.fusion_tuning import TuningConfig, ndcg_at_k, parse_task_values, top_k_watch_time, tune_fusion
from tests.server import rank_body

VALUE = "vtr=1,finish=2,like=5,share=10,skip=-1"
BUDGET = 20


def _dcg(gains: list[float]) -> float:
    return sum(g / math.log2(r + 2) for r, g in enumerate(gains))


# -- objectives on hand-made lists --------------------------------------------------------------

# Rows of five lists, interleaved: a and e are ordinary, b has a score tie (logged order wins), c has
# one row (cannot be mis-ordered: left out), d has no row worth showing (IDCG 0: left out).
LISTS = np.array(["a", "b", "a", "c", "d", "a", "b", "d", "e", "e", "e"])
GAIN = np.array([3.0, 0.0, 0.0, 5.0, 0.0, 1.0, 2.0, -1.0, 2.0, -1.0, 0.0])
SCORE = np.array([0.1, 0.7, 0.9, 0.3, 0.2, 0.5, 0.7, 0.1, 0.2, 0.9, 0.1])


def test_ndcg_is_exact_on_hand_made_lists():
    # a ranks gains [0, 1, 3] (ideal [3, 1, 0]); b ties, so logged order [0, 2] (ideal [2, 0]);
    # e ranks [-1, 2, 0] (ideal [2, 0, -1]): a negative value at the top costs.
    a = _dcg([0, 1, 3]) / _dcg([3, 1, 0])
    b = _dcg([0, 2]) / _dcg([2, 0])
    e = _dcg([-1, 2, 0]) / _dcg([2, 0, -1])
    assert ndcg_at_k(LISTS, SCORE, GAIN, k=10) == pytest.approx((a + b + e) / 3, rel=1e-12)
    a2, b2, e2 = _dcg([0, 1]) / _dcg([3, 1]), _dcg([0, 2]) / _dcg([2, 0]), _dcg([-1, 2]) / _dcg([2, 0])
    assert ndcg_at_k(LISTS, SCORE, GAIN, k=2) == pytest.approx((a2 + b2 + e2) / 3, rel=1e-12)
    assert ndcg_at_k(LISTS, SCORE, GAIN, k=1) == pytest.approx((0 + 0 + -1 / 2) / 3, rel=1e-12)
    assert ndcg_at_k(LISTS, GAIN, GAIN, k=3) == pytest.approx(1.0, rel=1e-12)


def test_ndcg_orders_like_the_service():
    # The same lists ranked one by one with the service's rank_order give the same NDCG.
    per_list = []
    for name in ("a", "b", "e"):
        rows = np.flatnonzero(np.equal(LISTS, name))
        ranked = GAIN[rows][rank_order(np.log(SCORE[rows]))]
        per_list.append(_dcg(list(ranked)) / _dcg(sorted(GAIN[rows], reverse=True)))
    assert ndcg_at_k(LISTS, np.log(SCORE), GAIN, k=10) == pytest.approx(np.mean(per_list), rel=1e-12)


def test_watch_time_is_the_mean_top_k_seconds_on_hand_made_lists():
    lists = np.array(["a", "b", "a", "a", "b", "c"])
    watch = np.array([10.0, 5.0, 50.0, 30.0, 7.0, 99.0])
    score = np.array([0.3, 0.1, 0.2, 0.9, 0.8, 0.5])
    # a ranks [30, 10, 50]; b ranks [7, 5]; c has one row and is left out.
    assert top_k_watch_time(lists, score, watch, k=2) == pytest.approx(((30 + 10) + (7 + 5)) / 2)
    assert top_k_watch_time(lists, score, watch, k=1) == pytest.approx((30 + 7) / 2)
    assert top_k_watch_time(lists, score, watch, k=5) == pytest.approx((90 + 12) / 2)


def test_task_values_parse_and_reject_bad_syntax():
    assert parse_task_values(VALUE, "--value") == {"vtr": 1, "finish": 2, "like": 5, "share": 10, "skip": -1}
    for bad in ("vtr", "vtr=x", "vtr=1,vtr=2", "=1", "vtr=nan"):
        with pytest.raises(ValueError, match="--value"):
            parse_task_values(bad, "--value")


# -- the search on a trained run -------------------------------------------------------------------


def _tune(trained_run, synth_dir, out: Path, **overrides) -> dict:
    cfg = TuningConfig(value=parse_task_values(VALUE, "--value"), budget=BUDGET, **overrides)
    return tune_fusion(trained_run("ple"), synth_dir, out, cfg, progress=False)


def test_seeded_search_is_reproducible_and_writes_the_outputs(trained_run, synth_dir, tmp_path):
    first = _tune(trained_run, synth_dir, tmp_path / "a", seed=3)
    second = _tune(trained_run, synth_dir, tmp_path / "b", seed=3)
    other = _tune(trained_run, synth_dir, tmp_path / "c", seed=4)
    assert first["tuned"]["weights"] == second["tuned"]["weights"]
    assert [h["objective"] for h in first["history"]] == [h["objective"] for h in second["history"]]
    assert [h["objective"] for h in first["history"]] != [h["objective"] for h in other["history"]]
    assert len(first["history"]) == BUDGET + 1  # evaluation 0 is the baseline
    assert first["tuned"]["valid"] >= first["baseline"]["valid"]
    for key in ("heldout", "heldout_oracle"):  # the synthetic data has oracle columns
        assert isinstance(first["baseline"][key], float) and isinstance(first["tuned"][key], float)
    buckets = [BucketConfig(**b) for b in json.loads((tmp_path / "a" / "buckets.json").read_text())]
    check_buckets(buckets)
    assert [(b.name, b.share) for b in buckets] == [("control", 90.0), ("treatment", 10.0)]
    assert buckets[0].weights == {t: 1.0 for t in first["baseline"]["weights"]}
    assert buckets[1].weights == first["tuned"]["weights"]
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["tuned"]["heldout"] == first["tuned"]["heldout"]
    assert {r["task"] for r in report["guardrails"]} == set(first["baseline"]["weights"])
    assert next(r for r in report["guardrails"] if r["task"] == "skip")["gain"] == "1 - label"
    for name in ("report.md", "objective.png", "tasks.png"):
        assert (tmp_path / "a" / name).stat().st_size > 0
    assert "![objective per evaluation](objective.png)" in (tmp_path / "a" / "report.md").read_text()


def test_guardrail_keeps_every_task_within_the_allowed_loss(trained_run, synth_dir, tmp_path):
    report = _tune(trained_run, synth_dir, tmp_path, seed=1, max_task_loss=1.0, length_fn="sigmoid")
    assert not all(h["feasible"] for h in report["history"])  # the constraint was active
    assert all(r["within_guardrail"] and r["change_valid_pct"] >= -1.0 for r in report["guardrails"])
    assert report["tuned"]["valid"] >= report["baseline"]["valid"]


@pytest.mark.parametrize(("objective", "length_fn"), [("ndcg", "log1p"), ("ndcg", "power"), ("watch_time", "sigmoid")])
def test_reported_objective_is_the_one_of_the_written_buckets(trained_run, synth_dir, tmp_path, objective, length_fn):
    # Recompute the held-out objective from buckets.json with the service's fusion: same number.
    from mtrank.training.checkpoint import load_run
    from mtrank.training.evaluate import predict_frame
    from mtrank.training.streaming import load_split

    report = _tune(trained_run, synth_dir, tmp_path, seed=2, objective=objective, k=3, length_fn=length_fn)
    treatment = BucketConfig(**json.loads((tmp_path / "buckets.json").read_text())[1])
    assert treatment.length_fn.kind == report["tuned"]["length_fn"]["kind"]
    run = load_run(trained_run("ple"))
    frame = load_split(synth_dir, "test", run.spec)
    predictions, _ = predict_frame(run, frame)
    video_len = frame["video_len"].to_numpy()
    score = log_scores(predictions, treatment.weights, video_len, treatment.length_fn)
    if objective == "ndcg":
        gain = sum(v * frame[t].to_numpy(dtype=np.float64) for t, v in parse_task_values(VALUE, "v").items())
        expected = ndcg_at_k(frame["user_id"].to_numpy(), score, gain, k=3)
    else:
        watch = np.nan_to_num(frame["vcr"].to_numpy(dtype=np.float64)) * video_len
        expected = top_k_watch_time(frame["user_id"].to_numpy(), score, watch, k=3)
    assert report["tuned"]["heldout"] == pytest.approx(expected, rel=1e-12)


def test_ranking_lists_are_requests_when_the_data_has_a_request_column(trained_run, synth_dir, tmp_path):
    def requests(frame: pd.DataFrame) -> pd.DataFrame:  # a user's impressions, three per request
        chunk = frame.groupby("user_id").cumcount() // 3
        return frame.assign(request_id=frame["user_id"].astype(str) + "-" + chunk.astype(str))

    data = _copy_data(synth_dir, tmp_path / "data", edit=requests)
    by_request = _tune(trained_run, data, tmp_path / "out", seed=1)
    by_user = _tune(trained_run, data, tmp_path / "out-user", seed=1, group_by="user_id")
    assert (by_request["group_by"], by_user["group_by"]) == ("request_id", "user_id")
    assert by_request["lists"]["valid"]["lists"] > by_user["lists"]["valid"]["lists"]
    assert by_request["lists"]["valid"]["mean_size"] <= 3 < by_user["lists"]["valid"]["mean_size"]


# -- bad inputs: one line, exit 2 ---------------------------------------------------------------------


def _copy_data(src: Path, dst: Path, edit=None, spec_edit=None) -> Path:
    dst.mkdir()
    for split in ("train", "valid", "test"):
        frame = pd.read_parquet(src / f"{split}.parquet")
        (edit(frame) if edit else frame).to_parquet(dst / f"{split}.parquet")
    spec = yaml.safe_load((src / "spec.yaml").read_text())
    if spec_edit is not None:
        spec_edit(spec)
    (dst / "spec.yaml").write_text(yaml.safe_dump(spec))
    return dst


def _solo_users(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.assign(user_id=[f"solo{i}" for i in range(len(frame))])


def _drop_share_task(spec: dict) -> None:
    spec["tasks"] = [t for t in spec["tasks"] if t["name"] != "share"]


def _drop_share_column(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns=["share"])


@pytest.mark.parametrize(
    ("case", "args", "message"),
    [
        ("unknown task", ["--value", "vtr=1,dwell=2"], "--value: unknown task 'dwell'"),
        ("no ranking lists", ["--value", VALUE], "valid split: no ranking list of 2 or more rows"),
        ("run tasks differ from the spec", ["--value", VALUE], "do not match"),
        ("label column missing", ["--value", VALUE], "'share'"),
        ("no value for ndcg", [], "--value must give a non-zero value"),
        ("bad share", ["--value", VALUE, "--treatment-share", "100"], "--treatment-share"),
    ],
)
def test_bad_inputs_get_one_line_and_exit_2(trained_run, synth_dir, tmp_path, capsys, case, args, message):
    data = synth_dir
    if case == "no ranking lists":
        data = _copy_data(synth_dir, tmp_path / "data", edit=_solo_users)
    elif case == "run tasks differ from the spec":
        data = _copy_data(synth_dir, tmp_path / "data", spec_edit=_drop_share_task)
    elif case == "label column missing":
        data = _copy_data(synth_dir, tmp_path / "data", edit=_drop_share_column)
        (data / "spec.yaml").unlink()
    rc = main(["tune-fusion", "--run", str(trained_run("ple")), "--data", str(data), "--out", str(tmp_path / "out"),
               "--budget", "2", "--quiet", *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("mtrank tune-fusion: error:"), err
    assert message in err
    assert not (tmp_path / "out" / "buckets.json").exists()


# -- the round trip to the service ---------------------------------------------------------------------


def test_mtrank_serve_serves_both_buckets_of_buckets_json(trained_run, exported_repo, synth_dir, tmp_path):
    _tune(trained_run, synth_dir, tmp_path, seed=5)
    text = (tmp_path / "buckets.json").read_text()
    written = {b["name"]: b for b in json.loads(text)}
    with RemoteServer(exported_repo("ple"), env={"MTRANK_BUCKETS": text}) as server:
        served = {b["name"]: b for b in server.get("/v1/models").json()["buckets"]}
        assert set(served) == {"control", "treatment"}
        for name in served:
            assert served[name]["share"] == written[name]["share"]
            assert served[name]["weights"] == written[name]["weights"]
        treatment = BucketConfig(**written["treatment"])
        seen: dict[str, int] = {}
        for i in range(200):
            body = rank_body(user_id=f"tuned-{i}", n=8, offset=i)
            out = server.post("/v1/rank", json=body).json()
            seen[out["bucket"]] = seen.get(out["bucket"], 0) + 1
            if out["bucket"] == "treatment":
                # The service orders by the tuned weights: recompute from its own task scores.
                items = out["items"]
                lengths = {c["item_id"]: c["video_len"] for c in body["candidates"]}
                tasks = {t: np.array([it["tasks"][t] for it in items]) for t in treatment.weights}
                score = log_scores(tasks, treatment.weights, np.array([lengths[it["item_id"]] for it in items]),
                                   treatment.length_fn)
                assert list(rank_order(score)) == list(range(len(items)))
    assert set(seen) == {"control", "treatment"}
    assert 5 <= seen["treatment"] <= 45, seen  # 10 % of 200 users
