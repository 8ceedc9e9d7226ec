"""Every Prometheus object of the service (names fixed by docs/architecture.md §7); the rest records here.

Histogram buckets are explicit and fine in the millisecond range: a ranking call takes a few
milliseconds, so the default buckets (5 ms upwards) would hide everything interesting.
"""

from __future__ import annotations

import contextlib
import os

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

for _reason in REJECT_REASONS:
    REJECTED.labels(_reason)


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
