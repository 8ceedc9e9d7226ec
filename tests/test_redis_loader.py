"""Redis embedding loader against a real Redis: bit-exact rows, versioned keys, atomic flip, prune."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import redis

from mtrank import store_keys
from mtrank.cli import main as cli_main
from mtrank.export.store_loader import load_embeddings, load_table, loaded_version, prune_versions
from mtrank.export.tables import write_table
from mtrank.manifest import Manifest, ManifestError, load_manifest, open_vectors, read_ids, version_dir, write_manifest
from mtrank.stores import open_backend
from mtrank.training.models.registry import model_names
from tests.cluster import free_node_port
from tests.conftest import _need

pytestmark = pytest.mark.redis
DIM = 4


def write_version(repo: Path, model: str, version: int, n_ids: int = 50, seed: int = 0) -> Path:
    """A version with a one-view table and a STEM-like three-view table; vectors differ per seed."""
    vdir = repo / model / str(version)
    vdir.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    tables = {}
    for field, views in (("user_id", ["shared"]), ("item_id", ["shared", "vtr", "like"])):
        ids = [f"{field[0]}{i}" for i in range(n_ids)]
        vectors = rng.standard_normal((n_ids + 1, DIM * len(views)), dtype=np.float32)
        tables[field] = write_table(vdir, field, ids, vectors, DIM, views)
    manifest = Manifest(
        name=model, kind="test", version=version, tasks=[], dense=[], sparse=[], graphs={}, tables=tables
    )
    write_manifest(vdir, manifest)
    return vdir


def stored_rows(client, vdir: Path, model: str, prefix: str) -> dict[str, list[bytes | None]]:
    """Per table, the stored value of each id in the version's ids file (None: no key)."""
    manifest = load_manifest(vdir)
    out = {}
    for field, table in manifest.tables.items():
        key_prefix = store_keys.id_key_prefix(prefix, model, manifest.version, field)
        out[field] = client.mget([key_prefix + i for i in read_ids(vdir / table.ids_file)])
    return out


def table_bytes(vdir: Path) -> dict[str, list[bytes]]:
    manifest = load_manifest(vdir)
    return {f: store_keys.encode_rows(open_vectors(vdir / t.vectors_file)[1:]) for f, t in manifest.tables.items()}


def keys_under(client, prefix: str) -> set[bytes]:
    return set(client.scan_iter(match=f"{prefix}*", count=1000))


@pytest.fixture
def client(redis_url):
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


@pytest.fixture
def backend(redis_url):
    """The loader's side of the store: the back-end its URL names."""
    b = open_backend(redis_url)
    yield b
    b.close_writer()


@pytest.mark.parametrize("model", model_names())
def test_vectors_read_back_equal_the_exported_tables_bit_for_bit(
    model, exported_repo, redis_url, redis_prefix, client, backend
):
    repo = exported_repo(model)
    stats = load_embeddings(repo, model, redis_url, prefix=redis_prefix, progress=False)
    vdir = version_dir(repo, model)
    manifest = load_manifest(vdir)
    assert stats["ids"] == sum(t.rows - 1 for t in manifest.tables.values())
    stored = stored_rows(client, vdir, model, redis_prefix)
    for field, table in manifest.tables.items():
        vectors = np.asarray(open_vectors(vdir / table.vectors_file))
        # One value per id holds every view of it (STEM: shared and task vectors together).
        assert b"".join(stored[field]) == vectors[1:].astype("<f4").tobytes()
        assert all(len(v) == 4 * table.width for v in stored[field])
    assert loaded_version(backend, model, prefix=redis_prefix) == manifest.version


def test_the_default_row_is_not_stored_and_meta_marks_each_table(tmp_path, redis_url, redis_prefix, client):
    vdir = write_version(tmp_path, "m", 1)
    load_embeddings(tmp_path, "m", redis_url, prefix=redis_prefix, progress=False)
    manifest = load_manifest(vdir)
    for field, table in manifest.tables.items():
        rows = list(client.scan_iter(match=store_keys.id_key_prefix(redis_prefix, "m", 1, field) + "*"))
        assert len(rows) == table.rows - 1
        meta = json.loads(client.get(store_keys.meta_key(redis_prefix, "m", 1, field)))
        assert meta["rows"] == table.rows and meta["width"] == table.width
        assert meta["sha256"] == manifest.files[table.vectors_file]


