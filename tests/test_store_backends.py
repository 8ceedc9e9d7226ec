"""Store back-ends are plug-ins (issue 28): a back-end written here, a dict behind
:class:`mtrank.stores.StoreBackend`, registered under its own URL scheme, gets the loader's
versioned writes, the TTL cache, the circuit breaker and readiness without any other change."""

from __future__ import annotations

import asyncio
import fnmatch
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import pytest
from fastapi.testclient import TestClient

from mtrank import store_keys
from mtrank.export.store_loader import load_embeddings, loaded_version
from mtrank.manifest import load_manifest
from mtrank.service.app import create_app
from mtrank.service.settings import load_settings
from mtrank.service.stores import KeyValueStore, LocalTable, open_store
from mtrank.stores import KeyGroup, StoreBackend, backend_class, register, schemes
from tests.server import TOY_ITEMS, build_toy_version, rank_body

RETRY_S = 0.2


class DictStore:
    """The store's contents and whether it answers; shared by every back-end of one URL."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.down = False
        self.reads = 0


class DictBackend(StoreBackend):
    """The whole back-end: a dict per URL, both sides."""

    name = "dict"
    title = "the dict store"
    errors = (ConnectionError,)
    stores: dict[str, DictStore] = {}

    def __init__(self, url: str, timeout_s: float = 0.1):
        super().__init__(url, timeout_s)
        self.store = self.stores.setdefault(url.split("://", 1)[1], DictStore())

    async def read(self, groups: Sequence[KeyGroup]) -> list[list[bytes | None] | BaseException]:
        if self.store.down:
            raise ConnectionError("the dict store is down")
        self.store.reads += 1
        return [[self.store.data.get(k) for k in keys] for _, keys in groups]

    async def close(self) -> None:
        return None

    def get_value(self, key: str) -> bytes | None:
        return self.store.data.get(key)

    def set_value(self, key: str, value: bytes | str) -> None:
        self.store.data[key] = value.encode() if isinstance(value, str) else value

    def delete_keys(self, keys: Sequence[bytes | str]) -> int:
        names = [k.decode() if isinstance(k, bytes) else k for k in keys]
        return sum(self.store.data.pop(k, None) is not None for k in names)

    def write_rows(self, key_prefix: bytes, chunks: Iterable[list[bytes]], on_written: Callable[[int], None]) -> int:
        for args in chunks:
            for key, value in zip(args[0::2], args[1::2], strict=True):
                assert key.startswith(key_prefix)
                self.store.data[key.decode()] = value
            on_written(len(args) // 2)
        return 0

    def scan(self, pattern: str) -> Iterator[bytes]:
        return iter([k.encode() for k in list(self.store.data) if fnmatch.fnmatchcase(k, pattern)])


@pytest.fixture(scope="module", autouse=True)
def dict_scheme() -> None:
    register("dict", DictBackend)


@pytest.fixture
def repo(tmp_path):
    build_toy_version(tmp_path, "toy", 1, seed=1)
    build_toy_version(tmp_path, "toy", 2, seed=2)
    return tmp_path


def _tables(repo, version: int) -> dict[str, LocalTable]:
    vdir = repo / "toy" / str(version)
    return {f: LocalTable("toy", version, info, vdir) for f, info in load_manifest(vdir).tables.items()}


def test_the_registry_picks_the_backend_by_scheme():
    assert backend_class("dict://x") is DictBackend
    assert backend_class("inprocess://") is None and backend_class(None) is None
    assert {"redis", "rediss", "unix", "redis+cluster", "rediss+cluster", "inprocess", "dict"} <= set(schemes())
    with pytest.raises(ValueError, match="no embedding store back-end for the scheme 'memcached'"):
        backend_class("memcached://h:1")


def test_the_loader_writes_versions_beside_each_other_and_flips_the_pointer(repo):
    url = "dict://loader"
    first = load_embeddings(repo, "toy", url, version=1, progress=False)
    store = DictBackend.stores["loader"]
    v1_keys = {k for k in store.data if "{toy:1}" in k}
    second = load_embeddings(repo, "toy", url, version=2, progress=False)
    assert first["ids"] == second["ids"] == sum(t.info.rows - 1 for t in _tables(repo, 1).values())
    assert v1_keys <= set(store.data) and loaded_version(DictBackend(url), "toy") == 2
    assert load_embeddings(repo, "toy", url, version=2, progress=False)["ids"] == 0  # idempotent
    pruned = load_embeddings(repo, "toy", url, version=2, prune=True, progress=False)["pruned_keys"]
    assert pruned == len(v1_keys) and not any("{toy:1}" in k for k in store.data)
    item = _tables(repo, 2)["item_id"]
    key = store_keys.id_key_prefix(store_keys.DEFAULT_PREFIX, "toy", 2, "item_id") + "v5"
    assert store.data[key] == item.vectors[item.index["v5"]].astype("<f4").tobytes()


def test_the_service_wraps_the_backend_in_the_cache_and_the_breaker(repo):
    url = "dict://served"
    load_embeddings(repo, "toy", url, version=1, progress=False)
    backing = DictBackend.stores["served"]
    tables = _tables(repo, 1)
    item = tables["item_id"]
    settings = load_settings(store_url=url, store_retry_s=RETRY_S)

    async def main():
        store = open_store(settings)
        assert isinstance(store, KeyValueStore) and isinstance(store.backend, DictBackend)
        try:
            assert await store.version_problem(list(tables.values())) is None
            first, _ = await store.lookup_many([(item, TOY_ITEMS[:10])])
            reads = backing.reads
            cached, cached_degraded = await store.lookup_many([(item, TOY_ITEMS[:10])])
            from_cache = backing.reads == reads
            backing.down = True
            (outage,), outage_degraded = await store.lookup_many([(item, TOY_ITEMS[10:20])])
            reason = await store.health()
            backing.down = False
            (still_open,), still_degraded = await store.lookup_many([(item, TOY_ITEMS[10:20])])
            reads_while_open = backing.reads - reads
            await asyncio.sleep(RETRY_S)
            (probe,), probe_degraded = await store.lookup_many([(item, TOY_ITEMS[10:20])])
            return (first, cached, cached_degraded, from_cache, outage, outage_degraded, reason, still_open,
                    still_degraded, reads_while_open, probe, probe_degraded, await store.health())
        finally:
            await store.close()

    (first, cached, cached_degraded, from_cache, outage, outage_degraded, reason, still_open, still_degraded,
     reads_while_open, probe, probe_degraded, healthy) = asyncio.run(main())
    expected = item.vectors[[item.index[i] for i in TOY_ITEMS[:10]]]
    np.testing.assert_array_equal(first[0].vectors, expected)
    assert from_cache and not cached_degraded and (cached[0].vectors == expected).all()
    assert outage_degraded and outage.unserved == 10 and (outage.vectors == item.default).all()
    assert reason.startswith("embedding store degraded: the dict store unreachable (ConnectionError")
    # Open: the back-end is not asked until the retry is due, then one probe closes the breaker.
    assert still_degraded and still_open.unserved == 10 and reads_while_open == 0
    assert not probe_degraded and probe.defaults == 0 and healthy is None
    np.testing.assert_array_equal(probe.vectors, item.vectors[[item.index[i] for i in TOY_ITEMS[10:20]]])


def test_readiness_and_answers_follow_the_backend(repo):
    url = "dict://ready"
    load_embeddings(repo, "toy", url, progress=False)
    backing = DictBackend.stores["ready"]
    settings = load_settings(model_repo=repo, store_url=url, store_retry_s=RETRY_S, device="cpu",
                             intra_op_threads=1)
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").json() == {"ready": True}
        assert client.get("/v1/models").json()["store"] == {"kind": "dict", "degraded": False}
        assert client.post("/v1/rank", json=rank_body(n=10)).json()["degraded"] is False
        backing.down = True
        ready = client.get("/readyz")
        answer = client.post("/v1/rank", json=rank_body(user_id="u2", n=10, offset=40)).json()
        backing.down = False
        time.sleep(RETRY_S)
        recovered = client.get("/readyz").json()
    # An outage keeps the replica in rotation (200), degraded, with the back-end's reason.
    assert ready.status_code == 200 and ready.json()["degraded"] is True
    assert "the dict store unreachable" in ready.json()["reason"]
    assert answer["degraded"] is True and len(answer["items"]) == 10
    assert recovered == {"ready": True}
