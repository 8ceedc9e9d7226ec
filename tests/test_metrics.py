"""Offline metrics: exact AUC, logloss/MSE, the metrics.json layout and MTL gain."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from mtrank.spec import DenseField, Facet, FacetRule, FeatureSpec, SparseField, Task
from mtrank.training.metrics import auc, evaluate_predictions, logloss, mse, mtl_gain


def _pairwise_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / (len(pos) * len(neg)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_equals_brute_force_pair_count_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = (rng.random(700) < 0.3).astype(int)
    scores = rng.integers(0, 12, 700).astype(float)  # few distinct values: many ties
    assert auc(labels, scores) == pytest.approx(_pairwise_auc(labels, scores), abs=1e-12)


def test_auc_of_perfect_scores_is_one_and_of_reversed_scores_zero() -> None:
    labels = np.array([0, 0, 1, 0, 1, 1])
    assert auc(labels, labels * 2.0 + 0.1) == 1.0
    assert auc(labels, -labels.astype(float)) == 0.0


def test_auc_of_constant_scores_is_one_half() -> None:
    assert auc(np.array([0, 1, 1, 0]), np.zeros(4)) == 0.5


def test_auc_is_nan_when_one_class_is_absent() -> None:
    assert math.isnan(auc(np.ones(5), np.arange(5.0)))


def test_logloss_and_mse_values() -> None:
    assert logloss(np.array([1.0, 0.0]), np.array([0.5, 0.5])) == pytest.approx(math.log(2))
    assert mse(np.array([1.0, 0.0, 0.5]), np.array([0.0, 0.0, 0.5])) == pytest.approx(1 / 3)


def _spec(groups: bool = True) -> FeatureSpec:
    return FeatureSpec(
        name="t",
        dense=(DenseField("age", side="user"),),
        sparse=(SparseField("item_id", location="store"),),
        tasks=(Task("click"), Task("ratio", type="regression", space="played")),
        user_groups=Facet("user_group", ("new", "old"), (FacetRule("new", "age", "lt", 7.0),), "old")
        if groups
        else None,
    )


def _frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "age": [1.0, 2.0, 30.0, 40.0, 50.0, 60.0],
            "item_id": list("abcdef"),
            "click": [0, 1, 0, 1, 1, 0],
            "played": [1, 1, 0, 1, 1, 0],
            "ratio": [0.2, 0.8, np.nan, 0.6, 1.0, np.nan],
            "oracle_click": [0.1, 0.9, 0.2, 0.8, 0.3, 0.4],
        }
    )


def test_evaluate_predictions_layout_and_values() -> None:
    preds = {"click": np.array([0.2, 0.7, 0.1, 0.6, 0.9, 0.3]), "ratio": np.full(6, 0.5)}
    m = evaluate_predictions(_frame(), preds, _spec())
    assert m["rows"] == 6
    assert m["avg_auc"] == 1.0
    assert m["avg_oracle_auc"] == pytest.approx(8 / 9)
    assert m["tasks"]["click"]["positive_rate"] == 0.5
    # ratio is scored on played rows only: (0.3^2 + 0.3^2 + 0.1^2 + 0.5^2) / 4
    assert m["tasks"]["ratio"] == {"mse": pytest.approx(0.11)}
    assert m["groups"]["new"]["rows"] == 2
    assert m["groups"]["old"]["click"]["auc"] == 1.0
    assert "item_facets" not in m
    json.dumps(m, allow_nan=False)


def test_evaluate_predictions_turns_nan_into_none() -> None:
    preds = {"click": np.linspace(0, 1, 6), "ratio": np.zeros(6)}
    frame = _frame().assign(click=[1, 1, 0, 1, 1, 0])  # the "new" group has positives only
    m = evaluate_predictions(frame, preds, _spec())
    assert m["groups"]["new"]["click"]["auc"] is None
    json.dumps(m, allow_nan=False)


def test_evaluate_predictions_without_groups_or_oracles() -> None:
    frame = _frame().drop(columns="oracle_click")
    m = evaluate_predictions(frame, {"click": np.linspace(0, 1, 6), "ratio": np.zeros(6)}, _spec(groups=False))
    assert "groups" not in m and "avg_oracle_auc" not in m
    assert set(m["tasks"]["click"]) == {"auc", "logloss", "positive_rate"}


def test_mtl_gain_is_positive_when_better_than_the_baseline() -> None:
    ours = {"tasks": {"click": {"auc": 0.75}, "ratio": {"mse": 0.10}}}
    base = {"tasks": {"click": {"auc": 0.70}, "ratio": {"mse": 0.12}}}
    gain = mtl_gain(ours, base)
    assert gain["click"] == pytest.approx(0.05)
    assert gain["ratio"] == pytest.approx(0.02)
    worse = mtl_gain(base, ours)
    assert worse["click"] < 0 and worse["ratio"] < 0
