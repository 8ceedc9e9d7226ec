"""Synthetic short-video data: determinism, schema, documented rates and ground truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mtrank.spec import FeatureSpec
from mtrank.training.metrics import auc
from mtrank.training.synth import BINARY_TASKS, TASKS, generate, oracle_report, simulate

ROWS = 100_000


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return simulate(ROWS, seed=3)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate(out, rows=5_000, seed=7, progress=False)
    return out


def test_generate_writes_splits_of_80_10_10_and_a_loadable_spec(written: Path) -> None:
    sizes = {s: len(pd.read_parquet(written / f"{s}.parquet")) for s in ("train", "valid", "test")}
    assert sizes == {"train": 4_000, "valid": 500, "test": 500}
    spec = FeatureSpec.load(written / "spec.yaml")
    assert spec.task_names == list(TASKS)
    assert spec.task("vcr").space == "played" and spec.task("vcr").type == "regression"
    assert spec.extra["seed"] == 7 and spec.extra["params"]["rows_per_user"] == 40.0


def test_generate_is_byte_identical_for_a_seed(written: Path, tmp_path: Path) -> None:
    generate(tmp_path, rows=5_000, seed=7, progress=False)
    for name in ("train.parquet", "valid.parquet", "test.parquet", "spec.yaml"):
        assert (tmp_path / name).read_bytes() == (written / name).read_bytes(), name


def test_a_different_seed_gives_different_data(written: Path, tmp_path: Path) -> None:
    generate(tmp_path, rows=5_000, seed=8, progress=False)
    assert (tmp_path / "train.parquet").read_bytes() != (written / "train.parquet").read_bytes()


def test_columns_and_dtypes(frame: pd.DataFrame) -> None:
    strings = ["user_id", "device", "user_group", "item_id", "author_id", "category", "item_state"]
    floats = ["account_age_days", "watch_minutes_30d", "video_len", "item_age_days", "vcr"]
    labels = ["played", "vtr", "finish", "skip", "like", "share"]
    expected = set(strings + floats + labels + [f"oracle_{t}" for t in TASKS])
    assert set(frame.columns) == expected
    for c in strings:
        assert pd.api.types.is_string_dtype(frame[c]) or frame[c].dtype == object, c
    for c in floats + [f"oracle_{t}" for t in TASKS]:
        assert frame[c].dtype == np.float64, c
    for c in labels:
        assert frame[c].dtype == np.int8 and set(frame[c].unique()) <= {0, 1}, c
    assert frame["user_id"].str.match(r"^u\d+$").all() and frame["item_id"].str.match(r"^v\d+$").all()
    assert frame["author_id"].str.match(r"^a\d+$").all() and frame["category"].nunique() == 40
    assert set(frame["device"]) == {"ios", "android", "web"}


def test_feature_ranges(frame: pd.DataFrame) -> None:
    assert frame["video_len"].between(3, 1800).all()
    assert 25 <= frame["video_len"].median() <= 35
    assert (frame[["account_age_days", "watch_minutes_30d", "item_age_days"]] >= 0).all().all()


def test_id_counts_follow_rows(frame: pd.DataFrame) -> None:
    n_items = ROWS / 50
    assert frame["user_id"].nunique() == pytest.approx(ROWS / 40, rel=0.05)
    assert frame["item_id"].nunique() == pytest.approx(n_items, rel=0.1)
    assert frame["author_id"].nunique() == pytest.approx(n_items / 8, rel=0.1)
    counts = frame["item_id"].value_counts()
    assert counts.iloc[0] > 20 * counts.median()  # Zipf-like popularity


def test_new_users_are_scarce_in_rows_and_users(frame: pd.DataFrame) -> None:
    shares = frame["user_group"].value_counts(normalize=True)
    assert 0.03 <= shares["new"] <= 0.05
    assert 0.08 <= shares["low"] <= 0.20
    assert shares["high"] >= 0.75
    users = frame.drop_duplicates("user_id")
    assert 0.08 <= (users["user_group"] == "new").mean() <= 0.10


def test_positive_rates(frame: pd.DataFrame) -> None:
    assert 0.80 <= frame["played"].mean() <= 0.90
    assert 0.01 <= frame["share"].mean() <= 0.03
    assert 0.03 <= frame["like"].mean() <= 0.06


def test_vcr_is_nan_exactly_where_not_played(frame: pd.DataFrame) -> None:
    np.testing.assert_array_equal(frame["vcr"].isna().to_numpy(), frame["played"].to_numpy() == 0)
    assert frame["vcr"].dropna().between(0, 1).all()


def test_unplayed_rows_have_no_engagement_and_count_as_skips(frame: pd.DataFrame) -> None:
    unplayed = frame[frame["played"] == 0]
    assert (unplayed[["vtr", "finish", "like", "share"]] == 0).all().all()
    assert (unplayed["skip"] == 1).all()


def test_derived_facet_columns_equal_the_spec_rules(frame: pd.DataFrame, written: Path) -> None:
    spec = FeatureSpec.load(written / "spec.yaml")
    raw = {c: frame[c].to_numpy() for c in ("account_age_days", "watch_minutes_30d", "item_age_days")}
    groups = np.asarray(spec.user_groups.values)[spec.user_groups.assign(raw)]
    states = np.asarray(spec.item_facet.values)[spec.item_facet.assign(raw)]
    np.testing.assert_array_equal(frame["user_group"].to_numpy(dtype=str), groups)
    np.testing.assert_array_equal(frame["item_state"].to_numpy(dtype=str), states)


def test_oracles_are_probabilities_the_labels_are_drawn_from(frame: pd.DataFrame) -> None:
    for task in BINARY_TASKS:
        oracle = frame[f"oracle_{task}"]
        assert oracle.between(0, 1).all(), task
        assert frame[task].mean() == pytest.approx(oracle.mean(), abs=0.01), task
    played = frame["played"] == 1
    assert frame.loc[played, "vcr"].mean() == pytest.approx(frame.loc[played, "oracle_vcr"].mean(), abs=0.005)


def test_oracle_auc_is_informative_for_every_binary_task(frame: pd.DataFrame) -> None:
    report = oracle_report(frame)
    for task in BINARY_TASKS:
        assert report[task]["oracle_auc"] > 0.6, task
        assert report[task]["oracle_auc"] == auc(frame[task], frame[f"oracle_{task}"])
    assert report["vcr"]["oracle_mse"] < report["vcr"]["variance"]


def test_new_users_respond_to_video_length_unlike_high_users(frame: pd.DataFrame) -> None:
    played = frame[frame["played"] == 1]
    short = played["video_len"] < 20
    medium = played["video_len"].between(30, 90)

    def medium_minus_short(group: str) -> float:
        rows = played["user_group"] == group
        return played.loc[rows & medium, "vtr"].mean() - played.loc[rows & short, "vtr"].mean()

    assert medium_minus_short("high") > 0.05  # low/high users: medium videos are watched validly more
    assert medium_minus_short("new") < -0.05  # new users: shorter is better
