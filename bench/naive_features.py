"""The naive PySpark user features that bench/sessionize_bench.py (stage "features") measures
`microseg features` against.

This is what is commonly written by hand. Spark keeps the events strictly before the as-of
time T and stitches identities with a join (bench/naive_sessionizer.py). Then
`groupBy("user_key").applyInPandas(...)` hands each user's events to plain pandas and Python,
which rebuild the user's sessions with the naive sessionizer's loop and compute a handful of
microseg's features from those sessions and events. Spark writes the result to Delta.

Same definitions as lib/microseg/features.py (windows are [T - n days, T); session windows
go by session_start), written independently of its code.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from naive_sessionizer import INPUT_COLUMNS, _none, sessionize_user, with_user_key

DAY_US = 86_400_000_000

# The features computed here, with their Spark types (microseg's names and types).
FEATURE_COLUMNS = [
    ("days_since_last_event", "double"),
    ("orders_lifetime", "int"),
    ("revenue_lifetime", "double"),
    ("sessions_30d", "int"),
    ("bounce_rate_30d", "double"),
    ("cart_adds_90d", "int"),
    ("cart_abandoned_sessions_7d", "int"),
    ("distinct_categories", "int"),
    ("max_views_one_product_unbought_7d", "int"),
    ("top_category", "string"),
]
OUTPUT_SCHEMA = "user_key string, " + ", ".join(f"{n} {t}" for n, t in FEATURE_COLUMNS)


def naive_features(
    events_df: DataFrame,
    *,
    as_of: datetime,
    inactivity_timeout: timedelta,
    max_session_length: timedelta,
) -> DataFrame:
    """One row per user key: user_key, as_of, then FEATURE_COLUMNS, from bronze events."""
    timeout_s = inactivity_timeout.total_seconds()
    max_len_s = max_session_length.total_seconds()
    as_of_us = round(as_of.timestamp() * 1e6)  # as_of is timezone-aware

    def per_user(pdf: pd.DataFrame) -> pd.DataFrame:
        return features_user(pdf, timeout_s=timeout_s, max_len_s=max_len_s, as_of_us=as_of_us)

    before_df = events_df.filter(F.col("event_time") < F.lit(as_of))
    keyed_df = with_user_key(before_df).filter(F.col("user_key").isNotNull())
    return (
        keyed_df.select(*INPUT_COLUMNS)
        .groupBy("user_key")
        .applyInPandas(per_user, OUTPUT_SCHEMA)
        .select("user_key", F.lit(as_of).alias("as_of"), *[n for n, _ in FEATURE_COLUMNS])
    )


def _micros(column: pd.Series) -> np.ndarray:
    return column.to_numpy().astype("datetime64[us]").astype(np.int64)


def features_user(
    pdf: pd.DataFrame, *, timeout_s: float, max_len_s: float, as_of_us: int
) -> pd.DataFrame:
    """The features of one user key's events (a pandas frame of INPUT_COLUMNS, all before T)."""
    user_key = pdf["user_key"].iloc[0]
    sessions = sessionize_user(pdf, timeout_s=timeout_s, max_len_s=max_len_s)

    # sessions, counted in a window when they start in it
    starts_us = _micros(sessions["session_start"])
    in_7d = starts_us >= as_of_us - 7 * DAY_US
    in_30d = starts_us >= as_of_us - 30 * DAY_US
    in_90d = starts_us >= as_of_us - 90 * DAY_US
    bounces = sessions["is_bounce"].to_numpy(dtype=bool)
    abandoned = sessions["is_cart_abandoned"].to_numpy(dtype=bool)
    sessions_30d = int(in_30d.sum())
    bounces_30d = int((in_30d & bounces).sum())

    # events
    times_us = _micros(pdf["event_time"])
    types = pdf["event_type"].tolist()
    products = [_none(p) for p in pdf["product_id"].tolist()]
    categories = [c for c in (_none(c) for c in pdf["category"].tolist()) if c is not None]
    category_counts = Counter(categories)
    top_category = (
        min(category_counts.items(), key=lambda kv: (-kv[1], kv[0]))[0] if category_counts else None
    )
    views: Counter = Counter()
    bought = set()
    week_start = as_of_us - 7 * DAY_US
    for t_us, etype, product in zip(times_us.tolist(), types, products, strict=True):
        if product is None or t_us < week_start:
            continue
        views[product] += 1 if etype == "product_view" else 0
        if etype == "purchase":
            bought.add(product)
    max_unbought = max((n for p, n in views.items() if p not in bought), default=0)

    row = {
        "user_key": user_key,
        "days_since_last_event": (as_of_us - int(times_us.max())) / 86_400e6,
        "orders_lifetime": int(sessions["has_purchase"].sum()),
        "revenue_lifetime": float(sum(sessions["revenue"].tolist())),
        "sessions_30d": sessions_30d,
        "bounce_rate_30d": bounces_30d / sessions_30d if sessions_30d else None,
        "cart_adds_90d": int(sessions["cart_adds"].to_numpy()[in_90d].sum()),
        "cart_abandoned_sessions_7d": int((in_7d & abandoned).sum()),
        "distinct_categories": len(category_counts),
        "max_views_one_product_unbought_7d": max_unbought,
        "top_category": top_category,
    }
    return pd.DataFrame([row], columns=["user_key", *[n for n, _ in FEATURE_COLUMNS]])
