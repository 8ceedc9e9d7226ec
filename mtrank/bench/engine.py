"""The engine limit: ONNX Runtime alone, in process, on one of the model's graphs.

Two sessions, fed random inputs of the graph's shapes; no HTTP, no features, no lookups:

- the reference of the targets: an ``InferenceSession`` with ONNX Runtime's *default* session
  options (intra-op threads = all cores, spinning on), what a user who loads the graph
  themselves gets (:class:`DefaultSession`);
- the service's own :class:`mtrank.service.runner.GraphRunner` at a given thread count (informational).

Rows/s at a batch size is the median of a few timed repetitions, each running the graph back to
back for at least ``min_time_s``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from mtrank import kinds
from mtrank.manifest import ITEM_FACET_INPUT, Manifest
from mtrank.service.runner import CPU, CUDA, DeviceError, GraphRunner, InputSpec
from mtrank.transform import FeatureTransform

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class DefaultSession:
    """One graph in an ``InferenceSession`` with default session options, on the CPU or (``cuda``) the GPU."""

    def __init__(self, path: Path, inputs: list[InputSpec], device: str = "cpu"):
        providers = [CUDA, CPU] if device == "cuda" else [CPU]
        self.session = ort.InferenceSession(str(path), providers=providers)
        active = self.session.get_providers()
        if device == "cuda" and CUDA not in active:
            # ONNX Runtime falls back to the CPU silently; a CUDA bench on the CPU would mislead.
            raise DeviceError(f"the CUDA provider is not usable (ONNX Runtime {ort.__version__}, active providers "
                              f"{active}, available {ort.get_available_providers()})")
        self.provider = active[0]
        self.inputs = inputs
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.output_names, feed)


def random_feed(runner: GraphRunner | DefaultSession, manifest: Manifest, rows: int,
                rng: np.random.Generator, requests: int = 1) -> dict[str, np.ndarray]:
    """Inputs of ``rows`` candidates as the feature kinds derive them (normal floats, in-vocabulary
    indices, list lengths up to ``max_len``), in ``requests`` requests of consecutive rows, as the
    batcher stacks them: the user's side has a row per request, ``request_index`` maps rows to them."""
    transform = FeatureTransform.from_manifest(manifest)
    facet = transform.item_facet
    inputs = kinds.graph_inputs(transform, {f: t.width for f, t in manifest.tables.items()},
                                item_facet=any(i.name == ITEM_FACET_INPUT for i in runner.inputs))
    vocab = {s.name: len(s.vocabulary) + 1 for s in transform.sparse if s.vocabulary is not None}
    vocab |= {f.name: len(f.vocabulary) + 1 for f in transform.lists if f.vocabulary is not None}
    max_len = {f.name: f.max_len for f in transform.lists}
    highs = {
        "ids": lambda i: [vocab[f] for f in i.fields],
        "list_ids": lambda i: [vocab[i.fields[0]]] * i.width[0],
        "list_len": lambda i: [max_len[i.fields[0]] + 1],
        "item_facet": lambda i: [len(facet.values) if facet else 1],
    }
    feed = {}
    for i in inputs:
        if i.role == "request_index":
            feed[i.name] = np.repeat(np.arange(requests, dtype=np.int64), -(-rows // requests))[:rows]
            continue
        n = requests if i.per_request else rows
        if i.dtype == "int64":
            columns = [rng.integers(0, h, n) for h in highs[i.role](i)]
            feed[i.name] = (np.stack(columns, axis=1) if i.width else columns[0]).astype(np.int64)
        else:
            feed[i.name] = rng.standard_normal((n, *i.width)).astype(np.float32)
    return feed


def rows_per_second(runner: GraphRunner | DefaultSession, feed: dict[str, np.ndarray], rows: int, min_time_s: float,
                    repeats: int = 3) -> tuple[float, float]:
    """(rows per wall-clock second, rows per CPU second of this process), medians of ``repeats``.

    On a shared machine the wall-clock rate falls with the load; the CPU-time rate barely moves.
    """
    for _ in range(3):
        runner.run(feed)
    rates, cpu_rates = [], []
    for _ in range(repeats):
        n, started, cpu_started = 0, time.perf_counter(), time.process_time()
        while True:
            runner.run(feed)
            n += 1
            elapsed = time.perf_counter() - started
            if elapsed >= min_time_s:
                break
        rates.append(n * rows / elapsed)
        cpu_rates.append(n * rows / max(time.process_time() - cpu_started, 1e-9))
    return float(np.median(rates)), float(np.median(cpu_rates))


def bench_engine(vdir: Path, manifest: Manifest, graph: str, threads: int | None, min_time_s: float,
                 device: str = "cpu", batch_sizes: tuple[int, ...] = BATCH_SIZES) -> dict:
    """``{"graph", "threads", "session_options", "provider", "curve": [{"batch", "rows_per_s", "rows_per_cpu_s",
    "ms_per_batch"}], "peak"}``; ``threads`` None = ONNX Runtime's default session options (the
    reference), else the service's :class:`GraphRunner` with that many intra-op threads (0: ORT's default count).
    """
    runner = _runner(vdir, manifest, graph, threads, device)
    curve = [{k: v for k, v in p.items() if k != "requests"}
             for p in _curve(runner, manifest, [(b, 1) for b in batch_sizes], min_time_s)]
    peak = max(curve, key=lambda p: p["rows_per_s"])
    return {"graph": graph, "threads": threads, "device": device, "provider": runner.provider,
            "session_options": "default" if threads is None else f"service ({threads or 'default'} intra-op threads)",
            "curve": curve, "peak": peak}


def bench_engine_requests(vdir: Path, manifest: Manifest, graph: str, candidates: int, requests: tuple[int, ...],
                          min_time_s: float, device: str = "cpu") -> dict:
    """The reference's rows/s on batches the service's batcher makes of requests of ``candidates``
    candidates: ``k`` requests stacked (``k × candidates`` rows, ``k`` rows of the user's side) for each
    ``k`` of ``requests``. ``{"candidates", "provider", "curve": [{"batch", "requests", ...}], "peak"}``."""
    runner = _runner(vdir, manifest, graph, None, device)
    curve = _curve(runner, manifest, [(k * candidates, k) for k in requests], min_time_s)
    return {"candidates": candidates, "provider": runner.provider, "curve": curve,
            "peak": max(curve, key=lambda p: p["rows_per_s"])}


def _runner(vdir: Path, manifest: Manifest, graph: str, threads: int | None,
            device: str) -> GraphRunner | DefaultSession:
    """ONNX Runtime's default session options (``threads`` None) or the service's session."""
    path = vdir / manifest.graphs[graph].file
    if threads is None:
        inputs = GraphRunner(path, device="cpu", intra_op_threads=1).inputs
        return DefaultSession(path, inputs, device)
    return GraphRunner(path, device=device, intra_op_threads=threads)


def _curve(runner: GraphRunner | DefaultSession, manifest: Manifest, shapes: list[tuple[int, int]],
           min_time_s: float) -> list[dict]:
    """Rows/s of each (rows, requests) shape, on random inputs (seeded)."""
    rng = np.random.default_rng(0)
    curve = []
    for rows, requests in shapes:
        rate, cpu_rate = rows_per_second(runner, random_feed(runner, manifest, rows, rng, requests), rows, min_time_s)
        curve.append({"batch": rows, "requests": requests, "rows_per_s": round(rate, 1),
                      "rows_per_cpu_s": round(cpu_rate, 1), "ms_per_batch": round(1000.0 * rows / rate, 4)})
    return curve


def rows_per_s_at(batches: list[int], rows_per_s: list[float], batch: float) -> float:
    """The engine's rows/s at ``batch`` rows, interpolated linearly in log(batch) between the measured
    ``batches`` (ascending) and their ``rows_per_s``."""
    xs, ys = batches, rows_per_s
    if batch <= xs[0]:
        return ys[0]
    if batch >= xs[-1]:
        return ys[-1]
    for (x0, y0), (x1, y1) in zip(zip(xs, ys, strict=True), zip(xs[1:], ys[1:], strict=True), strict=False):
        if x0 <= batch <= x1:
            t = (math.log(batch) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + t * (y1 - y0)
    return ys[-1]
