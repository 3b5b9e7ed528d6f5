"""Pseudonymization: a keyed hash (HMAC-SHA256) computed with Spark's own functions."""

from __future__ import annotations

import hashlib

from pyspark.sql import Column
from pyspark.sql import functions as F

_BLOCK = 64  # SHA-256 block size in bytes


def keyed_hash(value: Column, key: bytes) -> Column:
    """HMAC-SHA256 of the UTF-8 string value, as 64 lower-case hex digits; null stays null.

    Equal inputs give equal outputs under one key, so joins and counts still work, while the
    value cannot be recovered or recomputed without the key.
    """
    if not key:
        raise ValueError("the pseudonymization key is empty")
    if len(key) > _BLOCK:
        key = hashlib.sha256(key).digest()
    key = key.ljust(_BLOCK, b"\0")
    inner_pad = bytearray(b ^ 0x36 for b in key)
    outer_pad = bytearray(b ^ 0x5C for b in key)
    inner = F.unhex(F.sha2(F.concat(F.lit(inner_pad), F.encode(value, "UTF-8")), 256))
    return F.when(value.isNotNull(), F.sha2(F.concat(F.lit(outer_pad), inner), 256))
