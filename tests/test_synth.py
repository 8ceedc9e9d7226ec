"""Synthetic short-video data: determinism, schema, documented rates and ground truth."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from mtrank.cli import main
from mtrank.spec import FeatureSpec
from mtrank.training.metrics import auc
from mtrank.training.synth import BINARY_TASKS, TASKS, build_world, generate, oracle_report, simulate
from mtrank.training.synth_history import HistoryParams, histories_from_frame

ROWS = 100_000
HISTORY_ROWS = 60_000
LISTS = ("tags", "hist_item_id", "hist_category")


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


def _fingerprint(frame: pd.DataFrame) -> str:
    """sha256 of the frame's column names and values (independent of the Parquet writer's version)."""
    h = hashlib.sha256()
    for c in frame.columns:
        h.update(c.encode())
        v = frame[c].to_numpy()
        if v.dtype.kind in "fi":
            h.update(np.ascontiguousarray(v, dtype=np.float64).tobytes())
        else:
            h.update("\n".join(map(str, v)).encode())
    return h.hexdigest()


def test_rows_without_history_are_those_the_generator_made_before_histories_existed() -> None:
    # Pinned from the generator before histories: data sets without lists keep their rows.
    assert _fingerprint(simulate(2_000, seed=5)) == "1b9e1aa63ed98391242fa2bfbb37ae72f094c59eecf3101b6141da02f0dc2281"


def test_generate_with_history_off_writes_the_bytes_of_a_plain_call(written: Path, tmp_path: Path) -> None:
    generate(tmp_path, rows=5_000, seed=7, progress=False, history=False)
    for name in ("train.parquet", "valid.parquet", "test.parquet", "spec.yaml"):
        assert (tmp_path / name).read_bytes() == (written / name).read_bytes(), name
    assert not set(LISTS) & set(pq.read_schema(written / "train.parquet").names)


@pytest.fixture(scope="module")
def history_world():
    return build_world(HISTORY_ROWS, seed=3, history=HistoryParams())


@pytest.fixture(scope="module")
def history_frame() -> pd.DataFrame:
    return simulate(HISTORY_ROWS, seed=3, history=HistoryParams())


@pytest.fixture(scope="module")
def history_written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth_history")
    generate(out, rows=5_000, seed=7, progress=False, history=True)
    return out


def _ids(values: np.ndarray) -> np.ndarray:
    return np.asarray([int(v[1:]) for v in values], dtype=np.int64)


def test_history_lists_are_parquet_list_columns_of_strings(history_written: Path, tmp_path: Path) -> None:
    schema = pq.read_schema(history_written / "train.parquet")
    for name in LISTS:
        assert schema.field(name).type == pa.list_(pa.string()), name
    generate(tmp_path, rows=5_000, seed=7, progress=False, history=True, shards=2)
    sharded = pq.read_table(tmp_path / "train" / "part-00001.parquet")
    for name in LISTS:
        assert sharded.schema.field(name).type == pa.list_(pa.string()), name
    assert pq.read_table(tmp_path / "train").num_rows == 4_000


def test_history_lengths_vary_from_empty_to_max_len_with_a_parallel_category_list(
        history_frame: pd.DataFrame, history_world) -> None:
    ids = history_frame["hist_item_id"].list.len().to_numpy()
    cats = history_frame["hist_category"].list.len().to_numpy()
    np.testing.assert_array_equal(ids, cats)
    assert ids.min() == 0 and ids.max() == 50
    assert 0.01 < (ids == 0).mean() < 0.10 and (ids == 50).mean() > 0.05 and 10 < np.median(ids) < 45
    new = history_frame["user_group"].to_numpy() == "new"
    assert (ids[new] == 0).mean() > 0.25 > (ids[~new] == 0).mean()
    entries = history_frame["hist_item_id"].list.flatten().to_numpy()
    categories = history_frame["hist_category"].list.flatten().to_numpy()
    assert pd.Series(entries).str.match(r"^v\d+$").all()
    np.testing.assert_array_equal(
        categories.astype(str), [f"c{c}" for c in history_world.items["category"][_ids(entries)]])


def test_tags_are_one_to_six_distinct_tags_per_item_that_follow_its_category(history_frame: pd.DataFrame) -> None:
    counts = history_frame["tags"].list.len().to_numpy()
    assert counts.min() == 1 and counts.max() == 6
    by_item = history_frame.groupby("item_id")["tags"].agg(lambda t: len({tuple(x) for x in t}))
    assert (by_item == 1).all()  # an item's tags are the same on all its rows
    first = history_frame.drop_duplicates("item_id")
    tags = [list(t) for t in first["tags"]]
    assert all(len(set(t)) == len(t) for t in tags)
    numbers = np.asarray([int(t[1:]) for row in tags for t in row])
    assert numbers.min() >= 0 and numbers.max() < 300 and len(np.unique(numbers)) > 200
    # Tag k's home category is k mod 40: most items' first tag is a home tag of their category.
    home = np.asarray([int(row[0][1:]) % 40 for row in tags]) == _ids(first["category"].to_numpy())
    assert home.mean() > 0.5


def test_histories_are_drawn_from_the_users_interests(history_frame: pd.DataFrame, history_world) -> None:
    hist = histories_from_frame(history_frame)
    row, _ = hist.entry_rows()
    u = _ids(history_frame["user_id"].to_numpy())
    category = history_world.items["category"][hist.items]
    interests = history_world.taste.interests

    def in_interests(users: np.ndarray) -> float:
        return float((interests[users] == category[:, None]).any(axis=1).mean())

    other_users = np.random.default_rng(0).permutation(u)[row]
    assert in_interests(u[row]) > 0.85
    assert in_interests(other_users) < 0.35  # ~3 interests of 40 categories


def test_histories_are_most_recent_first(history_frame: pd.DataFrame) -> None:
    # The session's interest dominates the recent end: entry j agrees with entry 0 less as j grows.
    cats = history_frame["hist_category"]
    full = cats[cats.list.len() == 50]
    first = full.list[0].to_numpy()
    assert (full.list[1].to_numpy() == first).mean() > (full.list[45].to_numpy() == first).mean() + 0.2


def test_the_history_term_raises_the_oracle_auc(history_frame: pd.DataFrame, history_world) -> None:
    u = _ids(history_frame["user_id"].to_numpy())
    i = _ids(history_frame["item_id"].to_numpy())
    without = history_world.oracles(u, i)
    with_history = [auc(history_frame[t], history_frame[f"oracle_{t}"]) for t in BINARY_TASKS]
    without_history = [auc(history_frame[t], without[t]) for t in BINARY_TASKS]
    assert all(a > b + 0.01 for a, b in zip(with_history, without_history, strict=True))
    assert np.mean(with_history) > np.mean(without_history) + 0.03


def test_oracle_columns_are_the_truth_of_the_written_histories(history_frame: pd.DataFrame, history_world) -> None:
    u = _ids(history_frame["user_id"].to_numpy())
    i = _ids(history_frame["item_id"].to_numpy())
    oracles = history_world.oracles(u, i, histories_from_frame(history_frame))
    for t in TASKS:
        np.testing.assert_array_equal(oracles[t], history_frame[f"oracle_{t}"].to_numpy(), err_msg=t)


def test_a_request_can_repeat_one_users_history_for_each_candidate(history_world) -> None:
    users = np.arange(20)
    hist = history_world.draw_histories(users, np.random.default_rng(1))
    r = int(np.argmax(hist.lengths > 0))
    own = hist.items[hist.offsets[r]:hist.offsets[r + 1]]
    candidates = np.concatenate([own[:3], [own[0]]])  # items of the history's own categories
    per_candidate = hist.take(np.full(len(candidates), r))
    assert len(per_candidate) == len(candidates) and per_candidate.items.tolist() == own.tolist() * len(candidates)
    u = np.full(len(candidates), users[r])
    p_with, _ = history_world.truth(u, candidates, per_candidate)
    p_without, _ = history_world.truth(u, candidates)
    assert (p_with > p_without).all()  # a candidate that matches the recent history is played more
    assert p_with[0] == p_with[-1]  # the same candidate with the same history: the same truth
    with pytest.raises(ValueError, match="one per row"):
        history_world.truth(u, candidates, hist)


def test_a_world_without_histories_refuses_to_draw_them() -> None:
    with pytest.raises(ValueError, match="no behaviour histories"):
        build_world(2_000, seed=1).draw_histories(np.array([0]), np.random.default_rng(0))


def test_history_data_keeps_the_rates_of_data_without_it(history_frame: pd.DataFrame) -> None:
    assert 0.85 <= history_frame["played"].mean() <= 0.87
    report = oracle_report(history_frame)
    plain = oracle_report(simulate(HISTORY_ROWS, seed=3))
    for task in BINARY_TASKS:
        assert report[task]["positive_rate"] == pytest.approx(plain[task]["positive_rate"], abs=0.01), task
        assert history_frame[task].mean() == pytest.approx(history_frame[f"oracle_{task}"].mean(), abs=0.01), task
    assert report["vcr"]["mean"] == pytest.approx(0.63, abs=0.01)


def test_generate_with_history_is_byte_identical_for_a_seed(history_written: Path, tmp_path: Path) -> None:
    generate(tmp_path, rows=5_000, seed=7, progress=False, history=True)
    for name in ("train.parquet", "valid.parquet", "test.parquet", "spec.yaml"):
        assert (tmp_path / name).read_bytes() == (history_written / name).read_bytes(), name
    generate(tmp_path / "other", rows=5_000, seed=8, progress=False, history=True)
    assert (tmp_path / "other" / "train.parquet").read_bytes() != (history_written / "train.parquet").read_bytes()


def test_the_spec_names_the_lists_and_records_the_history_parameters(history_written: Path) -> None:
    raw = yaml.safe_load((history_written / "spec.yaml").read_text())
    assert [{k: f[k] for k in ("name", "side", "pooling", "max_len")} for f in raw["multi"]] == [
        {"name": "tags", "side": "item", "pooling": "mean", "max_len": 8}]
    assert [{k: f[k] for k in ("name", "share", "max_len", "pooling")} for f in raw["sequence"]] == [
        {"name": "hist_item_id", "share": "item_id", "max_len": 50, "pooling": "attention"},
        {"name": "hist_category", "share": "category", "max_len": 50, "pooling": "attention"},
    ]
    spec = FeatureSpec.load(history_written / "spec.yaml")
    assert [f.name for f in spec.lists] == list(LISTS)
    assert HistoryParams(**spec.extra["history"]) == HistoryParams()
    world = build_world(5_000, seed=7, history=HistoryParams(**spec.extra["history"]))
    assert {k: round(v, 6) for k, v in world.intercepts.items()} == spec.extra["intercepts"]


def test_cli_synth_history_writes_the_lists(tmp_path: Path) -> None:
    assert main(["synth", "--out", str(tmp_path), "--rows", "2000", "--seed", "2", "--history"]) == 0
    table = pq.read_table(tmp_path / "valid.parquet", columns=list(LISTS))
    assert table.num_rows == 200 and all(table.schema.field(n).type == pa.list_(pa.string()) for n in LISTS)
