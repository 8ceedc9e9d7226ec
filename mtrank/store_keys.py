"""Redis layout of the embedding store, shared by the loader (export) and the service.

Every table of one (model, version) shares the version's hash tags, so a request that looks up
several tables still sends at most one ``MGET`` per Cluster node:

- One shard (a single Redis, a small version): ``{prefix}:{<model>:<version>}:<field>:<id>``
  → the table row of ``id``: ``width`` float32 values, little-endian, no header (STEM: the
  shared and every task view in one value). One tag, one Cluster slot for the whole version.
- ``N > 1`` shards (a large version on a Cluster): ``id`` of every table lives under
  ``{prefix}:{<model>:<version>:<s>.<salt>}:<field>:<id>`` with ``s = crc32(id) mod N``
  (:func:`shard_of`). The loader picks the ``N`` salts once per version so that the ``N`` tags'
  slots sit on ``N`` different primaries (:func:`pick_salts`): a request's keys of all tables
  then fall into at most ``N`` slots on ``N`` nodes, one ``MGET`` each, and the version's memory
  and lookup work spread over the cluster.
- ``{prefix}:meta:{<model>:<version>}:<field>`` → JSON ``{"rows", "width", "sha256", ...,
  "shards", "shard_salts"}`` written after the table's rows: a table is complete when its meta
  key exists, a version when all its tables' are. Every table's meta carries the same version
  layout (:class:`VersionLayout`); the service reads it from there.
- ``{prefix}:ptr:<model>`` → the version the loader flipped to last (an integer as text).
- History records (:mod:`mtrank.histories`): ``{prefix}:<tag>:@hist:<user_id>`` under the tag
  of the user's shard (``shard_of(user_id)``, as any id), and per tag the load's meta key
  ``{prefix}:meta:<tag>:@hist`` (:func:`history_key_prefixes`, :func:`history_meta_keys`): a
  request's record and its shard's meta share a slot with its embeddings.

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
"""A version gets one shard per this many bytes of values, all tables together (up to one per primary)."""
MAX_SALT = 1_000_000


def version_tag(model: str, version: int) -> str:
    """The hash tag of a one-shard version."""
    return f"{{{model}:{version}}}"


def shard_tag(model: str, version: int, shard: int, salt: int) -> str:
    """The hash tag of shard ``shard`` of a version spread over several shards."""
    return f"{{{model}:{version}:{shard}.{salt}}}"


def id_key_prefix(prefix: str, model: str, version: int, field: str) -> str:
    """Prepend to an id to get its key (one-shard layout)."""
    return f"{prefix}:{version_tag(model, version)}:{field}:"


def meta_key(prefix: str, model: str, version: int, field: str) -> str:
    return f"{prefix}:meta:{version_tag(model, version)}:{field}"


HISTORY_SEGMENT = "@hist"
"""Where a table's field name stands in a key, the history records' segment (no spec field uses it)."""


def history_key_prefixes(prefix: str, model: str, version: int, layout: VersionLayout) -> list[str]:
    """Per shard of ``layout``, the string to prepend to a user id to get its history record's key."""
    return layout.key_prefixes(prefix, model, version, HISTORY_SEGMENT)


def history_meta_keys(prefix: str, model: str, version: int, layout: VersionLayout) -> list[str]:
    """Per shard of ``layout``, the meta key of a history load (one per hash tag, beside its records)."""
    return [f"{prefix}:meta:{tag}:{HISTORY_SEGMENT}" for tag in layout.tags(model, version)]


def pointer_key(prefix: str, model: str) -> str:
    return f"{prefix}:ptr:{model}"


def key_slot(key: str | bytes) -> int:
    """The Redis Cluster slot of ``key`` (CRC16 of its hash tag, mod 16384)."""
    from redis.crc import key_slot as redis_key_slot

    return redis_key_slot(key.encode() if isinstance(key, str) else key)


def shard_of(ids: Sequence[str], shards: int) -> list[int]:
    """Per id its shard: ``crc32(utf-8 id) mod shards`` (stable across processes, tables and versions)."""
    if shards == 1:
        return [0] * len(ids)
    crc = zlib.crc32
    return [crc(i.encode()) % shards for i in ids]


@dataclass(frozen=True)
class VersionLayout:
    """Where the tables of one version live: ``shards`` hash tags, ``salts[s]`` naming shard s."""

    shards: int = 1
    salts: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.shards < 1 or (self.shards > 1 and len(self.salts) != self.shards):
            raise ValueError(f"version layout: {self.shards} shards with {len(self.salts)} salts")

    def tags(self, model: str, version: int) -> list[str]:
        """Per shard, its hash tag."""
        if self.shards == 1:
            return [version_tag(model, version)]
        return [shard_tag(model, version, s, salt) for s, salt in enumerate(self.salts)]

    def key_prefixes(self, prefix: str, model: str, version: int, field: str) -> list[str]:
        """Per shard, the string to prepend to an id of table ``field`` to get its key."""
        return [f"{prefix}:{tag}:{field}:" for tag in self.tags(model, version)]

    def meta_fields(self) -> dict[str, Any]:
        return {"shards": self.shards, "shard_salts": list(self.salts)} if self.shards > 1 else {"shards": 1}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> VersionLayout:
        shards = int(meta.get("shards", 1))
        return cls(shards, tuple(int(s) for s in meta.get("shard_salts", ()))) if shards > 1 else cls()


def choose_shards(value_bytes: int, primaries: int) -> int:
    """Shards for a version whose tables hold ``value_bytes`` of values in all, on a cluster of
    ``primaries``: one per :data:`SHARD_MIN_BYTES`, at most one per primary (more would need two
    MGETs on a node)."""
    return max(1, min(primaries, math.ceil(value_bytes / SHARD_MIN_BYTES)))


def pick_salts(
    model: str, version: int, shards: int, owner: Callable[[int], str], primaries: Sequence[str]
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
        salt = next((k for k in range(MAX_SALT) if owner(key_slot(shard_tag(model, version, s, k))) == target), None)
        if salt is None:
            raise ValueError(f"no hash tag of shard {s} of {model} v{version} lands on primary {target}")
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


def redacted_url(url: str) -> str:
    """``url`` without its secrets, for messages: the password (in the user info or a
    ``password=`` query option) becomes ``***``; a URL that does not parse becomes its scheme."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            user = parts.username or ""
            host = netloc.rpartition("@")[2]
            netloc = f"{user}:***@{host}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode([(k, "***" if k.lower() in SECRET_OPTIONS else v) for k, v in pairs], safe="*/")
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return url.split("://", 1)[0] + "://***"


SECRET_OPTIONS = ("password", "ssl_password")
"""URL query options whose values :func:`redacted_url` hides."""


def url_secrets(url: str) -> list[str]:
    """The secret strings in ``url`` (its password, secret query options), to scrub from error texts."""
    from urllib.parse import parse_qsl, unquote, urlsplit

    try:
        parts = urlsplit(url)
        found = [unquote(parts.password)] if parts.password else []
        found += [v for k, v in parse_qsl(parts.query) if k.lower() in SECRET_OPTIONS and v]
    except ValueError:
        return []
    return [s for s in found if s]


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
