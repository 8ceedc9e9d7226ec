"""The service on a real local Redis Cluster (3 primaries + 3 replicas started here): answers equal
the in-process store's, a killed primary and a reshard under load, sharded tables, two replicas
through a hot reload. Real ``mtrank serve`` processes, real ``redis-server`` and ``redis-cli``."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mtrank import store_keys
from mtrank.bench.server import RemoteServer
from mtrank.export.store_loader import load_embeddings
from mtrank.export.tables import write_table
from mtrank.manifest import Manifest, load_manifest, open_vectors, read_ids, version_dir, write_manifest
from mtrank.service.stores import LocalTable, open_url
from tests.cluster import LocalCluster, redis_binaries
from tests.server import build_toy_version, rank_body

pytestmark = [pytest.mark.redis, pytest.mark.slow]
RETRY_S = 0.2
PREFIX = "mtrank"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    redis_binaries()
    c = LocalCluster(tmp_path_factory.mktemp("cluster")).start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def ple(exported_repo, cluster) -> Path:
    """The exported PLE, its version loaded with one shard per primary."""
    repo = exported_repo("ple")
    stats = load_embeddings(repo, "ple", cluster.url, progress=False, shards=3)
    assert stats["shards"] == 3 and len(stats["shard_salts"]) == 3
    return repo


@pytest.fixture(scope="module")
def in_process(ple):
    with RemoteServer(ple) as s:
        yield s


@pytest.fixture(scope="module")
def on_cluster(ple, cluster):
    # No cache: every request reaches the cluster, so the tests see every node's state.
    env = {"MTRANK_STORE_URL": cluster.url, "MTRANK_STORE_RETRY_S": str(RETRY_S), "MTRANK_EMBEDDING_CACHE_SIZE": "0"}
    with RemoteServer(ple, env=env) as s:
        yield s


def bodies(count: int, n: int = 30) -> list[dict]:
    return [rank_body(user_id=f"u{k}", n=n, offset=(37 * k) % 900) for k in range(count)]


@dataclass
class Answer:
    sent: float
    done: float
    status: int
    body: dict | None
    replica: int
    request: int
    """Index into the load's requests."""


@dataclass
class Load:
    """Requests in a loop from a thread, round robin over ``urls`` (client-side load balancing)."""

    urls: list[str]
    requests: list[dict]
    answers: list[Answer] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> Load:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        clients = [httpx.Client(base_url=u, timeout=10.0) for u in self.urls]
        try:
            for i in itertools.count():
                if self._stop.is_set():
                    return
                replica = i % len(clients)
                sent = time.monotonic()
                request = i % len(self.requests)
                try:
                    r = clients[replica].post("/v1/rank", json=self.requests[request])
                    body = r.json() if r.status_code == 200 else None
                    self.answers.append(Answer(sent, time.monotonic(), r.status_code, body, replica, request))
                except httpx.HTTPError:
                    self.answers.append(Answer(sent, time.monotonic(), 0, None, replica, request))
        finally:
            for c in clients:
                c.close()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def failed(answers: list[Answer]) -> list[int]:
    return [a.status for a in answers if a.status != 200]


def test_cluster_answers_equal_the_in_process_store_bit_for_bit(in_process, on_cluster):
    for body in bodies(6, n=60):
        local = in_process.post("/v1/rank", json=body).json()
        remote = on_cluster.post("/v1/rank", json=body).json()
        assert remote["degraded"] is False
        assert remote["items"] == local["items"]  # ids, ranks, scores and task scores: equal floats
    assert on_cluster.get("/readyz").json() == {"ready": True}


def _version_keys_per_node(cluster: LocalCluster, model: str, version: int, prefix: str = PREFIX) -> dict[int, int]:
    """Per live primary's port, the row keys of ``model`` v``version`` (sharded layout) it holds."""
    counts = {}
    for node in cluster.primaries():
        c = node.client()
        try:
            counts[node.port] = sum(1 for _ in c.scan_iter(match=f"{prefix}:{{{model}:{version}:*", count=1000))
        finally:
            c.close()
    return counts


