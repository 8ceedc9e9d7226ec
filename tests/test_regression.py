"""Regression outputs: labels of any range train, predict, export and fuse in label units."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import torch
import yaml

from mtrank.export.exporter import export_run
from mtrank.fusion import P_MIN, LengthFn, log_scores
from mtrank.manifest import ALL_GROUPS, load_manifest
from mtrank.spec import FeatureSpec, SpecError
from mtrank.training.checkpoint import load_run
from mtrank.training.evaluate import evaluate_run, predict
from mtrank.training.outputs import OutputLayer, TaskOutput, choose_output, fit_output
from mtrank.training.streaming import to_tensors
from mtrank.training.trainer import train
from tests.test_export import serving_feeds

ROWS = {"train": 6000, "valid": 1500, "test": 3000}
LABEL_STD = 1.15
SPEC = {
    "name": "unit-regression",
    "dense": [{"name": f"x{i}"} for i in range(4)],
    "sparse": [{"name": "cat"}],
    "tasks": [{"name": "score", "type": "regression"}, {"name": "gain", "type": "regression"}],
}
# Small networks and a few epochs: each run takes a couple of seconds on one thread.
SMALL = {
    "single": {"embedding_dim": 4, "bottom_hidden": [32, 16], "tower_hidden": [8]},
    "mmoe": {"embedding_dim": 4, "n_experts": 3, "expert_hidden": [32, 16], "tower_hidden": [8]},
    "ple": {"embedding_dim": 4, "n_task_experts": 1, "n_shared_experts": 1, "expert_hidden": [32, 16],
            "tower_hidden": [8]},
}
TRAIN = {"epochs": 8, "batch_size": 256, "lr": 3e-3, "patience": 2, "threads": 1, "eval_train_rows": 500}


def _labels(x: np.ndarray, cat: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two tasks of unit scale (std ≈ 1.15), each a smooth function of the features plus noise."""
    effect = np.linspace(-0.8, 0.8, 8)[cat]
    score = 0.85 * x[:, 0] + 0.55 * np.sin(2 * x[:, 1]) + effect + 0.4 * rng.standard_normal(len(x))
    gain = 0.8 * x[:, 2] * (x[:, 3] > 0) - 0.65 * x[:, 0] + 0.65 * effect + 0.65 * rng.standard_normal(len(x))
    return score, gain


