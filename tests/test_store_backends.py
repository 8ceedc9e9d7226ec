"""Store back-ends are plug-ins (issue 28): a back-end written here, a dict behind
:class:`mtrank.stores.StoreBackend`, registered under its own URL scheme, gets the loader's
versioned writes, the TTL cache, the circuit breaker and readiness without any other change."""

from __future__ import annotations

import asyncio
import fnmatch
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from mtrank import store_keys
from mtrank.export.history_loader import load_histories
from mtrank.export.store_loader import load_embeddings, loaded_version
from mtrank.histories import HistoryFields
from mtrank.manifest import ListInfo, load_manifest, write_manifest
from mtrank.service.app import create_app
from mtrank.service.settings import load_settings
from mtrank.service.stores import HistoryAnswer, HistoryQuery, KeyValueStore, LocalTable, open_store
from mtrank.service.stores.histories import FOUND, MISSING, UNSERVED
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


def _with_a_history_field(vdir) -> HistoryFields:
    """Give a toy version a sequence field in its manifest: ``hist_item_id``, 4 entries of the
    store's item table (the loader and the store read only the manifest)."""
    manifest = load_manifest(vdir)
    manifest.lists = [ListInfo(name="hist_item_id", kind="sequence", side="user", max_len=4, pooling="mean",
                               share="item_id", location="store")]
    write_manifest(vdir, manifest)
    return HistoryFields.of(manifest.lists)


def test_history_records_go_through_the_backend_and_ride_with_the_embeddings(repo, tmp_path):
    url = "dict://histories"
    vdir = repo / "toy" / "1"
    fields = _with_a_history_field(vdir)
    load_embeddings(repo, "toy", url, version=1, progress=False)
    table = tmp_path / "histories.parquet"
    pd.DataFrame({"user_id": ["u1", "u2"], "hist_item_id": [["v1", "v2", "v3", "v4", "v5"], []]}).to_parquet(table)
    stats = load_histories(repo, "toy", table, version=1, store_url=url, progress=False)
    assert stats["users"] == 2 and stats["truncated"] == 1
    backing = DictBackend.stores["histories"]
    meta_key = store_keys.history_meta_keys(store_keys.DEFAULT_PREFIX, "toy", 1, store_keys.VersionLayout())[0]
    tables = _tables(repo, 1)

    def query(user: str) -> HistoryQuery:
        return HistoryQuery("toy", 1, vdir, user, fields)

    async def main():
        store = KeyValueStore(DictBackend(url), retry_s=RETRY_S, cache_size=0)
        try:
            assert await store.version_problem(list(tables.values())) is None
            reads = backing.reads
            _, found, degraded = await store.lookup_with_history([(tables["item_id"], ["v1", "v9"])], query("u1"))
            one_read = backing.reads - reads == 1
            answers = [(await store.lookup_with_history([], query(u)))[1] for u in ("u2", "u3")]
            meta = backing.data.pop(meta_key)  # a load under way: no record, not an error
            _, loading, loading_degraded = await store.lookup_with_history([], query("u1"))
            backing.data[meta_key] = meta
            backing.down = True
            _, outage, outage_degraded = await store.lookup_with_history([], query("u1"))
            return found, degraded, one_read, answers, loading, loading_degraded, outage, outage_degraded
        finally:
            await store.close()

    found, degraded, one_read, (empty, none), loading, loading_degraded, outage, outage_degraded = asyncio.run(main())
    # The record is read in the same back-end call as the embeddings, cut at max_len (most recent first).
    assert one_read and not degraded and found == HistoryAnswer(FOUND, (["v1", "v2", "v3", "v4"],))
    assert empty == HistoryAnswer(FOUND, ([],)) and none.status == MISSING
    assert loading.status == MISSING and not loading_degraded
    assert outage.status == UNSERVED and outage_degraded
    backing.down = False

    # A re-load replaces the version's records; its meta key is written after them.
    pd.DataFrame({"user_id": ["u3"], "hist_item_id": [["v7"]]}).to_parquet(table)
    load_histories(repo, "toy", table, version=1, store_url=url, progress=False)
    history_keys = [k for k in backing.data if store_keys.HISTORY_SEGMENT in k]
    assert history_keys == [history_keys[0].rsplit(":", 1)[0] + ":u3", meta_key], history_keys
