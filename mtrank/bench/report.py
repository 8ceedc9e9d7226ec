"""The typed report of a bench run and its file, ``bench.json``.

:class:`Report` holds every figure of a run; :func:`to_json` turns it into the dict written to
``bench.json`` (each dataclass field under its own name, in field order, so the file keeps the keys
the docs and earlier runs use) and :func:`from_json` reads such a dict back. Every field has a default
so that a report read from an earlier, smaller ``bench.json`` or a partial one built in a test loads;
fields marked :func:`optional` are left out of the file while they are None (sections a run did not
measure). Latencies are in milliseconds, throughputs per second, memory in KiB.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from mtrank.bench.config import BenchConfig

Load = list[float]
"""The load average over 1, 5 and 15 minutes."""


def optional() -> Any:
    """A field left out of ``bench.json`` while it is None (a section or figure the run did not measure)."""
    return field(default=None, metadata={"omit_none": True})


@dataclass
class Section:
    """One timed section of the run."""

    load_before: Load = field(default_factory=list)
    load_after: Load = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class ServerRecord:
    """A server under test: its environment, its provider and, once stopped, what its log says."""

    env: dict[str, str] = field(default_factory=dict)
    pid: int = 0
    provider: str | None = optional()
    device: str | None = optional()
    exit_status: int | None = optional()
    log_lines: int = 0
    error_lines: int = 0
    """Lines with ERROR, CRITICAL or Traceback."""
    error_examples: list[str] = field(default_factory=list)


@dataclass
class EnginePoint:
    """ONNX Runtime alone at one batch size."""

    batch: int = 0
    rows_per_s: float = 0.0
    rows_per_cpu_s: float = 0.0
    ms_per_batch: float = 0.0


@dataclass
class EngineRun:
    """One measurement of the engine curve (:func:`mtrank.bench.engine.bench_engine`)."""

    graph: str = ""
    threads: int | None = None
    """None: ONNX Runtime's default session options (the reference)."""
    device: str = "cpu"
    provider: str = ""
    session_options: str = "default"
    curve: list[EnginePoint] = field(default_factory=list)
    peak: EnginePoint = field(default_factory=EnginePoint)


@dataclass
class StatusLatency:
    """The answers of one non-200 status in a load point."""

    count: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0


@dataclass(kw_only=True)
class LoadPoint:
    """One load point: the load generator's figures, then what the server's metrics and CPU time say."""

    mode: str = "closed"
    concurrency: int = 0
    """Closed loop: connections (0: open loop at ``rate``)."""
    rate: float = 0.0
    """Open loop: requests offered per second."""
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    throughput_rps: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    mean_ms: float = 0.0
    windows: int = 0
    stable: bool = False
    client_cpu_s: float = 0.0
    window_rps: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    non_200: dict[str, StatusLatency] = field(default_factory=dict)
    """Status ("0": no answer) → its answers' latency."""
    size: int = 0
    """Candidates per request."""
    rows_per_s: float = 0.0
    mean_batch_rows: float = 0.0
    mean_batch_requests: float = 0.0
    inference_busy: float = 0.0
    """Seconds of inference per second of the point."""
    server_cpu_cores: float = 0.0
    rows_per_server_cpu_s: float = 0.0
    client_cpu_cores: float = 0.0
    load: Load = field(default_factory=list)
    mean_lookup_ms: float | None = optional()
    mean_queue_wait_ms: float | None = optional()


@dataclass
class TailRepeat:
    """One open-loop repeat of a tail point."""

    p50_ms: float = 0.0
    p99_ms: float = 0.0
    p99_over_p50: float = 0.0
    throughput_rps: float = 0.0
    errors: int = 0
    load: Load = field(default_factory=list)


@dataclass(kw_only=True)
class TailPoint(LoadPoint):
    """The tail point of one size: the repeat with the median p99 ÷ p50, every repeat beside it."""

    p99_over_p50: float = 0.0
    target_fraction: float = 0.0
    """Offered rate ÷ ``max_throughput_rps``."""
    max_throughput_rps: float = 0.0
    """The size's best closed-loop throughput."""
    repeats: list[TailRepeat] = field(default_factory=list)


@dataclass
class C1Pair:
    """20 candidates at concurrency 1 on both servers, back to back."""

    batching_p50_ms: float = 0.0
    naive_p50_ms: float = 0.0
    ratio: float | None = optional()


