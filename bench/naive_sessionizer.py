"""The naive PySpark sessionizer that bench/sessionize_bench.py measures microseg against.

This is what is commonly written by hand: stitch identities with a Spark join, then
`groupBy("user_key").applyInPandas(...)` with a plain Python loop over each user's events
(sorted in pandas), and write the sessions to Delta. Same semantics and the same output
columns as microseg.silver.sessions (see its module docstring); kept independent of its code so the
benchmark's agreement check compares two implementations, not one.
"""

from __future__ import annotations

import hashlib
import math
from datetime import timedelta

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

ANON_PREFIX = "anon:"

# Output columns and Spark types (those of silver/sessions, in its order).
SESSION_COLUMNS = [
    ("session_id", "string"),
    ("user_key", "string"),
    ("session_start", "timestamp"),
    ("session_end", "timestamp"),
    ("duration_seconds", "double"),
    ("events", "int"),
    ("page_views", "int"),
    ("product_views", "int"),
    ("searches", "int"),
    ("cart_adds", "int"),
    ("cart_removes", "int"),
    ("wishlist_adds", "int"),
    ("checkouts", "int"),
    ("purchase_events", "int"),
    ("distinct_products", "int"),
    ("distinct_categories", "int"),
    ("landing_page", "string"),
    ("exit_page", "string"),
    ("landing_product", "string"),
    ("exit_product", "string"),
    ("has_cart_add", "boolean"),
    ("has_checkout", "boolean"),
    ("has_purchase", "boolean"),
    ("is_cart_abandoned", "boolean"),
    ("revenue", "double"),
    ("items", "int"),
    ("device", "string"),
    ("country", "string"),
    ("utm_source", "string"),
    ("utm_medium", "string"),
    ("utm_campaign", "string"),
    ("is_bounce", "boolean"),
    ("visit_part", "int"),
    ("visit_start", "timestamp"),
    ("first_event_id", "string"),
    ("session_date", "date"),
]
SESSION_SCHEMA = ", ".join(f"{name} {dtype}" for name, dtype in SESSION_COLUMNS)

INPUT_COLUMNS = [
    "user_key",
    "event_id",
    "event_time",
    "event_type",
    "product_id",
    "category",
    "price",
    "quantity",
    "page_url",
    "device",
    "country",
    "utm_source",
    "utm_medium",
    "utm_campaign",
]

COUNTED_TYPES = {
    "page_view": "page_views",
    "product_view": "product_views",
    "search": "searches",
    "add_to_cart": "cart_adds",
    "remove_from_cart": "cart_removes",
    "add_to_wishlist": "wishlist_adds",
    "checkout_started": "checkouts",
    "purchase": "purchase_events",
}


# --------------------------------------------------------------------------------------
# identity stitching in Spark


def with_user_key(events_df: DataFrame) -> DataFrame:
    """Events with `user_key`: user_id, else the user id their anonymous id was first seen
    with (earliest event_time, then the smallest user id), else anon:<anonymous_id>."""
    pairs_df = (
        events_df.filter(F.col("anonymous_id").isNotNull() & F.col("user_id").isNotNull())
        .groupBy("anonymous_id", "user_id")
        .agg(F.min("event_time").alias("pair_first"))
    )
    first = Window.partitionBy("anonymous_id").orderBy("pair_first", "user_id")
    mapping_df = (
        pairs_df.withColumn("_rank", F.row_number().over(first))
        .filter(F.col("_rank") == 1)
        .select(F.col("anonymous_id").alias("_anon"), F.col("user_id").alias("_stitched"))
    )
    joined_df = events_df.join(
        mapping_df,
        events_df.user_id.isNull() & (events_df.anonymous_id == mapping_df._anon),
        "left",
    )
    return joined_df.withColumn(
        "user_key",
        F.coalesce("user_id", "_stitched", F.concat(F.lit(ANON_PREFIX), "anonymous_id")),
    ).drop("_anon", "_stitched")


def naive_sessions(
    events_df: DataFrame, *, inactivity_timeout: timedelta, max_session_length: timedelta
) -> DataFrame:
    """Sessions of bronze events: Spark join for the user key, then a pandas UDF per user."""
    timeout_s = inactivity_timeout.total_seconds()
    max_len_s = max_session_length.total_seconds()

    def per_user(pdf: pd.DataFrame) -> pd.DataFrame:
        return sessionize_user(pdf, timeout_s=timeout_s, max_len_s=max_len_s)

    keyed_df = with_user_key(events_df).filter(F.col("user_key").isNotNull())
    return (
        keyed_df.select(*INPUT_COLUMNS).groupBy("user_key").applyInPandas(per_user, SESSION_SCHEMA)
    )


# --------------------------------------------------------------------------------------
# the per-user Python loop


