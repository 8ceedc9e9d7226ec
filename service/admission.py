"""Admission before work: refuse a ranking request before its body is read when it could not
finish within its deadline given the rows already queued (Triton's queue policy).

The body's declared size stands in for its candidate count (bytes per candidate are learnt from
the requests decoded so far); the expected wait is the rows queued and running ahead of it over
the engine's measured rows/s (:class:`service.batcher.LoadEstimate`). An idle service admits
everything, and so does a service that has not measured its engine yet. The batcher checks again,
with the exact row count, once the request is decoded.
"""

from __future__ import annotations

from service.batcher import LoadEstimate


class Admission:
    def __init__(self, load: LoadEstimate, smoothing: float = 0.1):
        self.load = load
        self.smoothing = smoothing
        self.bytes_per_row: float | None = None

    def check(self, content_length: str | None, budget_s: float) -> None:
        """Raise :class:`Overloaded` when a body of ``content_length`` bytes could not be ranked
        within ``budget_s`` seconds."""
        load = self.load
        if not self.bytes_per_row or not content_length or not content_length.isdigit():
            return
        if load.queued_rows == 0 and load.running_rows == 0:
            return  # an idle service runs it at once
        rows = int(int(content_length) / self.bytes_per_row)
        load.refuse_unless_in_time(rows, budget_s, f"about {rows} candidates")

    def learn(self, body_bytes: int, rows: int) -> None:
        """A decoded request: its body size and candidate count."""
        if rows <= 0:
            return
        per_row = body_bytes / rows
        if self.bytes_per_row is None:
            self.bytes_per_row = per_row
        else:
            self.bytes_per_row += self.smoothing * (per_row - self.bytes_per_row)
