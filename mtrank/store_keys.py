"""Redis layout of the embedding store, shared by the loader (export) and the service.

- ``{prefix}:{<model>:<version>:<field>}:<id>`` → the table row of ``id``: ``width`` float32
  values, little-endian, no header (STEM: the shared and every task view in one value).
  The hash tag keeps one table of one version in one Cluster slot, so a request's MGET for a
  field is a single command even on Redis Cluster. This is the layout of a table with one shard.
- A table spread over ``N > 1`` shards (a large table on a Cluster): ``id`` lives under
  ``{prefix}:{<model>:<version>:<field>:<s>.<salt>}:<id>`` with ``s = crc32(id) mod N``
  (:func:`shard_of`). The loader picks each shard's ``salt`` so that the shards' slots sit on
  different primaries (:func:`pick_salts`): a request then needs at most one MGET per node
  for the table, and the table's memory and lookup work spread over the cluster.
- ``{prefix}:meta:{<model>:<version>:<field>}`` → JSON ``{"rows", "width", "sha256", ...,
  "shards", "shard_salts"}`` written after the table's rows: a table is complete when its meta
  key exists; the service reads the shard layout from it (absent ``shards``: one shard).
- ``{prefix}:ptr:<model>`` → the version the loader flipped to last (an integer as text).

A URL with the scheme ``redis+cluster://`` (or ``rediss+cluster://``) selects Redis Cluster.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

DEFAULT_PREFIX = "mtrank"
CLUSTER_SLOTS = 16384
SHARD_MIN_BYTES = 64 * 1024 * 1024
"""A table gets one shard per this many bytes of values (up to one per primary)."""
MAX_SALT = 1_000_000


def table_tag(model: str, version: int, field: str) -> str:
    return f"{{{model}:{version}:{field}}}"


def shard_tag(model: str, version: int, field: str, shard: int, salt: int) -> str:
    return f"{{{model}:{version}:{field}:{shard}.{salt}}}"


def id_key_prefix(prefix: str, model: str, version: int, field: str) -> str:
    """Prepend to an id to get its key (one-shard layout)."""
    return f"{prefix}:{table_tag(model, version, field)}:"


def meta_key(prefix: str, model: str, version: int, field: str) -> str:
    return f"{prefix}:meta:{table_tag(model, version, field)}"


def pointer_key(prefix: str, model: str) -> str:
    return f"{prefix}:ptr:{model}"


def key_slot(key: str | bytes) -> int:
    """The Redis Cluster slot of ``key`` (CRC16 of its hash tag, mod 16384)."""
    from redis.crc import key_slot as redis_key_slot

    return redis_key_slot(key.encode() if isinstance(key, str) else key)


def shard_of(ids: Sequence[str], shards: int) -> list[int]:
    """Per id its shard: ``crc32(utf-8 id) mod shards`` (stable across processes and versions)."""
    if shards == 1:
        return [0] * len(ids)
    crc = zlib.crc32
    return [crc(i.encode()) % shards for i in ids]


@dataclass(frozen=True)
class TableLayout:
    """Where one table of one version lives: ``shards`` hash tags, ``salts[s]`` naming shard s."""

    shards: int = 1
    salts: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.shards < 1 or (self.shards > 1 and len(self.salts) != self.shards):
            raise ValueError(f"table layout: {self.shards} shards with {len(self.salts)} salts")

    def key_prefixes(self, prefix: str, model: str, version: int, field: str) -> list[str]:
        """Per shard, the string to prepend to an id to get its key."""
        if self.shards == 1:
            return [id_key_prefix(prefix, model, version, field)]
        return [f"{prefix}:{shard_tag(model, version, field, s, salt)}:" for s, salt in enumerate(self.salts)]

    def meta_fields(self) -> dict[str, Any]:
        return {"shards": self.shards, "shard_salts": list(self.salts)} if self.shards > 1 else {"shards": 1}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> TableLayout:
        shards = int(meta.get("shards", 1))
        return cls(shards, tuple(int(s) for s in meta.get("shard_salts", ()))) if shards > 1 else cls()


def choose_shards(value_bytes: int, primaries: int) -> int:
    """Shards for a table of ``value_bytes`` on a cluster of ``primaries``: one per
    :data:`SHARD_MIN_BYTES`, at most one per primary (more would need two MGETs on a node)."""
    return max(1, min(primaries, math.ceil(value_bytes / SHARD_MIN_BYTES)))


def pick_salts(
    model: str, version: int, field: str, shards: int, owner: Callable[[int], str], primaries: Sequence[str]
) -> tuple[int, ...]:
    """Per shard the smallest salt whose tag's slot ``owner(slot)`` is a primary of its own.

    ``primaries`` in a stable order (e.g. by first slot); shard s goes to primary
    ``s * len(primaries) // shards``, so ``shards <= len(primaries)`` shards land on distinct nodes.
    """
    if shards > len(primaries):
        raise ValueError(f"{shards} shards need at least as many primaries, the cluster has {len(primaries)}")
    salts = []
    for s in range(shards):
        target = primaries[s * len(primaries) // shards]
        salt = next(
            (k for k in range(MAX_SALT) if owner(key_slot(shard_tag(model, version, field, s, k))) == target), None
        )
        if salt is None:
            raise ValueError(f"no hash tag of shard {s} of table {field!r} lands on primary {target}")
        salts.append(salt)
    return tuple(salts)


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
