"""The stable uid hash that maps users to partitions.

Every instance, every restart and every other service must agree on which
partition a uid lives in, so the hash is fixed here, byte for byte, and never
depends on Python's ``hash()`` (which is salted per process).

Algorithm (implementable in any language)::

    digest    = SHA-256(UTF-8 bytes of uid)            # 32 bytes
    hash      = first 8 bytes of digest, read as an unsigned 64-bit
                big-endian integer                      # 0 .. 2**64 - 1
    partition = hash mod P                              # P = cluster.partitions

Example: ``uid = "alice"`` gives SHA-256 ``2bd806c97f0e00af...``, so
``hash = 0x2bd806c97f0e00af = 3159282601090220207`` and with ``P = 64`` the
partition is ``3159282601090220207 mod 64 = 47``.
"""

from __future__ import annotations

import hashlib

__all__ = ["partition_for", "stable_hash"]


def stable_hash(uid: str) -> int:
    """Return the first 8 bytes of SHA-256(uid as UTF-8) as a big-endian unsigned int."""
    digest = hashlib.sha256(uid.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def partition_for(uid: str, partitions: int) -> int:
    """Return the partition (``0 .. partitions - 1``) that owns ``uid``."""
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions}")
    return stable_hash(uid) % partitions
