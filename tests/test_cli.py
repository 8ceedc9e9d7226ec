"""The mtrank command line: bad configs and specs are one-line errors that write nothing, train options
override the config file, every option is documented, the summary fits the tasks."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from mtrank.cli import build_parser, main

FAST_TRAIN = {"epochs": 1, "batch_size": 512, "eval_train_rows": 500, "threads": 1}
SMALL_SB = {"embedding_dim": 4, "bottom_hidden": [16], "tower_hidden": [8]}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _fails_with_one_line(argv: list[str], out: Path, capsys, *expected: str) -> str:
    """Runs ``mtrank`` and checks: exit 2, one line on stderr naming ``expected``, no run directory."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    for part in expected:
        assert part in err, (part, err)
    assert not out.exists(), "a failed command writes nothing"
    return err


@pytest.mark.parametrize(
    ("train_yaml", "expected"),
    [
        ("epochs: 1\n  colour: blue\n", "train.colour: unknown key"),
        ("epochs: 1\n  lr: fast\n", "train.lr: Input should be a valid number"),
        ("epochs: 1\n  batch_size: '512'\n", "train.batch_size: Input should be a valid integer"),
        ("epochs: 1\n  loss_weighting: gradnorm\n", "train.loss_weighting: Input should be 'static'"),
        ("epochs: 0\n", "train: epochs must be >= 1"),
        ("epochs: 1\n  task_weights: {vtrr: 2}\n", "train.task_weights.vtrr: not a task"),
    ],
    ids=["unknown-key", "lr-word", "quoted-int", "weighting", "zero-epochs", "unknown-task-weight"],
)
def test_a_bad_train_config_is_one_line_naming_file_and_key(synth_dir, tmp_path, capsys, train_yaml, expected):
    config = _write(tmp_path / "bad.yaml", "name: ple\ntrain:\n  " + train_yaml)
    out = tmp_path / "run"
    argv = ["train", "--model", "ple", "--data", str(synth_dir), "--out", str(out), "--config", str(config)]
    err = _fails_with_one_line(argv, out, capsys, str(config), expected)
    assert err.startswith("mtrank train: error: ")


@pytest.mark.parametrize(
    ("model_yaml", "expected"),
    [
        ("n_expertz: 3\n", "model.n_expertz: unknown config key of model 'mmoe'"),
        ("n_experts: 2.5\n", "model.n_experts: Input should be a valid integer"),
        ("expert_hidden: 64\n", "model.expert_hidden: Input should be a valid"),
    ],
    ids=["unknown-key", "float-for-int", "int-for-list"],
)
def test_a_bad_model_config_is_one_line_naming_file_and_key(synth_dir, tmp_path, capsys, model_yaml, expected):
    config = _write(tmp_path / "bad.yaml", "model:\n  " + model_yaml)
    out = tmp_path / "run"
    argv = ["train", "--model", "mmoe", "--data", str(synth_dir), "--out", str(out), "--config", str(config)]
    _fails_with_one_line(argv, out, capsys, str(config), expected)


def test_an_unknown_config_section_is_one_line(synth_dir, tmp_path, capsys):
    config = _write(tmp_path / "bad.yaml", "trian:\n  epochs: 1\n")
    out = tmp_path / "run"
    argv = ["train", "--model", "ple", "--data", str(synth_dir), "--out", str(out), "--config", str(config)]
    _fails_with_one_line(argv, out, capsys, str(config), "trian: unknown section")


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (("dense", 0, "side"), "usr", "dense[0].side: Input should be 'user' or 'item' (got 'usr')"),
        (("sparse", 0, "location"), "stor", "sparse[0].location: Input should be 'graph' or 'store' (got 'stor')"),
        (("user_groups", "rules", 0, "op"), "lte", "user_groups.rules[0].op: Input should be 'lt'"),
        (("user_groups", "rules", 0, "threshold"), "7", "rules[0].threshold: Input should be a valid number (got '7')"),
        (("user_groups", "rules", 0, "value"), "veteran", "user_groups: facet 'user_group': rules[0].value 'veteran'"),
        (("tasks", 0, "typ"), "binary", "tasks[0].typ: unknown key"),
        (("tasks", 0, "output"), "identity", "tasks[0]: task 'vtr': output is for regression tasks only"),
    ],
    ids=["side-usr", "location-stor", "op-lte", "threshold-string", "rule-value", "task-typo", "binary-output"],
)
def test_a_bad_feature_spec_is_one_line_naming_file_and_key(synth_dir, tmp_path, capsys, path, value, expected):
    doc = yaml.safe_load((synth_dir / "spec.yaml").read_text())
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    spec = _write(tmp_path / "spec.yaml", yaml.safe_dump(doc))
    out = tmp_path / "run"
    argv = ["train", "--model", "single", "--data", str(synth_dir), "--out", str(out), "--spec", str(spec)]
    _fails_with_one_line(argv, out, capsys, str(spec), expected)


