"""Data readers: file formats, split discovery, one-line spec errors and conformed frames."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mtrank.spec import DenseField, Facet, FacetRule, FeatureSpec, SparseField, SpecError, Task
from mtrank.training.frames import conform_frame, find_split, load_spec, read_table, validate_frame
from mtrank.training.streaming import load_split

REPO = Path(__file__).resolve().parents[1]


def _shared_data() -> Path:
    root = os.environ.get("MTRANK_SHARED_DATA")
    path = Path(root) if root else Path(__file__).resolve().parents[2] / "shared" / "data"
    if not path.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"shared sample data not found at {path} (set MTRANK_SHARED_DATA)")
        pytest.skip(f"shared sample data not found at {path}")
    return path


SPEC = FeatureSpec(
    name="toy",
    dense=(
        DenseField("age", side="user", transform="log1p", default=3.0),
        DenseField("video_len", side="item", default=30.0),
    ),
    sparse=(SparseField("user_id", side="user", location="store"), SparseField("category")),
    tasks=(Task("click"), Task("ratio", type="regression", space="played")),
    user_groups=Facet("user_group", ("new", "old"), (FacetRule("new", "age", "lt", 7.0),), "old"),
)


def _frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "age": [1.0, 30.0, np.nan],
            "video_len": [10.0, 20.0, 30.0],
            "user_id": [1, 2, 3],
            "category": ["c1", "c2", "c1"],
            "click": [0, 1, 0],
            "played": [1, 1, 0],
            "ratio": [0.5, 1.0, np.nan],
        }
    )


def _error(frame: pd.DataFrame) -> str:
    with pytest.raises(SpecError) as info:
        validate_frame(frame, SPEC, "data/train.csv")
    message = str(info.value)
    assert "\n" not in message and message.startswith("data/train.csv: ")
    return message


def test_valid_frame_passes() -> None:
    validate_frame(_frame(), SPEC, "data/train.csv")


def test_empty_file_is_an_error() -> None:
    assert "no rows" in _error(_frame().iloc[:0])


def test_missing_label_column_is_named() -> None:
    assert "missing label column 'click' of task 'click'" in _error(_frame().drop(columns="click"))


def test_missing_feature_column_is_named() -> None:
    assert "missing feature column 'video_len'" in _error(_frame().drop(columns="video_len"))


def test_missing_space_column_is_named() -> None:
    assert "missing space column 'played' of task 'ratio'" in _error(_frame().drop(columns="played"))


def test_nan_binary_label_is_an_error() -> None:
    assert "label 'click' of task 'click' is NaN" in _error(_frame().assign(click=[0, np.nan, 1]))


def test_nan_regression_label_inside_its_space_is_an_error() -> None:
    message = _error(_frame().assign(ratio=[0.5, np.nan, np.nan]))
    assert "label 'ratio' of task 'ratio' is NaN inside its space 'played'" in message
    assert "first row 1" in message


def test_binary_label_outside_zero_one_is_an_error() -> None:
    assert "values other than 0/1" in _error(_frame().assign(click=[0, 2, 1]))


def test_missing_facet_column_without_its_rule_feature_is_an_error() -> None:
    spec = FeatureSpec(
        name="toy",
        dense=(),
        sparse=(SparseField("user_id"),),
        tasks=(Task("click"),),
        user_groups=Facet("user_group", ("new", "old"), (FacetRule("new", "age", "lt", 7.0),), "old"),
    )
    with pytest.raises(SpecError, match="rule feature 'age'"):
        validate_frame(pd.DataFrame({"user_id": ["a"], "click": [1]}), spec, "x.csv")


def test_unknown_facet_value_is_an_error() -> None:
    assert "outside ['new', 'old']" in _error(_frame().assign(user_group=["new", "old", "vip"]))


def test_conform_fills_dense_nan_with_default_and_computes_facets() -> None:
    out = conform_frame(_frame(), SPEC)
    assert out["age"].tolist() == [1.0, 30.0, 3.0]
    assert out["user_group"].tolist() == ["new", "old", "new"]  # default age 3 < 7
    assert out["click"].dtype == np.float64 and np.isnan(out["ratio"].iloc[2])


def test_conform_turns_sparse_values_into_str() -> None:
    frame = _frame().assign(user_id=[1.0, np.nan, 3.0])  # how CSV reads ints with a gap
    out = conform_frame(frame, SPEC)
    assert out["user_id"].tolist() == ["1", "", "3"]
    assert conform_frame(_frame(), SPEC)["user_id"].tolist() == ["1", "2", "3"]


@pytest.mark.parametrize("name", ["train.parquet", "train.csv", "train.csv.gz", "train.tsv"])
def test_round_trip_through_each_format(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    frame = _frame()
    if name.endswith(".parquet"):
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False, sep="\t" if name.endswith(".tsv") else ",")
    out = load_split(tmp_path, "train", SPEC)
    assert out["user_id"].tolist() == ["1", "2", "3"]
    assert out["age"].tolist() == [1.0, 30.0, 3.0]
    np.testing.assert_array_equal(out["click"].to_numpy(), [0.0, 1.0, 0.0])


def test_csv_and_parquet_give_equal_frames(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _frame().to_csv(tmp_path / "a" / "test.csv", index=False)
    _frame().assign(user_id=["1", "2", "3"]).to_parquet(tmp_path / "b" / "test.parquet", index=False)
    a = load_split(tmp_path / "a", "test", SPEC)
    b = load_split(tmp_path / "b", "test", SPEC)
    pd.testing.assert_frame_equal(a, b, check_dtype=False)


def test_read_table_rejects_unknown_suffix(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(SpecError, match="unsupported file type"):
        read_table(tmp_path / "x.json")


def test_exact_split_name_wins_over_a_partial_match(tmp_path: Path) -> None:
    for name in ("train.csv", "old_train_sample.csv"):
        (tmp_path / name).write_text("a\n1\n")
    assert find_split(tmp_path, "train").name == "train.csv"


def test_valid_split_matches_val_files(tmp_path: Path) -> None:
    (tmp_path / "x_val_sample.csv").write_text("a\n1\n")
    (tmp_path / "SOURCE.md").write_text("not a table")
    assert find_split(tmp_path, "valid").name == "x_val_sample.csv"


def test_ambiguous_split_names_every_candidate(tmp_path: Path) -> None:
    for name in ("a_test.csv", "b_test.csv"):
        (tmp_path / name).write_text("a\n1\n")
    with pytest.raises(SpecError, match="a_test.csv, b_test.csv"):
        find_split(tmp_path, "test")
    assert find_split(tmp_path, "test", spec_name="b").name == "b_test.csv"


def test_missing_split_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="no test.parquet"):
        find_split(tmp_path, "test")


def test_load_spec_defaults_to_spec_yaml_in_the_data_directory(tmp_path: Path) -> None:
    SPEC.save(tmp_path / "spec.yaml")
    assert load_spec(tmp_path) == SPEC
    with pytest.raises(SpecError, match="feature spec not found"):
        load_spec(tmp_path / "elsewhere")


@pytest.mark.parametrize(
    ("config", "directory", "labels"),
    [
        ("census_income.yaml", "census_income", {"income": 5, "marital status": 27}),
        ("ali_ccp.yaml", "ali_ccp", {"click": 7, "purchase": 1}),
    ],
)
def test_shared_samples_load_with_their_specs(config: str, directory: str, labels: dict[str, int]) -> None:
    data = _shared_data() / directory
    spec = load_spec(data, REPO / "configs" / "data" / config)
    splits = {split: load_split(data, split, spec) for split in ("train", "valid", "test")}
    assert {s: len(f) for s, f in splits.items()} == (
        {"train": 80, "valid": 20, "test": 20}
        if directory == "census_income"
        else {"train": 100, "valid": 50, "test": 50}
    )
    train = splits["train"]
    assert {label: int(train[label].sum()) for label in labels} == labels  # positives listed in SOURCE.md
    for f in spec.sparse:
        assert train[f.name].map(type).eq(str).all(), f.name
