"""Embedding store back-ends (docs/architecture.md, "Store back-ends"): the interface
(:class:`StoreBackend`, read and write side), the URL-scheme registry, one module per back-end."""

from mtrank.stores.base import KeyGroup, StoreBackend
from mtrank.stores.registry import IN_PROCESS, backend_class, open_backend, register, schemes

__all__ = ["IN_PROCESS", "KeyGroup", "StoreBackend", "backend_class", "open_backend", "register", "schemes"]
