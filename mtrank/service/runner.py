"""ONNX Runtime sessions: device choice, provider check, tuned options and warm-up.

ONNX Runtime falls back to the CPU silently when the CUDA provider cannot start (it only logs
to stderr), so the provider actually active is read back from the session after creation.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from mtrank.manifest import REQUESTS_AXIS

log = logging.getLogger("mtrank.runner")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


class DeviceError(RuntimeError):
    """The requested device cannot be used (MTRANK_DEVICE=cuda without a usable GPU)."""


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: type
    tail: tuple[int, ...] = ()
    """Every size after the first axis (a history's entry vectors have two)."""
    per_request: bool = False
    """Its first axis is ``requests`` (a row per request), not ``batch``."""


class GraphRunner:
    """One ONNX graph in one InferenceSession; ``run`` is thread-safe and releases the GIL."""

    def __init__(self, path: Path, device: str = "auto", intra_op_threads: int = 0):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.inter_op_num_threads = 1
        if intra_op_threads > 0:
            opts.intra_op_num_threads = intra_op_threads
        # Idle intra-op threads would otherwise spin for a while after each run, taking CPU from
        # the event loop that parses requests and assembles features on the same cores.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        wants_cuda = device == "cuda" or (device == "auto" and CUDA in ort.get_available_providers())
        providers = [CUDA, CPU] if wants_cuda else [CPU]
        if wants_cuda and hasattr(ort, "preload_dlls"):
            # The CUDA and cuDNN libraries of the `gpu` extra live in nvidia-* wheels, not on the
            # loader's path; the provider finds them only once they are loaded.
            ort.preload_dlls()
        self.path = path
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        active = self.session.get_providers()
        if device == "cuda" and CUDA not in active:
            raise DeviceError(
                f"MTRANK_DEVICE=cuda but ONNX Runtime could not use the GPU for {path.name} "
                f"(active providers: {active}; available: {ort.get_available_providers()}); "
                "install onnxruntime-gpu with CUDA/cuDNN, or set MTRANK_DEVICE=auto or cpu"
            )
        if wants_cuda and CUDA not in active:
            log.warning("CUDA provider listed but not usable for %s; running on the CPU", path.name)
        self.device = "cuda" if CUDA in active else "cpu"
        self.provider = active[0]
        self.inputs = [_input_spec(i) for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs in graph order for a batch of rows."""
        return self.session.run(self.output_names, feed)

    def warm_up(self, batch_sizes: tuple[int, ...], repeats: int = 3) -> list[tuple[int, float]]:
        """Run zero inputs at each batch size so the first real request pays no allocation, then
        ``repeats`` times more, timed: (rows, median seconds) per batch size — the service's cost
        model and its choice of batch size come from these."""
        timings = []
        for n in batch_sizes:  # n rows of one request
            feed = {i.name: np.zeros((1 if i.per_request else n, *i.tail), dtype=i.dtype) for i in self.inputs}
            self.run(feed)
            seconds = []
            for _ in range(repeats):
                started = time.perf_counter()
                self.run(feed)
                seconds.append(time.perf_counter() - started)
            timings.append((n, float(np.median(seconds))))
        return timings


def _input_spec(i) -> InputSpec:
    tail = tuple(d if isinstance(d, int) else 0 for d in i.shape[1:])
    return InputSpec(i.name, _DTYPES[i.type], tail, i.shape[0] == REQUESTS_AXIS)


BATCH_SIZES = (1, 64, 128, 256, 512, 1024, 2048, 4096)
"""Batch sizes timed at load; the batcher's batch size is chosen among them (above 1)."""


def best_batch_rows(timings: list[tuple[int, float]], within: float = 0.97, limit: int | None = None) -> int:
    """The smallest timed batch size whose rows/s is within ``within`` of the best: on a CPU,
    rows/s rises with the batch until the activations leave the cache, then falls again (the demo
    PLE, one thread: 85k rows/s at 250 rows, 61k at 4096), so bigger is not always better."""
    rates = [(n, n / t) for n, t in timings if n > 1 and (limit is None or n <= limit) and t > 0]
    if not rates:
        return limit or max(n for n, _ in timings)
    best = max(rate for _, rate in rates)
    return min(n for n, rate in rates if rate >= within * best)
