"""Test helpers for the service: a tiny hand-built model repository and request bodies.

The server process itself is :class:`mtrank.bench.server.RemoteServer`. :func:`build_toy_version`
writes a model version that follows the manifest contract exactly (ONNX graphs made with
``onnx.helper``, store tables, checksums) in a fraction of a second, for tests that need a model
but not a trained one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mtrank.manifest import (
    DenseInfo,
    GraphInfo,
    Manifest,
    SparseInfo,
    TableInfo,
    TensorInfo,
    facet_dict,
    write_manifest,
)
from mtrank.spec import Facet, FacetRule

ROOT = Path(__file__).resolve().parents[1]


# -- a tiny model repository ---------------------------------------------------------------

TOY_TASKS = (("vtr", "binary"), ("vcr", "regression"), ("like", "binary"))
TOY_GROUPS = Facet(
    column="user_group",
    values=("new", "low", "high"),
    rules=(FacetRule("new", "account_age_days", "lt", 7.0), FacetRule("low", "watch_minutes_30d", "lt", 60.0)),
    default="high",
)
TOY_DENSE = (
    DenseInfo("account_age_days", "user", "log1p", 4.0, 1.5, 0.0),
    DenseInfo("watch_minutes_30d", "user", "log1p", 4.5, 1.2, 0.0),
    DenseInfo("video_len", "item", "log1p", 3.4, 1.0, 30.0),
    DenseInfo("item_age_days", "item", "log1p", 2.5, 1.1, 0.0),
)
TOY_DEVICES = ["android", "ios", "web"]
TOY_CATEGORIES = [f"c{i}" for i in range(10)]
TOY_DIM = 8
TOY_USERS = [f"u{i}" for i in range(200)]
TOY_ITEMS = [f"v{i}" for i in range(500)]
TOY_AUTHORS = [f"a{i}" for i in range(60)]
TOY_STORE_FIELDS = (("user_id", "user", TOY_USERS), ("item_id", "item", TOY_ITEMS), ("author_id", "item", TOY_AUTHORS))

TOY_INPUTS = (
    TensorInfo("request_index", "int64", ["batch"]),
    TensorInfo("dense", "float32", ["batch", 2]),
    TensorInfo("user_dense", "float32", ["requests", 2]),
    TensorInfo("ids", "int64", ["batch", 1]),
    TensorInfo("user_ids", "int64", ["requests", 1]),
    TensorInfo("emb.user_id", "float32", ["requests", TOY_DIM]),
    TensorInfo("emb.item_id", "float32", ["batch", TOY_DIM]),
    TensorInfo("emb.author_id", "float32", ["batch", TOY_DIM]),
)
"""The toy graphs' inputs, as the feature kinds derive them from the toy manifest."""


BUSY_DIM = 384


def _busy_nodes(inits: list, rounds: int) -> list:
    """Nodes whose cost per run does not depend on the batch: ``rounds`` [384, 384] matrix
    products fed from the input (so nothing is folded at load), contributing exactly 0 to ``z``."""
    from onnx import helper, numpy_helper

    w = np.random.default_rng(0).normal(0, 0.05, (BUSY_DIM, BUSY_DIM)).astype(np.float32)
    inits += [numpy_helper.from_array(w, "busy_w"),
              numpy_helper.from_array(np.zeros((BUSY_DIM, BUSY_DIM), np.float32), "busy_zero"),
              numpy_helper.from_array(np.array(0.0, np.float32), "busy_scale")]
    nodes = [helper.make_node("ReduceSum", ["dense"], ["busy_s"], keepdims=0),
             helper.make_node("Mul", ["busy_s", "busy_zero"], ["busy_0"])]
    for i in range(rounds):
        nodes.append(helper.make_node("MatMul", [f"busy_{i}", "busy_w"], [f"busy_{i + 1}"]))
    nodes += [helper.make_node("ReduceSum", [f"busy_{rounds}"], ["busy_sum"], keepdims=0),
              helper.make_node("Mul", ["busy_sum", "busy_scale"], ["busy"])]
    return nodes