@dataclass
class FloorPoint:
    """The serving floor (:mod:`mtrank.bench.floor`) at one closed-loop point."""

    size: int = 0
    concurrency: int = 0
    throughput_rps: float = 0.0
    rows_per_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    errors: int = 0
    server_cpu_cores: float = 0.0
    rows_per_server_cpu_s: float = 0.0
    load: Load = field(default_factory=list)


@dataclass
class BestClosedLoop:
    """The closed-loop point of the best throughput at the overload size."""

    concurrency: int = 0
    throughput_rps: float = 0.0
    rows_per_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0


@dataclass
class RssFigures:
    """The overload server's RSS in KiB."""

    start: int = 0
    after_first_second: int = 0
    """After the load generator's start-up and warm-up."""
    end: int = 0
    max: int = 0
    samples: int = 0


@dataclass
class OverloadFigures:
    """The figures of one overload repeat that the targets read."""

    goodput_rps: float = 0.0
    accepted_p50_ms: float = 0.0
    accepted_p99_ms: float = 0.0
    rejected_503_p50_ms: float | None = None
    rejected_503_p99_ms: float | None = None
    statuses: dict[str, int] = field(default_factory=dict)
    load: Load = field(default_factory=list)


@dataclass
class RetryStorm:
    """Closed-loop clients that resend the moment they are refused."""

    clients: int = 0
    seconds: float = 0.0
    goodput_rps: float = 0.0
    refused_per_s: float = 0.0
    accepted_p99_ms: float = 0.0
    rejected_503_p50_ms: float | None = None
    rejected_503_p99_ms: float | None = None
    statuses: dict[str, int] = field(default_factory=dict)
    load: Load = field(default_factory=list)
    server_cpu_cores: float = 0.0
    client_cpu_cores: float = 0.0


@dataclass
class Overload:
    """Open loop at ``factor`` × the best closed-loop throughput; the top-level figures are medians over
    the repeats, ``statuses`` their sum."""

    size: int = 0
    factor: float = 0.0
    rate_rps: float = 0.0
    seconds: float = 0.0
    repeats_n: int = 1
    best_closed_loop: BestClosedLoop = field(default_factory=BestClosedLoop)
    request_timeout_ms: int = 0
    client_timeout_s: float = 0.0
    goodput_rps: float = 0.0
    accepted_p50_ms: float = 0.0
    accepted_p99_ms: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)
    non_200: dict[str, StatusLatency] = field(default_factory=dict)
    """Of the repeat with the median goodput."""
    rejected_503_p99_ms: float | None = None
    rejected_503_p50_ms: float | None = None
    rss_kib: RssFigures = field(default_factory=RssFigures)
    rss_samples: list[tuple[float, int]] = field(default_factory=list)
    """(seconds since the first repeat started, KiB)."""
    error_lines: int = 0
    repeats: list[OverloadFigures] = field(default_factory=list)
    warm_point: LoadPoint | None = optional()
    point: LoadPoint | None = optional()
    """The repeat with the median goodput."""
    retry_storm: RetryStorm | None = optional()


@dataclass
class ImpressionServer:
    """What one server of the impression-log point counted, after the point."""

    statuses: dict[str, int] = field(default_factory=dict)
    """``/v1/rank`` answers by status (``mtrank_requests_total``), warm-ups included."""
    logged: int = 0
    """``mtrank_impressions_logged_total``: records in completed files while the server ran."""
    dropped: dict[str, int] = field(default_factory=dict)
    """``mtrank_impressions_dropped_total`` by reason."""
    answered_logged: int | None = optional()
    """Log on: its 200 answers to the request ids it logs (warm-ups included)."""
    records_in_files: int | None = optional()
    """Log on: the records in the directory's complete files once the server stopped."""
    records_sampled_out: int | None = optional()
    """Log on: of those, records whose request id its sampling rate leaves out (none, when it holds)."""
    cpu_s: float = 0.0
    """CPU seconds of the server's processes (all threads) through the rounds."""
    writer_cpu_s: float = 0.0
    """Of which the impression writer threads' (``mtrank-implog``)."""