def test_a_sharded_version_spreads_over_all_primaries_and_a_request_needs_one_mget_per_node(
    ple, cluster, on_cluster
):
    vdir = version_dir(ple, "ple")
    manifest = load_manifest(vdir)
    primaries = cluster.primaries()
    counts = _version_keys_per_node(cluster, "ple", manifest.version)
    total = sum(t.rows - 1 for t in manifest.tables.values())
    even = total / len(primaries)
    assert sum(counts.values()) == total and all(abs(n - even) <= 0.2 * even for n in counts.values()), counts

    # The store alone: every table of the version in one lookup, 500 ids of the largest.
    tables = [LocalTable("ple", manifest.version, t, vdir) for t in manifest.tables.values()]
    ids = {t.field: read_ids(vdir / t.info.ids_file)[:500] for t in tables}
    assert max(map(len, ids.values())) == 500 and len(tables) >= 3

    async def one_lookup() -> tuple[dict[int, int], bool]:
        store = open_url(cluster.url, timeout_s=1.0)
        try:
            assert await store.version_problem(tables) is None
            before = {n.port: n.mget_calls() for n in cluster.live()}
            results, degraded = await store.lookup_many([(t, ids[t.field]) for t in tables])
            for t, result in zip(tables, results, strict=True):
                expected = np.asarray(open_vectors(vdir / t.info.vectors_file))[1 : len(ids[t.field]) + 1]
                np.testing.assert_array_equal(result.vectors, expected)
            return {n.port: n.mget_calls() - before[n.port] for n in cluster.live()}, degraded
        finally:
            await store.close()

    mgets, degraded = asyncio.run(one_lookup())
    on_primaries = {n.port: 1 for n in primaries}
    assert not degraded and mgets == {**dict.fromkeys(mgets, 0), **on_primaries}, mgets

    # Through the service: a 500-candidate request (user, item and author tables) is one MGET per node.
    assert {"user_id", "item_id", "author_id"} <= set(manifest.tables), sorted(manifest.tables)
    before = {n.port: n.mget_calls() for n in cluster.live()}
    r = on_cluster.post("/v1/rank", json=rank_body(user_id="u3", n=500))
    assert r.status_code == 200 and r.json()["degraded"] is False
    per_node = {n.port: n.mget_calls() - before[n.port] for n in cluster.live()}
    assert per_node == {**dict.fromkeys(per_node, 0), **on_primaries}, per_node
    print(f"version keys per primary {sorted(counts.values())} (even {even:.0f}); MGETs per node of a "
          f"500-candidate request: {sorted(per_node.values())}")


def test_a_killed_primary_degrades_answers_only_until_its_replica_is_promoted(in_process, on_cluster, cluster):
    requests = bodies(12)
    expected = [in_process.post("/v1/rank", json=b).json()["items"] for b in requests]
    victim = cluster.primaries()[1]
    with Load([on_cluster.url], requests) as load:
        time.sleep(1.0)
        killed = time.monotonic()
        victim.kill()
        ready_during = on_cluster.get("/readyz").json()
        cluster.wait_healthy(30)
        promoted = time.monotonic()
        time.sleep(2.0)
    victim.start()  # comes back as a replica of the promoted node
    cluster.wait_healthy(30)

    answers = load.answers
    assert not failed(answers), failed(answers)
    degraded = [a for a in answers if a.body["degraded"]]
    assert degraded, "the killed primary was never noticed"
    # Degraded only while the slot had no live primary (plus one breaker retry and some slack).
    assert all(a.done >= killed and a.sent <= promoted + RETRY_S + 1.0 for a in degraded), (
        killed, promoted, [(a.sent, a.done) for a in degraded])
    after = [a for a in answers if a.sent > promoted + RETRY_S + 1.0]
    assert after and all(not a.body["degraded"] for a in after)
    assert all(a.body["items"] == expected[a.request] for a in after)
    assert ready_during["ready"] is True and ready_during["degraded"] is True and "Redis" in ready_during["reason"]
    assert on_cluster.get("/readyz").json() == {"ready": True}


def _bulk_model(slot: int) -> str:
    """A model name whose one-shard version 1 hashes to ``slot``."""
    return next(m for m in (f"bulk{k}" for k in itertools.count())
                if store_keys.key_slot(store_keys.version_tag(m, 1)) == slot)


