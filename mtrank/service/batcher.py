"""Dynamic batcher: one per (model, version, user-group graph).

- **Dispatch when idle.** A request that arrives while its graph has a free slot runs at once:
  batching never delays a lone request. ``max_concurrent`` batches of a graph may be in flight
  (ONNX Runtime releases the GIL, so they run on different cores while the event loop keeps
  serving).
- **Batch while busy.** Requests that arrive while every slot is taken queue up; when a slot
  frees, everything queued (up to ``max_batch_rows``) runs as one batch. While other batches of
  the graph are still running, a partial batch waits for more rows at most until its oldest
  request has waited ``max_queue_delay`` — the longest *extra* wait batching adds.
- **The engine does not wait for the event loop.** Each slot is a worker thread that takes its
  next batch from the queue itself the moment its last one is done, and hands results back to
  the loop. Under overload the loop is busy answering and refusing requests; were it the one to
  start batches, the engine would idle until the loop got round to it (a third of the cores sat
  idle at 4 × overload, with three batches nominally "running").
- **Admission.** :meth:`Batcher.submit` refuses (503, :class:`Overloaded`) a request whose rows
  would not finish before its deadline given the rows queued ahead of it and the measured engine
  throughput (:class:`LoadEstimate`), and any request beyond ``max_queue_rows`` queued rows.
  Requests whose deadline passed or whose client went away are dropped before they run.

Each request gets exactly its own slice of the batch outputs; its scores do not depend on which
other requests shared its batch (tests/test_service_unit.py holds this).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from mtrank.manifest import REQUEST_INDEX_INPUT
from mtrank.service import metrics, tracing
from mtrank.service.errors import DeadlineExceeded, Overloaded

log = logging.getLogger("mtrank.batcher")

WORKER_NICE = 10
"""Niceness of the worker threads (Linux: per thread). The event loop must get its core when it
needs it, or refusals and answers wait behind inference: at 4 × overload on 2 cores, 503 answers
took p99 230 ms with the workers at the loop's priority and 77-129 ms at +10, and goodput rose from
105 to 145-168 req/s (the loop refuses sooner and so works less). Inference still gets every cycle
the loop leaves."""
RunFn = Callable[[dict[str, np.ndarray]], list[np.ndarray]]
QUEUE_SHARE = 0.8
"""Share of a request's remaining time its queue wait and inference may take; the rest is for
decoding, features, fusion and the response, so an admitted request finishes before its deadline."""


class LoadEstimate:
    """Rows waiting and running across the whole service, and how long they will take.

    Shared by every batcher of a process (they compete for the same cores), read by the HTTP
    layer to refuse a request before its body is read when it could not finish in time.

    - One batch of ``r`` rows takes ``fixed_s + r * per_row_s`` seconds of wall time: seeded from
      timed warm-up runs, refitted online (least squares with exponential forgetting) on every
      batch, so it includes what the event loop and the rest of the machine take from the engine.
    - Batches overlap: how many run at once on average (the sum of batch times over the time they
      span, over the last ``window_s`` seconds of busy batches) divides the work queued ahead;
      until that is measured, ``parallelism`` stands in.

    The batchers' worker threads and the event loop both update it: counts and samples change under
    a lock; readers take them as they are (an estimate one batch old is as good).
    """

    def __init__(self, parallelism: int, max_batch_rows: int = 4096, forgetting: float = 0.05,
                 window_s: float = 2.0):
        self.parallelism = max(1, parallelism)
        """How many batches can truly run at once (cores ÷ intra-op threads, at most the slots)."""
        self.max_batch_rows = max(1, max_batch_rows)
        self.forgetting = forgetting
        self.window_s = window_s
        self.queued_rows = 0
        self.running_rows = 0
        self.fixed_s = 0.0
        self.per_row_s: float | None = None
        self._moments: list[float] | None = None  # E[r], E[t], E[r²], E[r·t]
        self._busy: deque[tuple[float, float]] = deque()  # (start, end), monotonic, of batches run while others waited
        self._overlap = float(self.parallelism)
        self._lock = threading.Lock()

    def add_queued(self, rows: int) -> None:
        with self._lock:
            self.queued_rows += rows

    def start(self, rows: int) -> None:
        """Rows leave the queue for a batch that starts now."""
        with self._lock:
            self.queued_rows -= rows
            self.running_rows += rows

    def drop_queued(self, rows: int) -> None:
        """Queued rows that will not run (deadline passed, client gone, version unloaded)."""
        with self._lock:
            self.queued_rows -= rows

    def finish(self, rows: int) -> None:
        with self._lock:
            self.running_rows -= rows

    def seed(self, small: tuple[int, float], large: tuple[int, float]) -> None:
        """Two timed runs, (rows, seconds) each, at two batch sizes."""
        (r1, t1), (r2, t2) = small, large
        self.per_row_s = max((t2 - t1) / max(r2 - r1, 1), 1e-9)
        self.fixed_s = max(t1 - self.per_row_s * r1, 0.0)
        mean_r, mean_t = (r1 + r2) / 2, (t1 + t2) / 2
        self._moments = [mean_r, mean_t, (r1 * r1 + r2 * r2) / 2, (r1 * t1 + r2 * t2) / 2]

    def observe(self, rows: int, seconds: float, busy: bool = False) -> None:
        """One finished batch: its rows and wall time; ``busy``: other work was waiting for it."""
        sample = [rows, seconds, rows * rows, rows * seconds]
        with self._lock:
            if self._moments is None:
                self._moments = sample
            else:
                w = self.forgetting
                self._moments = [(1 - w) * m + w * x for m, x in zip(self._moments, sample, strict=True)]
            mean_r, mean_t, mean_rr, mean_rt = self._moments
            var = mean_rr - mean_r * mean_r
            if var > (0.05 * mean_r) ** 2 and var > 1.0:
                self.per_row_s = max((mean_rt - mean_r * mean_t) / var, 1e-9)
            elif self.per_row_s is None:
                self.per_row_s = mean_t / max(mean_r, 1.0)  # one batch size seen so far: no fixed part
            self.fixed_s = max(mean_t - self.per_row_s * mean_r, 0.0)
            if busy:
                end = time.monotonic()
                self._busy.append((end - seconds, end))
                while self._busy and self._busy[0][1] < end - self.window_s:
                    self._busy.popleft()
                self._overlap = self._measured_overlap()

    def _measured_overlap(self) -> float:
        if len(self._busy) < 4:
            return float(self.parallelism)
        span = self._busy[-1][1] - min(start for start, _ in self._busy)
        total = sum(end - start for start, end in self._busy)
        return min(float(self.parallelism), max(1.0, total / span)) if span > 0 else float(self.parallelism)

    @property
    def overlap(self) -> float:
        """Batches running at once on average while busy (1 to ``parallelism``), as of the last batch."""
        return self._overlap

    def batch_s(self, rows: int) -> float:
        """Wall seconds of one batch of ``rows`` rows (0 before any measurement)."""
        return self.fixed_s + rows * self.per_row_s if self.per_row_s else 0.0

    def expected_wait_s(self, rows: int) -> float:
        """Seconds until ``rows`` more rows would be done: the batches queued and (half of those)
        running ahead of them, spread over the overlapping slots, then their own batch."""
        if not self.per_row_s:
            return 0.0
        queued = self.queued_rows
        ahead = math.ceil(queued / self.max_batch_rows) * self.fixed_s + queued * self.per_row_s
        ahead += self.batch_s(self.running_rows) / 2 if self.running_rows else 0.0
        return ahead / self.overlap + self.batch_s(rows)

    def retry_after_s(self) -> int:
        """Whole seconds a refused client should wait: about the time to drain the queue."""
        return max(1, math.ceil(self.expected_wait_s(0)))

    def refuse_unless_in_time(self, rows: int, remaining_s: float, what: str) -> None:
        """Raise :class:`Overloaded` when ``rows`` more rows would not be done within
        :data:`QUEUE_SHARE` of the ``remaining_s`` seconds a request has left."""
        wait = self.expected_wait_s(rows)
        if wait > QUEUE_SHARE * remaining_s:
            raise Overloaded(
                f"{what} would finish in {wait * 1000:.0f} ms, after the request's {remaining_s * 1000:.0f} ms "
                f"deadline ({self.queued_rows} rows queued)", self.retry_after_s()
            )


@dataclass
class _Pending:
    inputs: dict[str, np.ndarray]
    rows: int
    deadline: float
    """time.monotonic() seconds."""
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    enqueued_ns: int = field(default_factory=time.time_ns)
    """Wall-clock timestamps (ns) of the request's trace spans: queued, batch started, batch done."""
    dispatched_ns: int = 0
    done_ns: int = 0


