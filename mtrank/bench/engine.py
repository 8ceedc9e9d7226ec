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

from mtrank.manifest import Manifest
from mtrank.service.runner import CPU, CUDA, DeviceError, GraphRunner, InputSpec

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
                rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Inputs of ``rows`` rows: normal floats, and in-vocabulary indices for the ``ids`` input."""
    vocab_sizes = [len(s.vocab or []) + 1 for s in manifest.sparse if s.location == "graph"]
    feed = {}
    for spec in runner.inputs:
        shape = (rows, spec.width) if spec.width is not None else (rows,)
        if np.issubdtype(spec.dtype, np.integer):
            highs = vocab_sizes if spec.width == len(vocab_sizes) else [1] * (spec.width or 1)
            feed[spec.name] = np.stack([rng.integers(0, h, rows) for h in highs], axis=1).astype(spec.dtype)
        else:
            feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
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
    path = vdir / manifest.graphs[graph].file
    runner: GraphRunner | DefaultSession
    if threads is None:
        inputs = GraphRunner(path, device="cpu", intra_op_threads=1).inputs
        runner = DefaultSession(path, inputs, device)
    else:
        runner = GraphRunner(path, device=device, intra_op_threads=threads)
    rng = np.random.default_rng(0)
    curve = []
    for b in batch_sizes:
        rate, cpu_rate = rows_per_second(runner, random_feed(runner, manifest, b, rng), b, min_time_s)
        curve.append({"batch": b, "rows_per_s": round(rate, 1), "rows_per_cpu_s": round(cpu_rate, 1),
                      "ms_per_batch": round(1000.0 * b / rate, 4)})
    peak = max(curve, key=lambda p: p["rows_per_s"])
    return {"graph": graph, "threads": threads, "device": device, "provider": runner.provider,
            "session_options": "default" if threads is None else f"service ({threads or 'default'} intra-op threads)",
            "curve": curve, "peak": peak}


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
