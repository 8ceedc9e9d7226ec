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
import pandas as pd
import torch
from torch import nn

from mtrank import kinds
from mtrank.export.tables import write_table
from mtrank.kinds.base import GraphInput
from mtrank.manifest import (
    ALL_GROUPS,
    BATCH_AXIS,
    REQUEST_INDEX_INPUT,
    DenseInfo,
    GraphInfo,
    ListInfo,
    Manifest,
    SparseInfo,
    TableInfo,
    TensorInfo,
    facet_dict,
    open_vectors,
    write_manifest,
)
from mtrank.training.checkpoint import Run, fsync_dir, load_run
from mtrank.training.models.base import MultiTaskModel
from mtrank.training.outputs import OutputLayer
from mtrank.training.streaming import facet_codes
from mtrank.transform import Vocabulary

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
    """The served computation of one user group: inputs as :func:`mtrank.kinds.graph_inputs` lists
    them, label units out.

    Each input is handled by its role: ``dense`` columns go back to spec order, graph-table ``ids``
    are looked up with the model's own tables, store ``vectors`` arrive as they are, list fields
    are embedded (or arrive as entry vectors) and pooled by the model's shared input layer. Inputs
    on the ``requests`` axis are gathered to rows with ``request_index``; a user-side list pooled
    without attention is pooled once per request before the gather. A three-facet model also takes
    each row's item-facet index and picks the head of the row's item value. One ``[B]`` output per
    task, in spec task order.
    """

    def __init__(self, model: MultiTaskModel, outputs: OutputLayer, group: str | None, inputs: list[GraphInput]):
        super().__init__()
        self.model = model
        self.outputs = outputs
        self.group = group
        self.inputs = inputs
        spec = model.spec
        dense_names = [d.name for d in spec.dense]
        fed = [f for i in inputs if i.role == "dense" for f in i.fields]
        self.register_buffer("dense_order", torch.tensor([fed.index(n) for n in dense_names], dtype=torch.int64),
                             persistent=False)
        self.sparse_index = {f.name: j for j, f in enumerate(spec.sparse)}
        self.list_index = {f.name: k for k, f in enumerate(spec.lists)}

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = {i.name: t for i, t in zip(self.inputs, tensors, strict=True)}
        index = x.get(REQUEST_INDEX_INPUT)

        def rows(i: GraphInput, t: torch.Tensor) -> torch.Tensor:
            return t.index_select(0, index) if i.per_request else t

        model = self.model
        dense_parts, item = [], None
        vectors: list[torch.Tensor | None] = [None] * model.n_fields
        lists: dict[int, tuple[GraphInput, torch.Tensor]] = {}
        lengths: dict[int, torch.Tensor] = {}
        for i in self.inputs:
            t = x[i.name]
            if i.role == "dense":
                dense_parts.append(rows(i, t))
            elif i.role == "ids":
                for col, name in enumerate(i.fields):
                    j = self.sparse_index[name]
                    vectors[j] = rows(i, model.embeddings.tables[j](t[:, col]))
            elif i.role == "vectors":
                vectors[self.sparse_index[i.fields[0]]] = rows(i, t)
            elif i.role in ("list_ids", "list_vectors"):
                k = self.list_index[i.fields[0]]
                lists[k] = (i, model.list_table(k)(t) if i.role == "list_ids" else t)
            elif i.role == "list_len":
                lengths[self.list_index[i.fields[0]]] = t
            elif i.role == "item_facet":
                item = t
        if dense_parts:
            dense = torch.cat(dense_parts, dim=1).index_select(1, self.dense_order)
        else:
            dense = torch.zeros(tensors[0].shape[0], 0)  # no dense field: the first input is per row
        pooled = []
        for k, x_list in enumerate(model.shape.lists):
            i, entries = lists[k]
            if i.per_request and x_list.pooling != "attention":
                pooled.append(rows(i, model.pool_list(k, entries, lengths[k], [])))
            else:
                pooled.append(model.pool_list(k, rows(i, entries), rows(i, lengths[k]), vectors))
        logits = model.forward_embedded(dense, vectors + pooled, group=self.group)
        values = self.outputs(model.group_task_logits(logits, self.group, item))
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
    tables: dict[str, TableInfo] = {}
    for j, f in enumerate(spec.sparse):
        if f.location == "store":
            _check_name("store field", f.name)
            weights = model.embeddings.tables[j].weight.detach().cpu().numpy()
            tables[f.name] = write_table(out, f.name, pre.vocabs[f.name], weights, model.embedding_dim,
                                         model.field_view_names(j))
    _say(progress, f"export: wrote {len(tables)} store tables ({', '.join(tables) or 'none'})")

    transform = pre.feature_transform
    inputs = kinds.graph_inputs(transform, {k: t.width for k, t in tables.items()}, model.uses_item_facet)
    frame, grouped, rows_source = _parity_rows(run)
    feeds = _feeds(transform, inputs, grouped, out, tables)
    dense, sparse = pre.transform(frame)
    item = facet_codes(frame, spec.item_facet) if spec.item_facet is not None else np.zeros(len(frame), np.int64)

    graphs: dict[str, GraphInfo] = {}
    parity: dict[str, Any] = {}
    for group in model.groups or [None]:
        key = group or ALL_GROUPS
        module = ServingGraph(model, OutputLayer(run.outputs), group, inputs).eval()
        graphs[key], parity[key] = _export_graph(module, key, out, feeds, (dense, sparse, item), fp16)
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
        lists=[
            ListInfo(f.name, f.kind, f.side, f.max_len, f.pooling, f.share, f.location,
                     None if f.share else list(pre.vocabs[f.name]))
            for f in transform.lists
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
    rows: tuple[np.ndarray, np.ndarray, np.ndarray],
    fp16: bool,
) -> tuple[GraphInfo, dict[str, dict[str, float]]]:
    """Write ``graph_<key>.onnx`` (and its fp16 variant) after checking them against PyTorch.

    ``rows``: the parity rows as the model reads them (dense, packed ids, item-facet index).
    Returns the graph's manifest entry and its max abs diff per precision and output.
    """
    tasks = module.model.spec.task_names
    reference = _torch_reference(module, *rows)
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
        inputs=[TensorInfo(i.name, i.dtype, i.shape) for i in module.inputs],
        outputs=[TensorInfo(t, "float32", [BATCH_AXIS]) for t in tasks],
        tasks=tasks,
        fp16_file=fp16_file,
    )
    return info, diffs


