"""silver/user_days: additive rollups of bronze/events per raw key and UTC day.

A raw key is what an event carries before stitching: its user_id, else `anon:<anonymous_id>`.
Stitching depends on the time features are computed for (an anonymous id belongs to a user
only from the first event that links them), so the rollups stay per raw key and features
resolve them through the identity map as known at that time. Every column adds up over days
and raw keys (counts, minimums, maximums, per-category and per-hour counts), so a feature
window is a sum over rows instead of a pass over the events.

sessionize maintains the table: a full run rebuilds it, an incremental run rebuilds the
(raw key, day) rows that received events since its watermark and merges them in.
"""

from __future__ import annotations

from datetime import date

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from microseg.core import lake
from microseg.core.failpoints import durable
from microseg.silver.keys import raw_key


def _summed_by(entries: Column, field: str, key_type: str) -> Column:
    """From an array of (hour, category, n) structs: a map of `field`'s values (not null) to
    the sum of n."""
    values = F.array_sort(
        F.array_distinct(
            F.transform(F.filter(entries, lambda e: e[field].isNotNull()), lambda e: e[field])
        )
    )
    sums = F.transform(
        values,
        lambda v: F.aggregate(
            F.filter(entries, lambda e: e[field] == v),
            F.lit(0).cast("long"),
            lambda acc, e: acc + e["n"],
        ),
    )
    return F.map_from_arrays(values.cast(f"array<{key_type}>"), sums)


def user_days(events_df: DataFrame) -> DataFrame:
    """One silver/user_days row per (raw key, event_date) of events_df (bronze columns).

    Two aggregations: per (raw key, day, hour, category), then per (raw key, day) with the
    per-hour and per-category counts summed from the first one's rows."""
    day = ["raw_key", "anonymous_id", "event_date"]
    cells_df = (
        events_df.filter(F.col("user_id").isNotNull() | F.col("anonymous_id").isNotNull())
        .groupBy(
            raw_key().alias("raw_key"),
            F.when(F.col("user_id").isNull(), F.col("anonymous_id")).alias("anonymous_id"),
            F.to_date("event_time").alias("event_date"),
            F.hour("event_time").alias("hour"),
            "category",
        )
        .agg(
            F.count(F.lit(1)).alias("n"),
            F.min("event_time").alias("first_event"),
            F.max("event_time").alias("last_event"),
            F.max(F.when(F.col("event_type") == "purchase", F.col("event_time"))).alias(
                "last_purchase"
            ),
        )
    )
    days_df = cells_df.groupBy(*day).agg(
        F.sum("n").alias("events"),
        F.min("first_event").alias("first_event"),
        F.max("last_event").alias("last_event"),
        F.max("last_purchase").alias("last_purchase"),
        F.collect_list(F.struct("hour", "category", "n")).alias("_cells"),
    )
    return days_df.select(
        *day,
        "events",
        "first_event",
        "last_event",
        "last_purchase",
        _summed_by(F.col("_cells"), "category", "string").alias("category_events"),
        _summed_by(F.col("_cells"), "hour", "int").alias("hour_events"),
    )


def refresh_user_days(
    spark: SparkSession, root: str, events_df: DataFrame, new_df: DataFrame | None
) -> None:
    """Bring silver/user_days up to date with bronze `events_df`: rebuild everything when
    `new_df` is None, else the (raw key, day) rows that `new_df` (events ingested since the
    last run) touches, merged in with one commit."""
    if new_df is None or not lake.table_exists(spark, root, lake.USER_DAYS):
        lake.overwrite(spark, root, lake.USER_DAYS, user_days(events_df))
        return
    touched_df = (
        new_df.filter(F.col("user_id").isNotNull() | F.col("anonymous_id").isNotNull())
        .select(raw_key().alias("raw_key"), "event_date")
        .distinct()
        .persist()
    )
    try:
        dates: list[date] = [r[0] for r in touched_df.select("event_date").distinct().collect()]
        if not dates:
            return
        # bronze is partitioned by event_date: only the touched days' files are read
        rebuilt_df = user_days(
            events_df.filter(F.col("event_date").isin(dates))
            .withColumn("raw_key", raw_key())
            .join(F.broadcast(touched_df), on=["raw_key", "event_date"], how="left_semi")
            .drop("raw_key")
        )
        target = lake.ensure_table(spark, root, lake.USER_DAYS)
        columns = {c: f"s.`{c}`" for c in lake.USER_DAYS.schema.names}
        (
            target.alias("t")
            .merge(
                lake.conform(rebuilt_df, lake.USER_DAYS).alias("s"),
                "t.raw_key = s.raw_key AND t.event_date = s.event_date",
            )
            .whenMatchedUpdate(set=columns)
            .whenNotMatchedInsert(values=columns)
            .execute()
        )
        durable(lake.USER_DAYS.name)
    finally:
        touched_df.unpersist()