def _write_bulk_version(repo: Path, model: str, n_ids: int, dim: int = 16) -> np.ndarray:
    vdir = repo / model / "1"
    vdir.mkdir(parents=True)
    vectors = np.random.default_rng(5).standard_normal((n_ids + 1, dim), dtype=np.float32)
    table = write_table(vdir, "emb", [f"k{i}" for i in range(n_ids)], vectors, dim, ["shared"])
    write_manifest(vdir, Manifest(name=model, kind="test", version=1, tasks=[], dense=[], sparse=[], graphs={},
                                  tables={"emb": table}))
    return vectors


def _read_back(cluster: LocalCluster, model: str, n_ids: int) -> list[bytes | None]:
    client = store_keys.connect(cluster.url)
    try:
        key_prefix = store_keys.id_key_prefix(PREFIX, model, 1, "emb")
        return client.mget([key_prefix + f"k{i}" for i in range(n_ids)])
    finally:
        client.close()


def test_a_reshard_under_load_fails_no_request_and_the_loader_survives_it(in_process, on_cluster, cluster, tmp_path):
    requests = bodies(12)
    expected = [in_process.post("/v1/rank", json=b).json()["items"] for b in requests]
    # Move a primary's slots from its lowest up to the highest of this model's slots on it: the
    # served shard of the version moves, and slot-first a bulk table being loaded meanwhile.
    src = cluster.primaries()[0]
    src_id, _ = next((i, n) for i, n in cluster.topology().items() if n["port"] == src.port)
    src_slots = sorted(cluster.topology()[src_id]["slots"])
    layout_slots = [store_keys.key_slot(store_keys.shard_tag("ple", 1, s, salt)) for s, salt in
                    enumerate(_ple_salts(cluster))]
    moved_slot = max(s for s in layout_slots if s in src_slots)
    bulk = _bulk_model(src_slots[0])
    n_ids = 100_000
    vectors = _write_bulk_version(tmp_path, bulk, n_ids)
    dst = next(n for n in cluster.primaries() if n.port != src.port)

    loader: dict = {}

    def load() -> None:
        try:
            loader["stats"] = load_embeddings(tmp_path, bulk, cluster.url, progress=False)
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            loader["error"] = e

    with Load([on_cluster.url], requests) as traffic:
        time.sleep(0.5)
        loading = threading.Thread(target=load)
        loading.start()
        time.sleep(0.1)
        cluster.reshard(moved_slot, dst.port)
        loading.join(120)
        time.sleep(0.5)
    cluster.wait_healthy(30)

    assert not failed(traffic.answers), failed(traffic.answers)
    assert all(a.body["items"] == expected[a.request] for a in traffic.answers if not a.body["degraded"])
    assert "error" not in loader, loader.get("error")
    assert cluster.owner(moved_slot)[1] == dst.port and cluster.owner(src_slots[0])[1] == dst.port
    assert _read_back(cluster, bulk, n_ids) == store_keys.encode_rows(vectors[1:])
    print(f"reshard: {len(traffic.answers)} requests, {sum(a.body['degraded'] for a in traffic.answers)} degraded; "
          f"loader rewrote {loader['stats']['redirected_ids']} redirected ids")


def _ple_salts(cluster: LocalCluster) -> list[int]:
    import json

    client = store_keys.connect(cluster.url)
    try:
        return json.loads(client.get(store_keys.meta_key(PREFIX, "ple", 1, "item_id")))["shard_salts"]
    finally:
        client.close()