@dataclass
class ImpressionLogPoint:
    """The impression log on and off in one server process, a server without the log and one whose
    log directory is read-only: one closed-loop point each per round, the order rotating
    (:mod:`mtrank.bench.impressions`)."""

    size: int = 0
    concurrency: int = 0
    sample: float = 1.0
    """``MTRANK_IMPRESSION_SAMPLE`` of the log-on server; its ``log_on`` points send ids it logs (all
    of them), its ``sampled_out`` points ids it leaves out."""
    read_only: dict[str, str] = field(default_factory=dict)
    """How the read-only directory was made (mode, the server's command prefix) and the error a write
    probe under that prefix got."""
    orders: list[list[str]] = field(default_factory=list)
    """The servers' order in each round."""
    points: dict[str, list[LoadPoint]] = field(default_factory=dict)
    """Point (``log_on``, ``sampled_out``, ``log_off``, ``log_read_only``) → its measurement in each round."""
    on_vs_off: list[float] = field(default_factory=list)
    """Each round's req/s of the log-on server, its requests logged ÷ sampled out (the log on ÷ off in
    one process): the target's."""
    on_vs_off_server: list[float] = field(default_factory=list)
    """Each round's req/s of the log-on server's logged requests ÷ the server without the log."""
    sampled_out_vs_off_server: list[float] = field(default_factory=list)
    """Each round's req/s of the log-on server's sampled-out requests ÷ the server without the log: two
    processes, neither logging (what differs between servers, and the sampling check)."""
    servers: dict[str, ImpressionServer] = field(default_factory=dict)


@dataclass
class ModelInfo:
    """The model version under test."""

    repo: str = ""
    name: str = ""
    version: int = 0
    kind: str = ""
    graphs: list[str] = field(default_factory=list)


@dataclass
class RequestBatchPoint(EnginePoint):
    """The engine on ``requests`` requests stacked as the batcher stacks them (``batch`` rows in all)."""

    requests: int = 1


@dataclass
class RequestBatchCurve:
    """One measurement of the engine on batches of requests of ``candidates`` candidates
    (:func:`mtrank.bench.engine.bench_engine_requests`)."""

    candidates: int = 0
    provider: str = ""
    curve: list[RequestBatchPoint] = field(default_factory=list)
    peak: RequestBatchPoint = field(default_factory=RequestBatchPoint)


@dataclass
class HistoryWorkload:
    """The history workload (:mod:`mtrank.bench.history`): a model with users' behaviour histories,
    served by ``mtrank serve`` and run alone in ONNX Runtime, the same graph, in the same run."""

    model: ModelInfo = field(default_factory=ModelInfo)
    """The history model (its repository beside the bench's)."""
    graph: str = ""
    history_lengths: dict[str, list[int]] = field(default_factory=dict)
    """User-side list field → the fewest and the most entries it has in the request bodies."""
    concurrency: int = 0
    """Closed-loop connections of the service's points."""
    engine: list[RequestBatchCurve] = field(default_factory=list)
    """Every engine measurement (each size before the service's points, then after), in order."""
    service: list[LoadPoint] = field(default_factory=list)


@dataclass
class LookupTiming:
    """Per-call times of one way to fetch the lookup ids (the median round)."""

    mean_ms: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    calls: int = 0
    missing: int | None = optional()
    rps: float | None = optional()
    avg_latency_ms: float | None = optional()
    rounds_mean_ms: list[float] = field(default_factory=list)


@dataclass
class Lookups:
    """Embedding lookups of ``ids`` ids (:func:`mtrank.bench.lookups.bench_lookups`); None: not measured."""

    ids: int = 0
    value_bytes: int = 0
    keys_example: str = ""
    service: LookupTiming | None = None
    redis_benchmark: LookupTiming | None = None
    bare_async: LookupTiming | None = None
    raw_protocol: LookupTiming | None = None
    bare_sync: LookupTiming | None = None
    service_cached: LookupTiming | None = None
    redis_benchmark_missing: bool = False


@dataclass
class Ratio:
    """One target (or informational figure): ``value op target`` and the figures it is made of."""

    value: float | None = None
    op: str = ">="
    target: float | None = None
    met: bool = False
    what: str = ""
    parts: dict[str, Any] = field(default_factory=dict)
    """The figures the value is made of; ``missing`` or ``not_at_load`` say why a target is not met."""

    def to_json(self) -> dict[str, Any]:
        """The ratio's fields, then its parts, at one level (bench.json's ``ratios.<name>``)."""
        return {"value": self.value, "op": self.op, "target": self.target, "met": self.met, "what": self.what,
                **self.parts}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Ratio:
        """The inverse of :meth:`to_json`."""
        own = {f.name for f in dataclasses.fields(cls)} - {"parts"}
        return cls(**{k: data[k] for k in own if k in data}, parts={k: v for k, v in data.items() if k not in own})


