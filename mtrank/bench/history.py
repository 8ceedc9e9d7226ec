"""The history workload: ranking with the user's behaviour history, the service against the engine
on the same graph, in the same run.

The model is :data:`~mtrank.bench.prepare.HISTORY_MODEL`, PLE trained on ``mtrank synth --history``
data (two 50-entry sequence fields, ``hist_item_id`` and ``hist_category``, under target attention
against the candidate; items' ``tags``), in its own repository beside the bench's
(:func:`~mtrank.bench.prepare.history_repo_for`). Requests come from
:class:`~mtrank.bench.workload.RequestFactory`: every user carries a full history (``max_len``
entries of each sequence field), candidates their tags.

In order: the engine (ONNX Runtime alone, default session options) on the history graph at each
request size, fed as the batcher feeds it (``k`` requests stacked, the user's side a row per
request, for each ``k`` of ``cfg.history_requests``); a real ``mtrank serve`` with the service's
defaults, one closed-loop point per size at ``cfg.history_concurrency``; the engine again. A size's
reference is the best engine rows/s of the two measurements (:func:`mtrank.bench.scoring.history_ratios`).

``mtrank bench`` runs it after its other sections when the history repository has the model (or
``--prepare`` makes it). ``python -m mtrank.bench.run_history --repo bench/repo --out DIR`` runs it
alone (:mod:`mtrank.bench.run_history`): a ``bench.json`` and ``bench.md`` of this workload only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson

from mtrank.bench.config import BenchConfig, BenchError
from mtrank.bench.engine import bench_engine_requests
from mtrank.bench.loadgen import write_bodies
from mtrank.bench.measure import measure_point, say, server_under_test
from mtrank.bench.prepare import HISTORY_MODEL, history_repo_for
from mtrank.bench.report import HistoryWorkload, ModelInfo, Report, RequestBatchCurve, from_json
from mtrank.bench.workload import Catalog, RequestFactory
from mtrank.manifest import ALL_GROUPS, Manifest, list_versions, load_manifest, version_dir


def has_history_model(repo: Path) -> bool:
    """Whether the history repository beside ``repo`` holds a version of the history model."""
    return bool(list_versions(history_repo_for(repo), HISTORY_MODEL))


def history_bodies(factory: RequestFactory, sizes: list[int], per_size: int,
                   tmp: Path) -> tuple[dict[int, Path], dict[str, list[int]]]:
    """``per_size`` request bodies of each size (seeded), one file per size, and for each user-side list
    field the fewest and the most entries it has in them."""
    rng = np.random.default_rng(29)
    files: dict[int, Path] = {}
    lengths: dict[str, list[int]] = {}
    for n in sizes:
        requests = [factory.request(rng, n) for _ in range(per_size)]
        for body in requests:
            for f in factory.user_lists:
                k = len(body["user"]["features"][f.name])
                seen = lengths.setdefault(f.name, [k, k])
                seen[:] = [min(seen[0], k), max(seen[1], k)]
        files[n] = tmp / f"history-bodies-{n}.jsonl"
        write_bodies(files[n], [orjson.dumps(b) for b in requests])
    return files, lengths


def _engine_curves(vdir: Path, manifest: Manifest, workload: HistoryWorkload, cfg: BenchConfig, device: str) -> None:
    """One engine measurement of every size, appended to ``workload.engine``."""
    for size in cfg.history_sizes:
        curve = from_json(RequestBatchCurve, bench_engine_requests(
            vdir, manifest, workload.graph, size, tuple(cfg.history_requests), cfg.history_engine_min_time_s,
            device=device))
        workload.engine.append(curve)
        say(f"history engine size={size}: {curve.peak.rows_per_s:.0f} rows/s at {curve.peak.requests} "
            f"request(s) per batch ({curve.provider}); "
            + ", ".join(f"{p.requests}: {p.rows_per_s:.0f}" for p in curve.curve))


def measure_history(report: Report, repo: Path, env: dict[str, str], redis_url: str | None, prefix: str,
                    cfg: BenchConfig, device: str, scratch: Path) -> HistoryWorkload:
    """The engine, the service's points and the engine again on the history model beside ``repo``.
    ``env``: the servers' environment (the store's prefix ``prefix`` included when ``redis_url``)."""
    from mtrank.export.store_loader import load_embeddings

    hrepo = history_repo_for(repo)
    if not has_history_model(repo):
        raise BenchError(f"{hrepo} has no {HISTORY_MODEL} (run with --prepare to make it)")
    vdir = version_dir(hrepo, HISTORY_MODEL)
    manifest = load_manifest(vdir, verify=False)
    graph = ALL_GROUPS if ALL_GROUPS in manifest.graphs else next(iter(manifest.graphs))
    if not any(f.side == "user" for f in manifest.lists):
        raise BenchError(f"{vdir}: the history model has no user-side list field")
    if redis_url:
        load_embeddings(hrepo, HISTORY_MODEL, redis_url, version=manifest.version, prefix=prefix, progress=False)
    bodies, lengths = history_bodies(RequestFactory(Catalog.from_repo(hrepo, HISTORY_MODEL, manifest.version)),
                                     cfg.history_sizes, cfg.bodies_per_size, scratch)
    workload = HistoryWorkload(
        model=ModelInfo(repo=str(hrepo), name=HISTORY_MODEL, version=manifest.version,
                                         kind=manifest.kind, graphs=sorted(manifest.graphs)),
        graph=graph, history_lengths=lengths, concurrency=cfg.history_concurrency)
    say(f"history workload: {HISTORY_MODEL} v{manifest.version}, list entries per request {lengths}")
    _engine_curves(vdir, manifest, workload, cfg, device)
    with server_under_test(report, "history", hrepo, env | {"MTRANK_BATCHING": "true"}, device) as server:
        for size in cfg.history_sizes:
            p = measure_point(server, bodies[size], size, cfg, concurrency=cfg.history_concurrency)
            workload.service.append(p)
            say(f"history service size={size:4d} c={p.concurrency:3d}: {p.throughput_rps:8.1f} req/s "
                f"{p.rows_per_s:9.0f} rows/s p50={p.p50_ms:7.2f} ms batch={p.mean_batch_rows:6.0f} rows "
                f"server CPU {p.server_cpu_cores:.2f} cores{'' if p.stable else ' (unstable)'}"
                f"{' errors=' + str(p.errors) if p.errors else ''}")
    _engine_curves(vdir, manifest, workload, cfg, device)
    return workload