def test_loading_v2_leaves_v1_keys_and_the_pointer_until_the_flip(tmp_path, redis_url, redis_prefix, client, backend):
    v1 = write_version(tmp_path, "m", 1, seed=1)
    v2 = write_version(tmp_path, "m", 2, n_ids=60, seed=2)
    load_embeddings(tmp_path, "m", redis_url, version=1, prefix=redis_prefix, progress=False)
    before = stored_rows(client, v1, "m", redis_prefix)
    assert before == table_bytes(v1)

    manifest2 = load_manifest(v2)
    for field in manifest2.tables:  # every table of v2 written, pointer not flipped yet
        load_table(backend, v2, manifest2, field, prefix=redis_prefix, progress=False)
        assert loaded_version(backend, "m", prefix=redis_prefix) == 1
        assert stored_rows(client, v1, "m", redis_prefix) == before
    assert stored_rows(client, v2, "m", redis_prefix) == table_bytes(v2)

    stats = load_embeddings(tmp_path, "m", redis_url, version=2, prefix=redis_prefix, progress=False)
    assert stats["ids"] == 0  # the tables were complete: only the pointer moved
    assert loaded_version(backend, "m", prefix=redis_prefix) == 2
    assert stored_rows(client, v1, "m", redis_prefix) == before


def test_rerunning_a_load_is_idempotent(tmp_path, redis_url, redis_prefix, client):
    write_version(tmp_path, "m", 1)
    first = load_embeddings(tmp_path, "m", redis_url, prefix=redis_prefix, progress=False)
    keys = keys_under(client, redis_prefix)
    second = load_embeddings(tmp_path, "m", redis_url, prefix=redis_prefix, progress=False)
    assert first["ids"] == 100 and second["ids"] == 0
    assert keys_under(client, redis_prefix) == keys


def test_a_table_without_its_meta_key_is_loaded_again(tmp_path, redis_url, redis_prefix, client):
    vdir = write_version(tmp_path, "m", 1)
    load_embeddings(tmp_path, "m", redis_url, prefix=redis_prefix, progress=False)
    client.delete(store_keys.meta_key(redis_prefix, "m", 1, "item_id"))  # as after an interrupted load
    client.delete(store_keys.id_key_prefix(redis_prefix, "m", 1, "item_id") + "i3")
    stats = load_embeddings(tmp_path, "m", redis_url, prefix=redis_prefix, progress=False)
    assert stats["tables"] == {"user_id": 0, "item_id": 50}
    assert stored_rows(client, vdir, "m", redis_prefix) == table_bytes(vdir)


def test_prune_removes_other_versions_of_the_model_only(tmp_path, redis_url, redis_prefix, client):
    write_version(tmp_path, "m", 1, seed=1)
    v2 = write_version(tmp_path, "m", 2, seed=2)
    write_version(tmp_path, "other", 1, seed=3)
    load_embeddings(tmp_path, "m", redis_url, version=1, prefix=redis_prefix, progress=False)
    load_embeddings(tmp_path, "other", redis_url, prefix=redis_prefix, progress=False)
    stats = load_embeddings(tmp_path, "m", redis_url, version=2, prune=True, prefix=redis_prefix, progress=False)
    assert stats["pruned_keys"] == 100 + 2  # v1's rows and meta keys
    remaining = {k.decode() for k in keys_under(client, redis_prefix)}
    assert not [k for k in remaining if "{m:1}" in k] and any("{m:2}" in k for k in remaining)
    assert len([k for k in remaining if "{other:1}" in k]) == 102
    assert stored_rows(client, v2, "m", redis_prefix) == table_bytes(v2)


def test_a_version_keeps_one_layout_for_all_its_tables(tmp_path, redis_url, redis_prefix, client):
    vdir = write_version(tmp_path, "m", 1)
    first = load_embeddings(tmp_path, "m", redis_url, prefix=redis_prefix, progress=False, shards=3)
    assert first["shards"] == 3

    def layouts() -> set[int]:
        metas = [client.get(store_keys.meta_key(redis_prefix, "m", 1, f)) for f in ("user_id", "item_id")]
        return {json.loads(m)["shards"] for m in metas}

    assert layouts() == {3}
    client.delete(store_keys.meta_key(redis_prefix, "m", 1, "item_id"))  # as after an interrupted load
    resumed = load_embeddings(tmp_path, "m", redis_url, prefix=redis_prefix, progress=False)
    assert resumed["shards"] == 3 and resumed["tables"] == {"user_id": 0, "item_id": 50}  # the recorded layout
    assert layouts() == {3}
    # Another --shards rewrites every table under the new layout.
    again = load_embeddings(tmp_path, "m", redis_url, prefix=redis_prefix, progress=False, shards=1)
    assert again["shards"] == 1 and again["tables"] == {"user_id": 50, "item_id": 50} and layouts() == {1}
    assert stored_rows(client, vdir, "m", redis_prefix) == table_bytes(vdir)