class Batcher:
    def __init__(
        self,
        run: RunFn,
        output_names: list[str],
        model: str,
        group: str,
        device: str,
        max_batch_rows: int = 4096,
        max_queue_delay_s: float = 0.002,
        max_queue_rows: int = 65536,
        batching: bool = True,
        max_concurrent: int = 2,
        load: LoadEstimate | None = None,
        request_inputs: frozenset[str] = frozenset(),
    ):
        self._run = run
        self.request_inputs = request_inputs
        """Inputs with a row per request (the user's side): whole in every chunk, and stacked with
        ``request_index`` shifted when requests share a batch."""
        self.output_names = output_names
        self.max_batch_rows = max_batch_rows
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_rows = max_queue_rows
        self.batching = batching
        self.max_concurrent = max(1, max_concurrent)
        self.load = load or LoadEstimate(self.max_concurrent)
        # Everything below the lock is shared by the event loop (submit, close) and the workers.
        self._lock = threading.Condition(threading.Lock())
        self._queue: deque[_Pending] = deque()
        self._queued_rows = 0
        self._running = 0
        self._closed = False
        self._m_wait = metrics.QUEUE_WAIT.labels(model, group)
        self._m_rows = metrics.BATCH_ROWS.labels(model, group)
        self._m_requests = metrics.BATCH_REQUESTS.labels(model, group)
        self._m_infer = metrics.INFERENCE_DURATION.labels(model, group, device)
        self._workers = [
            threading.Thread(target=self._work, name=f"mtrank-batch-{model}-{group}-{i}", daemon=True)
            for i in range(self.max_concurrent if batching else 0)
        ]
        for worker in self._workers:
            worker.start()

    async def submit(self, inputs: dict[str, np.ndarray], deadline: float) -> dict[str, np.ndarray]:
        """This request's outputs by name, ``[rows]`` each. Raises Overloaded, DeadlineExceeded.

        A request larger than ``max_batch_rows`` arriving while slots are free is split into
        chunks of about equal size, one per free slot, that run at the same time; on a busy graph
        it runs whole (splitting would only add calls).
        """
        rows = self._rows(inputs)
        self._admit(rows, deadline)
        if not self.batching:
            return await self._run_alone(inputs, rows)
        free = self.max_concurrent - self._running
        if rows > self.max_batch_rows and free > 1 and not self._queue:
            return await self._submit_chunks(inputs, rows, min(free, math.ceil(rows / self.max_batch_rows)), deadline)
        return await self._enqueue(inputs, rows, deadline)

    def _rows(self, inputs: dict[str, np.ndarray]) -> int:
        return len(next(v for k, v in inputs.items() if k not in self.request_inputs))

    async def _submit_chunks(
        self, inputs: dict[str, np.ndarray], rows: int, n_chunks: int, deadline: float
    ) -> dict[str, np.ndarray]:
        bounds = np.linspace(0, rows, n_chunks + 1).round().astype(int).tolist()
        whole = self.request_inputs
        tasks = [asyncio.ensure_future(self._enqueue({k: v if k in whole else v[a:b] for k, v in inputs.items()},
                                                     b - a, deadline))
                 for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:  # one chunk failed or the request was cancelled: drop the others' rows
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return {name: np.concatenate([r[name] for r in results]) for name in self.output_names}

    async def _enqueue(self, inputs: dict[str, np.ndarray], rows: int, deadline: float) -> dict[str, np.ndarray]:
        pending = _Pending(inputs, rows, deadline, asyncio.get_running_loop().create_future())
        with self._lock:
            if self._closed:
                raise DeadlineExceeded("model version unloaded")
            self._queue.append(pending)
            self._queued_rows += rows
            self.load.add_queued(rows)
            self._lock.notify()
        outputs = await pending.future
        if tracing.enabled():
            tracing.record("queue_wait", pending.enqueued_ns, pending.dispatched_ns)
            tracing.record("inference", pending.dispatched_ns, pending.done_ns, rows=rows)
        return outputs

    def _admit(self, rows: int, deadline: float) -> None:
        if self._closed:
            raise DeadlineExceeded("model version unloaded")
        if self._queued_rows + rows > self.max_queue_rows:
            raise Overloaded(
                f"{self._queued_rows} rows already waiting for this model graph, limit {self.max_queue_rows}"
                " (MTRANK_MAX_QUEUE_ROWS)", self.load.retry_after_s()
            )
        if self._running >= self.max_concurrent or self._queued_rows > 0:
            self.load.refuse_unless_in_time(rows, deadline - time.monotonic(), f"{rows} rows")

    async def _run_alone(self, inputs: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
        """MTRANK_BATCHING=false: one inference per request, as a naive server does it."""
        self._queued_rows += rows
        self.load.add_queued(rows)
        self.load.start(rows)
        try:
            started = time.perf_counter()
            outputs = await asyncio.get_running_loop().run_in_executor(None, self._run, inputs)
            elapsed = time.perf_counter() - started
        finally:
            self._queued_rows -= rows
            self.load.finish(rows)
        self.load.observe(rows, elapsed, busy=self._queued_rows > 0)
        self._m_infer.observe(elapsed)
        self._m_wait.observe(0.0)
        self._m_rows.observe(rows)
        self._m_requests.observe(1)
        return dict(zip(self.output_names, outputs, strict=True))

    # -- the workers ---------------------------------------------------------------------------

    def _work(self) -> None:
        """One slot: take a batch, run it, hand each request its slice, until closed."""
        with contextlib.suppress(OSError, AttributeError):  # per-thread niceness is Linux's; elsewhere as is
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORKER_NICE)
        while True:
            with self._lock:
                batch = self._next_batch()
                if batch is None:
                    return
                self._running += 1
            try:
                self._run_batch(batch)
            finally:
                with self._lock:
                    self._running -= 1
                    self._lock.notify_all()  # a partial batch may have been waiting for this one

    def _next_batch(self) -> list[_Pending] | None:
        """Under the lock: wait until a batch may start (or the batcher closes: None)."""
        while not self._closed:
            if not self._queue:
                self._lock.wait()
                continue
            if self._running > 0 and self._queued_rows < self.max_batch_rows:
                # Others are running: a partial batch waits for company, at most until its oldest is due.
                wait = self._queue[0].enqueued + self.max_queue_delay_s - time.monotonic()
                if wait > 0:
                    self._lock.wait(wait)
                    continue
            batch = self._take_batch()
            if batch:
                return batch
        return None

    def _take_batch(self) -> list[_Pending]:
        now = time.monotonic()
        now_ns = time.time_ns()
        batch: list[_Pending] = []
        rows = 0
        dropped = 0
        late: list[tuple[_Pending, BaseException]] = []
        while self._queue and (not batch or rows + self._queue[0].rows <= self.max_batch_rows):
            p = self._queue.popleft()
            self._queued_rows -= p.rows
            if p.future.done():  # cancelled: the client went away or its handler timed out
                dropped += p.rows
                continue
            if p.deadline <= now:
                dropped += p.rows
                late.append((p, DeadlineExceeded("deadline passed while queued")))
                continue
            batch.append(p)
            rows += p.rows
            p.dispatched_ns = now_ns
            self._m_wait.observe(now - p.enqueued)
        _resolve(late)
        self.load.drop_queued(dropped)
        self.load.start(rows)
        return batch

    def _run_batch(self, batch: list[_Pending]) -> None:
        rows = sum(p.rows for p in batch)
        try:
            started = time.perf_counter()
            try:
                if len(batch) == 1:
                    feed = batch[0].inputs
                else:
                    feed = merge_feeds([p.inputs for p in batch], self.request_inputs)
                outputs = self._run(feed)
            except Exception as e:  # a runtime failure fails this batch's requests, not the worker
                log.exception("inference failed for a batch of %d rows", rows)
                _resolve([(p, RuntimeError(f"inference failed: {e}")) for p in batch])
                return
            elapsed = time.perf_counter() - started
            done_ns = time.time_ns()
            self.load.observe(rows, elapsed, busy=bool(self._queue) or self._running > 1)
            self._m_infer.observe(elapsed)
            self._m_rows.observe(rows)
            self._m_requests.observe(len(batch))
            offset = 0
            results: list[tuple[_Pending, dict[str, np.ndarray]]] = []
            for p in batch:
                p.done_ns = done_ns
                end = offset + p.rows
                results.append((p, {n: out[offset:end] for n, out in zip(self.output_names, outputs, strict=True)}))
                offset = end
            _resolve(results)
        finally:
            self.load.finish(rows)

    def stop(self) -> list[_Pending]:
        """Stop the workers once their running batch is done (any thread); returns the requests
        still queued, which will not run."""
        with self._lock:
            self._closed = True
            left = list(self._queue)
            self._queue.clear()
            self._queued_rows = 0
            self._lock.notify_all()
        self.load.drop_queued(sum(p.rows for p in left))
        return left

    async def close(self) -> None:
        """Stop dispatching; requests still queued fail with DeadlineExceeded; wait for running batches."""
        for p in self.stop():
            if not p.future.done():
                p.future.set_exception(DeadlineExceeded("model version unloaded"))
        if self._workers:
            await asyncio.get_running_loop().run_in_executor(None, self._join)

    def _join(self) -> None:
        for worker in self._workers:
            worker.join()


def merge_feeds(feeds: list[dict[str, np.ndarray]], request_inputs: frozenset[str]) -> dict[str, np.ndarray]:
    """One feed of several requests' feeds: rows stacked, per-request rows stacked, and each
    feed's ``request_index`` shifted past the requests before it."""
    merged = {name: np.concatenate([f[name] for f in feeds]) for name in feeds[0] if name != REQUEST_INDEX_INPUT}
    if REQUEST_INDEX_INPUT in feeds[0]:
        shifted, offset = [], 0
        for f in feeds:
            shifted.append(f[REQUEST_INDEX_INPUT] + offset)
            offset += _requests(f, request_inputs)
        merged[REQUEST_INDEX_INPUT] = np.concatenate(shifted)
    return merged


def _requests(feed: dict[str, np.ndarray], request_inputs: frozenset[str]) -> int:
    """How many requests a feed holds: the rows of a per-request input (1 for a graph without any)."""
    for name in request_inputs:
        if name in feed:
            return len(feed[name])
    return 1


def _resolve(outcomes: list[tuple[_Pending, dict[str, np.ndarray] | BaseException]]) -> None:
    """From a worker thread: settle the requests' futures on their event loop (those not done yet).

    One hand-off per loop for the whole list, not one per request: each ``call_soon_threadsafe``
    wakes the loop, and a batch of 20-candidate requests at concurrency 32 holds 5-10 of them."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future, object]]] = {}
    for p, outcome in outcomes:
        by_loop.setdefault(p.future.get_loop(), []).append((p.future, outcome))
    for loop, settled in by_loop.items():
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits for the answers any more
            loop.call_soon_threadsafe(_settle, settled)


def _settle(settled: list[tuple[asyncio.Future, object]]) -> None:
    """On the event loop: each future's result or exception, unless it is done (cancelled)."""
    for future, outcome in settled:
        if future.done():
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
