"""Fault injection: which records become malformed, duplicate, late or invalid.

Faults are chosen after the clean simulation, each on distinct records, with exact counts
(shares of the clean events, rounded down) that go to the manifest.
"""

from __future__ import annotations

import math

import numpy as np

from microseg.core.config import GenerateConfig
from microseg.ingest.generate.world import seed_words

INVALID_KINDS = (
    "unknown_event_type",
    "unparseable_timestamp",
    "future_timestamp",
    "negative_price",
    "missing_user",
    "missing_event_type",
)
(
    INV_UNKNOWN_TYPE,
    INV_BAD_TS,
    INV_FUTURE_TS,
    INV_NEGATIVE_PRICE,
    INV_MISSING_USER,
    INV_MISSING_TYPE,
) = range(1, 7)
UNPARSEABLE_TS = "yesterday noon"
FUTURE_YEAR = 2099
NEGATIVE_PRICE_CENTS = -500


def check_shares(settings: GenerateConfig) -> None:
    shares = [settings.duplicate_share, settings.late_share, settings.invalid_share]
    if settings.format == "json":
        shares.append(settings.malformed_share)
    if sum(shares) > 1:
        raise ValueError(
            f"the fault shares add up to {sum(shares):g} of the clean events, but every fault "
            "needs a record of its own: keep their sum at most 1"
        )


def plan_faults(settings: GenerateConfig, events: dict, day: np.ndarray, days: int) -> dict:
    """Choose distinct records for every fault kind (exact counts).

    `day` is the UTC day of each (time-sorted) record counted from the first file day;
    `days` is the number of file days.
    """
    n = len(day)
    rng = np.random.default_rng([*seed_words(settings.seed), 2])
    want_malformed = math.floor(n * settings.malformed_share) if settings.format == "json" else 0
    want = {
        "late": math.floor(n * settings.late_share),
        "duplicate": math.floor(n * settings.duplicate_share),
        "malformed": want_malformed,
    }
    n_invalid = math.floor(n * settings.invalid_share)
    per_kind = [n_invalid // len(INVALID_KINDS)] * len(INVALID_KINDS)
    for k in range(n_invalid % len(INVALID_KINDS)):
        per_kind[k] += 1
    assert sum(want.values()) + n_invalid <= n  # guaranteed by check_shares
    any_fault = sum(want.values()) + n_invalid > 0
    perm = rng.permutation(n) if any_fault else np.zeros(0, dtype=np.int64)
    used = np.zeros(n, dtype=bool)

    def pick(count: int, eligible: np.ndarray | None = None) -> np.ndarray:
        if count == 0:
            return np.zeros(0, dtype=np.int64)
        ok = ~used[perm]
        if eligible is not None:
            ok &= eligible[perm]
        chosen = np.sort(perm[ok][:count])
        used[chosen] = True
        return chosen

    late = pick(want["late"], day <= days - 2)
    has_product = events["product"] >= 0
    inv = np.zeros(n, dtype=np.int8)
    negative = pick(per_kind[INV_NEGATIVE_PRICE - 1], has_product)
    inv[negative] = INV_NEGATIVE_PRICE
    duplicate = pick(want["duplicate"])
    malformed_ix = pick(want["malformed"])
    invalid_counts = {}
    for code, kind in enumerate(INVALID_KINDS, start=1):
        if code == INV_NEGATIVE_PRICE:
            invalid_counts[kind] = len(negative)
            continue
        chosen = pick(per_kind[code - 1])
        inv[chosen] = code
        invalid_counts[kind] = len(chosen)

    file_day = day.copy()
    lag = 1 + rng.integers(0, 3, len(late))
    file_day[late] = np.minimum(day[late] + lag, days - 1)
    dup_day = day[duplicate] + (rng.random(len(duplicate)) < 0.5)
    dup_day = np.minimum(dup_day, days - 1)
    malformed = np.zeros(n, dtype=bool)
    malformed[malformed_ix] = True
    return {
        "file_day": file_day,
        "duplicate": duplicate,
        "dup_day": dup_day,
        "inv": inv,
        "malformed": malformed,
        "requested": {**want, "invalid": n_invalid},
        "counts": {
            "malformed": len(malformed_ix),
            "duplicate": len(duplicate),
            "late": len(late),
            "invalid": invalid_counts,
            "invalid_total": sum(invalid_counts.values()),
        },
    }
