"""Run directory → model repository version: ONNX graphs, embedding tables and a manifest.

``export_run`` builds everything in ``REPO/<name>/.tmp-<uuid>/``, checks every graph against the
PyTorch model, and only then renames the directory to ``REPO/<name>/<next version>/``: a version
appears complete or not at all.

Exporter choice: the TorchScript exporter (``dynamo=False``) with ``dynamic_axes``. The dynamo
exporter (torch.export) matched PyTorch just as exactly (~6e-8) but took 3–10 s per PLE graph and
86 s for the three MFH group graphs against 6 s here (2 busy shared cores), which every export, the
demo and every test run would pay. Tracing's risk, a shape baked in from the example, is covered
twice: every input and output must keep the symbolic ``batch`` axis, and parity runs at batch
sizes 1, 7 and 1024. torch is pinned (2.13), so the deprecation does not bite before a planned
upgrade; switching is a change to :func:`_to_onnx` only.
"""

from __future__ import annotations

import errno
import io
import os
import re
import shutil
import sys
import uuid
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from mtrank.export.tables import write_table
from mtrank.manifest import (
    ALL_GROUPS,
    DENSE_INPUT,
    IDS_INPUT,
    ITEM_FACET_INPUT,
    DenseInfo,
    GraphInfo,
    Manifest,
    SparseInfo,
    TableInfo,
    TensorInfo,
    emb_input,
    facet_dict,
    open_vectors,
    write_manifest,
)
from mtrank.training.checkpoint import Run, fsync_dir, load_run
from mtrank.training.models.base import MultiTaskModel
from mtrank.training.outputs import OutputLayer

FP32_TOLERANCE = 1e-5
"""Max abs difference between ONNX Runtime and PyTorch outputs (label units), fp32 graphs."""
FP16_TOLERANCE = 1e-2
PARITY_BATCH_SIZES = (1, 7, 1024)
PARITY_SEED = 0
OPSET = 17
"""Plain ONNX ops these models need all exist at 17, which every ONNX Runtime since 1.13 runs."""
# BASIC: ORT's semantics-preserving rewrites (constant folding, redundant-node elimination, plain
# ONNX fusions), which its docs say run before graph partitioning and so hold for every execution
# provider. EXTENDED runs after partitioning and fuses for the provider it ran with: produced on
# CPU it already emits com.microsoft FusedGemm (Gemm+Relu, a CPU-provider fusion) here, which
# ties the file to the CPU provider. The service's own session adds its provider's fusions at load.
OFFLINE_OPTIMIZATION = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
"""Model and store-field names: directory and file names, and parts of Redis hash tags."""


class ParityError(ValueError):
    """ONNX Runtime and PyTorch disagree beyond tolerance; nothing was written."""


