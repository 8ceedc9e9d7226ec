"""Capacity figures for docs/scaling.md: Redis memory per id, per-node MGET throughput, per-replica req/s."""
import asyncio
import json
import re
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from mtrank import store_keys
from mtrank.bench.server import RemoteServer
from mtrank.export.store_loader import load_embeddings
from mtrank.export.tables import write_table
from mtrank.manifest import Manifest, write_manifest
from tests.cluster import LocalCluster
from tests.server import build_toy_version, rank_body

root = Path(tempfile.mkdtemp())
cluster = LocalCluster(root / "cluster").start()
out = {}
try:
    # 1. memory: N ids at two widths, 3 shards (one per primary); used_memory summed over primaries
    n = 300_000
    for dim in (16, 64):
        model = f"mem{dim}"
        vdir = root / "repo" / model / "1"
        vdir.mkdir(parents=True)
        vec = np.random.default_rng(0).standard_normal((n + 1, dim), dtype=np.float32)
        t = write_table(vdir, "item_id", [f"i{k}" for k in range(n)], vec, dim, ["shared"])
        manifest = Manifest(name=model, kind="m", version=1, tasks=[], dense=[], sparse=[], graphs={},
                            tables={"item_id": t})
        write_manifest(vdir, manifest)
        before = sum(p.info("memory")["used_memory"] for p in cluster.primaries())
        st = load_embeddings(root / "repo", model, cluster.url, progress=False, shards=3)
        after = sum(p.info("memory")["used_memory"] for p in cluster.primaries())
        out[f"bytes_per_id_dim{dim}"] = (after - before) / n
        out[f"load_ids_per_s_dim{dim}"] = st["ids_per_s"]
    # 2. MGET of 500 keys of one slot (64-dim values, 256 B) on one primary
    meta = json.loads(store_keys.connect(cluster.url).get(store_keys.meta_key("mtrank", "mem64", 1, "item_id")))
    layout = store_keys.VersionLayout.from_meta(meta)
    prefix0 = layout.key_prefixes("mtrank", "mem64", 1, "item_id")[0]
    ids = [f"i{k}" for k in range(n)]
    keys = [prefix0 + i for i, s in zip(ids, store_keys.shard_of(ids, 3), strict=True) if s == 0][:500]
    port = cluster.owner(store_keys.key_slot(prefix0))[1]
    for c in (1, 4):
        cmd = ["redis-benchmark", "-p", str(port), "-n", "5000", "-c", str(c), "-q", "MGET", *keys]
        text = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        out[f"mget500_per_s_c{c}"] = float(re.findall(r"([\d.]+) requests per second", text)[-1])
    # 3. one replica: toy model, 500 candidates, concurrency 8, cache on (default) and off
    repo = root / "toy"
    build_toy_version(repo, "toy", 1)
    load_embeddings(repo, "toy", cluster.url, progress=False)
    async def drive(url, seconds=8.0, conc=8, n_cand=500):
        bodies = [rank_body(user_id=f"u{k}", n=n_cand, offset=k) for k in range(50)]
        done = 0
        stop = time.monotonic() + seconds
        async with httpx.AsyncClient(base_url=url, timeout=10) as c:
            async def worker(w):
                nonlocal done
                k = w
                while time.monotonic() < stop:
                    r = await c.post("/v1/rank", json=bodies[k % 50])
                    assert r.status_code == 200, r.text
                    done += 1
                    k += conc
            await asyncio.gather(*(worker(w) for w in range(conc)))
        return done / seconds
    for label, env in (("inprocess", {}), ("cluster_cache", {"MTRANK_REDIS_URL": cluster.url}),
                       ("cluster_nocache", {"MTRANK_REDIS_URL": cluster.url, "MTRANK_EMBEDDING_CACHE_SIZE": "0"})):
        with RemoteServer(repo, env=env) as s:
            asyncio.run(drive(s.url, 2.0))  # warm-up
            out[f"req_per_s_500cand_{label}"] = asyncio.run(drive(s.url))
finally:
    cluster.stop()
print(json.dumps(out, indent=1))