def test_the_loader_follows_ask_while_a_slot_migrates_and_moved_after(cluster, tmp_path):
    """The two steps of a reshard pinned in place: writes while the slot is MIGRATING get ASK,
    writes after it moved get MOVED; every row arrives."""
    topology = cluster.topology()
    src_id, src = next((i, n) for i, n in topology.items() if n["primary"] and not n["failed"])
    dst_id, dst = next((i, n) for i, n in topology.items() if n["primary"] and not n["failed"] and i != src_id)
    slot = src["slots"][len(src["slots"]) // 2]
    model = _bulk_model(slot)
    n_ids = 5000
    vectors = _write_bulk_version(tmp_path, model, n_ids, dim=8)
    src_node, dst_node = cluster.node(src["port"]).client(), cluster.node(dst["port"]).client()
    try:
        dst_node.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        src_node.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        stats = load_embeddings(tmp_path, model, cluster.url, progress=False)
        assert stats["redirected_ids"] == n_ids  # every chunk met ASK and was written on the target
        for node in (dst_node, src_node):
            node.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        cluster.wait_healthy(30)
        assert _read_back(cluster, model, n_ids) == store_keys.encode_rows(vectors[1:])
    finally:
        src_node.close()
        dst_node.close()


def test_prune_deletes_a_sharded_version_on_every_primary_and_the_per_table_layout_too(cluster, tmp_path):
    repo = tmp_path / "repo"
    prefix = "mtrank-prune"
    for version in (1, 2):
        build_toy_version(repo, "toy", version, seed=version)
    v1 = load_embeddings(repo, "toy", cluster.url, version=1, prefix=prefix, progress=False, shards=3)
    assert v1["shards"] == 3 and all(n > 0 for n in _version_keys_per_node(cluster, "toy", 1, prefix).values())
    client = store_keys.connect(cluster.url)
    try:
        # Version 0 in the earlier layout (a hash tag per table, sharded and not): pruned as well.
        old = [f"{prefix}:{{toy:0:item_id:1.7}}:v1", f"{prefix}:{{toy:0:user_id}}:u1",
               f"{prefix}:meta:{{toy:0:item_id}}", f"{prefix}:meta:{{toy:0:user_id}}"]
        for key in old:
            client.set(key, b"x")
        v2 = load_embeddings(repo, "toy", cluster.url, version=2, prefix=prefix, progress=False, shards=3, prune=True)
        tables = load_manifest(version_dir(repo, "toy", 2)).tables
        assert v2["pruned_keys"] == v1["ids"] + len(tables) + len(old)
        assert all(n == 0 for n in _version_keys_per_node(cluster, "toy", 1, prefix).values())
        assert client.exists(*old) == 0
        assert not any(client.exists(store_keys.meta_key(prefix, "toy", 1, f)) for f in tables)
        # Version 2 untouched: every row reads back, spread over the three primaries.
        layout = store_keys.VersionLayout(v2["shards"], tuple(v2["shard_salts"]))
        vdir = version_dir(repo, "toy", 2)
        for field, table in tables.items():
            ids = read_ids(vdir / table.ids_file)
            key_prefixes = layout.key_prefixes(prefix, "toy", 2, field)
            keys = [key_prefixes[s] + i for s, i in zip(store_keys.shard_of(ids, 3), ids, strict=True)]
            assert client.mget_nonatomic(keys) == store_keys.encode_rows(open_vectors(vdir / table.vectors_file)[1:])
        assert sum(_version_keys_per_node(cluster, "toy", 2, prefix).values()) == v2["ids"]
    finally:
        client.close()


def test_two_replicas_serve_through_a_hot_reload_with_no_failed_request(cluster, tmp_path):
    repo = tmp_path / "repo"
    build_toy_version(repo, "toy", 1, seed=1)
    prefix = "mtrank-replicas"
    load_embeddings(repo, "toy", cluster.url, prefix=prefix, progress=False)
    env = {"MTRANK_STORE_URL": cluster.url, "MTRANK_STORE_PREFIX": prefix, "MTRANK_ADMIN_TOKEN": "t0ken",
           "MTRANK_STORE_RETRY_S": str(RETRY_S)}
    with RemoteServer(repo, env=env) as a, RemoteServer(repo, env=env) as b:
        replicas = [a, b]
        with Load([a.url, b.url], bodies(8)) as load:
            time.sleep(1.0)
            build_toy_version(repo, "toy", 2, seed=2)
            load_embeddings(repo, "toy", cluster.url, prefix=prefix, progress=False)
            for s in replicas:
                r = s.post("/admin/reload", headers={"Authorization": "Bearer t0ken"})
                assert r.status_code == 200, r.text
            reloaded = len(load.answers)
            time.sleep(1.0)
        answers = load.answers
        assert not failed(answers), failed(answers)
        after = answers[reloaded + 2 :]
        assert {(x.replica, x.body["model"]["version"]) for x in after} == {(0, 2), (1, 2)}
        assert not any(x.body["degraded"] for x in answers)
        for k, s in enumerate(replicas):
            assert s.get("/readyz").json() == {"ready": True}
            served = _counter(s.metrics(), "mtrank_requests_total", route="/v1/rank", status="200")
            assert served == sum(1 for x in answers if x.replica == k)  # each replica counts its own


def _counter(text: str, name: str, **labels: str) -> float:
    return sum(
        s.value for fam in text_string_to_metric_families(text) for s in fam.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )
