"""Admission before work: refuse a ranking request before its body is read when it could not
finish within its deadline given the rows already queued (Triton's queue policy).

Two signals, either one refuses:

- **The engine's queue.** The body's declared size stands in for its candidate count (bytes per
  candidate are learnt from the requests decoded so far); the expected wait is the rows queued and
  running ahead of it over the engine's measured rows/s (:class:`mtrank.service.batcher.LoadEstimate`).
  The batcher checks again, with the exact row count, once the request is decoded.
- **The event loop.** Decoding, features and the response run on one event loop; when it is the
  bottleneck the engine's queue stays short while requests wait their turn on the loop (and in
  the socket before it). So the time recent requests spent in the handler is tracked too, with the
  number in flight while they ran (exponential averages over the last ~20 answers). By Little's
  law their ratio is the rate the service answers at, and that rate times :data:`LATENCY_SHARE`
  of the deadline is how many requests can be in flight for a new one to be answered within that
  share: above it, new ones are refused. The limit never falls below the engine's parallelism plus
  one, and it only binds once requests take that share of the deadline; it scales with the
  concurrency that was measured, so a service at capacity keeps that many in flight instead of
  being cut down to a handful. A refusal costs the loop a fraction of an answer, so refusing is
  what lets it catch up. (The loop's lag was tried as a signal and dropped: at 64 concurrent
  20-candidate requests the loop runs 10-20 ms late while answers take 40-50 ms of a 1 s deadline,
  so a lag threshold refused healthy traffic. Refusing every new request while the mean latency
  was above the share, whatever the concurrency, cut a saturated closed loop of 16 clients down to
  ~4 in flight and most of its requests to 503s.)

An idle service admits everything, and so does a service that has not measured its engine yet.

**Refusals are paced.** A refusal is cheap, but not free (~0.1-0.2 ms of the event loop), and a
client that resends at once on a 503, ignoring ``Retry-After``, turns each one into another
request. Sixteen such clients with 500 candidates each and a 500 ms deadline kept a 2-core service
refusing 1 700-2 750 requests a second: the loops, at a higher priority than inference, took the
cores, the measured engine rate fell (wall time per row 5 × its CPU time), which kept the refusals
coming, and answers fell to 40-65 % of what the same clients got without refusals. So a process
answers refusals at once only up to :data:`REFUSALS_PER_ANSWER` per request it answers (recent
rate by Little's law, which holds through pauses and bursts, plus :data:`REFUSAL_FLOOR_PER_S`);
refusals beyond that are held, each until its turn at that rate (at most :data:`MAX_HOLD_S` and the
deadline), then answered. Open-loop overload, where refusals only come from new arrivals, stays
below the rate (4 × overload refuses 4-6 per answer, unevenly between processes) and gets its
503s at once.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

from mtrank.service.batcher import LoadEstimate
from mtrank.service.errors import Overloaded

log = logging.getLogger("mtrank.admission")

LATENCY_SHARE = 0.4
"""The mean time in the handler that the in-flight limit aims at, as a share of the deadline (a
mean: the slow ones take about twice as long under overload, and the time before the handler runs
is not in it)."""


REFUSALS_PER_ANSWER = 10.0
"""Refusals answered at once per request the service answers (its recent rate); beyond it they are paced."""
REFUSAL_FLOOR_PER_S = 100.0
"""Refusals per second answered at once even when nothing is being answered."""
BURST_S = 0.5
"""Refusals answered at once in a burst: this many seconds' worth of the rate."""
MAX_HOLD_S = 1.0
"""The longest a paced refusal is held (the ``Retry-After`` a refusal carries is at least 1 s)."""