def test_scientific_notation_in_yaml_is_a_number_and_options_override_the_config(synth_dir, tmp_path, capsys):
    config = _write(
        tmp_path / "sb.yaml",
        "name: shared_bottom\nmodel: " + json.dumps(SMALL_SB) + "\ntrain:\n  epochs: 1\n  lr: 1e-3\n  batch_size: 512\n"
        "  eval_train_rows: 500\n  weight_decay: 1E-6\n",
    )
    out = tmp_path / "run"
    base = ["train", "--model", "shared_bottom", "--data", str(synth_dir), "--config", str(config)]
    assert main([*base, "--out", str(out)]) == 0
    meta = json.loads((out / "checkpoint.json").read_text())["train_config"]
    assert meta["lr"] == 0.001 and meta["weight_decay"] == 1e-6 and meta["batch_size"] == 512
    capsys.readouterr()

    out2 = tmp_path / "run2"
    overrides = ["--lr", "0.01", "--batch-size", "256", "--patience", "0", "--threads", "1",
                 "--loss-weighting", "uncertainty"]
    assert main([*base, "--out", str(out2), *overrides]) == 0
    meta = json.loads((out2 / "checkpoint.json").read_text())["train_config"]
    assert (meta["lr"], meta["batch_size"], meta["patience"], meta["threads"], meta["loss_weighting"]) == (
        0.01, 256, 0, 1, "uncertainty"
    )
    assert meta["weight_decay"] == 1e-6, "values not given on the command line stay the config file's"
    summary = capsys.readouterr().out.splitlines()[0]
    assert summary.startswith("avg_auc=") and "vtr_auc=" in summary and "vcr_mse=" in summary


def test_a_bad_option_value_writes_nothing(synth_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--model", "ple", "--data", str(synth_dir), "--out", str(out), "--lr", "-0.1"]
    _fails_with_one_line(argv, out, capsys, "train: lr must be > 0")


@pytest.fixture(scope="module")
def regression_only(tmp_path_factory) -> Path:
    """A tiny data set with one regression task of small values: MSE needs significant digits."""
    rng = np.random.default_rng(3)
    out = tmp_path_factory.mktemp("regression-only")
    for split, n in (("train", 800), ("valid", 200), ("test", 300)):
        x = rng.standard_normal(n)
        y = 0.001 * x + 0.0005 * rng.standard_normal(n)
        pd.DataFrame({"x": x, "c": rng.choice(["a", "b"], n), "y": y}).to_parquet(out / f"{split}.parquet")
    (out / "spec.yaml").write_text(
        yaml.safe_dump({"name": "tiny", "dense": [{"name": "x"}], "sparse": [{"name": "c"}],
                        "tasks": [{"name": "y", "type": "regression"}]})
    )
    return out


def test_the_summary_has_no_auc_without_binary_tasks_and_mse_keeps_its_digits(regression_only, tmp_path, capsys):
    config = _write(tmp_path / "sb.yaml", yaml.safe_dump({"model": SMALL_SB, "train": FAST_TRAIN}))
    out = tmp_path / "run"
    argv = ["train", "--model", "shared_bottom", "--data", str(regression_only), "--out", str(out),
            "--config", str(config)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    summary = captured.out.splitlines()[0]
    assert "auc" not in summary
    mse = json.loads((out / "metrics.json").read_text())["tasks"]["y"]["mse"]
    assert mse < 1e-4
    assert summary == f"y_mse={mse:.4g}"
    assert float(summary.split("=")[1]) == pytest.approx(mse, rel=1e-3), "not rounded to 0.0000"
    assert "task y: regression output identity" in captured.err


def _options(parser: argparse.ArgumentParser, prefix: str = "mtrank"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, f"{prefix} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield prefix, action


def test_every_option_of_every_subcommand_has_help_text():
    undocumented = [
        f"{command} {'/'.join(action.option_strings) or action.dest}"
        for command, action in _options(build_parser())
        if action.option_strings and not (action.help and action.help.strip())
    ]
    assert not undocumented, f"options without help: {undocumented}"


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in sub._choices_actions}
    assert set(helps) == set(sub.choices) and all(helps.values())
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--lr", "--batch-size", "--patience", "--threads", "--loss-weighting"):
        assert option in text


def test_a_config_for_another_model_is_refused(synth_dir, tmp_path, capsys):
    config = tmp_path / "ple.yaml"
    shutil.copy(Path(__file__).resolve().parents[1] / "configs" / "ple.yaml", config)
    out = tmp_path / "run"
    argv = ["train", "--model", "mmoe", "--data", str(synth_dir), "--out", str(out), "--config", str(config)]
    _fails_with_one_line(argv, out, capsys, str(config), "name: this is a config for 'ple', not 'mmoe'")
