"""What a running service holds (:class:`ServingState`): the embedding store, the model repository,
the ranker and admission; built at start-up, closed by the app's lifespan."""

from __future__ import annotations

import asyncio
from typing import Any

from mtrank.service import metrics
from mtrank.service.admission import Admission
from mtrank.service.impressions import ImpressionLog, open_impression_log
from mtrank.service.ranking import Ranker
from mtrank.service.repository import Repository
from mtrank.service.settings import Settings
from mtrank.service.stores import EmbeddingStore, open_store


class ServingState:
    """Everything a running service owns: the embedding store, the repository and the ranker."""

    def __init__(self, settings: Settings, store: EmbeddingStore, repository: Repository):
        self.settings = settings
        self.store = store
        self.repository = repository
        self.ranker = Ranker(repository, store)
        self.admission = Admission(repository.load, parallel=repository.load.parallelism)
        self.draining = False
        self.impressions: ImpressionLog | None = open_impression_log(settings)
        self._lag_watch = asyncio.get_running_loop().create_task(watch_event_loop_lag())

    @classmethod
    async def start(cls, settings: Settings) -> ServingState:
        """Load the repository. Raises StartupError / DeviceError for configuration problems."""
        store = open_store(settings)
        repository = Repository(settings, store)
        try:
            await repository.start()
        except BaseException:
            await repository.close()
            await store.close()
            raise
        metrics.LOOKUP_DURATION.labels(store.name)
        return cls(settings, store, repository)

    async def not_ready_reason(self) -> str | None:
        """Why this replica must not get traffic: draining, or no servable model version."""
        if self.draining:
            return "shutting down"
        return self.repository.not_ready_reason()

    def describe(self) -> dict[str, Any]:
        """The body of ``GET /v1/models``: loaded and refused versions, buckets, store, batching."""
        repo = self.repository
        models: dict[str, dict[str, Any]] = {}
        for lv in sorted(repo.loaded_versions(), key=lambda v: (v.name, v.version)):
            entry = models.setdefault(lv.name, {"name": lv.name, "kind": lv.manifest.kind,
                                                "newest": repo.newest(lv.name), "versions": []})
            facet = lv.transform.user_groups
            entry["versions"].append({
                "version": lv.version,
                "device": lv.device,
                "provider": lv.provider,
                "user_groups": list(facet.values) if facet else [],
                "graphs": {k: g.info.tasks for k, g in lv.graphs.items()},
                "tasks": lv.task_names,
                "store_tables": sorted(lv.tables),
                "created_at": lv.manifest.created_at,
            })
        for name, refused in sorted(repo.refused.items()):
            entry = models.setdefault(name, {"name": name, "kind": None, "newest": repo.newest(name), "versions": []})
            entry["refused"] = [{"version": v, "reason": r} for v, r in sorted(refused.items())]
        buckets = [b.model_dump() for b in repo.buckets.buckets] if repo.buckets else []
        return {
            "models": list(models.values()),
            "buckets": buckets,
            "store": {"kind": self.store.name, "degraded": self.store.degraded},
            "batching": self.settings.batching,
            "errors": repo.errors,
        }

    async def close(self) -> None:
        self._lag_watch.cancel()
        metrics.flush_predictions()
        if self.impressions is not None:
            # After the drain: the records of the last answered requests go into the last file.
            await asyncio.to_thread(self.impressions.close)
        await self.repository.close()
        await self.store.close()


async def watch_event_loop_lag(interval_s: float = 0.05) -> None:
    """Record in ``mtrank_event_loop_lag_seconds`` how late a timer fires, every ``interval_s``.

    Decoding, features and responses share one event loop; when it is the bottleneck, requests
    wait for it before any of their own work starts, and that wait is in no other metric (the
    request duration starts when the handler runs). The lag is that wait."""
    loop = asyncio.get_running_loop()
    next_flush = loop.time() + metrics.PREDICTION_FLUSH_S
    while True:
        due = loop.time() + interval_s
        await asyncio.sleep(interval_s)
        now = loop.time()
        metrics.EVENT_LOOP_LAG.observe(max(0.0, now - due))
        if now >= next_flush:
            # Requests bucket their predictions in numpy; the histogram gets the sums once a second.
            metrics.flush_predictions()
            next_flush = now + metrics.PREDICTION_FLUSH_S
