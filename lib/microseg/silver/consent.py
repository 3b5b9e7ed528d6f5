"""Consent as history: per user and purpose, since when it was granted or denied.

Events carry the visitor's consent (`consent_analytics`, `consent_marketing`: true, false or
unknown). `consent_history` turns them into intervals per user key (stitched as sessions are)
and purpose, one per change; `consent_at` gives each user's state as of a time, from the
last consent signal strictly before it (what the as-of's features may see too). Users with no
signal get the configured default (privacy.consent).
"""

from __future__ import annotations

from datetime import datetime
from functools import reduce

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

PURPOSES = {"analytics": "consent_analytics", "marketing": "consent_marketing"}


def consent_history(keyed_df: DataFrame) -> DataFrame:
    """keyed events (with user_key) -> silver/consent rows: user_key, purpose, granted,
    valid_from, valid_to (the next change; null while current), is_current, event_id (the
    event that set it). An event repeating the current state changes nothing; two signals at
    the same time are ordered by event_id."""
    signals_df = reduce(
        DataFrame.unionByName,
        [
            keyed_df.filter(F.col(column).isNotNull() & F.col("user_key").isNotNull()).select(
                "user_key",
                F.lit(purpose).alias("purpose"),
                F.col(column).alias("granted"),
                "event_time",
                "event_id",
            )
            for purpose, column in PURPOSES.items()
        ],
    )
    order = Window.partitionBy("user_key", "purpose").orderBy("event_time", "event_id")
    changes_df = signals_df.withColumn("_previous", F.lag("granted").over(order)).filter(
        F.col("_previous").isNull() | (F.col("_previous") != F.col("granted"))
    )
    valid_to = F.lead("event_time").over(order)
    return changes_df.select(
        "user_key",
        "purpose",
        "granted",
        F.col("event_time").alias("valid_from"),
        valid_to.alias("valid_to"),
        valid_to.isNull().alias("is_current"),
        "event_id",
    )


def consent_at(history_df: DataFrame, purpose: str, as_of: datetime) -> DataFrame:
    """user_key, granted: each user's `purpose` consent from their last signal strictly
    before as_of (naive UTC); users without one are absent."""
    if purpose not in PURPOSES:
        raise ValueError(f"unknown consent purpose {purpose!r} (one of {', '.join(PURPOSES)})")
    at = F.lit(as_of)
    return history_df.filter(
        (F.col("purpose") == purpose)
        & (F.col("valid_from") < at)
        & (F.col("valid_to").isNull() | (F.col("valid_to") >= at))
    ).select("user_key", "granted")


def consented(
    users_df: DataFrame, history_df: DataFrame | None, purpose: str, as_of: datetime, default: bool
) -> DataFrame:
    """users_df (with user_key) restricted to the users whose `purpose` consent holds at
    as_of; `default`: whether a user with no signal counts as consenting."""
    if history_df is None:
        return users_df if default else users_df.limit(0)
    state_df = consent_at(history_df, purpose, as_of).withColumnRenamed("granted", "_granted")
    joined_df = users_df.join(state_df, on="user_key", how="left")
    return joined_df.filter(F.coalesce(F.col("_granted"), F.lit(default))).drop("_granted")


def consent_at_points(
    points_df: DataFrame, history_df: DataFrame | None, purpose: str, default: bool
) -> DataFrame:
    """points_df (user_key, as_of: one row per user and point in time) with `consent_ok`:
    whether the user's `purpose` consent holds at the row's as_of, from their last signal at
    or before it; `default` for users without one. A stream's point is an event's time and
    counts that event, so a signal on it counts too (a batch as-of counts events strictly
    before it: consent_at)."""
    if history_df is None:
        return points_df.withColumn("consent_ok", F.lit(default))
    state_df = history_df.filter(F.col("purpose") == purpose).select(
        F.col("user_key").alias("_user"), "granted", "valid_from", "valid_to"
    )
    keys = points_df.columns
    joined_df = points_df.join(
        state_df,
        (F.col("user_key") == F.col("_user"))
        & (F.col("valid_from") <= F.col("as_of"))
        & (F.col("valid_to").isNull() | (F.col("valid_to") > F.col("as_of"))),
        "left",
    )
    return joined_df.select(*keys, F.coalesce(F.col("granted"), F.lit(default)).alias("consent_ok"))


def read_history(spark, root: str) -> DataFrame | None:
    """silver/consent, or None before the first sessionize."""
    from microseg.core import lake

    if not lake.table_exists(spark, root, lake.CONSENT):
        return None
    return lake.read_table(spark, root, lake.CONSENT)
