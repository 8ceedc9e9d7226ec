"""URL scheme → embedding store back-end: the one place that picks a back-end.

A back-end registers under its schemes, by class or lazily by ``"module:Class"`` (so Redis is
imported only by a service that uses it). ``inprocess`` names the in-process store: the
repository's own tables read in the serving process, no back-end to connect to.
"""

from __future__ import annotations

import importlib

from mtrank.stores.base import StoreBackend

IN_PROCESS = "inprocess"

_BACKENDS: dict[str, type[StoreBackend] | str | None] = {
    "redis": "mtrank.stores.redis:RedisBackend",
    "rediss": "mtrank.stores.redis:RedisBackend",
    "unix": "mtrank.stores.redis:RedisBackend",
    "redis+cluster": "mtrank.stores.redis:RedisBackend",
    "rediss+cluster": "mtrank.stores.redis:RedisBackend",
    IN_PROCESS: None,
}


def register(scheme: str, backend: type[StoreBackend] | str) -> None:
    """Serve URLs ``scheme://...`` from ``backend`` (a class, or ``"module:Class"``)."""
    _BACKENDS[scheme] = backend


def schemes() -> list[str]:
    return list(_BACKENDS)


def scheme_of(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else ""


def backend_class(url: str | None) -> type[StoreBackend] | None:
    """The back-end class of ``url``; None for the in-process store (``url`` None or ``inprocess://``).
    Raises ValueError for a scheme no back-end registered."""
    if url is None:
        return None
    scheme = scheme_of(url)
    if scheme not in _BACKENDS:
        raise ValueError(f"no embedding store back-end for the scheme {scheme or '(none)'!r} "
                         f"(known: {', '.join(s + '://' for s in _BACKENDS)})")
    entry = _BACKENDS[scheme]
    if isinstance(entry, str):
        module, _, name = entry.partition(":")
        entry = getattr(importlib.import_module(module), name)
        _BACKENDS[scheme] = entry
    return entry


def open_backend(url: str, timeout_s: float = 1.0) -> StoreBackend:
    """A back-end for ``url`` (not the in-process store); ``timeout_s`` per call."""
    cls = backend_class(url)
    if cls is None:
        raise ValueError("the in-process store reads the repository: it has no back-end to open or to load")
    return cls(url, timeout_s=timeout_s)