@pytest.fixture(scope="module")
def unit_data(tmp_path_factory) -> tuple[Path, Path, dict[str, tuple[float, float]]]:
    """The same rows twice: labels in their own units, and rescaled to [0, 1] (min-max over all rows).

    Returns both directories and, per task, ``(min, max - min)`` to map the rescaled units back.
    """
    rng = np.random.default_rng(11)
    frames = {}
    for split, n in ROWS.items():
        x = rng.standard_normal((n, 4))
        cat = rng.integers(0, 8, n)
        score, gain = _labels(x, cat, rng)
        frames[split] = pd.DataFrame({**{f"x{i}": x[:, i] for i in range(4)}, "cat": cat.astype(str),
                                      "score": score, "gain": gain})
    everything = pd.concat(frames.values())
    raw = everything[["score", "gain"]].to_numpy()
    # The data are what the issue describes: unit-scale labels, std close to 1.15.
    assert np.all(np.abs(raw.std(axis=0) - LABEL_STD) < 0.15), raw.std(axis=0)
    span = {t: (float(everything[t].min()), float(np.ptp(everything[t]))) for t in ("score", "gain")}
    unit, rescaled = tmp_path_factory.mktemp("unit"), tmp_path_factory.mktemp("rescaled")
    for split, frame in frames.items():
        frame.to_parquet(unit / f"{split}.parquet")
        scaled = frame.copy()
        for t, (lo, width) in span.items():
            scaled[t] = (frame[t] - lo) / width
        scaled.to_parquet(rescaled / f"{split}.parquet")
    for d in (unit, rescaled):
        (d / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    return unit, rescaled, span


def _config(tmp_path: Path, model: str) -> Path:
    path = tmp_path / f"{model}.yaml"
    path.write_text(yaml.safe_dump({"name": model, "model": SMALL[model], "train": TRAIN}))
    return path


@pytest.mark.parametrize("model", ["single", "mmoe", "ple"])
def test_unit_scale_labels_train_as_well_as_labels_rescaled_to_0_1(model, unit_data, tmp_path, capsys):
    unit, rescaled, span = unit_data
    config = _config(tmp_path, model)
    ours = train(model, unit, tmp_path / "unit", config_path=config, progress=False)
    chosen = capsys.readouterr().err
    assert "task score: regression output identity" in chosen and "task gain: regression output identity" in chosen
    theirs = train(model, rescaled, tmp_path / "rescaled", config_path=config, progress=False)
    assert "regression output sigmoid" in capsys.readouterr().err
    rows = []
    for task, (_, width) in span.items():
        mse_unit = ours["tasks"][task]["mse"]
        mse_rescaled = theirs["tasks"][task]["mse"] * width**2  # back in the original units
        rows.append((task, mse_unit, mse_rescaled, mse_unit / mse_rescaled))
        assert mse_unit <= 1.10 * mse_rescaled, (model, task, mse_unit, mse_rescaled)
        assert mse_unit < 0.5 * LABEL_STD**2, "the model explains most of the label variance"
    with capsys.disabled():
        for task, a, b, r in rows:
            print(f"\n{model} {task}: test MSE unit-scale {a:.4f}, rescaled (original units) {b:.4f}, ratio {r:.3f}")


def test_an_identity_run_predicts_evaluates_and_exports_in_label_units(unit_data, tmp_path):
    unit, _, _ = unit_data
    run_dir = tmp_path / "run"
    report = train("mmoe", unit, run_dir, config_path=_config(tmp_path, "mmoe"), progress=False)
    run = load_run(run_dir)
    score = next(o for o in run.outputs if o.task == "score")
    frame = pd.read_parquet(unit / "train.parquet")
    assert score.output == "identity"
    assert score.shift == pytest.approx(frame["score"].mean(), rel=1e-5)
    assert score.scale == pytest.approx(frame["score"].std(ddof=0), rel=1e-5)
    assert score.fusion_range == pytest.approx(tuple(np.percentile(frame["score"], [1, 99])), rel=1e-5)
    # Predictions are in label units: their spread is the labels', not a probability's.
    test = pd.read_parquet(unit / "test.parquet")
    preds, _ = predict(run.model, to_tensors(test, run.spec, run.preprocessor), run.outputs)
    assert preds[:, 0].min() < -1.0 and preds[:, 0].max() > 1.0
    assert float(np.mean((preds[:, 0] - test["score"]) ** 2)) == pytest.approx(report["tasks"]["score"]["mse"])
    again = evaluate_run(run_dir, unit)
    assert again["tasks"] == report["tasks"]

    vdir = export_run(run_dir, tmp_path / "repo", progress=False)
    manifest = load_manifest(vdir)
    assert [(t["name"], t["output"]) for t in manifest.tasks] == [("score", "identity"), ("gain", "identity")]
    assert manifest.tasks[0]["fusion_range"] == pytest.approx(list(score.fusion_range))
    graph = manifest.graphs[ALL_GROUPS]
    dense, sparse = run.preprocessor.transform(test.iloc[:256])
    session = ort.InferenceSession(str(vdir / graph.file), providers=["CPUExecutionProvider"])
    got = np.stack(session.run(graph.tasks, serving_feeds(manifest, vdir, dense, sparse)), axis=1)
    np.testing.assert_allclose(got, preds[:256], atol=1e-4, rtol=1e-5)


def test_a_declared_output_wins_and_is_checked_against_the_labels(unit_data, tmp_path, capsys):
    unit, _, _ = unit_data
    declared = {**SPEC, "tasks": [{"name": "score", "type": "regression", "output": "identity"},
                                  {"name": "gain", "type": "regression", "output": "sigmoid"}]}
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(declared))
    with pytest.raises(SpecError, match="task 'gain': output sigmoid needs labels in \\[0, 1\\]"):
        train("single", unit, tmp_path / "run", config_path=_config(tmp_path, "single"), spec_path=spec_path,
              progress=False)
    assert "regression output" not in capsys.readouterr().err, "nothing is chosen for declared outputs"
    assert not (tmp_path / "run").exists()


