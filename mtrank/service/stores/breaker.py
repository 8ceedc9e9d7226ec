"""The circuit breaker around any embedding store back-end.

On a failed call (one of the back-end's :attr:`~mtrank.stores.StoreBackend.errors`) the breaker
opens: answers come from the cache and default vectors (``degraded``) and the back-end is not
asked. After ``retry_s`` one call (a request's lookup or a readiness check) is let through as the
probe, on fresh connections (:meth:`~mtrank.stores.StoreBackend.reconnect`), while the others
keep answering degraded; its success closes the breaker. Recovery, failover and resharding need
no restart.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from mtrank.service import metrics
from mtrank.stores import StoreBackend

log = logging.getLogger("mtrank.stores")

CLOSED, PROBE, OPEN = "closed", "probe", "open"


class CircuitBreaker:
    """Closed (ask the back-end), open (do not) and half-open (one probe) for one back-end."""

    def __init__(self, backend: StoreBackend, retry_s: float):
        self.backend = backend
        self.retry_s = retry_s
        """Seconds after a failure before the next probe."""
        self.degraded = False
        self.last_error = ""
        self._retry_at = 0.0
        self._probing = False
        self._connections_stale = False
        self._on_recovered: list[Callable[[], None]] = []
        self._redis = backend.name == "redis"
        metrics.STORE_DEGRADED.set(0)

    def on_recovered(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` each time the back-end answers again after an outage."""
        self._on_recovered.append(callback)

    def admit(self, now: float) -> str:
        """:data:`CLOSED`: ask the back-end. :data:`PROBE`: this call is the half-open breaker's
        one try (end it with :meth:`end_probe`). :data:`OPEN`: do not ask."""
        if not self.degraded:
            return CLOSED
        if now >= self._retry_at and not self._probing:
            self._probing = True
            return PROBE
        return OPEN

    async def start_probe(self) -> None:
        """Reconnect instead of reusing connections the outage broke."""
        if self._connections_stale:
            await self.backend.reconnect()
            self._connections_stale = False

    def end_probe(self) -> None:
        self._probing = False

    def failed(self, e: BaseException) -> None:
        """A call failed with ``e``: open (or keep open) the breaker."""
        metrics.STORE_ERRORS.labels(self.backend.name).inc()
        if self._redis:
            metrics.REDIS_ERRORS.inc()
        error = self.backend.scrub(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
        if not self.degraded:
            log.warning("%s at %s unreachable (%s); serving default vectors, retrying every %.1f s",
                        self.backend.title, self.backend.display_url, error, self.retry_s)
        self.degraded = True
        self._connections_stale = True
        self.last_error = error
        self._retry_at = time.monotonic() + self.retry_s
        metrics.STORE_DEGRADED.set(1)

    def succeeded(self) -> None:
        """A call succeeded: close the breaker."""
        if not self.degraded:
            return
        log.warning("%s reachable again; embedding store recovered", self.backend.title)
        self.degraded = False
        metrics.STORE_DEGRADED.set(0)
        for callback in self._on_recovered:
            callback()

    def outage_reason(self) -> str:
        return (f"embedding store degraded: {self.backend.title} unreachable ({self.last_error}); "
                f"serving default vectors")
