"""Every Prometheus object of the service (names fixed by docs/architecture.md §7); the rest records here.

Histogram buckets are explicit and fine in the millisecond range: a ranking call takes a few
milliseconds, so the default buckets (5 ms upwards) would hide everything interesting.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Mapping

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015,
    0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0,
)
ROW_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 4096, 8192, 16384, 65536)
REQUESTS_PER_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128)
REJECT_REASONS = ("overloaded", "deadline", "client_gone", "invalid", "too_large", "not_ready", "body_timeout")

REQUESTS = Counter(
    "mtrank_requests", "HTTP requests by route, status code and A/B bucket", ["route", "status", "bucket"]
)
REQUEST_DURATION = Histogram(
    "mtrank_request_duration_seconds", "Request latency in seconds, by route and bucket", ["route", "bucket"],
    buckets=LATENCY_BUCKETS_S,
)
CANDIDATES = Histogram("mtrank_candidates_per_request", "Candidates per ranking request", buckets=ROW_BUCKETS)
QUEUE_WAIT = Histogram(
    "mtrank_queue_wait_seconds", "Seconds a request waited in the batcher before its batch ran", ["model", "group"],
    buckets=LATENCY_BUCKETS_S,
)
BATCH_ROWS = Histogram("mtrank_batch_rows", "Rows per inference call", ["model", "group"], buckets=ROW_BUCKETS)
BATCH_REQUESTS = Histogram(
    "mtrank_batch_requests", "Requests merged into one inference call", ["model", "group"],
    buckets=REQUESTS_PER_BATCH_BUCKETS,
)
INFERENCE_DURATION = Histogram(
    "mtrank_inference_duration_seconds", "ONNX Runtime run time in seconds per batch", ["model", "group", "device"],
    buckets=LATENCY_BUCKETS_S,
)
LOOKUP_DURATION = Histogram(
    "mtrank_embedding_lookup_duration_seconds", "Embedding lookup time per request in seconds (all fields)",
    ["store"], buckets=LATENCY_BUCKETS_S,
)
CACHE_HITS = Counter("mtrank_embedding_cache_hits", "Ids served from the in-process cache in front of Redis")
CACHE_MISSES = Counter("mtrank_embedding_cache_misses", "Ids fetched from Redis (not in the in-process cache)")
MISSING = Counter(
    "mtrank_embedding_missing", "Ids not in their table, served the default vector", ["table"]
)
INVALID_VECTORS = Counter(
    "mtrank_embedding_invalid", "Store values with NaN or infinities, served the default vector (also counted "
    "in mtrank_embedding_missing_total)", ["table"],
)
LIST_TRUNCATED = Counter(
    "mtrank_list_truncated", "Request rows whose list (multi or sequence) field held more than its max_len", ["field"]
)
REJECTED = Counter("mtrank_rejected", "Ranking requests refused or dropped, by reason", ["reason"])
REFUSALS_PACED = Counter(
    "mtrank_refusals_paced", "503s held until their turn because refusals outran answers (clients that resend at "
    "once, ignoring Retry-After)",
)
# Gauges say how several worker processes of one replica add up (mtrank/service/workers.py): in-flight
# requests sum, "models loaded" is the worst worker's, the flags the worst of any worker.
INFLIGHT = Gauge("mtrank_inflight_requests", "Ranking requests being served", multiprocess_mode="livesum")
MODEL_INFO = Gauge("mtrank_model_info", "1 for each loaded model version and the device it runs on",
                   ["model", "version", "device"], multiprocess_mode="livemax")
MODELS_LOADED = Gauge("mtrank_models_loaded", "Model versions loaded and warmed", multiprocess_mode="livemin")
REDIS_ERRORS = Counter("mtrank_redis_errors", "Failed Redis calls (timeouts, connection errors)")
STORE_ERRORS = Counter("mtrank_embedding_store_errors",
                       "Failed embedding store calls (timeouts, connection errors), by back-end", ["store"])
STORE_DEGRADED = Gauge("mtrank_embedding_store_degraded", "1 while the embedding store is unreachable",
                       multiprocess_mode="livemax")
EVENT_LOOP_LAG = Histogram(
    "mtrank_event_loop_lag_seconds",
    "How late a timer on the serving event loop fires (one every 50 ms): what a new request waits before "
    "its first step runs", buckets=LATENCY_BUCKETS_S,
)
MODEL_VERSIONS_REFUSED = Gauge(
    "mtrank_model_versions_refused", "1 for each model version that failed its checks at the last (re)load",
    ["model", "version"], multiprocess_mode="livemax",
)

IMPRESSION_DROP_REASONS = ("queue_full", "write_error")
IMPRESSIONS_LOGGED = Counter(
    "mtrank_impressions_logged", "Impression records in completed (renamed) log files (docs/impressions.md)",
)
IMPRESSIONS_DROPPED = Counter(
    "mtrank_impressions_dropped", "Impression records lost: the writer's queue was full, or a file could not be "
    "written (read-only or full disk)", ["reason"],
)
PREDICTION_BUCKETS = (
    0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7,
    0.8, 0.9, 0.95, 0.99, 1.0,
)
"""Fine near 0, where the rates of rare events (likes, shares) live, and near 1 (completion)."""
PREDICTION = Histogram(
    "mtrank_prediction", "Predictions of the returned items, by bucket and task: probabilities, and regression "
    "outputs as the fraction of their fusion range, in [0, 1]", ["bucket", "task"], buckets=PREDICTION_BUCKETS,
)

for _reason in REJECT_REASONS:
    REJECTED.labels(_reason)
for _reason in IMPRESSION_DROP_REASONS:
    IMPRESSIONS_DROPPED.labels(_reason)


_REQUEST_SERIES: dict[tuple[str, int, str], tuple[Counter, Histogram]] = {}
"""The labelled series of each (route, status, bucket) seen: ``labels()`` validates, converts and
locks on every call (~7 µs a request for the two); the routes, statuses and buckets are few."""


def record_request(route: str, status: int, bucket: str, elapsed_s: float) -> None:
    """One answered HTTP request: ``mtrank_requests_total`` and ``mtrank_request_duration_seconds``."""
    series = _REQUEST_SERIES.get((route, status, bucket))
    if series is None:
        series = _REQUEST_SERIES[route, status, bucket] = (
            REQUESTS.labels(route, str(status), bucket), REQUEST_DURATION.labels(route, bucket))
    series[0].inc()
    series[1].observe(elapsed_s)


_PREDICTION_BOUNDS = np.array([*PREDICTION_BUCKETS, math.inf])
PREDICTION_FLUSH_S = 1.0
"""How often the service adds the predictions it has bucketed to ``mtrank_prediction``."""


class _PredictionSeries:
    """The ``mtrank_prediction`` series of one bucket and one model version's tasks.

    One ``observe`` per item and task costs ~1-2 µs (60-120 µs for 20 items and 3 tasks, 5-10 % of
    such a request), and even adding each request's per-bucket counts to the client's values takes
    ~0.3 µs per bucket. So a request's values are bucketed with numpy into counts and sums kept here
    (:meth:`add`), and :meth:`flush` adds them to the histogram about once a second."""

    def __init__(self, bucket: str, tasks: tuple[str, ...], ranges: Mapping[str, tuple[float, float]]):
        children = [PREDICTION.labels(bucket, task) for task in tasks]
        # prometheus_client keeps a histogram's buckets non-cumulative, one value per upper bound
        # (+Inf last), and the sum beside them; tests/test_impressions.py holds this to observe().
        self._cells = [cell for child in children for cell in child._buckets]
        self._sum_cells = [child._sum for child in children]
        width = len(_PREDICTION_BOUNDS)
        self._offsets = (np.arange(len(tasks)) * width)[:, None]
        self._counts = np.zeros(len(tasks) * width, dtype=np.int64)
        self._sums = np.zeros(len(tasks) * width)
        self._dirty = False
        self._scaled = any(t in ranges for t in tasks)
        lo = np.array([ranges.get(t, (0.0, 1.0))[0] for t in tasks])
        hi = np.array([ranges.get(t, (0.0, 1.0))[1] for t in tasks])
        self._lo, self._inv_width = lo[:, None], (1.0 / (hi - lo))[:, None]

    def add(self, values: np.ndarray) -> None:
        """``values``: float64 ``[tasks, items]`` in the tasks' output units (overwritten)."""
        if self._scaled:
            values -= self._lo
            values *= self._inv_width
        np.fmax(values, 0.0, out=values)  # NaN (a broken output) counts as 0, as fusion's floor
        np.fmin(values, 1.0, out=values)
        cells = (np.searchsorted(_PREDICTION_BOUNDS, values) + self._offsets).ravel()
        size = len(self._counts)
        self._counts += np.bincount(cells, minlength=size)
        self._sums += np.bincount(cells, weights=values.ravel(), minlength=size)
        self._dirty = True

    def flush(self) -> None:
        if not self._dirty:
            return
        counts, self._counts = self._counts, np.zeros_like(self._counts)
        sums, self._sums = self._sums, np.zeros_like(self._sums)
        self._dirty = False
        for i in np.flatnonzero(counts).tolist():
            self._cells[i].inc(int(counts[i]))
        for cell, total in zip(self._sum_cells, sums.reshape(len(self._sum_cells), -1).sum(axis=1).tolist(),
                               strict=True):
            cell.inc(total)


