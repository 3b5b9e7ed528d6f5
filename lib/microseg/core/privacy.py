"""Pseudonymization: a keyed hash (HMAC-SHA256) computed with Spark's own functions."""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable

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


def pseudonym(value: str, key: bytes) -> str:
    """keyed_hash of one value, computed in Python (the same 64 hex digits)."""
    return hmac.new(key, value.encode("utf-8"), hashlib.sha256).hexdigest()


def audit_key(key: bytes) -> bytes:
    """The key of the hashes the erasure audit and the suppression list keep. It differs from
    the pseudonymization key, so an audit hash never equals an identifier the lake stores
    (`forget --verify` would find the audit row itself)."""
    return hashlib.sha256(b"microseg erasure audit\0" + key).digest()


def audit_hash(value: str, key: bytes) -> str:
    return pseudonym(value, audit_key(key))


def id_pattern(ids: Iterable[str]) -> str:
    """A regular expression that finds any of `ids` as a whole token of a text (JSON, CSV,
    a URL), the id in group 1: neither side may continue the id (a letter, digit or one of
    _.@+-), so forgetting "u1" does not touch "u10". Literal characters are escaped and
    there is no look-around, so Java's regex, RE2 (pyarrow) and Python's re read it alike."""
    alternatives = sorted(
        {re.sub(r"([^A-Za-z0-9\u0080-\U0010ffff])", r"\\\1", i) for i in ids if i},
        key=lambda text: (-len(text), text),
    )
    if not alternatives:
        raise ValueError("no identifiers to look for")
    return f"(?:^|[^A-Za-z0-9_.@+\\-])({'|'.join(alternatives)})(?:$|[^A-Za-z0-9_.@+\\-])"
