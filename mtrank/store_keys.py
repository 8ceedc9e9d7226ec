"""Redis layout of the embedding store, shared by the loader (export) and the service.

- ``{prefix}:{<model>:<version>:<field>}:<id>`` → the table row of ``id``: ``width`` float32
  values, little-endian, no header (STEM: the shared and every task view in one value).
  The hash tag keeps one table of one version in one Cluster slot, so a request's MGET for a
  field is a single command even on Redis Cluster.
- ``{prefix}:meta:{<model>:<version>:<field>}`` → JSON ``{"rows", "width", "sha256"}`` written
  after the table's rows: a table is complete when its meta key exists.
- ``{prefix}:ptr:<model>`` → the version the loader flipped to last (an integer as text).

A URL with the scheme ``redis+cluster://`` (or ``rediss+cluster://``) selects Redis Cluster.
"""

from __future__ import annotations

import numpy as np

DEFAULT_PREFIX = "mtrank"


def table_tag(model: str, version: int, field: str) -> str:
    return f"{{{model}:{version}:{field}}}"


def id_key_prefix(prefix: str, model: str, version: int, field: str) -> str:
    """Prepend to an id to get its key."""
    return f"{prefix}:{table_tag(model, version, field)}:"


def meta_key(prefix: str, model: str, version: int, field: str) -> str:
    return f"{prefix}:meta:{table_tag(model, version, field)}"


def pointer_key(prefix: str, model: str) -> str:
    return f"{prefix}:ptr:{model}"


def encode_rows(vectors: np.ndarray) -> list[bytes]:
    """One value per row: the row's float32 little-endian bytes."""
    data = np.ascontiguousarray(vectors, dtype="<f4")
    flat = data.tobytes()
    n = data.shape[1] * 4
    return [flat[i : i + n] for i in range(0, len(flat), n)]


def is_cluster_url(url: str) -> bool:
    return url.split("://", 1)[0] in ("redis+cluster", "rediss+cluster")


def plain_url(url: str) -> str:
    """The URL redis-py understands (``redis+cluster://h:p`` → ``redis://h:p``)."""
    scheme, rest = url.split("://", 1)
    return f"{scheme.replace('+cluster', '')}://{rest}"


def connect(url: str, **kwargs):
    """A synchronous client (``RedisCluster`` for cluster URLs)."""
    import redis
    from redis.cluster import RedisCluster

    if is_cluster_url(url):
        return RedisCluster.from_url(plain_url(url), **kwargs)
    return redis.Redis.from_url(url, **kwargs)


def connect_async(url: str, **kwargs):
    """An asyncio client (``RedisCluster`` for cluster URLs)."""
    from redis import asyncio as aioredis
    from redis.asyncio.cluster import RedisCluster

    if is_cluster_url(url):
        return RedisCluster.from_url(plain_url(url), **kwargs)
    return aioredis.Redis.from_url(url, **kwargs)
