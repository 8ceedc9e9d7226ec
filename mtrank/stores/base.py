"""The interface of one embedding store back-end: both sides of one kind of key-value store.

A back-end holds the tables in the layout of :mod:`mtrank.store_keys` (versioned keys, hash tags
shared by a version's tables, a meta key per table, a pointer per model). It only moves bytes:
the service wraps it in the circuit breaker, the TTL cache and the table checks
(:mod:`mtrank.service.stores`), and the loader (:mod:`mtrank.export.store_loader`) writes through
it, so a new back-end gets all of them by implementing this class.

- The read side (the service, asyncio): :meth:`read` of grouped keys in one round trip,
  :meth:`get`, :meth:`check`, :meth:`reconnect`, :meth:`close`.
- The write side (the loader, blocking): :meth:`get_value`, :meth:`set_value`,
  :meth:`delete_keys`, :meth:`write_rows`, :meth:`scan`, :meth:`placement`, :meth:`close_writer`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import ClassVar

from mtrank import store_keys

KeyGroup = tuple[int, list[str]]
"""``(route, keys)``: keys that go to one place of the store (:meth:`StoreBackend.route`)."""


class StoreBackend(ABC):
    """One kind of key-value store holding the embedding tables (see the module docstring)."""

    name: ClassVar[str]
    """The ``store`` label of the lookup metrics (``redis``)."""
    title: ClassVar[str] = "the store"
    """What messages call it (``Redis``)."""
    errors: ClassVar[tuple[type[BaseException], ...]] = (OSError, TimeoutError)
    """Exceptions that mean the store could not be asked (an outage): the circuit breaker's
    business. Any other exception is a bug and propagates."""

    def __init__(self, url: str, timeout_s: float = 0.1):
        self.timeout_s = timeout_s
        """Connect and read timeout of one call, seconds."""
        self.display_url = store_keys.redacted_url(url)
        """The URL without its password: the only form of it a message may carry."""
        self._secrets = store_keys.url_secrets(url)

    def scrub(self, text: str) -> str:
        """``text`` without the URL's secrets (an error may quote what it was given)."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    # -- read side (the service) -----------------------------------------------------------------

    def route(self, key_prefix: str) -> int:
        """Where the keys starting with ``key_prefix`` (one hash tag) live: keys of one route are
        read in one command. One node: 0 for every key."""
        return 0

    @abstractmethod
    async def read(self, groups: Sequence[KeyGroup]) -> list[list[bytes | None] | BaseException]:
        """Per group its values (None: no such key), or the error (one of :attr:`errors`) that
        kept that group from being read while others were; raises one of :attr:`errors` when
        nothing could be read. One round trip for all groups where the store allows it."""

    async def get(self, keys: Sequence[str]) -> list[bytes | None]:
        """The values of single keys (meta keys); raises one of :attr:`errors`."""
        outcomes = await self.read([(self.route(k), [k]) for k in keys])
        values = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
            values.extend(outcome)
        return values

    async def check(self, probes: Mapping[int, str]) -> None:
        """Raise one of :attr:`errors` unless the store answers, on every route of ``probes``
        (route → a key prefix living there)."""
        outcomes = await self.read([(route, [prefix + "\x00health"]) for route, prefix in probes.items()] or
                                   [(0, ["\x00health"])])
        failure = next((o for o in outcomes if isinstance(o, BaseException)), None)
        if failure is not None:
            raise failure

    async def reconnect(self) -> None:
        """After a failure: drop connections the outage may have broken (and re-read where keys
        live), so the next call starts afresh. Nothing to do for a store without connections."""
        return None

    @abstractmethod
    async def close(self) -> None:
        """Release the read side's connections."""

    # -- write side (the loader) -----------------------------------------------------------------

    @abstractmethod
    def get_value(self, key: str) -> bytes | None: ...

    @abstractmethod
    def set_value(self, key: str, value: bytes | str) -> None: ...

    @abstractmethod
    def delete_keys(self, keys: Sequence[bytes | str]) -> int:
        """Delete ``keys`` (all of one hash tag); returns how many existed."""

    @abstractmethod
    def write_rows(self, key_prefix: bytes, chunks: Iterable[list[bytes]], on_written: Callable[[int], None]) -> int:
        """Write ``[key, value, key, value, ...]`` chunks whose keys all start with ``key_prefix``
        (one hash tag); ``on_written(n)`` after each chunk's ``n`` ids. Returns the ids that had
        to be written again one by one (a Cluster slot moving under the load)."""

    @abstractmethod
    def scan(self, pattern: str) -> Iterator[bytes]:
        """Keys matching the glob ``pattern``, everywhere in the store."""

    def placement(self) -> tuple[Callable[[int], str], list[str]] | None:
        """For spreading a large version over nodes: (Cluster slot → node name, the primaries in a
        stable order); None for a store on one node."""
        return None

    def close_writer(self) -> None:
        """Release the write side's connections (none by default)."""
        return None
