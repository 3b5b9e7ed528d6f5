"""Deterministic variant assignment that agrees with GrowthBook's SDKs.

The same arguments give the same results as the SDK's `hash`, `getBucketRanges`,
`chooseVariation` and `inNamespace`:

- `fnv1a32(text)`: 32-bit FNV-1a over the UTF-16 code units of `text` (as JavaScript's
  `charCodeAt` sees them, so a character outside the Basic Multilingual Plane counts as two);
- `gb_hash(seed, value, 1)`: `(fnv1a32(value + seed) % 1000) / 1000`;
- `gb_hash(seed, value, 2)`: `(fnv1a32(str(fnv1a32(seed + value))) % 10000) / 10000`;
- `bucket_ranges(n, coverage, weights)`: consecutive ranges `[start, start + coverage * w)`,
  with coverage clamped to [0, 1] and equal weights where `weights` is missing, of the wrong
  length, or does not add up to 1 (within 0.01);
- `choose_variation(n, ranges)`: the first range with `start <= n < end`, else -1;
- `in_namespace(value, (id, start, end))`: `start <= gb_hash("__" + id, value, 1) < end`.

Each has a Spark Column twin (`*_col`) built from Spark SQL functions only (no Python UDF):
a string's UTF-16 code units are the 4-digit groups of `hex(encode(s, 'UTF-16BE'))`, and the
hash folds them
with `aggregate` in 64-bit integers (the running value stays below 2^32, the FNV prime below
2^25, so a product never overflows).
"""

from __future__ import annotations

from collections.abc import Sequence

from pyspark.sql import Column
from pyspark.sql import functions as F

FNV_OFFSET = 0x811C9DC5
FNV_PRIME = 0x01000193
_MOD = 2**32


def utf16_units(text: str) -> list[int]:
    data = text.encode("utf-16-be", "surrogatepass")
    return [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]


def fnv1a32(text: str) -> int:
    value = FNV_OFFSET
    for unit in utf16_units(text):
        value = ((value ^ unit) * FNV_PRIME) % _MOD
    return value


def gb_hash(seed: str, value: str, version: int) -> float | None:
    """GrowthBook's `hash(seed, value, version)`: a number in [0, 1); None for an unknown
    version."""
    if version == 2:
        return (fnv1a32(str(fnv1a32(seed + value))) % 10000) / 10000
    if version == 1:
        return (fnv1a32(value + seed) % 1000) / 1000
    return None


def equal_weights(n: int) -> list[float]:
    return [1 / n] * n if n > 0 else []


def bucket_ranges(
    n: int, coverage: float = 1.0, weights: Sequence[float] | None = None
) -> list[tuple[float, float]]:
    """GrowthBook's `getBucketRanges(numVariations, coverage, weights)`."""
    coverage = min(max(coverage, 0.0), 1.0)
    equal = equal_weights(n)
    chosen = list(weights) if weights is not None and len(weights) == n else equal
    total = 0.0
    for w in chosen:
        total += w
    if total < 0.99 or total > 1.01:
        chosen = equal
    ranges = []
    cumulative = 0.0
    for w in chosen:
        start = cumulative
        cumulative += w
        ranges.append((start, start + coverage * w))
    return ranges


def choose_variation(n: float, ranges: Sequence[tuple[float, float]]) -> int:
    for index, (start, end) in enumerate(ranges):
        if start <= n < end:
            return index
    return -1


def in_namespace(value: str, namespace: tuple[str, float, float]) -> bool:
    n = gb_hash("__" + namespace[0], value, 1)
    return n is not None and namespace[1] <= n < namespace[2]


# --------------------------------------------------------------------------------------
# the same in Spark Columns


def fnv1a32_col(text: Column) -> Column:
    """fnv1a32 of a string column (bigint); null stays null. `text` appears once in the
    expression, so nesting (hash version 2) grows it linearly."""
    units = F.transform(
        F.regexp_extract_all(F.hex(F.encode(text, "UTF-16BE")), F.lit("(.{4})"), 1),
        lambda unit: F.conv(unit, 16, 10).cast("bigint"),
    )
    return F.aggregate(
        units,
        F.lit(FNV_OFFSET).cast("bigint"),
        lambda acc, unit: (acc.bitwiseXOR(unit) * F.lit(FNV_PRIME)) % F.lit(_MOD),
    )


def gb_hash_col(seed: str, value: Column, version: int) -> Column:
    """gb_hash(seed, value, version) of a string column (double)."""
    if version == 2:
        inner = fnv1a32_col(F.concat(F.lit(seed), value)).cast("string")
        return (fnv1a32_col(inner) % 10000) / F.lit(10000.0)
    if version == 1:
        return (fnv1a32_col(F.concat(value, F.lit(seed))) % 1000) / F.lit(1000.0)
    raise ValueError(f"unknown hash version {version} (GrowthBook has 1 and 2)")


def choose_variation_col(n: Column, ranges: Sequence[tuple[float, float]]) -> Column:
    """choose_variation of a bucket column (int, -1 where no range holds it)."""
    chosen = F.lit(-1)
    for index in reversed(range(len(ranges))):
        start, end = ranges[index]
        chosen = F.when((n >= F.lit(start)) & (n < F.lit(end)), F.lit(index)).otherwise(chosen)
    return chosen


def in_namespace_col(value: Column, namespace: tuple[str, float, float]) -> Column:
    n = gb_hash_col("__" + namespace[0], value, 1)
    return (n >= F.lit(namespace[1])) & (n < F.lit(namespace[2]))