def test_a_truncated_table_is_refused_before_anything_is_written(tmp_path, redis_url, redis_prefix, client):
    vdir = write_version(tmp_path, "m", 1)
    ids = vdir / "tables" / "user_id.ids"
    ids.write_bytes(ids.read_bytes()[:-3])
    with pytest.raises(ManifestError, match="user_id.ids"):
        load_embeddings(tmp_path, "m", redis_url, prefix=redis_prefix, progress=False)
    assert keys_under(client, redis_prefix) == set()


@pytest.mark.parametrize("flag", ["--store", "--redis"])
def test_cli_load_embeddings_prints_a_summary(tmp_path, redis_url, client, backend, capsys, flag):
    model = f"cli{uuid.uuid4().hex[:8]}"  # under the default prefix: a model of its own
    write_version(tmp_path, model, 1)
    try:
        assert cli_main(["load-embeddings", "--repo", str(tmp_path), "--model", model, flag, redis_url]) == 0
        out, err = capsys.readouterr()
        assert f"loaded {model} v1: 100 ids in" in out
        # The old flag still works, with one warning.
        assert err.count("--redis is deprecated; use --store") == (flag == "--redis")
        assert loaded_version(backend, model) == 1
    finally:
        prune_versions(backend, model, keep=0)
        client.delete(store_keys.pointer_key(store_keys.DEFAULT_PREFIX, model))


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_cli_load_embeddings_writes_under_the_services_prefix(tmp_path, redis_url, redis_prefix, client, backend,
                                                             monkeypatch, how):
    """--prefix, or MTRANK_STORE_PREFIX as the service reads it: the keys land where the service looks."""
    model = f"cli{uuid.uuid4().hex[:8]}"
    write_version(tmp_path, model, 1)
    argv = ["load-embeddings", "--repo", str(tmp_path), "--model", model, "--store", redis_url]
    if how == "flag":
        argv += ["--prefix", redis_prefix]
    else:
        monkeypatch.setenv("MTRANK_STORE_PREFIX", redis_prefix)
    assert cli_main(argv) == 0
    assert loaded_version(backend, model, prefix=redis_prefix) == 1
    assert loaded_version(backend, model) is None  # nothing under the default prefix
    assert keys_under(client, redis_prefix)


# --------------------------------------------------------------------------------------------
# Redis Cluster: three local primaries


@pytest.fixture
def redis_cluster_url(tmp_path):
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if not (server and cli):
        _need("redis-server/redis-cli not installed")
    ports = [free_node_port() for _ in range(3)]
    nodes = []
    try:
        for port in ports:
            node_dir = tmp_path / f"node-{port}"
            node_dir.mkdir()
            nodes.append(subprocess.Popen(
                [server, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                 "--cluster-config-file", str(node_dir / "nodes.conf"), "--dir", str(node_dir),
                 "--save", "", "--appendonly", "no"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))
        for port in ports:
            _wait(lambda p=port: redis.Redis(port=p).ping())
        subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports), "--cluster-replicas", "0",
             "--cluster-yes"],
            check=True, capture_output=True, timeout=30,
        )
        for port in ports:
            _wait(lambda p=port: redis.Redis(port=p).cluster("info")["cluster_state"] == "ok")
        yield f"redis+cluster://127.0.0.1:{ports[0]}"
    finally:
        for node in nodes:
            node.terminate()
        for node in nodes:
            node.wait(timeout=10)


def _wait(ready, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ready():
                return
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("redis cluster node not ready")
        time.sleep(0.05)


def test_redis_cluster_loads_flips_and_prunes(tmp_path, redis_cluster_url):
    v1 = write_version(tmp_path, "m", 1, seed=1)
    v2 = write_version(tmp_path, "m", 2, seed=2)
    load_embeddings(tmp_path, "m", redis_cluster_url, version=1, progress=False)
    stats = load_embeddings(tmp_path, "m", redis_cluster_url, version=2, prune=True, progress=False)
    assert stats["ids"] == 100 and stats["pruned_keys"] == 102
    client = store_keys.connect(redis_cluster_url)
    try:
        assert loaded_version(open_backend(redis_cluster_url), "m") == 2
        # Small tables: one shard, the version's keys share one hash tag and one MGET per table works.
        assert stored_rows(client, v2, "m", store_keys.DEFAULT_PREFIX) == table_bytes(v2)
        assert all(v is None for rows in stored_rows(client, v1, "m", store_keys.DEFAULT_PREFIX).values() for v in rows)
    finally:
        client.close()
