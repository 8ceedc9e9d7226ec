"""Recovery of the Redis store (issue 13, Redis recovery) against a real ``redis-server`` that the
tests start, kill and start again empty: misses learned while Redis was down, recovering or half
loaded are not cached past it, and the half-open breaker lets one probe through."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mtrank.bench.server import RemoteServer
from mtrank.export.store_loader import load_embeddings
from mtrank.manifest import load_manifest
from mtrank.service.stores import LocalTable, open_url
from tests.cluster import RedisNode, redis_binaries
from tests.server import TOY_ITEMS, build_toy_version, rank_body

pytestmark = pytest.mark.redis
CACHE_TTL_S = 10.0
RETRY_S = 0.2
PREFIX = "mtrank-recovery"


@pytest.fixture
def own_redis(tmp_path):
    redis_binaries()
    node = RedisNode(tmp_path / "redis").start()
    yield node
    node.stop()


@pytest.fixture
def toy(tmp_path):
    repo = tmp_path / "repo"
    vdir = build_toy_version(repo, "toy", 1)
    return repo, {f: LocalTable("toy", 1, info, vdir) for f, info in load_manifest(vdir).tables.items()}


def _missing_total(text: str) -> float:
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == "mtrank_embedding_missing_total")


def _body(user_id: str, known_items: range, unknown: str) -> dict:
    """A rank body: ``known_items`` of the toy table, 10 ids it does not hold, known authors."""
    items = [f"v{i}" for i in known_items] + [f"{unknown}-{j}" for j in range(10)]
    body = rank_body(user_id=user_id, n=len(items))
    for j, (c, item) in enumerate(zip(body["candidates"], items, strict=True)):
        c["item_id"] = item
        c["features"]["author_id"] = f"a{j % 60}"
    return body


def test_missing_ids_are_back_to_the_pre_outage_level_within_one_cache_ttl_after_an_outage_and_reload(
    own_redis, toy
):
    repo, _ = toy
    load_embeddings(repo, "toy", own_redis.url, prefix=PREFIX, progress=False)
    env = {"MTRANK_STORE_URL": own_redis.url, "MTRANK_STORE_PREFIX": PREFIX, "MTRANK_STORE_RETRY_S": str(RETRY_S),
           "MTRANK_EMBEDDING_CACHE_TTL_S": str(CACHE_TTL_S)}
    with RemoteServer(repo, env=env) as s:

        def rank(body: dict) -> tuple[float, bool]:
            """Missing ids counted for one request, and whether its answer was degraded."""
            before = _missing_total(s.metrics())
            r = s.post("/v1/rank", json=body)
            assert r.status_code == 200, r.text
            return _missing_total(s.metrics()) - before, r.json()["degraded"]

        baseline, degraded = rank(_body("u1", range(0, 30), "pre"))
        assert baseline == 10 and not degraded

        own_redis.kill()
        assert rank(_body("u2", range(30, 60), "outage"))[1] is True
        own_redis.start()  # same port, empty: every id is missing until the tables are loaded again
        time.sleep(2 * RETRY_S)
        # Ids first seen while Redis is back but empty: the case that used to be cached as missing.
        after_outage = _body("u3", range(100, 130), "post")
        during = [rank(after_outage) for _ in range(10)]
        assert all(d for _, d in during[1:]) and min(m for m, _ in during) > baseline, during

        load_embeddings(repo, "toy", own_redis.url, prefix=PREFIX, progress=False)
        loaded = time.monotonic()
        while True:
            missing, degraded = rank(after_outage)
            if missing == baseline and not degraded:
                break
            assert time.monotonic() - loaded < CACHE_TTL_S, f"{missing} missing ids per request, {baseline} before"
            time.sleep(0.05)
        print(f"missing ids per request back to {baseline:g} {time.monotonic() - loaded:.2f} s after the reload "
              f"(cache TTL {CACHE_TTL_S:g} s)")
        assert s.get("/readyz").json() == {"ready": True}


def test_a_table_emptied_behind_the_stores_back_is_not_cached_as_missing(own_redis, toy):
    """Redis restarted empty between two lookups (no error seen): misses of the unverified table
    are not cached, the table is reported incomplete, and a reload is served at once."""
    repo, tables = toy
    load_embeddings(repo, "toy", own_redis.url, prefix=PREFIX, progress=False)
    item = tables["item_id"]
    ids = TOY_ITEMS[:30]

    async def main():
        store = open_url(own_redis.url, prefix=PREFIX, timeout_s=1.0, retry_s=RETRY_S)
        try:
            assert await store.version_problem(list(tables.values())) is None
            (ok,), _ = await store.lookup_many([(item, ids)])
            client = own_redis.client()
            client.flushall()
            store.cache = type(store.cache)(store.cache.max_entries, store.cache.ttl_s)  # positive entries gone too
            await asyncio.sleep(RETRY_S)  # the table's last check is now too old to cache misses
            (empty,), _ = await store.lookup_many([(item, ids)])
            await asyncio.sleep(0.1)  # the background check of the meta key
            (flagged,), flagged_degraded = await store.lookup_many([(item, ids)])
            reason = await store.health()
            load_embeddings(repo, "toy", own_redis.url, prefix=PREFIX, progress=False)
            (reloaded,), reloaded_degraded = await store.lookup_many([(item, ids)])
            client.close()
            return ok, empty, flagged, flagged_degraded, reason, reloaded, reloaded_degraded
        finally:
            await store.close()

    ok, empty, flagged, flagged_degraded, reason, reloaded, reloaded_degraded = asyncio.run(main())
    assert ok.missing == 0 and empty.missing == 30 and not empty.incomplete
    assert flagged.missing == 30 and flagged.incomplete and flagged_degraded
    assert "not completely loaded" in reason and "toy v1 item_id" in reason
    # Nothing of the empty table was cached: the first lookup after the reload finds every id.
    assert reloaded.missing == 0 and reloaded.unserved == 0 and (reloaded.vectors == ok.vectors).all()
    assert reloaded_degraded  # until the meta key is read again (background, within retry_s)


def test_the_half_open_breaker_lets_one_probe_through(own_redis, toy):
    repo, tables = toy
    load_embeddings(repo, "toy", own_redis.url, prefix=PREFIX, progress=False)
    item = tables["item_id"]

    async def main():
        store = open_url(own_redis.url, prefix=PREFIX, timeout_s=0.3, retry_s=RETRY_S, cache_size=0)
        try:
            assert await store.version_problem(list(tables.values())) is None
            own_redis.kill()
            (_,), degraded = await store.lookup_many([(item, TOY_ITEMS[:5])])
            assert degraded and store.degraded
            own_redis.start()
            load_embeddings(repo, "toy", own_redis.url, prefix=PREFIX, progress=False)
            await asyncio.sleep(RETRY_S)
            before = own_redis.mget_calls()
            answers = await asyncio.gather(*(store.lookup_many([(item, TOY_ITEMS[k : k + 5])]) for k in range(20)))
            probes = own_redis.mget_calls() - before
            (after,), after_degraded = await store.lookup_many([(item, TOY_ITEMS[:5])])
            return answers, probes, after, after_degraded, store.degraded
        finally:
            await store.close()

    answers, probes, after, after_degraded, still_degraded = asyncio.run(main())
    assert probes == 1
    assert [d for _, d in answers].count(False) == 1  # the probe; the 19 others answered degraded at once
    assert all(r.unserved == 5 for (r,), d in answers if d)
    assert not still_degraded and not after_degraded and after.defaults == 0


@pytest.mark.parametrize("shards", [1, 3])
def test_a_lookup_of_every_table_is_one_mget_on_a_single_redis(own_redis, toy, shards):
    """Several tables, one or several shards: one command, one round trip; values bit-exact."""
    repo, tables = toy
    load_embeddings(repo, "toy", own_redis.url, prefix=PREFIX, progress=False, shards=shards)
    wanted = {"user_id": ["u7"], "item_id": TOY_ITEMS[:300] + ["nope"], "author_id": [f"a{k % 60}" for k in range(300)]}

    async def main():
        store = open_url(own_redis.url, prefix=PREFIX, timeout_s=1.0, cache_size=0)
        try:
            assert await store.version_problem(list(tables.values())) is None
            before = own_redis.mget_calls()
            results, degraded = await store.lookup_many([(tables[f], ids) for f, ids in wanted.items()])
            return results, degraded, own_redis.mget_calls() - before
        finally:
            await store.close()

    results, degraded, mgets = asyncio.run(main())
    assert mgets == 1 and not degraded
    for (field, ids), result in zip(wanted.items(), results, strict=True):
        table = tables[field]
        rows = [table.index.get(i, 0) for i in ids]
        np.testing.assert_array_equal(result.vectors, table.vectors[rows])
        assert result.missing == (1 if field == "item_id" else 0)