def _none(value):
    """pandas gives NaN / None / NaT for missing values; make them None."""
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


class _Session:
    __slots__ = (
        "first_event_id",
        "first_us",
        "last_us",
        "visit_start_us",
        "piece",
        "events",
        "counts",
        "products",
        "categories",
        "landing_page",
        "exit_page",
        "landing_product",
        "exit_product",
        "revenue",
        "has_revenue",
        "items",
        "device",
        "country",
        "utm",
    )

    def __init__(self, event_id, t_us, visit_start_us, piece, utm):
        self.first_event_id = event_id
        self.first_us = t_us
        self.last_us = t_us
        self.visit_start_us = visit_start_us
        self.piece = piece
        self.events = 0
        self.counts = dict.fromkeys(COUNTED_TYPES.values(), 0)
        self.products = set()
        self.categories = set()
        self.landing_page = self.exit_page = None
        self.landing_product = self.exit_product = None
        self.revenue = 0.0
        self.items = 0
        self.device = self.country = None
        self.utm = utm


def sessionize_user(pdf: pd.DataFrame, *, timeout_s: float, max_len_s: float) -> pd.DataFrame:
    """All sessions of one user key's events (a pandas frame of INPUT_COLUMNS)."""
    pdf = pdf.sort_values(["event_time", "event_id"], kind="mergesort")
    user_key = pdf["user_key"].iloc[0]
    times_us = pdf["event_time"].to_numpy().astype("datetime64[us]").astype(np.int64).tolist()
    columns = [pdf[c].tolist() for c in INPUT_COLUMNS if c not in ("user_key", "event_time")]
    rows = zip(times_us, *columns, strict=True)

    sessions: list[_Session] = []
    current: _Session | None = None
    prev_s = None
    visit_start_us = 0
    for t_us, event_id, etype, product, category, price, qty, page, device, country, *utm in rows:
        t_s = t_us / 1e6  # seconds as a double, like microseg (same rounding at the boundary)
        if prev_s is None or t_s - prev_s > timeout_s:
            visit_start_us = t_us
            current = None
        prev_s = t_s
        piece = math.floor((t_s - visit_start_us / 1e6) / max_len_s)
        if current is None or piece != current.piece:
            current = _Session(event_id, t_us, visit_start_us, piece, [_none(u) for u in utm])
            sessions.append(current)
        s = current
        s.events += 1
        s.last_us = t_us
        counted = COUNTED_TYPES.get(etype)
        if counted is not None:
            s.counts[counted] += 1
        product, category, page = _none(product), _none(category), _none(page)
        if product is not None:
            s.products.add(product)
            if s.landing_product is None:
                s.landing_product = product
            s.exit_product = product
        if category is not None:
            s.categories.add(category)
        if page is not None:
            if s.landing_page is None:
                s.landing_page = page
            s.exit_page = page
        if s.device is None:
            s.device = _none(device)
        if s.country is None:
            s.country = _none(country)
        if etype == "purchase":
            qty = _none(qty)
            units = 1 if qty is None else int(qty)
            s.items += units
            price = _none(price)
            if price is not None:
                s.revenue += price * units

    out = []
    for s in sessions:
        key = f"{user_key}\x1f{s.first_event_id}".encode()
        c = s.counts
        out.append(
            {
                "session_id": hashlib.sha256(key).hexdigest()[:32],
                "user_key": user_key,
                "session_start": s.first_us,
                "session_end": s.last_us,
                "duration_seconds": (s.last_us - s.first_us) / 1e6,
                "events": s.events,
                **c,
                "distinct_products": len(s.products),
                "distinct_categories": len(s.categories),
                "landing_page": s.landing_page,
                "exit_page": s.exit_page,
                "landing_product": s.landing_product,
                "exit_product": s.exit_product,
                "has_cart_add": c["cart_adds"] > 0,
                "has_checkout": c["checkouts"] > 0,
                "has_purchase": c["purchase_events"] > 0,
                "is_cart_abandoned": c["cart_adds"] > 0 and c["purchase_events"] == 0,
                "revenue": s.revenue,
                "items": s.items,
                "device": s.device,
                "country": s.country,
                "utm_source": s.utm[0],
                "utm_medium": s.utm[1],
                "utm_campaign": s.utm[2],
                "is_bounce": s.events == 1,
                "visit_part": s.piece,
                "visit_start": s.visit_start_us,
                "first_event_id": s.first_event_id,
            }
        )
    names = [name for name, _ in SESSION_COLUMNS]
    result = pd.DataFrame(out, columns=names[:-1])  # all but session_date
    for name in ("session_start", "session_end", "visit_start"):
        result[name] = pd.to_datetime(result[name], unit="us")
    result["session_date"] = result["session_start"].dt.date
    return result[names]
