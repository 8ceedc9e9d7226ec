"""Embedding lookups: the service's Redis lookup of N ids against redis-benchmark's MGET of the same keys.

Both run back to back on one connection against the same Redis and the same keys, so the ratio
is the service's client-side cost (key building, redis-py asyncio, decoding the values into a
float32 matrix) over what the server and a C client need for the same ``MGET``. redis-benchmark
is given the ``MGET`` as a custom command: its ``-t mget`` is silently ignored.

References that explain the gap: a bare ``redis.asyncio`` ``MGET`` (the client library alone),
a raw asyncio protocol with hiredis packing and parsing (the floor for a Python asyncio client),
a synchronous redis-py ``MGET``, and the service's lookup with its in-process cache on (the
steady state under load: hot ids come from the cache).

The service's figure is its :func:`~mtrank.service.stores.open_url` store with the cache off, so every id
goes to Redis (with the cache on, repeating the same 500 ids would measure the cache).
"""

from __future__ import annotations

import asyncio
import csv
import io
import shutil
import subprocess
import time
from urllib.parse import urlparse

import numpy as np

from mtrank import store_keys
from mtrank.service.stores import LocalTable, open_url


def _per_call_s(times: list[float]) -> dict:
    a = np.array(times)
    return {"mean_ms": round(float(a.mean()) * 1000, 4), "p50_ms": round(float(np.median(a)) * 1000, 4),
            "p99_ms": round(float(np.percentile(a, 99)) * 1000, 4), "calls": len(times)}


async def _time_service(url: str, prefix: str, table: LocalTable, ids: list[str], calls: int, cache: bool) -> dict:
    store = open_url(url, prefix=prefix, timeout_s=1.0, cache_size=200_000 if cache else 0)
    try:
        for _ in range(20):
            (result,), degraded = await store.lookup_many([(table, ids)])
            if degraded:
                raise RuntimeError(f"Redis lookup degraded: {store._last_error}")
        times = []
        for _ in range(calls):
            started = time.perf_counter()
            await store.lookup_many([(table, ids)])
            times.append(time.perf_counter() - started)
        missing = result.missing
    finally:
        await store.close()
    out = _per_call_s(times)
    out["missing"] = missing
    return out


async def _time_bare_async(url: str, keys: list[str], calls: int) -> dict:
    client = store_keys.connect_async(url)
    try:
        for _ in range(20):
            await client.mget(keys)
        times = []
        for _ in range(calls):
            started = time.perf_counter()
            await client.mget(keys)
            times.append(time.perf_counter() - started)
    finally:
        await client.aclose()
    return _per_call_s(times)


def _time_bare_sync(url: str, keys: list[str], calls: int) -> dict:
    client = store_keys.connect(url)
    try:
        for _ in range(20):
            client.mget(keys)
        times = []
        for _ in range(calls):
            started = time.perf_counter()
            client.mget(keys)
            times.append(time.perf_counter() - started)
    finally:
        client.close()
    return _per_call_s(times)


class _MgetProtocol(asyncio.Protocol):
    """The least a Python asyncio client can do: one pre-packed command, replies parsed by hiredis."""

    def __init__(self) -> None:
        import hiredis

        self.reader = hiredis.Reader()
        self.waiter: asyncio.Future | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        reply = self.reader.gets()
        if reply is not False and self.waiter is not None:
            self.waiter.set_result(reply)

    async def call(self, packed: bytes):
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(packed)
        return await self.waiter


