"""The store the settings name: the URL's scheme picks the back-end (:mod:`mtrank.stores.registry`),
and the service wraps it in the breaker, the cache and the table checks (:class:`KeyValueStore`)."""

from __future__ import annotations

from mtrank import store_keys
from mtrank.service.settings import Settings
from mtrank.service.stores.inprocess import InProcessStore
from mtrank.service.stores.kv import KeyValueStore
from mtrank.service.stores.tables import EmbeddingStore
from mtrank.stores import backend_class


def open_store(settings: Settings) -> EmbeddingStore:
    """The embedding store of ``settings.store_url`` (unset or ``inprocess://``: the in-process store)."""
    url = settings.store_url_text()
    backend = backend_class(url)
    if backend is None:
        return InProcessStore()
    return open_url(url, prefix=settings.store_prefix, timeout_s=settings.store_timeout_ms / 1000.0,
                    retry_s=settings.store_retry_s, cache_size=settings.embedding_cache_size,
                    cache_ttl_s=settings.embedding_cache_ttl_s)


def open_url(url: str, prefix: str = store_keys.DEFAULT_PREFIX, timeout_s: float = 0.1, retry_s: float = 1.0,
             cache_size: int = 200_000, cache_ttl_s: float = 60.0) -> KeyValueStore:
    """The key-value store at ``url`` (any registered back-end but the in-process store), wrapped."""
    backend = backend_class(url)
    if backend is None:
        raise ValueError("the in-process store is no key-value back-end")
    return KeyValueStore(backend(url, timeout_s=timeout_s), prefix=prefix, retry_s=retry_s, cache_size=cache_size,
                         cache_ttl_s=cache_ttl_s)
