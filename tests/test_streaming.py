"""Splits as datasets: sharded Parquet read in batches, the bounded shuffle, disjoint equal worker
shares, exact streamed evaluation, bounded vocabularies, and bad data refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from mtrank.cli import main
from mtrank.spec import DenseField, FeatureSpec, SparseField, SpecError, Task
from mtrank.training import streaming as dataset
from mtrank.training.checkpoint import load_run, partial_dir
from mtrank.training.evaluate import evaluate, evaluate_frames
from mtrank.training.frames import load_spec
from mtrank.training.streaming import SplitSource, TrainStream, fit_preprocessing, to_tensors
from mtrank.transform import VocabularyCounter

SMALL_SB = {"embedding_dim": 4, "bottom_hidden": [16], "tower_hidden": [8]}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    from mtrank.training.synth import generate

    out = tmp_path_factory.mktemp("sharded")
    generate(out, rows=6000, seed=3, progress=False, shards=3)
    return out


# A split whose one regression label is the row number: every batch says which rows it holds.
ROWS_SPEC = FeatureSpec(name="rows", dense=(DenseField("x"),), sparse=(SparseField("c"),),
                        tasks=(Task("rid", type="regression"),))


@pytest.fixture(scope="module")
def numbered(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("numbered")
    (out / "train").mkdir()
    n, start = 1003, 0
    for k, rows in enumerate((400, 350, 253)):
        rid = np.arange(start, start + rows, dtype=np.float64)
        table = pa.table({"x": rid * 0.5, "c": [f"k{i % 7}" for i in range(rows)], "rid": rid})
        pq.write_table(table, out / "train" / f"part-{k}.parquet", row_group_size=100)
        start += rows
    assert start == n
    return out


def _stream(data: Path, rank: int, world: int, seed: int = 0) -> TrainStream:
    source = SplitSource.open(data, "train", ROWS_SPEC)
    pre, _, _ = fit_preprocessing(source, ROWS_SPEC, max_vocab=None, seed=0)
    return TrainStream(source, pre, batch_size=32, shuffle_rows=128, seed=seed, rank=rank, world=world)


def _rows(stream: TrainStream, epoch: int, start: int = 0) -> list[list[int]]:
    return [b.labels[:, 0].to(int).tolist() for b in stream.batches(epoch, start)]


def test_a_directory_of_parquet_files_reads_like_one_file(sharded, tmp_path):
    from mtrank.training.synth import generate

    generate(tmp_path, rows=6000, seed=3, progress=False)
    spec = load_spec(sharded)
    source = SplitSource.open(sharded, "train", spec)
    assert len(source.files) == 3 and source.rows == 4800
    one_file = dataset.load_split(tmp_path, "train", spec)
    pd.testing.assert_frame_equal(dataset.load_split(sharded, "train", spec), one_file)


def test_a_split_is_read_one_row_group_at_a_time_with_only_the_spec_columns(numbered):
    source = SplitSource.open(numbered, "train", ROWS_SPEC)
    assert [u.rows for u in source.units] == [100, 100, 100, 100, 100, 100, 100, 50, 100, 100, 53]
    frames = list(source.frames())
    assert max(len(f) for f in frames) == 100 and sum(len(f) for f in frames) == 1003
    assert list(frames[0].columns) == ["x", "c", "rid"]


def test_two_workers_read_disjoint_equal_shares_and_take_the_same_steps(numbered):
    one = _stream(numbered, 0, 1)
    a, b = _stream(numbered, 0, 2), _stream(numbered, 1, 2)
    assert a.steps == b.steps == 16  # ceil(501 / 32), ceil(502 / 32) = 16, 16
    ra, rb = sum(_rows(a, 0), []), sum(_rows(b, 0), [])
    assert len(_rows(a, 0)) == len(_rows(b, 0)) == a.steps
    assert not set(ra) & set(rb)
    assert sorted(ra + rb) == list(range(1003)), "together the workers see every row once per epoch"
    assert sorted(sum(_rows(one, 0), [])) == list(range(1003))


def test_the_shuffle_is_seeded_bounded_and_changes_each_epoch(numbered):
    stream = _stream(numbered, 0, 1)
    first = _rows(stream, 0)
    assert first == _rows(_stream(numbered, 0, 1), 0), "same seed, same batches"
    assert first != _rows(stream, 1), "another epoch, another order"
    assert first != _rows(_stream(numbered, 0, 1, seed=1), 0)
    flat = sum(first, [])
    assert flat != sorted(flat)
    # A block of shuffle_rows (128) rows is shuffled on its own: batch i comes from block i // 4.
    for i, batch in enumerate(first[:-1]):
        block = set(flat[(i // 4) * 128 : (i // 4 + 1) * 128])
        assert set(batch) <= block


def test_a_stream_restarted_at_a_step_continues_with_the_same_batches(numbered):
    stream = _stream(numbered, 1, 2)
    full = _rows(stream, 2)
    for start in (1, 4, 5, 13):
        assert _rows(stream, 2, start) == full[start:]


def test_streamed_evaluation_equals_evaluation_of_the_whole_frame(trained_run, synth_dir):
    run = load_run(trained_run("ple"))
    frame = dataset.load_split(synth_dir, "test", run.spec)
    whole = evaluate(run.model, frame, run.preprocessor, run.outputs)
    chunks = (frame.iloc[a : a + 333] for a in range(0, len(frame), 333))
    streamed = evaluate_frames(run.model, chunks, run.preprocessor, run.outputs)
    # Forward passes over other batch sizes round differently (~1e-10): equal up to that.
    for key in ("tasks", "groups", "item_facets", "rows", "avg_auc"):
        assert _flat(streamed[key]) == pytest.approx(_flat(whole[key]), rel=1e-7, abs=1e-9), key
    for name, gate in whole["gates"].items():
        np.testing.assert_allclose(streamed["gates"][name]["mean"], gate["mean"], atol=1e-4)


def _flat(d, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    return {k: v for key, value in d.items() for k, v in _flat(value, f"{prefix}/{key}").items()}


def test_training_metrics_are_computed_on_every_test_row(trained_run, synth_dir):
    report = json.loads((trained_run("ple") / "metrics.json").read_text())
    spec = load_spec(synth_dir)
    assert report["rows"] == len(dataset.load_split(synth_dir, "test", spec))
    assert report["rows_seen"] == report["train_rows"] * report["epochs_run"] and report["workers"] == 1
    assert report["samples_per_second"] > 0


def test_the_fitted_preprocessing_of_a_stream_equals_the_whole_frames(sharded):
    from mtrank.training.features import Preprocessor

    spec = load_spec(sharded)
    streamed, labels, space = fit_preprocessing(SplitSource.open(sharded, "train", spec), spec, None, 0)
    frame = dataset.load_split(sharded, "train", spec)
    whole = Preprocessor.fit(spec, frame)
    assert streamed.vocabs == whole.vocabs
    for name, s in whole.dense_stats.items():
        assert streamed.dense_stats[name].mean == pytest.approx(s.mean, rel=1e-12)
        assert streamed.dense_stats[name].std == pytest.approx(s.std, rel=1e-12)
    t = to_tensors(frame, spec, whole)
    np.testing.assert_array_equal(labels, t.labels.numpy())  # below the sample size: every row
    np.testing.assert_array_equal(space, t.space.numpy())


def test_a_bounded_counter_is_exact_below_its_capacity_and_keeps_the_heavy_hitters():
    rng = np.random.default_rng(0)
    exact, bounded = VocabularyCounter(), VocabularyCounter(capacity=50)
    heavy = [f"h{i}" for i in range(10)]
    for _ in range(40):
        keys = heavy * 30 + [f"rare{j}" for j in rng.integers(0, 100_000, 400)]
        exact.update(keys)
        bounded.update(keys)
        assert len(bounded.counts) <= 100
    assert bounded.pruned > 0
    assert bounded.vocabulary(max_size=10) == sorted(heavy)
    assert exact.vocabulary(max_size=10) == sorted(heavy)
    small = VocabularyCounter(capacity=50)
    small.update(["a", "b", "a", "c"] * 3)
    assert small.pruned == 0 and small.vocabulary() == ["a", "b", "c"] and small.counts["a"] == 6


def test_max_vocab_keeps_the_most_frequent_keys(sharded, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": SMALL_SB, "train": {"epochs": 1, "batch_size": 512,
                                                                   "eval_train_rows": 500, "max_vocab": 20}}))
    assert main(["train", "--model", "shared_bottom", "--data", str(sharded), "--out", str(tmp_path / "run"),
                 "--config", str(config)]) == 0
    run = load_run(tmp_path / "run")
    assert max(len(v) for v in run.preprocessor.vocabs.values()) == 20
    assert len(run.preprocessor.vocabs["device"]) == 3


# -- bad data: one line naming the file, exit 2, nothing written ----------------------------


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _rewrite(path: Path, change) -> None:
    frame = pd.read_parquet(path)
    change(frame).to_parquet(path, index=False)


def _refused(data: Path, tmp_path: Path, capsys, *expected: str) -> None:
    out = tmp_path / "run"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": SMALL_SB, "train": {"epochs": 1, "batch_size": 512}}))
    code = main(["train", "--model", "shared_bottom", "--data", str(data), "--out", str(out), "--config", str(config)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("mtrank train: error: ") and "\n" not in err, err
    for part in expected:
        assert part in err, (part, err)
    assert not out.exists() and not partial_dir(out).exists(), "a refused run writes nothing"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith((".run", "run"))] == []


def test_a_shard_missing_a_column_is_refused(sharded, tmp_path, capsys):
    data = _copy(sharded, tmp_path / "data")
    _rewrite(data / "train" / "part-00001.parquet", lambda f: f.drop(columns="video_len"))
    _refused(data, tmp_path, capsys, "train/part-00001.parquet", "missing feature column 'video_len'")


def test_a_shard_with_a_wrong_dtype_is_refused(sharded, tmp_path, capsys):
    data = _copy(sharded, tmp_path / "data")
    _rewrite(data / "valid" / "part-00002.parquet",
             lambda f: f.assign(watch_minutes_30d=f["watch_minutes_30d"].astype(str)))
    _refused(data, tmp_path, capsys, "valid/part-00002.parquet", "'watch_minutes_30d'", "expected a number")


def test_an_empty_split_directory_is_refused(sharded, tmp_path, capsys):
    data = _copy(sharded, tmp_path / "data")
    for f in (data / "test").iterdir():
        f.unlink()
    _refused(data, tmp_path, capsys, "test: no Parquet files")


@pytest.mark.parametrize(
    ("split", "column", "value", "expected"),
    [("train", "like", 2, "binary label 'like' of task 'like' has values other than 0/1"),
     ("test", "played", 3, "space column 'played' must be 0/1"),
     ("valid", "vcr", np.nan, "label 'vcr' of task 'vcr' is NaN inside its space 'played'")],
    ids=["binary-label-2", "space-3", "regression-nan-in-space"],
)
def test_a_label_outside_its_type_is_refused(sharded, tmp_path, capsys, split, column, value, expected):
    data = _copy(sharded, tmp_path / "data")
    path = data / split / "part-00002.parquet"

    def change(f: pd.DataFrame) -> pd.DataFrame:
        row = int(np.flatnonzero(f["played"].to_numpy() == 1)[-1])
        f[column] = f[column].astype(np.float64)
        f.loc[row, column] = value
        return f

    _rewrite(path, change)
    _refused(data, tmp_path, capsys, f"{split}/part-00002.parquet", expected)


def test_an_unreadable_file_is_refused(sharded, tmp_path, capsys):
    data = _copy(sharded, tmp_path / "data")
    (data / "train" / "part-00000.parquet").write_bytes(b"not parquet")
    _refused(data, tmp_path, capsys, "train/part-00000.parquet", "not a readable Parquet file")


def test_check_reports_the_row_in_the_file(sharded, tmp_path):
    data = _copy(sharded, tmp_path / "data")
    _rewrite(data / "test" / "part-00001.parquet", lambda f: f.assign(finish=np.where(np.arange(len(f)) == 77, 5, 0)))
    with pytest.raises(SpecError, match=r"part-00001.parquet: binary label 'finish'.*first row 77: 5"):
        SplitSource.open(data, "test", load_spec(data)).check()