def test_the_output_is_chosen_from_the_train_labels_range():
    assert choose_output(np.array([0.0, 0.3, 1.0])) == "sigmoid"
    assert choose_output(np.array([0.0, 3.0, 1200.0])) == "softplus"
    assert choose_output(np.array([-0.1, 0.5])) == "identity"
    watch, chosen = fit_output("watch", "regression", None, np.array([0.0, 10.0, 30.0, 600.0]))
    assert chosen and watch.output == "softplus" and watch.shift == 0.0 and watch.fusion_range[0] == 0.0
    binary, chosen = fit_output("vtr", "binary", None, np.array([0.0, 1.0]))
    assert not chosen and binary.output == "sigmoid" and binary.fusion_range == (0.0, 1.0)


@pytest.mark.parametrize("kind", ["identity", "sigmoid", "softplus", "exp"])
def test_the_output_layer_maps_normalised_predictions_to_label_units(kind):
    out = TaskOutput("t", "regression", kind, shift=3.0 if kind == "identity" else 0.0, scale=2.5)
    layer = OutputLayer([out])
    logits = torch.linspace(-3, 3, 7).unsqueeze(1)
    y = layer(logits)
    torch.testing.assert_close(layer.normalise(y), layer.link(logits))
    torch.testing.assert_close(layer.loss_inputs(logits), layer.link(logits))
    if kind != "identity":
        assert (y >= 0).all(), "sigmoid, softplus and exp outputs are never negative"


def test_binary_columns_keep_logits_for_the_loss_and_output_probabilities():
    layer = OutputLayer([TaskOutput("vtr", "binary", "sigmoid")])
    logits = torch.tensor([[-2.0], [0.0], [2.0]])
    torch.testing.assert_close(layer.loss_inputs(logits), logits)
    torch.testing.assert_close(layer(logits), torch.sigmoid(logits))


def test_fusion_ranges_map_a_regression_output_into_0_1_before_the_log():
    outputs = {"vtr": np.array([0.5, 0.5, 0.5]), "watch": np.array([-10.0, 30.0, 500.0])}
    weights = {"vtr": 1.0, "watch": 2.0}
    fn = LengthFn()
    ranged = log_scores(outputs, weights, np.zeros(3), fn, ranges={"watch": (0.0, 60.0)})
    expected = np.log(0.5) + 2.0 * np.log(np.clip(np.array([-10.0, 30.0, 500.0]) / 60.0, P_MIN, 1.0))
    np.testing.assert_allclose(ranged, expected)
    # Without a range the output is clipped to [P_MIN, 1] as a probability: 30 s and 500 s tie.
    plain = log_scores(outputs, weights, np.zeros(3), fn)
    assert plain[1] == plain[2] and ranged[1] < ranged[2]
    assert outputs["watch"][1] == 30.0, "the caller's arrays are not modified"


def test_a_spec_without_outputs_keeps_its_fingerprint():
    spec = FeatureSpec.from_dict(SPEC)
    legacy = spec.to_dict()
    for task in legacy["tasks"]:
        del task["output"]
    import hashlib

    assert spec.fingerprint() == hashlib.sha256(json.dumps(legacy, sort_keys=True).encode()).hexdigest()[:16]