_PREDICTION_SERIES: dict[tuple[str, str, int, tuple[str, ...]], _PredictionSeries] = {}


def record_predictions(bucket: str, model: str, version: int, task_scores: Mapping[str, np.ndarray],
                       rows: np.ndarray, ranges: Mapping[str, tuple[float, float]]) -> None:
    """``mtrank_prediction``: every task's prediction for the returned ``rows`` (in rank order) of one
    answer. Regression outputs count as the fraction of their fusion range ``(lo, hi)``, clipped to
    [0, 1], as fusion sees them; tasks without a range (probabilities, ratios) as they are. Reaches
    the histogram at the next :func:`flush_predictions`."""
    key = (bucket, model, version, tuple(task_scores))
    series = _PREDICTION_SERIES.get(key)
    if series is None:
        series = _PREDICTION_SERIES[key] = _PredictionSeries(bucket, key[3], ranges)
    series.add(np.array([v[rows] for v in task_scores.values()], dtype=np.float64))


def flush_predictions() -> None:
    """Add the predictions recorded since the last call to ``mtrank_prediction``."""
    for series in _PREDICTION_SERIES.values():
        series.flush()


def unset(gauge: Gauge, *labels: str) -> None:
    """Drop one labelled series of ``gauge``; with several workers, whose series live in shared
    files that cannot drop one, set it to 0 instead."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        gauge.labels(*labels).set(0)
    else:
        with contextlib.suppress(KeyError):
            gauge.remove(*labels)


def exposition() -> tuple[bytes, str]:
    """The text exposition and its content type: this process's registry, or with several workers
    (``PROMETHEUS_MULTIPROC_DIR`` set) the sum over all of them."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