@dataclass
class Workers:
    """MTRANK_WORKERS of the servers under test (0: the service's default) and the count it means here."""

    asked: int = 0
    count: int = 1


@dataclass
class Report:
    """Every figure of one run, in bench.json's order."""

    mode: str = "full"
    device: str = "cpu"
    store: str = "redis"
    model: ModelInfo = field(default_factory=ModelInfo)
    machine: dict[str, Any] = field(default_factory=dict)
    config: BenchConfig = field(default_factory=BenchConfig)
    service_defaults: dict[str, Any] = field(default_factory=dict)
    workers: Workers = field(default_factory=Workers)
    target_names: list[str] = field(default_factory=list)
    load_at_start: Load = field(default_factory=list)
    started_at: str = ""
    sections: dict[str, Section] = field(default_factory=dict)
    servers: dict[str, ServerRecord] = field(default_factory=dict)
    engine: EngineRun = field(default_factory=EngineRun)
    """The engine measurement with the highest peak: the reference of the targets."""
    engine_1_thread: EngineRun | None = optional()
    redis_load: dict[str, Any] | None = optional()
    """What :func:`mtrank.export.store_loader.load_embeddings` returned."""
    lookups: Lookups | None = optional()
    service: list[LoadPoint] = field(default_factory=list)
    naive: list[LoadPoint] = field(default_factory=list)
    c1_pairs: list[C1Pair] | None = optional()
    tail: list[TailPoint] = field(default_factory=list)
    floor: list[FloorPoint] | None = optional()
    engine_peaks: list[EnginePoint] | None = optional()
    """Every engine peak, in the order measured."""
    overload: Overload = field(default_factory=Overload)
    impressions: ImpressionLogPoint | None = optional()
    """The impression log off, on and read-only (runs since issue 30)."""
    history: HistoryWorkload | None = optional()
    """The history workload (runs since issue 29 whose repository has the history model)."""
    redis_keys_deleted: int | None = optional()
    load_at_end: Load = field(default_factory=list)
    seconds: float = 0.0
    ratios: dict[str, Ratio] = field(default_factory=dict)
    informational: dict[str, Ratio] = field(default_factory=dict)
    plots: list[str] | None = optional()


T = TypeVar("T")
P = TypeVar("P", LoadPoint, FloorPoint)


def middle(items: list[T], key: Callable[[T], Any] | None = None) -> T:
    """The median item of ``items`` by ``key`` (the upper one of an even count)."""
    return sorted(items, key=key)[len(items) // 2]


def point_at(points: list[P], size: int, concurrency: int) -> P | None:
    """The point of ``size`` candidates at ``concurrency``, if measured."""
    return next((p for p in points if p.size == size and p.concurrency == concurrency), None)


def best_point(points: list[LoadPoint], size: int) -> LoadPoint | None:
    """The point of highest throughput at ``size``."""
    at = [p for p in points if p.size == size]
    return max(at, key=lambda p: p.throughput_rps) if at else None


def to_json(value: Any) -> Any:
    """A dataclass (and everything inside it) as plain JSON values, keys in field order."""
    if isinstance(value, Ratio):
        return to_json(value.to_json())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not (f.metadata.get("omit_none") and getattr(value, f.name) is None)}
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    return value


def from_json(cls: Any, data: Any) -> Any:
    """``data`` (plain JSON values) as an instance of the type ``cls``; missing fields take their defaults."""
    origin, args = typing.get_origin(cls), typing.get_args(cls)
    if data is None or cls is Any:
        return data
    if origin in (typing.Union, types.UnionType):
        return from_json(next(a for a in args if a is not type(None)), data)
    if cls is Ratio:
        return Ratio.from_json(data)
    if dataclasses.is_dataclass(cls):
        hints = typing.get_type_hints(cls)
        return cls(**{f.name: from_json(hints[f.name], data[f.name]) for f in dataclasses.fields(cls)
                      if f.init and f.name in data})
    if origin is dict:
        return {k: from_json(args[1], v) for k, v in data.items()}
    if origin is list:
        return [from_json(args[0], v) for v in data]
    if origin is tuple:
        return tuple(data)
    return data


def read_report(path: Path) -> Report:
    """A ``bench.json`` as a :class:`Report`."""
    return from_json(Report, json.loads(path.read_text()))


def write_json(report: Report, path: Path) -> None:
    """Writes ``report`` to ``path`` (``bench.json``); a NaN or infinite figure is an error."""
    path.write_text(json.dumps(to_json(report), indent=1, allow_nan=False))
