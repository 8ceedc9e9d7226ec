"""What a bench run measures (:class:`BenchConfig`) and what it is scored against (the targets).

Every target is a ratio of two measurements of the same run (or a latency in milliseconds, or a count),
compared with a threshold: :data:`TARGETS` and :data:`PER_SIZE_TARGETS` are the "Done when" ratios of
issue 17, :data:`INFORMATIONAL` the figures reported beside them.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field


class BenchError(ValueError):
    """A bad option or an unusable device; the message is one line (the CLI exits with status 2)."""


@dataclass(frozen=True)
class TargetSpec:
    """One target: ``value op threshold`` is met (e.g. ``value >= 0.6``)."""

    op: str
    """``">="`` or ``"<="``."""
    threshold: float | None
    """None: set by the run (the overload server's MTRANK_REQUEST_TIMEOUT_MS, in ms)."""
    what: str
    """What the value is, with its unit; per-size targets carry ``{size}``."""

    def for_size(self, size: int) -> TargetSpec:
        """The per-size target with ``{size}`` filled in."""
        return TargetSpec(self.op, self.threshold, self.what.format(size=size))


TARGETS: dict[str, TargetSpec] = {
    "batching_vs_naive_p50_20_c1": TargetSpec("<=", 1.05, "batching p50 ÷ naive p50, 20 candidates at concurrency 1"),
    "service_vs_engine_20_c32": TargetSpec(">=", 0.6, "service rows/s ÷ engine peak rows/s, 20 candidates at "
                                                      "concurrency 32"),
    "service_vs_engine_500_c16": TargetSpec(">=", 0.85, "service rows/s ÷ engine peak rows/s, 500 candidates at "
                                                        "concurrency 16"),
    "overload_goodput": TargetSpec(">=", 0.8, "200 answers/s at 4 × the best closed-loop throughput ÷ that "
                                              "throughput"),
    "overload_503_p99_ms": TargetSpec("<=", 20.0, "p99 latency of the 503 answers under that overload, ms"),
    "overload_accepted_p99_ms": TargetSpec("<=", None, "p99 latency of the 200 answers under that overload, ms "
                                                       "(target: the server's MTRANK_REQUEST_TIMEOUT_MS)"),
    "overload_rss_growth": TargetSpec("<=", 1.1, "server RSS at the end ÷ after the first second of the overload "
                                                 "point"),
    "overload_error_lines": TargetSpec("<=", 0, "ERROR and Traceback lines in the overload server's log"),
}
"""The run's targets, in the order bench.json lists them."""

PER_SIZE_TARGETS: dict[str, TargetSpec] = {
    "batching_vs_naive_{size}": TargetSpec(">=", 1.0, "best batching req/s ÷ best naive req/s, {size} candidates "
                                                      "(each at its best concurrency)"),
    "p99_over_p50_at_70pct_{size}": TargetSpec("<=", 3.0, "p99 ÷ p50, open loop at 70 % of the best closed-loop "
                                                          "throughput, {size} candidates"),
}
"""One target per request size of the run: ``{size}`` is filled in."""

TAIL_KEPT_UP = 0.95
"""A tail point counts only when it answered at least this share of the rate it offered, and when it
held no more requests in flight (answers/s × mean latency, Little's law) than the closed-loop point
of the best throughput ran with: more than that at 70 % of the rate is a standing queue (the host got
slower since the sweep), whose every answer is late alike, so that p99 ÷ p50 looks fine while p50 is
hundreds of milliseconds (100 candidates at 17:54: 99 in flight against 8, p50 203 ms, 1.50)."""

INFORMATIONAL: dict[str, TargetSpec] = {
    "lookup_vs_redis_benchmark_500": TargetSpec("<=", 2.0, "service Redis lookup ÷ redis-benchmark MGET, 500 ids "
                                                           "(p50 per call)"),
    "floor_vs_engine_20_c32": TargetSpec(
        ">=", 0.6, "the serving floor (HTTP, batching and ONNX Runtime on a fixed feed, no ranking path) rows/s ÷ "
                   "engine peak rows/s, 20 candidates at concurrency 32: the most any ranking path could reach "
                   "here (the service's target beside it)"),
    "floor_vs_engine_500_c16": TargetSpec(">=", 0.85, "the serving floor rows/s ÷ engine peak rows/s, 500 "
                                                      "candidates at concurrency 16 (the service's target beside it)"),
    "retry_storm_goodput": TargetSpec(">=", 0.8, "200 answers/s of closed-loop clients that resend at once on a "
                                                 "503, 4 × as many as the deadline's 40 % holds at the best "
                                                 "throughput ÷ that throughput"),
}
"""Figures reported beside the targets (their thresholds are references, not targets)."""

IMPRESSION_TARGETS: dict[str, TargetSpec] = {
    "impression_log_on_vs_off": TargetSpec(">=", 0.95, "req/s with the impression log on (every request logged) ÷ "
                                                       "off, in one server process (request ids it logs ÷ ids its "
                                                       "sampling leaves out), 100 candidates, closed loop; the median "
                                                       "of the rounds' ratios, each round measuring both back to "
                                                       "back"),
    "impression_log_read_only_failures": TargetSpec("<=", 0, "ranking requests that did not answer 200 on the "
                                                             "server whose log directory cannot be written (a 499, "
                                                             "the client leaving at the end of a point, aside)"),
}
"""The "Done when" of issue 30 on the impression log, for runs that measure it (:mod:`mtrank.bench.impressions`)."""

HISTORY_RATIO = "history_service_over_engine_{size}"
HISTORY_SPEC = TargetSpec(">=", 0.8, "history workload (a 50-entry history per request under target attention): "
                                     "service rows/s ÷ the engine's best rows/s on batches of {size}-candidate "
                                     "requests of the same graph, {size} candidates at the workload's concurrency")
HISTORY_TARGET_SIZE = 500
"""The history workload's target is at this size (issue 29); its other sizes are informational."""

ENGINE_POINTS: tuple[tuple[int, int], ...] = ((20, 32), (500, 16))
"""(candidates, concurrency) of the two engine targets, where the serving floor is measured too."""


def target_names(sizes: list[int], impressions: bool = True, history: bool = False) -> list[str]:
    """Every target a run over request ``sizes`` reports; ``impressions``: with the impression log's
    (runs before it was measured have none); ``history``: with the history workload's."""
    return [*TARGETS, *(name.format(size=n) for n in sorted(sizes) for name in PER_SIZE_TARGETS),
            *(IMPRESSION_TARGETS if impressions else ()), *history_target_names(history)]


def history_target_names(history: bool = True) -> list[str]:
    """The history workload's targets (none when the run has no history workload)."""
    return [HISTORY_RATIO.format(size=HISTORY_TARGET_SIZE)] if history else []


@dataclass
class BenchConfig:
    """What one run measures; :meth:`quick` is the CI smoke check (under 2 minutes)."""

    sizes: list[int] = field(default_factory=lambda: [20, 100, 500, 1000])
    """Candidates per request; every size gets the service and naive sweeps and a tail point."""
    concurrencies: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    """Closed-loop concurrencies of both sweeps (1 for the p50 target, 16 and 32 for the engine targets)."""
    bodies_per_size: int = 64
    """Distinct request bodies per size, sent round robin."""
    warmup_s: float = 1.0
    """Seconds of load before a point's first measured window."""
    window_s: float = 1.0
    """Seconds per measured window (a point runs windows until stable)."""
    max_windows: int = 8
    """Windows after which a point stops, stable or not."""
    min_requests_per_window: int = 30
    """A window lasts until this many answers are in."""
    engine_min_time_s: float = 0.4
    """Seconds the engine runs at each batch size."""
    engine_service_threads: bool = True
    """Also measure the service's own session at 1 intra-op thread (informational, CPU only)."""
    engine_twice: bool = True
    """Measure the engine peak again after the batching server's sections and at the end, and keep
    the best run: a peak measured while the host was busy or slow (once 63k rows/s, below the 66k of
    one thread, against 104-112k that hour; once 78k at both the start and the end of a run, against
    120k in the runs before and after) would inflate every ratio to it."""
    lookup_ids: int = 500
    """Ids per lookup call."""
    lookup_calls: int = 2000
    """Lookup calls per way of fetching and round."""
    lookup_rounds: int = 3
    """Rounds of lookups; the median round is kept."""
    floor_points: list[tuple[int, int]] = field(default_factory=lambda: list(ENGINE_POINTS))
    """(candidates, concurrency) of the serving floor (:mod:`mtrank.bench.floor`), CPU runs only: the
    points of the two engine targets, measured with nothing but HTTP, batching and ONNX Runtime."""
    c1_pairs: int = 3
    """Pairs of concurrency-1 points at 20 candidates (batching, naive, back to back, which first
    alternating), the sweep's pair included; the target takes the median of the pairs' p50 ratios.
    Both p50s are 1.2-1.8 ms here and the host's speed moves by more than their difference between
    minutes: one pair read 1.19 where three more read 0.95-1.04."""
    request_timeout_ms: int = 30_000
    """Server deadline in the sweeps: generous, so saturation shows as latency, not as rejections."""
    tail_fraction: float = 0.7
    """Open-loop rate of the tail points ÷ the best closed-loop throughput at their size."""
    tail_repeats: int = 3
    """Open-loop tail points per size; the target takes the one with the median p99 ÷ p50, and all are
    recorded (on a shared 2-core machine one stall in a point's ~1 000 answers moves its p99 5-fold)."""
    overload_size: int = 500
    """Request size of the overload point (the largest size of the run when it has no 500)."""
    overload_factor: float = 4.0
    """Open-loop rate of the overload point ÷ the best closed-loop throughput at its size."""
    overload_s: float = 20.0
    """Seconds of each overload repeat."""
    overload_warmup_s: float = 1.0
    """Seconds of load before each overload repeat's window."""
    overload_timeout_ms: int = 500
    """The overload server's MTRANK_REQUEST_TIMEOUT_MS (a realistic deadline for a ranking call)."""
    overload_client_timeout_s: float = 2.0
    """The load generator gives up after this (above the server's deadline, so the server decides)."""
    overload_repeats: int = 3
    """Open-loop overload points, one after the other on the same server; the targets take each figure's
    median over them, and all are recorded (goodput moved 0.70-0.82 and the 503 p99 61-102 ms between
    single points of three runs of the same code)."""
    overload_pause_s: float = 2.0
    """Idle time between overload repeats (the queue drains within the 500 ms deadline)."""
    retry_storm_s: float = 10.0
    """The retry-storm point on the overload server: a closed loop whose clients resend at once on a 503
    (ignoring Retry-After), :func:`mtrank.bench.measure.storm_clients` of them, measured this long."""
    rss_interval_s: float = 0.2
    """Seconds between two samples of the overload server's RSS."""
    impressions_size: int = 100
    """Candidates per request of the impression-log point (:mod:`mtrank.bench.impressions`)."""
    impressions_concurrency: int = 16
    """Closed-loop connections of the impression-log point (past the knee of 100 candidates here, so the
    servers are busy and what the writer thread takes from them shows)."""
    impressions_rounds: int = 9
    """Rounds of the impression-log point: in each, one point of each of its four kinds (the log on and
    off in one process, the server without the log, the read-only one), the order rotating; the target
    takes the median round. The log costs a few per cent, and single rounds on this 2-core host read
    0.85-1.19 (eight rounds of the same process, logged ÷ sampled out): nine rounds, about 160 s."""
    history_sizes: list[int] = field(default_factory=lambda: [100, HISTORY_TARGET_SIZE])
    """Candidates per request of the history workload (:mod:`mtrank.bench.history`)."""
    history_concurrency: int = 16
    """Closed-loop connections of the history workload's service points (the engine target's at 500)."""
    history_requests: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    """Requests per batch at which the engine runs the history graph (the batcher stacks up to
    ``max_batch_rows`` rows of whole requests; the reference is the best of these)."""
    history_engine_min_time_s: float = 1.5
    """Seconds the engine runs the history graph at each batch (a batch of 500-candidate requests takes
    30-60 ms here: at 0.4 s a repeat was a handful of batches, and one size read 14k and 42k rows/s
    in two runs minutes apart)."""

    @classmethod
    def quick(cls) -> BenchConfig:
        """The CI smoke run: two sizes, three concurrencies, short windows, one repeat of everything."""
        return cls(
            sizes=[20, 500], concurrencies=[1, 16, 32], bodies_per_size=16, warmup_s=0.3, window_s=0.3,
            max_windows=3, min_requests_per_window=8, engine_min_time_s=0.03, engine_service_threads=False,
            engine_twice=False, c1_pairs=1,
            lookup_calls=200, lookup_rounds=1, overload_s=3.0, overload_warmup_s=0.5, tail_repeats=1,
            overload_repeats=1, retry_storm_s=2.0, impressions_rounds=1, history_requests=[1, 4],
            history_engine_min_time_s=0.03,
        )

    @property
    def overload_at(self) -> int:
        """Request size of the overload point."""
        return self.overload_size if self.overload_size in self.sizes else max(self.sizes)


def config_for(args: argparse.Namespace) -> BenchConfig:
    """The run's :class:`BenchConfig`: ``--quick`` or the full one, with ``--sizes`` / ``--concurrencies``."""
    cfg = BenchConfig.quick() if args.quick else BenchConfig()
    if getattr(args, "sizes", None):
        cfg.sizes = sorted(set(args.sizes))
    if getattr(args, "concurrencies", None):
        cfg.concurrencies = sorted(set(args.concurrencies))
    return cfg
