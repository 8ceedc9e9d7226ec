"""A rare user group keeps its AUC: early stopping counts every user group once (issue 32).

A group of a few percent of the rows learns its own pattern an epoch or two after the majority has
learned its one and begun to memorise ids. A validation loss over all rows is then lowest where the
majority is best, and the rare group is served an underfit model. The data below make that choice
clear-cut (docs/training.md, "Early stopping and rare user groups").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from mtrank.spec import FeatureSpec
from mtrank.training.features import Preprocessor
from mtrank.training.models.registry import create_model, make_config
from mtrank.training.streaming import to_tensors
from mtrank.training.trainer import TrainConfig, Trainer, train

SPEC = {
    "name": "rare-group",
    "dense": [{"name": "account_age_days", "side": "user", "transform": "log1p"}, {"name": "x1"}, {"name": "x2"}],
    "sparse": [{"name": "user_id", "side": "user"}, {"name": "item_id", "side": "item"}],
    "tasks": [{"name": "click", "type": "binary"}, {"name": "like", "type": "binary"}],
    "user_groups": {"column": "user_group", "values": ["new", "old"],
                    "rules": [{"value": "new", "feature": "account_age_days", "op": "lt", "threshold": 7.0}],
                    "default": "old"},
}
ROWS = {"train": 30_000, "valid": 10_000, "test": 10_000}
RARE = 0.03
"""Share of rows (and of users) in the new-user group."""
USERS, ITEMS = 15_000, 500
PLE = {"embedding_dim": 8, "n_task_experts": 1, "n_shared_experts": 1, "expert_hidden": [32], "tower_hidden": [16]}
TRAIN = {"epochs": 4, "batch_size": 256, "lr": 3e-3, "patience": 1, "threads": 1, "seed": 3}
RARE_AUC_FLOOR = 0.72
"""Measured (main 82fe385 + the groups criterion, 1 thread) on these data, data seeds 1-4: the new
users' click AUC is 0.756-0.790 with the epoch the groups' criterion keeps (the 2nd every time;
0.790 for data seed 2, used here) and 0.513-0.673 with the one a loss over all rows keeps (the 1st
every time; 0.513 here)."""


def _frame(rng: np.random.Generator, n: int) -> pd.DataFrame:
    """New users: their own pattern (x1 counts against, x2 for); the others: x1 for. Two rows per
    user on average, so user ids invite memorising from the second epoch on."""
    new = rng.random(n) < RARE
    n_new = int(USERS * RARE)
    user = np.where(new, rng.integers(0, n_new, n), rng.integers(n_new, USERS, n))
    x1, x2 = rng.standard_normal(n), rng.standard_normal(n)
    z = np.where(new, -1.5 * x1 + 1.5 * x2, 1.5 * x1 + 0.3 * x2)
    frame = pd.DataFrame({
        "account_age_days": np.where(new, rng.uniform(0, 7, n), 30 + rng.exponential(300, n)),
        "x1": x1, "x2": x2,
        "user_id": [f"u{u}" for u in user], "item_id": [f"v{i}" for i in rng.integers(0, ITEMS, n)],
        "user_group": np.where(new, "new", "old"),
    })
    for task, shift in (("click", 0.0), ("like", -1.0)):
        frame[task] = (rng.random(n) < 1 / (1 + np.exp(-(z + shift)))).astype(np.int8)
    return frame


@pytest.fixture(scope="module")
def rare_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rare")
    rng = np.random.default_rng(2)
    for split, n in ROWS.items():
        _frame(rng, n).to_parquet(out / f"{split}.parquet", index=False)
    (out / "spec.yaml").write_text(yaml.safe_dump(SPEC, sort_keys=False))
    return out


def test_a_rare_user_group_is_served_a_model_that_learned_its_pattern(rare_data, tmp_path):
    config = tmp_path / "ple.yaml"
    config.write_text(yaml.safe_dump({"name": "ple", "model": PLE, "train": TRAIN}))
    report = train("ple", rare_data, tmp_path / "run", config_path=config, progress=False)
    rows = pd.read_parquet(rare_data / "test.parquet")
    assert 200 < (rows["user_group"] == "new").sum() < 400, "the group is rare and still measurable"
    rare_auc = report["groups"]["new"]["click"]["auc"]
    print(f"new users' click AUC {rare_auc:.4f}; validation losses {[h['valid_loss'] for h in report['history']]}")
    assert rare_auc >= RARE_AUC_FLOOR, (rare_auc, report["history"])


def test_the_early_stopping_loss_counts_each_user_group_once_whatever_its_rows(rare_data):
    spec = FeatureSpec.from_dict(SPEC, "rare-group")
    train_rows, valid = (pd.read_parquet(rare_data / f"{split}.parquet") for split in ("train", "valid"))
    pre = Preprocessor.fit(spec, train_rows)
    torch.manual_seed(0)
    model = create_model("ple", spec, pre.shape, make_config("ple", PLE))
    trainer = Trainer(model, TrainConfig(epochs=1, batch_size=256, threads=1))
    # One epoch: the majority has learned its pattern, the new users not yet, so the groups' losses differ.
    trainer.fit(to_tensors(train_rows, spec, pre), to_tensors(valid, spec, pre), progress=False)
    old = valid[valid["user_group"] == "old"]
    tripled = pd.concat([valid, old, old], ignore_index=True)  # the majority three times as large

    by_group = trainer.validation_loss(to_tensors(valid, spec, pre))
    assert trainer.validation_loss(to_tensors(tripled, spec, pre)) == pytest.approx(by_group, rel=1e-9)

    # The mean over the groups of each group's summed task losses (binary: mean BCE on the group's rows).
    logits = model(*(torch.as_tensor(a) for a in pre.transform(valid))).detach().numpy().astype(np.float64)
    expected = []
    for group in ("new", "old"):
        rows = (valid["user_group"] == group).to_numpy()
        y = valid.loc[rows, ["click", "like"]].to_numpy(np.float64)
        z = logits[rows]
        expected.append(np.mean(np.logaddexp(0.0, z) - y * z, axis=0).sum())
    assert by_group == pytest.approx(np.mean(expected), rel=1e-5)

    assert expected[0] > expected[1] + 0.1, expected
    rows_trainer = Trainer(model, TrainConfig(threads=1, valid_loss="rows"))
    assert rows_trainer.validation_loss(to_tensors(tripled, spec, pre)) != pytest.approx(
        rows_trainer.validation_loss(to_tensors(valid, spec, pre)), rel=1e-3), "a loss over rows moves with them"
