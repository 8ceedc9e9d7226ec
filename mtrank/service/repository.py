"""Model repository loading and hot reload.

For each model the newest complete version is served, plus any version a bucket pins. A version
is verified (checksums), its sessions created and warmed, and its store tables checked before it
is served; then the whole ``{model: versions}`` map is swapped in one assignment. A version that
fails to load is reported and the previous one stays served. Requests hold a reference to the
version they started with; a replaced version's batchers are stopped only after a grace period
longer than any request can live.

When the newest version of a model fails its checks and no version of it is served yet (at
start-up), the newest older version that passes is served instead; every refused version is kept
in :attr:`Repository.refused` with its reason (shown by ``/v1/models``, ``/readyz`` and the
``mtrank_model_versions_refused`` gauge).

Model files are untrusted input: any exception while opening a version (a malformed manifest, a
file outside the version directory, a graph ONNX Runtime rejects) refuses that version, never the
reload or the start-up. Reasons are public (``/readyz`` and ``/v1/models`` answer without
authentication), so they name files relative to the repository root; the log has the full paths.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from mtrank.fusion import BucketConfig
from mtrank.manifest import Manifest, ManifestError, list_models, list_versions, load_manifest, version_dir
from mtrank.service import metrics
from mtrank.service.batcher import Batcher, LoadEstimate
from mtrank.service.buckets import BucketTable
from mtrank.service.runner import BATCH_SIZES, DeviceError, GraphRunner, best_batch_rows
from mtrank.service.settings import Settings
from mtrank.service.stores import EmbeddingStore, LocalTable
from mtrank.service.version import GroupGraph, LoadedVersion, check_graph
from mtrank.service.workers import warm_up_turn
from mtrank.transform import FeatureTransform

log = logging.getLogger("mtrank.repository")

_ABSOLUTE_PATH = re.compile(r"""(?:^|(?<=[\s"'(\[=]))/[^\s"',:;)\]]*""")
"""An absolute POSIX path at the start of a text or after a space, quote, bracket or ``=``."""


class StartupError(RuntimeError):
    """A configuration problem found while loading: the process must not start."""


class LoadError(RuntimeError):
    """One version could not be loaded; the message says why."""


class BucketMismatch(LoadError):
    """A bucket's fusion weights name tasks the version does not have."""


@dataclass
class ReloadReport:
    """What one (re)load did. ``POST /admin/reload`` answers 200 when ``errors`` is empty, even with
    refused versions (the rest of the repository was loaded), and 409 otherwise."""

    served: dict[str, list[int]] = field(default_factory=dict)
    """The versions served per model after the reload."""
    loaded: list[str] = field(default_factory=list)
    """``"<model> v<version>"`` of each version loaded by this reload."""
    refused: dict[str, str] = field(default_factory=dict)
    """``"<model> v<version>"`` → why that version failed its checks (it is not served)."""
    errors: dict[str, str] = field(default_factory=dict)
    """Bucket → why it has no servable model version (configuration, or every version refused)."""
    details: dict[str, str] = field(default_factory=dict)
    """The refusals with the files' full paths: for the log only."""

    def to_dict(self) -> dict:
        return {"served": self.served, "loaded": self.loaded, "refused": self.refused, "errors": self.errors}


class Repository:
    def __init__(self, settings: Settings, store: EmbeddingStore, load: LoadEstimate | None = None):
        self.settings = settings
        self.store = store
        batches, threads = settings.concurrency()
        self.load = load or LoadEstimate(min(batches, max(1, settings.cores() // threads)),
                                         settings.max_batch_rows or 1024)
        """Rows queued and running in every batcher, and the engine's measured rows/s."""
        self.root = Path(settings.model_repo) if settings.model_repo else None
        self._models: dict[str, dict[int, LoadedVersion]] = {}
        self._newest: dict[str, int] = {}
        self.buckets: BucketTable | None = None
        self.errors: dict[str, str] = {}
        """The last (re)load's bucket errors and refused versions, by bucket or ``"<model> v<version>"``."""
        self.refused: dict[str, dict[int, str]] = {}
        """Versions of the last (re)load that failed their checks: ``{model: {version: reason}}``."""
        self._refused_series: set[tuple[str, str]] = set()
        self._lock = asyncio.Lock()
        self._retiring: set[asyncio.Task] = set()
        self._poller: asyncio.Task | None = None

    # -- serving side -----------------------------------------------------------------------

    def resolve(self, model: str, version: int | None) -> LoadedVersion | None:
        versions = self._models.get(model)
        if not versions:
            return None
        return versions.get(version if version is not None else self._newest[model])

    @property
    def ready(self) -> bool:
        return self.buckets is not None and all(
            self.resolve(b.model, b.version) is not None for b in self.buckets.buckets
        )

    def not_ready_reason(self) -> str | None:
        if self.root is None:
            return "no model repository configured (MTRANK_MODEL_REPO)"
        if not self._models:
            detail = "; ".join(f"{k}: {v}" for k, v in self.errors.items())
            return "no model version loaded from the model repository" + (f" ({detail})" if detail else "")
        if self.buckets is None:
            return "buckets not resolved"
        for b in self.buckets.buckets:
            if self.resolve(b.model, b.version) is None:
                pin = f" v{b.version}" if b.version else ""
                return f"bucket {b.name!r}: model {b.model}{pin} not loaded"
        return None

    def loaded_versions(self) -> list[LoadedVersion]:
        return [lv for versions in self._models.values() for lv in versions.values()]

    def newest(self, model: str) -> int | None:
        return self._newest.get(model)

    def served(self) -> dict[str, list[int]]:
        """The versions served per model."""
        return {m: sorted(vs) for m, vs in self._models.items()}

    def refusal_notice(self) -> str | None:
        """One line naming each refused version and what is served instead, or None."""
        parts = []
        for model, versions in sorted(self.refused.items()):
            for version, reason in sorted(versions.items()):
                instead = f"serving v{self._newest[model]}" if model in self._newest else "nothing served"
                parts.append(f"{model} v{version} refused ({reason}); {instead}")
        return "; ".join(parts) or None

    # -- loading ---------------------------------------------------------------------------

    async def start(self) -> ReloadReport:
        """First load. Raises StartupError for configuration problems; a version that merely
        fails to load leaves the service up but not ready (with the reason)."""
        if self.root is None:
            raise StartupError("MTRANK_MODEL_REPO: not set (or pass --repo)")
        if not self.root.is_dir():
            raise StartupError(f"MTRANK_MODEL_REPO: {self.root} is not a directory")
        report = await self.reload(startup=True)
        interval = self.settings.reload_interval_s
        self._poller = asyncio.get_running_loop().create_task(self._poll(interval), name="mtrank-reload")
        self._poller.add_done_callback(_log_task_failure)
        return report

    async def _poll(self, interval: float) -> None:
        """Reload every ``interval`` s; with polling off, retry every 2 s only while not ready."""
        while True:
            await asyncio.sleep(interval if interval > 0 else 2.0)
            if interval > 0 or not self.ready:
                try:
                    await self.reload()
                except Exception:
                    log.exception("repository poll failed")

    async def reload(self, startup: bool = False) -> ReloadReport:
        async with self._lock:
            return await self._reload(startup)

    def _bucket_configs(self, models: list[str]) -> list[BucketConfig]:
        configured = self.settings.buckets
        if configured is None:
            if not models:
                return []
            return [BucketConfig(name="default", share=100.0, model=models[0])]
        if not models:
            return list(configured)
        return [b if b.model is not None else b.model_copy(update={"model": models[0]}) for b in configured]

    def path_free(self, text: str) -> str:
        """``text`` for public answers: paths inside the repository relative to its root, any other
        absolute path (a library's message may name one) as ``<path>``."""
        if self.root is not None:
            for root in sorted({str(self.root.absolute()), str(self.root.resolve())}, key=len, reverse=True):
                text = text.replace(root + os.sep, "").replace(root, "the model repository")
        return _ABSOLUTE_PATH.sub("<path>", text)

    async def _reload(self, startup: bool) -> ReloadReport:
        report = ReloadReport()
        models = list_models(self.root) if self.root is not None else []
        buckets = self._bucket_configs(models)
        for b in buckets:
            if models and b.model not in models:
                msg = (f"MTRANK_BUCKETS: bucket {b.name!r} serves model {b.model!r}, "
                       f"not in the model repository (has {models})")
                if startup:
                    raise StartupError(f"{msg} ({self.root})")
                report.errors[b.name] = msg
        new_models: dict[str, dict[int, LoadedVersion]] = {}
        new_newest: dict[str, int] = {}
        refused: dict[str, dict[int, str]] = {}
        for model in models:
            versions = list_versions(self.root, model)
            wanted = {versions[-1]} | {b.version for b in buckets if b.model == model and b.version is not None}
            served: dict[int, LoadedVersion] = {}
            for v in sorted(wanted):
                lv = await self._try_load(model, v, buckets, v == versions[-1], startup, report, refused)
                if lv is not None:
                    served[v] = lv
            newest = versions[-1]
            if newest not in served and model in self._newest:
                # The new version failed: keep serving the previous newest.
                newest = self._newest[model]
                served.setdefault(newest, self._models[model][newest])
            elif newest not in served:
                # Nothing of this model is served yet (start-up during a bad roll-out): serve the
                # newest older version that passes rather than leave the replica without a model.
                for v in reversed(versions[:-1]):
                    lv = served.get(v) or await self._try_load(model, v, buckets, True, False, report, refused)
                    if lv is not None:
                        served[v], newest = lv, v
                        log.warning("serving %s v%d instead of the refused v%d", model, v, versions[-1],
                                    extra={"event": "model_fallback", "model": model, "version": v,
                                           "refused_version": versions[-1]})
                        break
            if newest in served:
                new_models[model] = served
                new_newest[model] = newest
        for b in buckets:
            if b.name not in report.errors and b.model in models and (
                (b.version or new_newest.get(b.model)) not in new_models.get(b.model, {})
            ):
                pin = f" v{b.version}" if b.version else ""
                report.errors[b.name] = f"bucket {b.name!r}: no servable version of model {b.model}{pin}"
        errors = {**report.refused, **report.errors}
        for key, reason in errors.items():
            if self.errors.get(key) != reason:  # the retry loop would repeat it every 2 s
                log.error("not serving %s: %s", key, report.details.get(key, reason),
                          extra={"event": "model_refused", "what": key})
        old = self.loaded_versions()
        self._models, self._newest = new_models, new_newest
        if models:
            self.buckets = BucketTable(tuple(buckets), self.settings.bucket_salt)
        self.errors = errors
        self.refused = refused
        report.served = {m: sorted(vs) for m, vs in new_models.items()}
        kept = {id(lv) for lv in self.loaded_versions()}
        retired = [lv for lv in old if id(lv) not in kept]
        self._update_metrics(retired)
        for lv in retired:
            self._retire(lv)
        if report.loaded or retired:
            log.info("serving %s", report.served, extra={"event": "reload", "served": report.served,
                                                          "loaded": report.loaded})
        return report

    async def _try_load(
        self, model: str, version: int, buckets: list[BucketConfig], serves_unpinned: bool, startup: bool,
        report: ReloadReport, refused: dict[str, dict[int, str]],
    ) -> LoadedVersion | None:
        """The version, already served or freshly loaded; None (reason in ``report`` and
        ``refused``) if it fails. With ``startup``, configuration problems raise StartupError."""
        current = self._models.get(model, {}).get(version)
        if current is not None:
            return current
        key = f"{model} v{version}"
        try:
            lv = await self._load(model, version, buckets, is_newest=serves_unpinned)
        except BucketMismatch as e:
            if startup:
                raise StartupError(str(e)) from None
            reason = str(e)
        except DeviceError as e:
            if startup:
                raise StartupError(f"MTRANK_DEVICE: {e}") from None
            reason = str(e)
        except LoadError as e:
            reason = str(e)
        except Exception as e:  # model files are untrusted: whatever they break refuses this version only
            log.debug("%s: unexpected failure while opening it", key, exc_info=True)
            reason = f"{self.root / model / str(version)}: {type(e).__name__}: {e}"
        else:
            report.loaded.append(key)
            return lv
        report.details[key] = reason
        reason = self.path_free(" ".join(reason.split()))
        report.refused[key] = reason
        refused.setdefault(model, {})[version] = reason
        return None

    async def _load(self, model: str, version: int, buckets: list[BucketConfig], is_newest: bool) -> LoadedVersion:
        """Verify, check tasks and store tables, then create and warm the sessions (the costly
        part last, so a version waiting for its Redis tables is cheap to retry)."""
        try:
            vdir = version_dir(self.root, model, version)
        except ManifestError as e:
            raise LoadError(str(e)) from None
        started = time.perf_counter()
        manifest, tables = await asyncio.to_thread(self._open_version, vdir)
        tasks = list(dict.fromkeys(t for g in manifest.graphs.values() for t in g.tasks))
        for b in buckets:
            if b.model == model and (b.version == version or (b.version is None and is_newest)) and b.weights:
                unknown = sorted(set(b.weights) - set(tasks))
                if unknown:
                    raise BucketMismatch(
                        f"MTRANK_BUCKETS: bucket {b.name!r} weighs tasks {unknown} that {model} v{version} "
                        f"does not have (tasks: {tasks})"
                    )
        problem = await self.store.version_problem(list(tables.values()))
        if problem:
            raise LoadError(problem)
        lv = await asyncio.to_thread(self._create_sessions, vdir, manifest, tables)
        log.info("loaded %s v%d on %s (%s) in %.2f s: graphs %s, tasks %s", model, version, lv.device, lv.provider,
                 time.perf_counter() - started, sorted(lv.graphs), lv.task_names,
                 extra={"event": "model_loaded", "model": model, "version": version, "device": lv.device})
        return lv

    @staticmethod
    def _open_version(vdir: Path) -> tuple[Manifest, dict[str, LocalTable]]:
        try:
            manifest = load_manifest(vdir, verify=True, located=True)
            if not manifest.graphs:
                raise ManifestError(f"{vdir}: the manifest lists no graph")
            tables = {f: LocalTable(manifest.name, manifest.version, info, vdir) for f, info in manifest.tables.items()}
            for t in tables.values():
                t.default  # noqa: B018 - opens the vectors and checks their shape
        except (ManifestError, OSError, ValueError) as e:
            raise LoadError(str(e)) from None
        return manifest, tables

    def _create_sessions(self, vdir: Path, manifest: Manifest, tables: dict[str, LocalTable]) -> LoadedVersion:
        s = self.settings
        graphs: dict[str, GroupGraph] = {}
        try:
            transform = FeatureTransform.from_manifest(manifest)
            transform.max_list_len = s.max_list_len
            for key, info in manifest.graphs.items():
                batches, threads = s.concurrency()
                runner = GraphRunner(vdir / info.file, s.device, threads)
                inputs = check_graph(key, info, runner, transform, tables)
                sizes = BATCH_SIZES if not s.max_batch_rows else (1, s.max_batch_rows)
                with warm_up_turn():
                    timings = runner.warm_up(tuple(n for n in sizes if n <= max(s.max_candidates, s.max_batch_rows)))
                batch_rows = s.max_batch_rows or best_batch_rows(timings)
                if self.load.per_row_s is None:
                    self.load.seed(timings[0], next(t for t in timings if t[0] == batch_rows))
                    self.load.max_batch_rows = batch_rows
                log.info("%s v%d graph %s: batches of up to %d rows (%s)", manifest.name, manifest.version, key,
                         batch_rows, "measured" if not s.max_batch_rows else "MTRANK_MAX_BATCH_ROWS",
                         extra={"event": "batch_size", "model": manifest.name, "version": manifest.version,
                                "graph": key, "batch_rows": batch_rows,
                                "rows_per_s": {str(n): round(n / t) for n, t in timings if t > 0}})
                batcher = Batcher(
                    runner.run, runner.output_names, manifest.name, key, runner.device,
                    max_batch_rows=batch_rows, max_queue_delay_s=s.max_queue_delay_ms / 1000.0,
                    max_queue_rows=s.max_queue_rows, batching=s.batching, max_concurrent=batches,
                    load=self.load, request_inputs=frozenset(n for n, i in inputs.items() if i.per_request),
                )
                graphs[key] = GroupGraph(key, info, runner, batcher, inputs)
        except BaseException as e:
            for graph in graphs.values():  # the graphs built before the failure: their workers end
                graph.batcher.stop()
            if isinstance(e, DeviceError) or not isinstance(e, Exception):
                raise
            # ORT, numpy and contract errors: this version is unusable
            raise LoadError(f"{vdir}: {type(e).__name__}: {e}") from None
        return LoadedVersion(manifest, vdir, graphs, transform, tables)

    def _update_metrics(self, retired: list[LoadedVersion]) -> None:
        for lv in retired:
            for device in {g.runner.device for g in lv.graphs.values()}:
                metrics.unset(metrics.MODEL_INFO, lv.name, str(lv.version), device)
        for lv in self.loaded_versions():
            metrics.MODEL_INFO.labels(lv.name, str(lv.version), lv.device).set(1)
        metrics.MODELS_LOADED.set(len(self.loaded_versions()))
        refused = {(model, str(version)) for model, versions in self.refused.items() for version in versions}
        for labels in self._refused_series - refused:
            metrics.unset(metrics.MODEL_VERSIONS_REFUSED, *labels)
        for labels in refused:
            metrics.MODEL_VERSIONS_REFUSED.labels(*labels).set(1)
        self._refused_series = refused

    def _retire(self, lv: LoadedVersion) -> None:
        """Stop a replaced version once every request that may still hold it has ended."""
        grace = self.settings.request_timeout_ms / 1000.0 + 1.0

        async def later() -> None:
            await asyncio.sleep(grace)
            await lv.close()
            log.info("unloaded %s v%d", lv.name, lv.version,
                     extra={"event": "model_unloaded", "model": lv.name, "version": lv.version})

        task = asyncio.get_running_loop().create_task(later(), name=f"mtrank-retire-{lv.name}-v{lv.version}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        task.add_done_callback(_log_task_failure)

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        for task in list(self._retiring):
            task.cancel()
        for lv in self.loaded_versions():
            await lv.close()
        self._models = {}


def _log_task_failure(task: asyncio.Task) -> None:
    """Done callback of a background task: its failure is logged once, with the traceback,
    instead of surfacing later as asyncio's "Task exception was never retrieved"."""
    if not task.cancelled() and task.exception() is not None:
        log.error("background task %s failed", task.get_name(), exc_info=task.exception())
