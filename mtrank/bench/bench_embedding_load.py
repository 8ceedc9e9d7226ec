"""Benchmark: load speed of ``mtrank load-embeddings`` into a local Redis.

``python -m mtrank.bench.bench_embedding_load [--ids 1000000] [--dim 16] [--redis URL]``

Writes a synthetic version (one store table of ``--ids`` ids × ``--dim`` float32) into a temporary
repository, times :func:`mtrank.export.store_loader.load_embeddings`, and as the same-run reference times
a bare redis-py pipelined ``MSET`` of the same keys and pre-encoded values (same chunking), so the
ratio shows the loader's own overhead on this machine. Uses a key prefix of its own on Redis db 15
by default and deletes its keys afterwards.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from mtrank import store_keys
from mtrank.export.store_loader import CHUNK_IDS, load_embeddings, prune_versions
from mtrank.export.tables import write_table
from mtrank.manifest import Manifest, write_manifest
from mtrank.stores.redis import IN_FLIGHT

MODEL = "bench"
FIELD = "item_id"


def write_version(repo: Path, n_ids: int, dim: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """``repo/bench/1`` with one table; returns its ids and vectors."""
    vdir = repo / MODEL / "1"
    vdir.mkdir(parents=True)
    ids = [f"v{i}" for i in range(n_ids)]
    vectors = np.random.default_rng(seed).standard_normal((n_ids + 1, dim), dtype=np.float32)
    table = write_table(vdir, FIELD, ids, vectors, dim, ["shared"])
    manifest = Manifest(
        name=MODEL, kind="bench", version=1, tasks=[], dense=[], sparse=[], graphs={}, tables={FIELD: table}
    )
    write_manifest(vdir, manifest)
    return ids, vectors


def reference_mset(client, keys: list[bytes], values: list[bytes]) -> float:
    """Seconds for a bare redis-py pipeline of ``MSET`` over pre-encoded keys and values.

    Chunked like the loader, ``IN_FLIGHT`` commands per round trip.
    """
    started = time.perf_counter()
    pipe = client.pipeline(transaction=False)
    for start in range(0, len(keys), CHUNK_IDS):
        args: list[bytes] = [b""] * (2 * len(keys[start : start + CHUNK_IDS]))
        args[0::2] = keys[start : start + CHUNK_IDS]
        args[1::2] = values[start : start + CHUNK_IDS]
        pipe.execute_command("MSET", *args)
        if len(pipe) >= IN_FLIGHT:
            pipe.execute()
    pipe.execute()
    return time.perf_counter() - started


def clean(client, prefix: str) -> None:
    prune_versions(client, MODEL, keep=0, prefix=prefix)  # no version 0: every version goes
    client.delete(store_keys.pointer_key(prefix, MODEL))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ids", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    a = p.parse_args(argv)

    prefix = f"mtrank-bench-{uuid.uuid4().hex[:8]}"
    client = store_keys.connect(a.redis)
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        ids, vectors = write_version(repo, a.ids, a.dim)
        try:
            total = time.perf_counter()
            stats = load_embeddings(repo, MODEL, a.redis, prefix=prefix, progress=False)
            total = time.perf_counter() - total
            clean(client, prefix)

            key_prefix = store_keys.id_key_prefix(prefix, MODEL, 1, FIELD).encode()
            keys = [key_prefix + i.encode() for i in ids]
            values = store_keys.encode_rows(vectors[1:])
            ref_seconds = reference_mset(client, keys, values)
        finally:
            clean(client, prefix)
            client.close()

    ref_rate = a.ids / ref_seconds
    print(f"ids={a.ids} dim={a.dim} redis={a.redis}")
    print(
        f"load_embeddings: {stats['ids_per_s']:,.0f} ids/s ({stats['seconds']:.2f} s loading; "
        f"{total:.2f} s with manifest checksum verification)"
    )
    print(f"reference pipelined MSET of pre-encoded values: {ref_rate:,.0f} ids/s ({ref_seconds:.2f} s)")
    print(f"ratio loader / reference: {stats['ids_per_s'] / ref_rate:.2f}")


if __name__ == "__main__":
    main()
