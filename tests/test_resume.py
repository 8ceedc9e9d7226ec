"""Checkpoints and resume: a run killed with SIGKILL mid-epoch and resumed with ``--resume`` ends
where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mtrank.cli import main
from mtrank.training.checkpoint import partial_dir

MODEL = {"embedding_dim": 4, "bottom_hidden": [32], "tower_hidden": [8]}
# 16k train rows in batches of 64: 250 steps an epoch, a checkpoint every 7 steps (never on an
# epoch boundary, so the kill lands on a mid-epoch checkpoint).
TRAIN = {"epochs": 2, "batch_size": 64, "eval_train_rows": 1000, "checkpoint_every": 7, "patience": 3,
         "loss_weighting": "uncertainty", "shuffle_rows": 1024}


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"name": "shared_bottom", "model": MODEL, "train": TRAIN}))
    return path


def _argv(data: Path, out: Path, config: Path) -> list[str]:
    return ["train", "--model", "shared_bottom", "--data", str(data), "--out", str(out), "--config", str(config)]


def _mid_epoch_checkpoint(partial: Path) -> dict | None:
    latest = partial / "LATEST"
    try:
        state = json.loads((partial / "state" / latest.read_text().strip() / "state.json").read_text())
    except FileNotFoundError:  # none yet, or the one LATEST named was just replaced by a newer one
        return None
    return state if state["step"] > 0 and state["epoch"] >= 1 else None


def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(synth_dir, tmp_path, capsys):
    config = _config(tmp_path)
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "mtrank.cli", *_argv(synth_dir, out, config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    deadline = time.monotonic() + 120
    state = None
    while state is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
        state = _mid_epoch_checkpoint(partial_dir(out))
    proc.kill()  # SIGKILL: no handler runs, nothing is flushed
    proc.wait()
    assert state is not None, "the run ended (or timed out) before a checkpoint in its second epoch"
    assert proc.returncode == -9
    assert not out.exists(), "a killed run leaves no run directory, only RUN.partial"

    assert main(["train", "--resume", str(out)]) == 0
    assert not partial_dir(out).exists()
    resumed = json.loads((out / "metrics.json").read_text())
    capsys.readouterr()

    assert main(_argv(synth_dir, tmp_path / "whole", config)) == 0
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    # Model, optimiser, loss weighting, RNG and data position are restored: the same run, to float noise.
    assert resumed["avg_auc"] == pytest.approx(whole["avg_auc"], abs=1e-6)
    assert resumed["tasks"]["vcr"]["mse"] == pytest.approx(whole["tasks"]["vcr"]["mse"], rel=1e-5)
    assert [h["valid_loss"] for h in resumed["history"]] == pytest.approx([h["valid_loss"] for h in whole["history"]])
    assert resumed["rows_seen"] == whole["rows_seen"] == 2 * whole["train_rows"]
    assert resumed["epochs_run"] == 2


def test_resuming_nothing_is_one_line(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mtrank train: error:") and "no run in progress to resume" in err and "\n" not in err


def test_train_without_data_or_resume_is_one_line(capsys):
    assert main(["train", "--model", "ple"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--model, --data and --out are required (or --resume RUN" in err and "\n" not in err
