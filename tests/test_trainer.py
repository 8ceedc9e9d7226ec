"""Trainer end to end on the small synthetic data set: learning, determinism, run directory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from mtrank.cli import main as cli_main
from mtrank.training import streaming as dataset
from mtrank.training.checkpoint import load_run
from mtrank.training.evaluate import predict
from mtrank.training.frames import load_spec
from mtrank.training.streaming import to_tensors
from mtrank.training.trainer import train


def _config(tmp_path: Path, **train_values) -> Path:
    path = tmp_path / "config.yaml"
    values = {"epochs": 1, "batch_size": 512, "eval_train_rows": 2000, "threads": 1, **train_values}
    path.write_text(yaml.safe_dump({"train": values}))
    return path


def test_a_short_run_beats_a_constant_predictor_on_every_task(synth_dir, tmp_path):
    config = _config(tmp_path, epochs=3, batch_size=256, patience=3)
    report = train("shared_bottom", synth_dir, tmp_path / "run", config_path=config, progress=False)
    spec = load_spec(synth_dir)
    test = dataset.load_split(synth_dir, "test", spec)
    for task in spec.tasks:
        m = report["tasks"][task.name]
        if task.type == "binary":
            assert m["auc"] > 0.55, (task.name, m)  # a constant has AUC 0.5
        else:
            y = test[task.label_column].to_numpy(np.float64)
            inside = ~np.isnan(y) & (test[task.space].to_numpy() > 0)
            constant_mse = float(np.var(y[inside]))  # the best constant predicts the mean
            assert m["mse"] < constant_mse, (task.name, m["mse"], constant_mse)


def test_two_runs_with_one_seed_give_identical_metrics(synth_dir, tmp_path):
    config = _config(tmp_path, seed=5)
    first = train("mmoe", synth_dir, tmp_path / "a", config_path=config, progress=False)
    second = train("mmoe", synth_dir, tmp_path / "b", config_path=config, progress=False)
    for key in ("train_seconds", "history", "samples_per_second", "samples_per_second_per_worker"):
        first.pop(key), second.pop(key)
    assert first == second
    third = train("mmoe", synth_dir, tmp_path / "c", config_path=config, seed=6, progress=False)
    assert third["avg_auc"] != first["avg_auc"]


def test_metrics_json_has_the_documented_fields(trained_run):
    report = json.loads((trained_run("ple") / "metrics.json").read_text())
    assert isinstance(report["avg_auc"], float) and isinstance(report["avg_oracle_auc"], float)
    assert {"auc", "logloss", "oracle_auc"} <= set(report["tasks"]["vtr"])
    assert {"mse", "oracle_mse"} <= set(report["tasks"]["vcr"])
    assert set(report["groups"]) == {"new", "low", "high"}
    assert {"auc", "logloss"} <= set(report["groups"]["new"]["like"])
    assert report["gates"] and all(len(g["mean"]) == len(g["std"]) for g in report["gates"].values())
    assert set(report["train"]["groups"]) == {"new", "low", "high"}


def test_mtl_gain_is_reported_against_a_baseline_run(trained_run, synth_dir, tmp_path):
    report = train(
        "shared_bottom", synth_dir, tmp_path / "sb", config_path=_config(tmp_path),
        baseline=trained_run("single"), progress=False,
    )
    single = json.loads((trained_run("single") / "metrics.json").read_text())
    assert report["mtl_gain"]["like"] == pytest.approx(report["tasks"]["like"]["auc"] - single["tasks"]["like"]["auc"])
    assert report["mtl_gain"]["vcr"] == pytest.approx(single["tasks"]["vcr"]["mse"] - report["tasks"]["vcr"]["mse"])


def test_a_checkpoint_rebuilds_its_model_without_outside_config(trained_run, synth_dir):
    run = load_run(trained_run("cgc"))
    spec = run.spec
    test = dataset.load_split(synth_dir, "test", spec)
    probs, _ = predict(run.model, to_tensors(test, spec, run.preprocessor))
    report = json.loads((trained_run("cgc") / "metrics.json").read_text())
    from mtrank.training.metrics import auc

    assert auc(test["vtr"].to_numpy(), probs[:, 0]) == pytest.approx(report["tasks"]["vtr"]["auc"], abs=1e-9)


def test_cli_errors_are_one_line(synth_dir, tmp_path, capsys):
    assert cli_main(["train", "--model", "plee", "--data", str(synth_dir), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mtrank train: error: unknown model 'plee'") and "\n" not in err
    assert cli_main(["train", "--model", "ple", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "y")]) == 2
    assert "\n" not in capsys.readouterr().err.strip()