def _toy_graph(path: Path, seed: int, tasks: Sequence[str], busy_rounds: int = 0) -> None:
    """dense ‖ emb(ids) ‖ store vectors → MLP(16) → sigmoid per task; batch axis symbolic."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    graph_dim = 4
    n_in = len(TOY_DENSE) + 2 * graph_dim + len(TOY_STORE_FIELDS) * TOY_DIM
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.5, (len(TOY_DEVICES) + 1, graph_dim)).astype(np.float32), "t_device"),
        numpy_helper.from_array(rng.normal(0, 0.5, (len(TOY_CATEGORIES) + 1, graph_dim)).astype(np.float32), "t_cat"),
        numpy_helper.from_array(rng.normal(0, 0.4, (n_in, 16)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.1, (16,)).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.normal(0, 0.6, (16, len(tasks))).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.normal(0, 0.1, (len(tasks),)).astype(np.float32), "b2"),
        numpy_helper.from_array(np.array(0, dtype=np.int64), "i0"),
        numpy_helper.from_array(np.array(1, dtype=np.int64), "i1"),
    ]
    for k in range(len(tasks)):
        inits.append(numpy_helper.from_array(np.array(k, dtype=np.int64), f"k{k}"))
    nodes = [  # the user's side arrives once per request; request_index gathers it to the rows
        helper.make_node("Gather", ["user_dense", "request_index"], ["ud"], axis=0),
        helper.make_node("Gather", ["user_ids", "request_index"], ["uids"], axis=0),
        helper.make_node("Gather", ["emb.user_id", "request_index"], ["e_user"], axis=0),
        helper.make_node("Gather", ["uids", "i0"], ["id_device"], axis=1),
        helper.make_node("Gather", ["ids", "i0"], ["id_cat"], axis=1),
        helper.make_node("Gather", ["t_device", "id_device"], ["e_device"], axis=0),
        helper.make_node("Gather", ["t_cat", "id_cat"], ["e_cat"], axis=0),
        helper.make_node(
            "Concat", ["ud", "dense", "e_device", "e_cat", "e_user", "emb.item_id", "emb.author_id"], ["x"], axis=1
        ),
        helper.make_node("MatMul", ["x", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h"]),
        helper.make_node("MatMul", ["h", "w2"], ["z0"]),
        helper.make_node("Add", ["z0", "b2"], ["z1"]),
    ]
    if busy_rounds:
        nodes += _busy_nodes(inits, busy_rounds)
        nodes.append(helper.make_node("Add", ["z1", "busy"], ["z"]))
    else:
        nodes.append(helper.make_node("Identity", ["z1"], ["z"]))
    nodes += [
        helper.make_node("Sigmoid", ["z"], ["p"]),
    ]
    nodes += [helper.make_node("Gather", ["p", f"k{k}"], [t], axis=1) for k, t in enumerate(tasks)]
    inputs = [
        helper.make_tensor_value_info(t.name, TensorProto.FLOAT if t.dtype == "float32" else TensorProto.INT64, t.shape)
        for t in TOY_INPUTS
    ]
    outputs = [helper.make_tensor_value_info(t, TensorProto.FLOAT, ["batch"]) for t in tasks]
    graph = helper.make_graph(nodes, "toy", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


def time_one_call(graph: Path, rows: int = 50, runs: int = 5) -> float:
    """Fewest wall seconds of ``runs`` ONNX Runtime calls of a toy graph on ``rows`` rows, with one
    intra-op thread (as :class:`mtrank.bench.server.RemoteServer` runs the service). The minimum:
    other work on the host only ever adds time, so it is the call's own cost."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])
    feed = {t.name: np.zeros((1 if t.shape[0] == "requests" else rows, *t.shape[1:]), t.dtype) for t in TOY_INPUTS}
    session.run(None, feed)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - started)
    return min(times)


def build_slow_version(repo: Path, call_s: float, name: str = "toy", version: int = 1) -> float:
    """Write a toy version whose every inference call takes about ``call_s`` seconds on this host,
    whatever its rows, so that a test can set its deadlines against a delay it measured instead of
    assuming how fast the host is. The work per call is scaled until a timed call lands within
    0.8-1.5 × ``call_s`` (a few tries: a busy host can slow one measurement). Returns the measured
    seconds of one call of the written graph."""
    probe = Path(repo) / ".probe"
    probe.mkdir(parents=True)
    rounds, tasks = 100, [t for t, _ in TOY_TASKS]
    for _ in range(4):
        graph = probe / f"busy-{rounds}.onnx"
        _toy_graph(graph, 0, tasks, rounds)
        took = time_one_call(graph)
        if 0.8 * call_s <= took <= 1.5 * call_s:
            break
        rounds = max(1, math.ceil(rounds * call_s / took))
    for f in probe.iterdir():
        f.unlink()
    probe.rmdir()
    vdir = build_toy_version(repo, name, version, busy_rounds=rounds)
    return time_one_call(vdir / "graphs" / "all.onnx")