async def _time_raw_protocol(url: str, keys: list[str], calls: int) -> dict | None:
    """A raw asyncio protocol + hiredis (packing and parsing): the floor under the service's client."""
    try:
        import hiredis
    except ImportError:
        return None
    u = urlparse(url)
    if u.scheme != "redis":
        return None
    _, proto = await asyncio.get_running_loop().create_connection(_MgetProtocol, u.hostname or "127.0.0.1",
                                                                   u.port or 6379)
    try:
        if u.password:
            await proto.call(hiredis.pack_command(("AUTH", *([u.username] if u.username else []), u.password)))
        await proto.call(hiredis.pack_command(("SELECT", (u.path or "/0").strip("/") or "0")))
        args = ("MGET", *keys)
        for _ in range(20):
            await proto.call(hiredis.pack_command(args))
        times = []
        for _ in range(calls):
            started = time.perf_counter()
            await proto.call(hiredis.pack_command(args))
            times.append(time.perf_counter() - started)
    finally:
        proto.transport.close()
    return _per_call_s(times)


def redis_benchmark(url: str, keys: list[str], calls: int) -> dict | None:
    """redis-benchmark sending ``MGET k1 … kN`` on one connection; None when it is not installed."""
    exe = shutil.which("redis-benchmark")
    if exe is None:
        return None
    u = urlparse(url)
    cmd = [exe, "-h", u.hostname or "127.0.0.1", "-p", str(u.port or 6379), "-n", str(calls), "-c", "1", "--csv"]
    db = (u.path or "/0").strip("/") or "0"
    if db != "0":
        cmd += ["--dbnum", db]
    if u.password:
        cmd += ["-a", u.password]
    proc = subprocess.run([*cmd, "MGET", *keys], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"redis-benchmark failed: {proc.stderr.strip()[-500:]}")
    rows = list(csv.reader(io.StringIO(proc.stdout.strip())))
    header, last = rows[0], rows[-1]
    values = dict(zip(header, last, strict=True))
    rps = float(values["rps"])
    return {"mean_ms": round(1000.0 / rps, 4), "p50_ms": float(values.get("p50_latency_ms", "nan")),
            "p99_ms": float(values.get("p99_latency_ms", "nan")), "calls": calls, "rps": rps,
            "avg_latency_ms": float(values.get("avg_latency_ms", "nan"))}


def bench_lookups(url: str, prefix: str, table: LocalTable, ids: list[str], calls: int, rounds: int = 3) -> dict:
    """Per-call times (ms) of each way to fetch ``ids``; ``rounds`` alternations, the median round kept."""
    key_prefix = store_keys.id_key_prefix(prefix, table.model, table.version, table.field)
    keys = [key_prefix + i for i in ids]

    def loop(coro_fn):
        try:
            import uvloop

            runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
        except ImportError:
            runner = asyncio.Runner()
        with runner:
            return runner.run(coro_fn())

    runs: dict[str, list[dict]] = {"service": [], "redis_benchmark": [], "bare_async": [], "raw_protocol": [],
                                   "bare_sync": [], "service_cached": []}
    for _ in range(rounds):
        runs["service"].append(loop(lambda: _time_service(url, prefix, table, ids, calls, cache=False)))
        bench = redis_benchmark(url, keys, calls)
        if bench is not None:
            runs["redis_benchmark"].append(bench)
        runs["bare_async"].append(loop(lambda: _time_bare_async(url, keys, calls)))
        raw = loop(lambda: _time_raw_protocol(url, keys, calls))
        if raw is not None:
            runs["raw_protocol"].append(raw)
        runs["bare_sync"].append(_time_bare_sync(url, keys, calls))
        runs["service_cached"].append(loop(lambda: _time_service(url, prefix, table, ids, calls, cache=True)))

    def median_round(results: list[dict]) -> dict | None:
        if not results:
            return None
        ordered = sorted(results, key=lambda r: r["mean_ms"])
        return ordered[len(ordered) // 2] | {"rounds_mean_ms": [r["mean_ms"] for r in results]}

    out: dict = {"ids": len(ids), "value_bytes": table.width * 4, "keys_example": keys[0]}
    for name, results in runs.items():
        out[name] = median_round(results)
    out["redis_benchmark_missing"] = shutil.which("redis-benchmark") is None
    return out
