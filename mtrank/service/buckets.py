"""A/B buckets: a stable hash of (salt, user id) picks a bucket by its traffic share.

The hash is BLAKE2b, so the assignment is the same on every process, machine and restart
(Python's ``hash`` is randomised per process) and changes only when the salt changes.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from dataclasses import dataclass

from mtrank.fusion import BucketConfig

RESOLUTION = 10_000
"""Hash slots: shares have a resolution of 0.01 percent."""


def user_slot(salt: str, user_id: str) -> int:
    """The user's slot in [0, 10000): percent × 100."""
    digest = hashlib.blake2b(f"{salt}\x00{user_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % RESOLUTION


@dataclass(frozen=True)
class BucketTable:
    """Buckets in configuration order, each owning a contiguous range of slots."""

    buckets: tuple[BucketConfig, ...]
    salt: str

    def __post_init__(self) -> None:
        bounds, acc = [], 0
        for b in self.buckets:
            acc += round(b.share * 100)
            bounds.append(acc)
        if acc != RESOLUTION:
            raise ValueError(f"bucket shares add up to {acc / 100:g}, not 100")
        object.__setattr__(self, "_upper", tuple(bounds))

    def assign(self, user_id: str) -> BucketConfig:
        return self.buckets[bisect_right(self._upper, user_slot(self.salt, user_id))]