def build_toy_version(
    repo: Path, name: str = "toy", version: int = 1, grouped: bool = False, seed: int = 0,
    tasks: Sequence[tuple[str, str]] = TOY_TASKS, busy_rounds: int = 0,
) -> Path:
    """Write ``repo/name/version`` with one graph (``all``) or one per user group (new/low/high),
    whose weights differ by group. Store tables hold TOY_USERS / TOY_ITEMS / TOY_AUTHORS.

    ``busy_rounds`` makes every inference call cost that many [384, 384] matrix products whatever
    its batch size (a slow engine for queueing tests) without changing any output."""
    vdir = Path(repo) / name / str(version)
    vdir.mkdir(parents=True)
    rng = np.random.default_rng(seed + 1000)
    tables = {}
    for f, _, ids in TOY_STORE_FIELDS:
        vectors = rng.normal(0, 1, (len(ids) + 1, TOY_DIM)).astype(np.float32)
        vectors[0] = 0.05  # a recognisable default row
        (vdir / "tables").mkdir(exist_ok=True)
        (vdir / "tables" / f"{f}.ids").write_text("".join(f"{i}\n" for i in ids))
        np.save(vdir / "tables" / f"{f}.npy", vectors)
        tables[f] = TableInfo(f, f"tables/{f}.ids", f"tables/{f}.npy", len(ids) + 1, TOY_DIM, ["shared"])
    task_names = [t for t, _ in tasks]
    inputs = list(TOY_INPUTS)
    graphs = {}
    for g, key in enumerate(TOY_GROUPS.values if grouped else ("all",)):
        (vdir / "graphs").mkdir(exist_ok=True)
        _toy_graph(vdir / "graphs" / f"{key}.onnx", seed * 10 + g, task_names, busy_rounds)
        graphs[key] = GraphInfo(
            file=f"graphs/{key}.onnx", inputs=inputs,
            outputs=[TensorInfo(t, "float32", ["batch"]) for t in task_names], tasks=task_names,
        )
    sparse = [
        SparseInfo("user_id", "user", "store"),
        SparseInfo("device", "user", "graph", vocab=TOY_DEVICES),
        SparseInfo("item_id", "item", "store"),
        SparseInfo("author_id", "item", "store"),
        SparseInfo("category", "item", "graph", vocab=TOY_CATEGORIES),
    ]
    manifest = Manifest(
        name=name, kind="toy", version=version,
        tasks=[{"name": t, "type": kind, "behaviour": t} for t, kind in tasks],
        dense=list(TOY_DENSE), sparse=sparse, graphs=graphs, tables=tables,
        user_groups=facet_dict(TOY_GROUPS), created_at="2026-01-01T00:00:00Z",
    )
    write_manifest(vdir, manifest)
    return vdir


def rank_body(user_id: str = "u1", n: int = 20, offset: int = 0, **user_features: Any) -> dict[str, Any]:
    """A /v1/rank body with ``n`` candidates taken from the toy (and synthetic) id ranges."""
    features = {"account_age_days": 400, "watch_minutes_30d": 300.0, "device": "ios", **user_features}
    return {
        "request_id": f"r-{user_id}-{n}-{offset}",
        "user": {"user_id": user_id, "features": features},
        "candidates": [
            {"item_id": f"v{offset + i}", "video_len": float(5 + (offset + i) * 7 % 300),
             "features": {"author_id": f"a{(offset + i) % 70}", "category": f"c{(offset + i) % 12}",
                          "item_age_days": float((offset + i) % 30)}}
            for i in range(n)
        ],
        "return_task_scores": True,
    }


# -- raw HTTP, for what httpx refuses to send ----------------------------------------------

def raw_request(method: bytes, target: bytes, headers: Sequence[tuple[bytes, bytes]] = (), body: bytes = b"") -> bytes:
    """One HTTP/1.1 request as bytes, exactly as given (no validation), with Host,
    Content-Length and ``Connection: close`` added."""
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close",
             b"Content-Length: " + str(len(body)).encode()]
    lines += [name + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def send_raw(port: int, request: bytes, timeout_s: float = 10.0) -> tuple[int | None, dict[bytes, bytes], bytes]:
    """Send ``request`` on a new connection and read until the server closes it: (status, or None
    when no status line came back; headers by lower-case name; body)."""
    import socket

    chunks = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(request)
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status_line, *header_lines = head.split(b"\r\n")
    parts = status_line.split(b" ")
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        return None, {}, b""
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers, body