REQUEST_ROWS = 4
"""Parity rows per request: rows ``4r .. 4r + 3`` share request ``r``'s user side, so the graphs'
gather by ``request_index`` is checked on requests of several candidates."""


def _parity_rows(run: Run) -> tuple[pd.DataFrame, kinds.Rows, str]:
    """``max(PARITY_BATCH_SIZES)`` raw rows (the run's test split, or random valid values) with each
    row's user side replaced by its request's (:data:`REQUEST_ROWS`), and the same rows as requests."""
    n = max(PARITY_BATCH_SIZES)
    spec = run.spec
    data_dir = Path(run.meta["data"]) if run.meta.get("data") else None
    frame, source = None, "random"
    if data_dir is not None and data_dir.is_dir():
        from mtrank.training.streaming import load_split

        test = load_split(data_dir, "test", spec)
        if len(test):
            frame, source = test.iloc[np.arange(n) % len(test)].reset_index(drop=True), f"test split of {data_dir}"
    if frame is None:
        frame = run.preprocessor.random_rows(n, np.random.default_rng(PARITY_SEED))
    index = np.arange(n, dtype=np.int64) // REQUEST_ROWS
    user = [f.name for f in (*spec.dense, *spec.sparse, *spec.lists) if f.side == "user"]
    frame[user] = frame[user].iloc[index * REQUEST_ROWS].reset_index(drop=True)
    columns = {c: frame[c].to_numpy() for c in frame.columns}
    first = {c: v[::REQUEST_ROWS] for c, v in columns.items()}
    grouped = kinds.Rows(columns, first, n, len(first[next(iter(first))]), index)
    return frame, grouped, source


def _feeds(transform, inputs: list[kinds.GraphInput], rows: kinds.Rows, out: Path,
           tables: dict[str, TableInfo]) -> dict[str, np.ndarray]:
    """The graphs' inputs for ``rows`` through the shared transform, store vectors read from the
    tables just written (as the in-process store reads them)."""
    wanted = {i.name: i for i in inputs}
    feed = kinds.feed(transform, rows, wanted)
    found = {}
    for need in feed.needs:
        table = tables[need.table]
        ids = (out / table.ids_file).read_text().splitlines()
        found[need.input] = np.asarray(open_vectors(out / table.vectors_file))[Vocabulary(ids).indices(need.keys)]
    arrays = feed.resolve(found)
    return {i.name: np.ascontiguousarray(arrays[i.name]) for i in inputs}


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
        row_item = torch.tensor(item[:b]) if model.uses_item_facet else None
        out[b] = module.outputs(model.group_task_logits(logits, group, row_item)).numpy()
    return out


def _to_onnx(module: ServingGraph, feeds: dict[str, np.ndarray], output_names: list[str]) -> onnx.ModelProto:
    # Eight example rows of two requests: a batch of 1 could hide a broadcast that only works for one row.
    inputs = module.inputs
    example = tuple(torch.from_numpy(np.ascontiguousarray(feeds[i.name][:8])) for i in inputs)
    names = [i.name for i in inputs]
    axes = {i.name: i.axis for i in inputs} | dict.fromkeys(output_names, BATCH_AXIS)
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
            dynamic_axes={n: {0: axis} for n, axis in axes.items()},
            opset_version=OPSET,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(proto, full_check=True)
    kept = [value.name for value in proto.graph.input]
    if kept != names:
        raise ValueError(f"exported graph: inputs {kept}, expected {names} (an input the model does not use?)")
    for value in [*proto.graph.input, *proto.graph.output]:
        if value.type.tensor_type.shape.dim[0].dim_param != axes[value.name]:
            raise ValueError(f"exported graph: {value.name!r} lost its dynamic {axes[value.name]} axis")
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