class ServingGraph(nn.Module):
    """The served computation of one user group: inputs as the manifest names them, label units out.

    ``forward(dense, [ids], *store_vectors, [item_facet])``: graph-held fields are looked up with the
    model's own tables, store-held fields arrive as vectors; a three-facet model also takes each
    row's item-facet value index and picks the head of the row's item value. One ``[B]`` output per
    task, in spec task order: a probability for binary tasks, label units for regression tasks.
    """

    def __init__(
        self,
        model: MultiTaskModel,
        outputs: OutputLayer,
        group: str | None,
        graph_fields: list[int],
        store_fields: list[int],
    ):
        super().__init__()
        self.model = model
        self.outputs = outputs
        self.group = group
        self.graph_fields = graph_fields
        self.store_fields = store_fields

    def forward(self, dense: torch.Tensor, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        vectors: list[torch.Tensor | None] = [None] * self.model.n_fields
        item = None
        if self.model.uses_item_facet:
            *inputs, item = inputs
        if self.graph_fields:
            ids, *inputs = inputs
            for col, j in enumerate(self.graph_fields):
                vectors[j] = self.model.embeddings.tables[j](ids[:, col])
        for j, v in zip(self.store_fields, inputs, strict=True):
            vectors[j] = v
        logits = self.model.forward_embedded(dense, vectors, group=self.group)
        values = self.outputs(self.model.group_task_logits(logits, self.group, item))
        return tuple(values[:, k] for k in range(values.shape[1]))


def export_run(
    run_dir: str | Path, repo: str | Path, name: str | None = None, fp16: bool = False, progress: bool = True
) -> Path:
    """Export a trained run as the next version of model ``name`` (default: the model kind) in ``repo``.

    Returns the version directory. Raises :class:`ParityError` (and writes nothing) when ONNX
    Runtime does not reproduce the PyTorch model within tolerance.
    """
    run = load_run(run_dir)
    name = name or run.meta["model"]
    _check_name("model name", name)
    model_dir = Path(repo) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = model_dir / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        manifest = _build_version(run, Path(run_dir), name, tmp, fp16, progress)
        final = _publish(tmp, model_dir, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _build_version(run: Run, run_dir: Path, name: str, out: Path, fp16: bool, progress: bool) -> Manifest:
    model, spec, pre = run.model, run.spec, run.preprocessor
    graph_fields = [j for j, f in enumerate(spec.sparse) if f.location == "graph"]
    store_fields = [j for j, f in enumerate(spec.sparse) if f.location == "store"]

    tables: dict[str, TableInfo] = {}
    for j in store_fields:
        field = spec.sparse[j].name
        _check_name("store field", field)
        weights = model.embeddings.tables[j].weight.detach().cpu().numpy()
        views = model.field_view_names(j)
        tables[field] = write_table(out, field, pre.vocabs[field], weights, model.embedding_dim, views)
    _say(progress, f"export: wrote {len(tables)} store tables ({', '.join(tables) or 'none'})")

    dense, sparse, item, rows_source = _parity_rows(run)
    feeds = {DENSE_INPUT: dense}
    if graph_fields:
        feeds[IDS_INPUT] = sparse[:, graph_fields]
    for j in store_fields:
        field = spec.sparse[j].name
        feeds[emb_input(field)] = np.asarray(open_vectors(out / tables[field].vectors_file))[sparse[:, j]]
    if model.uses_item_facet:
        feeds[ITEM_FACET_INPUT] = item

    graphs: dict[str, GraphInfo] = {}
    parity: dict[str, Any] = {}
    for group in model.groups or [None]:
        key = group or ALL_GROUPS
        module = ServingGraph(model, OutputLayer(run.outputs), group, graph_fields, store_fields).eval()
        graphs[key], parity[key] = _export_graph(module, key, out, feeds, sparse, item, fp16)
        worst = {p: max(d.values()) for p, d in parity[key].items()}
        _say(progress, f"export: graph {key!r} ok, max abs diff " + ", ".join(f"{p} {v:.2g}" for p, v in worst.items()))

    meta = run.meta
    return Manifest(
        name=name,
        kind=meta["model"],
        version=0,
        tasks=[
            {
                "name": t.name,
                "type": t.type,
                "behaviour": t.behaviour_name,
                "output": o.output,
                "fusion_range": list(o.fusion_range),
            }
            for t, o in zip(spec.tasks, run.outputs, strict=True)
        ],
        dense=[
            DenseInfo(f.name, f.side, f.transform, pre.dense_stats[f.name].mean, pre.dense_stats[f.name].std, f.default)
            for f in spec.dense
        ],
        sparse=[
            SparseInfo(f.name, f.side, f.location, list(pre.vocabs[f.name]) if f.location == "graph" else None)
            for f in spec.sparse
        ],
        graphs=graphs,
        tables=tables,
        user_groups=facet_dict(spec.user_groups),
        item_facet=facet_dict(spec.item_facet),
        parity={
            "rows": rows_source,
            "batch_sizes": list(PARITY_BATCH_SIZES),
            "tolerance": {"fp32": FP32_TOLERANCE, "fp16": FP16_TOLERANCE},
            "max_abs_diff": parity,
        },
        source={
            "run": str(run_dir.resolve()),
            "config_hash": meta.get("config_hash"),
            "model_config": meta.get("model_config"),
            "data": meta.get("data"),
            "exporter": f"torch {torch.__version__} torch.onnx (TorchScript), opset {OPSET}",
            "offline_optimization": f"onnxruntime {ort.__version__} {OFFLINE_OPTIMIZATION.name}",
        },
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def _export_graph(
    module: ServingGraph,
    key: str,
    out: Path,
    feeds: dict[str, np.ndarray],
    sparse: np.ndarray,
    item: np.ndarray,
    fp16: bool,
) -> tuple[GraphInfo, dict[str, dict[str, float]]]:
    """Write ``graph_<key>.onnx`` (and its fp16 variant) after checking them against PyTorch.

    Returns the graph's manifest entry and its max abs diff per precision and output.
    """
    tasks = module.model.spec.task_names
    reference = _torch_reference(module, feeds[DENSE_INPUT], sparse, item)
    graph_file = f"graph_{key}.onnx"
    served = _optimise_offline(_to_onnx(module, feeds, tasks), out / graph_file)
    diffs = {"fp32": _check_parity(out / graph_file, feeds, reference, tasks, key, "fp32", FP32_TOLERANCE)}
    fp16_file = None
    if fp16:
        fp16_file = f"graph_{key}.fp16.onnx"
        onnx.save(_to_fp16(served), out / fp16_file)
        diffs["fp16"] = _check_parity(out / fp16_file, feeds, reference, tasks, key, "fp16", FP16_TOLERANCE)
    info = GraphInfo(
        file=graph_file,
        inputs=[TensorInfo(n, str(a.dtype), ["batch", *a.shape[1:]]) for n, a in feeds.items()],
        outputs=[TensorInfo(t, "float32", ["batch"]) for t in tasks],
        tasks=tasks,
        fp16_file=fp16_file,
    )
    return info, diffs


def _parity_rows(run: Run) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """``max(PARITY_BATCH_SIZES)`` preprocessed rows (dense, sparse, item-facet index): the run's
    test split, or random valid inputs."""
    n = max(PARITY_BATCH_SIZES)
    spec = run.spec
    n_items = len(spec.item_facet.values) if spec.item_facet is not None else 1
    data_dir = Path(run.meta["data"]) if run.meta.get("data") else None
    if data_dir is not None and data_dir.is_dir():
        from mtrank.training.streaming import facet_codes, load_split

        frame = load_split(data_dir, "test", spec)
        if len(frame):
            rows = frame.iloc[:n]
            dense, sparse = run.preprocessor.transform(rows)
            item = facet_codes(rows, spec.item_facet) if spec.item_facet is not None else np.zeros(len(rows), np.int64)
            take = np.arange(n) % len(dense)
            return dense[take], sparse[take], item[take], f"test split of {data_dir}"
    rng = np.random.default_rng(PARITY_SEED)
    dense = rng.standard_normal((n, run.model.shape.n_dense)).astype(np.float32)
    sparse = np.zeros((n, len(run.model.shape.vocab_sizes)), dtype=np.int64)
    for j, vocab_size in enumerate(run.model.shape.vocab_sizes):
        sparse[:, j] = rng.integers(0, vocab_size, n)
    return dense, sparse, rng.integers(0, n_items, n).astype(np.int64), "random"


@torch.no_grad()
def _torch_reference(
    module: ServingGraph, dense: np.ndarray, sparse: np.ndarray, item: np.ndarray
) -> dict[int, np.ndarray]:
    """The PyTorch model's outputs ``[b, n_tasks]`` (label units) on the first ``b`` rows, per parity
    batch size: the model's own lookup of every field, not the serving graph's inputs."""
    model, group = module.model, module.group
    out = {}
    for b in PARITY_BATCH_SIZES:
        logits = model(torch.from_numpy(dense[:b]), torch.from_numpy(sparse[:b]), group=group)
        row_item = torch.from_numpy(item[:b]) if model.uses_item_facet else None
        out[b] = module.outputs(model.group_task_logits(logits, group, row_item)).numpy()
    return out


def _to_onnx(module: ServingGraph, feeds: dict[str, np.ndarray], output_names: list[str]) -> onnx.ModelProto:
    # Four example rows: a batch of 1 could hide a broadcast that only works for one row.
    example = tuple(torch.from_numpy(np.ascontiguousarray(a[:4])) for a in feeds.values())
    names = list(feeds)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated; this module's docstring says why it is used anyway.
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", message=".*feature will be removed")
        torch.onnx.export(
            module,
            example,
            buffer,
            dynamo=False,
            input_names=names,
            output_names=output_names,
            dynamic_axes={n: {0: "batch"} for n in names + output_names},
            opset_version=OPSET,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(proto, full_check=True)
    for value in [*proto.graph.input, *proto.graph.output]:
        if value.type.tensor_type.shape.dim[0].dim_param != "batch":
            raise ValueError(f"exported graph: {value.name!r} lost its dynamic batch axis")
    return proto


def _optimise_offline(proto: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    """Save ORT's BASIC-optimised version of ``proto`` at ``path``; checked like the export."""
    options = ort.SessionOptions()
    options.graph_optimization_level = OFFLINE_OPTIMIZATION
    options.optimized_model_filepath = str(path)
    options.intra_op_num_threads = 1
    ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    served = onnx.load(path)
    onnx.checker.check_model(served, full_check=True)
    return served


def _to_fp16(served: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights and arithmetic, float32 inputs and outputs (same interface as the fp32 graph).

    Converted from the optimised fp32 graph and not optimised again: ORT on CPU would inline fp16
    ops it has no kernel for (Softmax) and bake that into the file.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    half = OnnxModel(convert_float_to_float16(served, keep_io_types=True))
    half.topological_sort()  # the converter appends its Cast nodes at the end of the graph
    onnx.checker.check_model(half.model, full_check=True)
    return half.model


def _check_parity(
    path: Path,
    feeds: dict[str, np.ndarray],
    reference: dict[int, np.ndarray],
    tasks: list[str],
    key: str,
    precision: str,
    tolerance: float,
) -> dict[str, float]:
    """Max abs diff per output over the parity batch sizes; :class:`ParityError` beyond ``tolerance``."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    worst = dict.fromkeys(tasks, 0.0)
    for b, expected in reference.items():
        got = session.run(tasks, {n: a[:b] for n, a in feeds.items()})
        for k, task in enumerate(tasks):
            if got[k].shape != (b,):
                raise ParityError(
                    f"graph {key!r} ({precision}): output {task!r} has shape {got[k].shape}, expected ({b},)"
                )
            diff = float(np.max(np.abs(got[k].astype(np.float64) - expected[:, k])))
            if not diff <= tolerance:
                raise ParityError(
                    f"graph {key!r} ({precision}): output {task!r} differs from PyTorch by {diff:.3g} "
                    f"(tolerance {tolerance:g}) at batch size {b}; nothing written"
                )
            worst[task] = max(worst[task], diff)
    return worst


def _publish(tmp: Path, model_dir: Path, manifest: Manifest) -> Path:
    """Rename ``tmp`` to the next free version; a concurrent export taking the number moves us on."""
    while True:
        manifest.version = _next_version(model_dir)
        write_manifest(tmp, manifest)
        _fsync_tree(tmp)
        target = model_dir / str(manifest.version)
        try:
            os.rename(tmp, target)
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                continue
            raise
        fsync_dir(model_dir)
        return target


def _next_version(model_dir: Path) -> int:
    # Every numeric directory counts, complete or not, so a number is never reused.
    taken = [int(p.name) for p in model_dir.iterdir() if p.name.isdigit()]
    return max(taken, default=0) + 1


def _fsync_tree(root: Path) -> None:
    """Flush file contents before the rename publishes them (a crash must not leave a torn version)."""
    for p in root.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(root)


def _check_name(what: str, name: str) -> None:
    if not _NAME_RE.match(name):
        raise ValueError(f"{what} {name!r} must match {_NAME_RE.pattern} (it names files and Redis keys)")


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)
