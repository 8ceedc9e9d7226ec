"""Export: ONNX graphs equal the PyTorch model, tables equal its embeddings, versions appear atomically."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from mtrank.cli import main as cli_main
from mtrank.export import exporter
from mtrank.export.exporter import ParityError, export_run
from mtrank.manifest import (
    ALL_GROUPS,
    DENSE_INPUT,
    EMB_PREFIX,
    IDS_INPUT,
    REQUEST_INDEX_INPUT,
    USER_DENSE_INPUT,
    USER_IDS_INPUT,
    Manifest,
    ManifestError,
    emb_input,
    list_versions,
    load_manifest,
    open_vectors,
    read_ids,
    version_dir,
)
from mtrank.spec import DenseField, FeatureSpec, SparseField, Task
from mtrank.training.checkpoint import load_run, save_run
from mtrank.training.features import DenseStats, Preprocessor
from mtrank.training.models.registry import create_model, make_config, model_names

MODELS = model_names()
BATCH_SIZES = (1, 7, 1024)


def serving_feeds(manifest: Manifest, vdir: Path, dense: np.ndarray, sparse: np.ndarray,
                  key: str | None = None) -> dict[str, np.ndarray]:
    """Graph inputs of preprocessed rows, each its own request, built from the manifest and the
    table files only (single-valued fields; list fields have their own tests)."""
    n = len(dense)
    graph = manifest.graphs[key or next(iter(manifest.graphs))]
    dense_side = [d.side for d in manifest.dense]
    graph_cols = [(j, f.side) for j, f in enumerate(manifest.sparse) if f.location == "graph"]
    feeds = {}
    for tensor in graph.inputs:
        name = tensor.name
        if name == REQUEST_INDEX_INPUT:
            feeds[name] = np.arange(n, dtype=np.int64)
        elif name in (DENSE_INPUT, USER_DENSE_INPUT):
            side = "item" if name == DENSE_INPUT else "user"
            feeds[name] = dense[:, [j for j, s in enumerate(dense_side) if s == side]]
        elif name in (IDS_INPUT, USER_IDS_INPUT):
            side = "item" if name == IDS_INPUT else "user"
            feeds[name] = sparse[:, [j for j, s in graph_cols if s == side]]
        elif name.startswith(EMB_PREFIX):
            j = next(j for j, f in enumerate(manifest.sparse) if emb_input(f.name) == name)
            vectors = np.asarray(open_vectors(vdir / manifest.tables[manifest.sparse[j].name].vectors_file))
            feeds[name] = vectors[sparse[:, j]]
    return feeds


def random_rows(shape, n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    dense = rng.standard_normal((n, shape.n_dense)).astype(np.float32)
    sparse = np.stack([rng.integers(0, v, n) for v in shape.vocab_sizes], axis=1).astype(np.int64)
    return dense, sparse


def untrained_run(run_dir: Path, kind: str = "mmoe", graph_fields: bool = True) -> Path:
    """A run directory with random weights and no data directory: exports in seconds."""
    sparse = [SparseField("user_id", side="user", location="store"), SparseField("item_id", location="store")]
    if graph_fields:
        sparse.insert(1, SparseField("device", side="user"))
    spec = FeatureSpec(
        name="tiny",
        dense=(DenseField("age", side="user", transform="log1p"), DenseField("video_len")),
        sparse=tuple(sparse),
        tasks=(Task("vtr"), Task("vcr", type="regression")),
    )
    vocabs = {f.name: [f"{f.name}-{i}" for i in range(5 if f.location == "graph" else 40)] for f in spec.sparse}
    pre = Preprocessor(spec, {f.name: DenseStats(mean=1.0, std=2.0) for f in spec.dense}, vocabs)
    config = make_config(kind, {"embedding_dim": 4})
    torch.manual_seed(0)
    model = create_model(kind, spec, pre.shape, config)
    save_run(run_dir, model, pre, {"model_config": dataclasses.asdict(config), "data": str(run_dir / "gone")})
    return run_dir


@pytest.mark.parametrize("model", MODELS)
def test_onnx_runtime_matches_pytorch_at_batch_sizes_1_7_1024(model, trained_run, exported_repo):
    torch_model = load_run(trained_run(model)).model
    vdir = version_dir(exported_repo(model), model)
    manifest = load_manifest(vdir)
    dense, sparse = random_rows(torch_model.shape, max(BATCH_SIZES))
    for key, graph in manifest.graphs.items():
        session = ort.InferenceSession(str(vdir / graph.file), providers=["CPUExecutionProvider"])
        group = None if key == ALL_GROUPS else key
        for b in BATCH_SIZES:
            got = session.run(graph.tasks, serving_feeds(manifest, vdir, dense[:b], sparse[:b]))
            with torch.no_grad():
                expected = torch.sigmoid(torch_model(torch.from_numpy(dense[:b]), torch.from_numpy(sparse[:b]), group))
            for k, task in enumerate(graph.tasks):
                diff = np.abs(got[k] - expected[:, k].numpy()).max()
                assert diff <= 1e-5, f"{model} graph {key} output {task} batch {b}: max abs diff {diff}"


@pytest.mark.parametrize("model", MODELS)
def test_graphs_have_the_manifest_interface_and_a_dynamic_batch_axis(model, trained_run, exported_repo):
    torch_model = load_run(trained_run(model)).model
    vdir = version_dir(exported_repo(model), model)
    manifest = load_manifest(vdir)
    assert sorted(manifest.graphs) == sorted(torch_model.groups or [ALL_GROUPS])
    for key, graph in manifest.graphs.items():
        proto = onnx.load(vdir / graph.file)
        onnx.checker.check_model(proto, full_check=True)
        assert [i.name for i in proto.graph.input] == [t.name for t in graph.inputs]
        assert [o.name for o in proto.graph.output] == graph.tasks == [t.name for t in graph.outputs]
        # A group's graph computes that group's heads only.
        group = None if key == ALL_GROUPS else key
        assert graph.tasks == [h.task for h in torch_model.group_heads(group)]
        axes = {t.name: t.shape[0] for t in [*graph.inputs, *graph.outputs]}
        assert {a for n, a in axes.items() if n in graph.tasks} == {"batch"}
        for value in [*proto.graph.input, *proto.graph.output]:
            assert value.type.tensor_type.shape.dim[0].dim_param == axes[value.name], value.name
        np_dtype = onnx.helper.tensor_dtype_to_np_dtype
        assert {i.name: np_dtype(i.type.tensor_type.elem_type).name for i in proto.graph.input} == {
            t.name: t.dtype for t in graph.inputs
        }
        assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}, "offline optimisation left provider ops"


@pytest.mark.parametrize("model", MODELS)
def test_manifest_records_parity_within_tolerance(model, exported_repo):
    manifest = load_manifest(version_dir(exported_repo(model), model))
    assert manifest.parity["batch_sizes"] == list(BATCH_SIZES)
    assert set(manifest.parity["max_abs_diff"]) == set(manifest.graphs)
    for key, by_precision in manifest.parity["max_abs_diff"].items():
        assert set(by_precision["fp32"]) == set(manifest.graphs[key].tasks)
        assert max(by_precision["fp32"].values()) <= 1e-5


@pytest.mark.parametrize("model", MODELS)
def test_store_tables_and_vocabularies_are_the_runs(model, trained_run, exported_repo):
    run = load_run(trained_run(model))
    vdir = version_dir(exported_repo(model), model)
    manifest = load_manifest(vdir)
    for j, f in enumerate(run.spec.sparse):
        info = next(s for s in manifest.sparse if s.name == f.name)
        if f.location == "graph":
            assert info.vocab == run.preprocessor.vocabs[f.name]
            continue
        table = manifest.tables[f.name]
        assert read_ids(vdir / table.ids_file) == run.preprocessor.vocabs[f.name]
        weights = run.model.embeddings.tables[j].weight.detach().numpy()
        np.testing.assert_array_equal(open_vectors(vdir / table.vectors_file), weights)
        assert table.views == run.model.field_view_names(j)
        assert (table.rows, table.width) == weights.shape
    assert [(d.name, d.mean, d.std) for d in manifest.dense] == [
        (f.name, run.preprocessor.dense_stats[f.name].mean, run.preprocessor.dense_stats[f.name].std)
        for f in run.spec.dense
    ]


def test_fp16_variant_stays_within_1e_2_and_keeps_float32_io(trained_run, tmp_path):
    vdir = export_run(trained_run("ple"), tmp_path, fp16=True, progress=False)
    manifest = load_manifest(vdir)
    graph = manifest.graphs[ALL_GROUPS]
    proto = onnx.load(vdir / graph.fp16_file)
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer)
    assert {i.type.tensor_type.elem_type for i in [*proto.graph.input, *proto.graph.output]} <= {
        onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    }
    assert 0 < max(manifest.parity["max_abs_diff"][ALL_GROUPS]["fp16"].values()) <= 1e-2
    shape = load_run(trained_run("ple")).model.shape
    feeds = serving_feeds(manifest, vdir, *random_rows(shape, 1024))
    full = ort.InferenceSession(str(vdir / graph.file), providers=["CPUExecutionProvider"]).run(None, feeds)
    half = ort.InferenceSession(str(vdir / graph.fp16_file), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert max(float(np.abs(a - b).max()) for a, b in zip(full, half, strict=True)) <= 1e-2


def test_a_graph_with_one_flipped_byte_is_refused(exported_repo, tmp_path):
    vdir = shutil.copytree(version_dir(exported_repo("ple"), "ple"), tmp_path / "ple" / "1")
    graph = vdir / load_manifest(vdir).graphs[ALL_GROUPS].file
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0x01
    graph.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="checksum mismatch for graph_all.onnx"):
        load_manifest(vdir)


def test_a_truncated_table_is_refused(exported_repo, tmp_path):
    vdir = shutil.copytree(version_dir(exported_repo("ple"), "ple"), tmp_path / "ple" / "1")
    table = next(iter(load_manifest(vdir).tables.values()))
    path = vdir / table.vectors_file
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(ManifestError, match=f"checksum mismatch for {table.vectors_file}"):
        load_manifest(vdir)


def test_a_parity_failure_names_graph_and_output_and_writes_nothing(tmp_path, monkeypatch):
    run = untrained_run(tmp_path / "run")
    monkeypatch.setattr(exporter, "FP32_TOLERANCE", -1.0)
    with pytest.raises(ParityError, match=r"graph 'all' \(fp32\): output 'vtr' differs from PyTorch by"):
        export_run(run, tmp_path / "repo", name="tiny", progress=False)
    assert list((tmp_path / "repo" / "tiny").iterdir()) == []


def test_an_export_racing_another_takes_the_next_version(tmp_path, monkeypatch):
    run, repo = untrained_run(tmp_path / "run"), tmp_path / "repo"
    first = export_run(run, repo, name="tiny", progress=False)
    real_next = exporter._next_version

    def concurrent_export_publishes_2(model_dir: Path) -> int:
        n = real_next(model_dir)
        if n == 2:
            shutil.copytree(first, model_dir / "2")  # lands between our numbering and our rename
        return n

    monkeypatch.setattr(exporter, "_next_version", concurrent_export_publishes_2)
    third = export_run(run, repo, name="tiny", progress=False)
    assert third == repo / "tiny" / "3"
    assert list_versions(repo, "tiny") == [1, 2, 3]
    assert load_manifest(third).version == 3
    assert not list((repo / "tiny").glob(".tmp-*"))


def test_a_model_without_graph_fields_has_no_ids_input(tmp_path):
    vdir = export_run(untrained_run(tmp_path / "run", graph_fields=False), tmp_path / "repo", progress=False)
    manifest = load_manifest(vdir)
    inputs = [t.name for t in manifest.graphs[ALL_GROUPS].inputs]
    assert inputs == [REQUEST_INDEX_INPUT, DENSE_INPUT, USER_DENSE_INPUT, emb_input("user_id"), emb_input("item_id")]
    assert manifest.parity["rows"] == "random"  # the run's data directory no longer exists


def test_cli_export_writes_the_next_version(tmp_path, capsys):
    run = untrained_run(tmp_path / "run", kind="shared_bottom")
    assert cli_main(["export", "--run", str(run), "--repo", str(tmp_path / "repo"), "--name", "sb"]) == 0
    assert f"wrote {tmp_path / 'repo' / 'sb' / '1'}" in capsys.readouterr().out
    assert load_manifest(tmp_path / "repo" / "sb" / "1").kind == "shared_bottom"
