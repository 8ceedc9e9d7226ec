"""Dynamic batcher: one per (model, version, user-group graph).

Concurrent requests are queued; a single worker task takes the queue's head and waits until
``max_batch_rows`` rows are waiting or the oldest request has waited ``max_queue_delay``, then
concatenates the rows, runs the graph in a thread (ONNX Runtime releases the GIL, so the event
loop keeps serving) and hands each request exactly its own slice of the outputs. Requests whose
deadline passed or whose client went away are dropped before the run. The queue holds at most
``max_queue_rows`` rows; beyond that :meth:`Batcher.submit` raises :class:`Overloaded` at once.
A request larger than ``max_batch_rows`` runs alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from service import metrics
from service.errors import DeadlineExceeded, Overloaded

log = logging.getLogger("mtrank.batcher")

RunFn = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


@dataclass
class _Pending:
    inputs: dict[str, np.ndarray]
    rows: int
    deadline: float
    """time.monotonic() seconds."""
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


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
    ):
        self._run = run
        self.output_names = output_names
        self.max_batch_rows = max_batch_rows
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_rows = max_queue_rows
        self.batching = batching
        self._queue: deque[_Pending] = deque()
        self._queued_rows = 0
        self._wake = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self._m_wait = metrics.QUEUE_WAIT.labels(model, group)
        self._m_rows = metrics.BATCH_ROWS.labels(model, group)
        self._m_requests = metrics.BATCH_REQUESTS.labels(model, group)
        self._m_infer = metrics.INFERENCE_DURATION.labels(model, group, device)

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    async def submit(self, inputs: dict[str, np.ndarray], deadline: float) -> dict[str, np.ndarray]:
        """This request's outputs by name, ``[rows]`` each. Raises Overloaded, DeadlineExceeded."""
        rows = len(next(iter(inputs.values())))
        if self._queued_rows + rows > self.max_queue_rows:
            raise Overloaded(
                f"{self._queued_rows} rows already waiting for this model graph, limit {self.max_queue_rows}"
                " (MTRANK_MAX_QUEUE_ROWS)"
            )
        if not self.batching:
            return await self._run_alone(inputs, rows, deadline)
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._work(), name="mtrank-batcher")
        pending = _Pending(inputs, rows, deadline, asyncio.get_running_loop().create_future())
        self._queue.append(pending)
        self._queued_rows += rows
        self._wake.set()
        return await pending.future

    async def _run_alone(self, inputs: dict[str, np.ndarray], rows: int, deadline: float) -> dict[str, np.ndarray]:
        """MTRANK_BATCHING=false: one inference per request, as a naive server does it."""
        self._queued_rows += rows
        try:
            started = time.perf_counter()
            outputs = await asyncio.get_running_loop().run_in_executor(None, self._run, inputs)
            self._m_infer.observe(time.perf_counter() - started)
        finally:
            self._queued_rows -= rows
        self._m_wait.observe(0.0)
        self._m_rows.observe(rows)
        self._m_requests.observe(1)
        return dict(zip(self.output_names, outputs, strict=True))

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            await self._wait_for_batch()
            batch = self._take_batch()
            if batch:
                await self._run_batch(loop, batch)

    async def _wait_for_batch(self) -> None:
        """Until the batch is full or the oldest waiting request has waited max_queue_delay."""
        while self._queued_rows < self.max_batch_rows and self._queue:
            remaining = self._queue[0].enqueued + self.max_queue_delay_s - time.monotonic()
            if remaining <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                return

    def _take_batch(self) -> list[_Pending]:
        now = time.monotonic()
        batch: list[_Pending] = []
        rows = 0
        while self._queue and (not batch or rows + self._queue[0].rows <= self.max_batch_rows):
            p = self._queue.popleft()
            self._queued_rows -= p.rows
            if p.future.done():  # cancelled: the client went away or its handler timed out
                continue
            if p.deadline <= now:
                p.future.set_exception(DeadlineExceeded("deadline passed while queued"))
                continue
            batch.append(p)
            rows += p.rows
            self._m_wait.observe(now - p.enqueued)
        return batch

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending]) -> None:
        if len(batch) == 1:
            feed = batch[0].inputs
        else:
            feed = {name: np.concatenate([p.inputs[name] for p in batch]) for name in batch[0].inputs}
        rows = sum(p.rows for p in batch)
        started = time.perf_counter()
        try:
            outputs = await loop.run_in_executor(None, self._run, feed)
        except Exception as e:  # a runtime failure fails this batch's requests, not the worker
            log.exception("inference failed for a batch of %d rows", rows)
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(RuntimeError(f"inference failed: {e}"))
            return
        self._m_infer.observe(time.perf_counter() - started)
        self._m_rows.observe(rows)
        self._m_requests.observe(len(batch))
        offset = 0
        for p in batch:
            end = offset + p.rows
            if not p.future.done():
                p.future.set_result({n: out[offset:end] for n, out in zip(self.output_names, outputs, strict=True)})
            offset = end

    async def close(self) -> None:
        """Stop the worker; requests still queued fail with DeadlineExceeded."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        while self._queue:
            p = self._queue.popleft()
            if not p.future.done():
                p.future.set_exception(DeadlineExceeded("model version unloaded"))
        self._queued_rows = 0