class Admission:
    def __init__(self, load: LoadEstimate, smoothing: float = 0.1, parallel: int = 1,
                 clock: Callable[[], float] = time.monotonic):
        self.load = load
        self.smoothing = smoothing
        self.parallel = max(1, parallel)
        """Requests the engine runs at once; below that many in flight nothing waits for the loop."""
        self.bytes_per_row: float | None = None
        self.inflight = 0
        self.latency_s = 0.0
        """Exponential average of the time in the server of recently answered ranking requests."""
        self.concurrency = 0.0
        """Exponential average of the requests in flight (itself included) when one was answered."""
        self.clock = clock
        self.refused = 0
        self.held = 0
        """Refusals paced since the last warning."""
        self._warned_at = 0.0
        self._tokens = math.inf
        """Refusals that may be answered at once now (at most the burst); below 0, the paced refusals
        waiting their turn."""
        self._tokens_at = self.clock()

    def check(self, content_length: str | None, budget_s: float) -> None:
        """Raise :class:`Overloaded` when a body of ``content_length`` bytes could not be ranked
        within ``budget_s`` seconds."""
        load = self.load
        limit = self.inflight_limit(budget_s)
        if self.inflight >= limit:
            raise Overloaded(
                f"{self.inflight} requests in flight, the most that can be answered within {LATENCY_SHARE:.0%} of "
                f"the {budget_s * 1000:.0f} ms deadline at the recent {self.latency_s * 1000:.0f} ms each",
                max(1, round(self.latency_s)))
        if not self.bytes_per_row or not content_length or not content_length.isdigit():
            return
        if load.queued_rows == 0 and load.running_rows == 0:
            return  # an idle service runs it at once
        rows = int(int(content_length) / self.bytes_per_row)
        load.refuse_unless_in_time(rows, budget_s, f"about {rows} candidates")

    def inflight_limit(self, budget_s: float) -> float:
        """Requests that may be in flight for a new one to be answered within the deadline's share:
        :meth:`answer_rate` × that share; infinite while recent requests were quicker, never below the
        engine's parallelism + 1."""
        target_s = LATENCY_SHARE * budget_s
        if self.latency_s <= target_s:
            return float("inf")
        return max(self.parallel + 1.0, self.answer_rate() * target_s)

    def answer_rate(self) -> float:
        """Requests the service answers per second at its recent concurrency and latency (Little's law:
        requests in flight ÷ time in the server); 0 before any answer."""
        return self.concurrency / self.latency_s if self.latency_s > 0 else 0.0

    def refusal_hold_s(self, budget_s: float) -> float:
        """Seconds to hold the refusal being answered now (0: answer it at once): refusals flow at
        :data:`REFUSALS_PER_ANSWER` × :meth:`answer_rate` (at least :data:`REFUSAL_FLOOR_PER_S`), with
        :data:`BURST_S` of it at once; beyond that, each waits for its turn."""
        now = self.clock()
        rate = max(REFUSAL_FLOOR_PER_S, REFUSALS_PER_ANSWER * self.answer_rate())
        burst = max(8.0, rate * BURST_S)
        self._tokens = min(burst, self._tokens + (now - self._tokens_at) * rate)
        self._tokens_at = now
        self._tokens -= 1.0
        if self._tokens >= 0.0:
            return 0.0
        hold = -self._tokens / rate
        longest = min(MAX_HOLD_S, budget_s)
        if hold > longest:  # as many waiting as the longest hold allows: this one waits that long, taking no turn
            self._tokens += 1.0
            hold = longest
        if hold <= 0.0:  # its deadline has passed: answered now
            return 0.0
        self.held += 1
        return hold

    def note_refusal(self, reason: str, every_s: float = 10.0) -> None:
        """Count a request refused for load: the first is logged at once, then one warning per
        ``every_s`` sums them up."""
        self.refused += 1
        now = time.monotonic()
        if not self._warned_at or now - self._warned_at >= every_s:
            since = f"in the last {now - self._warned_at:.0f} s" if self._warned_at else "so far"
            paced = f", {self.held} of them paced" if self.held else ""
            log.warning("overloaded: %d requests refused with 503 %s%s (the last: %s)", self.refused, since, paced,
                        reason, extra={"event": "overloaded", "refused": self.refused, "paced": self.held})
            self.refused, self.held, self._warned_at = 0, 0, now

    def admitted(self) -> None:
        """A ranking request passed :meth:`check` and is now in flight."""
        self.inflight += 1

    def answered(self, seconds: float, refused: bool = False) -> None:
        """An admitted request left after ``seconds`` in the server (answered or failed).

        ``refused``: the batcher refused it for load once decoded. It leaves the in-flight count but
        not the averages: a burst of such quick refusals, each with many others in flight, would read
        as a high answer rate and lift the pacing of refusals just when it is needed."""
        if not refused:
            self.concurrency += 0.05 * (self.inflight - self.concurrency)
            self.latency_s += 0.05 * (seconds - self.latency_s)
        self.inflight -= 1

    def learn(self, body_bytes: int, rows: int) -> None:
        """A decoded request: its body size and candidate count."""
        if rows <= 0:
            return
        per_row = body_bytes / rows
        if self.bytes_per_row is None:
            self.bytes_per_row = per_row
        else:
            self.bytes_per_row += self.smoothing * (per_row - self.bytes_per_row)
