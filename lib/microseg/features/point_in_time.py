"""Features as of T from accumulated silver state, equal row for row to the from-scratch
definition (user_features.compute_features over every event before T).

What makes a feature right as of T, and where it comes from here:
- **Identity as known at T.** An anonymous id belongs to a user from the first event that
  links them (silver/identity_map.first_seen): before that, its events are its own
  (`anon:<id>`). The map from the events before T is the stored map restricted to
  first_seen < T, because both take the earliest link.
- **Sessions before T.** silver/sessions is sessionized with today's identities. A session
  holds as of T when it ends before T and every anonymous id stitched into it was linked
  before T: sessionization only looks back, so later events cannot change it. For a user
  key with a session that does not hold (one running across T, or holding an anonymous id
  linked later), the sessions from the start of that session's visit on are rebuilt from
  bronze: the events from that time to T, keyed as of T (a late-linked anonymous id gets
  its own sessions). Earlier visits stay as stored.
- **Event counts, first and last times, the modes** (top category, preferred hour and
  weekday): sums of silver/user_days over the days before T's date, plus the events of T's
  own date before T from bronze (none when T is midnight), per raw key resolved as of T.
- **Unbought product views in the last 7 days**: from the bronze events of those 7 days.

So bronze is read only for the open edge: sessions that straddle T or a later link, T's
partial day and the last 7 days, each limited to its dates (bronze is partitioned by date).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from microseg.core import lake
from microseg.features.user_features import (
    Feature,
    assemble,
    mode_of,
    unbought_views_7d,
)
from microseg.silver.keys import user_key_of
from microseg.silver.rollups import user_days
from microseg.silver.sessions import sessionize


def identity_at(identity_df: DataFrame, as_of: datetime) -> DataFrame:
    """(anonymous_id, user_key) for the anonymous ids linked before as_of."""
    return identity_df.filter(F.col("first_seen") < F.lit(as_of)).select("anonymous_id", "user_key")


def _with_keys(events_df: DataFrame, identity_df: DataFrame, as_of: datetime) -> DataFrame:
    """Bronze events plus `_key_now` (stitched with today's identity map) and `user_key` (as of
    as_of); events without any id are left out."""
    mapping_df = identity_df.select(
        F.col("anonymous_id").alias("_anon"),
        F.col("user_key").alias("_mapped"),
        F.col("first_seen").alias("_linked"),
    )
    joined_df = events_df.filter(
        F.col("user_id").isNotNull() | F.col("anonymous_id").isNotNull()
    ).join(
        mapping_df,
        F.col("user_id").isNull() & (F.col("anonymous_id") == F.col("_anon")),
        how="left",
    )
    mapped_at = F.when(F.col("_linked") < F.lit(as_of), F.col("_mapped"))
    return joined_df.select(
        *events_df.columns,
        user_key_of(F.col("user_id"), F.col("anonymous_id"), F.col("_mapped")).alias("_key_now"),
        user_key_of(F.col("user_id"), F.col("anonymous_id"), mapped_at).alias("user_key"),
    )


def _dates(start: datetime, end: datetime) -> F.Column:
    """Bronze partitions that hold events in [start, end)."""
    return F.col("event_date").between(F.lit(start.date()), F.lit(end.date()))


def sessions_at(
    spark: SparkSession,
    root: str,
    events_df: DataFrame,
    identity_df: DataFrame,
    *,
    as_of: datetime,
    inactivity_timeout: timedelta,
    max_session_length: timedelta,
) -> DataFrame:
    """The sessions of the events before as_of, keyed as of as_of (see the module docstring)."""
    before_df = lake.read_table(spark, root, lake.SESSIONS).filter(
        F.col("session_start") < F.lit(as_of)
    )
    late_df = (
        before_df.select("session_id", F.explode("anonymous_ids").alias("anonymous_id"))
        .join(identity_df.select("anonymous_id", "first_seen"), on="anonymous_id", how="left")
        .filter(F.col("first_seen").isNull() | (F.col("first_seen") >= F.lit(as_of)))
        .select("session_id")
        .distinct()
    )
    open_df = (
        before_df.join(late_df.withColumn("_late", F.lit(True)), on="session_id", how="left")
        .filter(F.col("_late").isNotNull() | (F.col("session_end") >= F.lit(as_of)))
        .groupBy("user_key")
        .agg(F.min("visit_start").alias("_rebuild_from"))
    )
    earliest = open_df.agg(F.min("_rebuild_from")).first()[0]
    kept_df = (
        before_df.join(F.broadcast(open_df), on="user_key", how="left")
        .filter(F.col("_rebuild_from").isNull() | (F.col("visit_start") < F.col("_rebuild_from")))
        .drop("_rebuild_from")
    )
    if earliest is None:
        return kept_df
    edge_df = (
        _with_keys(
            events_df.filter(_dates(earliest, as_of) & (F.col("event_time") < F.lit(as_of))),
            identity_df,
            as_of,
        )
        .join(
            F.broadcast(open_df.withColumnRenamed("user_key", "_key_now")),
            on="_key_now",
            how="inner",
        )
        .filter(F.col("event_time") >= F.col("_rebuild_from"))
        .drop("_key_now", "_rebuild_from")
    )
    rebuilt_df = sessionize(
        edge_df, inactivity_timeout=inactivity_timeout, max_session_length=max_session_length
    )
    return kept_df.unionByName(rebuilt_df)


def _event_level(days_df: DataFrame) -> DataFrame:
    """Per user key, from its user_days rows: the event aggregates and modes that
    user_features' from-scratch path computes from events."""
    totals_df = days_df.groupBy("user_key").agg(
        F.min("first_event").alias("_first_event"),
        F.max("last_event").alias("_last_event"),
        F.max("last_purchase").alias("_last_purchase"),
        F.size(F.array_distinct(F.flatten(F.collect_list(F.map_keys("category_events")))))
        .cast("int")
        .alias("_distinct_categories"),
    )

    def counts(value_map: str) -> DataFrame:
        return (
            days_df.select("user_key", F.explode(value_map).alias("_value", "n"))
            .groupBy("user_key", "_value")
            .agg(F.sum("n").alias("count"))
        )

    weekdays_df = days_df.groupBy("user_key", F.dayofweek("event_date").alias("_value")).agg(
        F.sum("events").alias("count")
    )
    return (
        totals_df.join(mode_of(counts("category_events"), "_top_category"), "user_key", "left")
        .join(mode_of(counts("hour_events"), "_preferred_hour"), "user_key", "left")
        .join(mode_of(weekdays_df, "_preferred_weekday"), "user_key", "left")
    )


def _days_at(
    spark: SparkSession, root: str, events_df: DataFrame, identity_df: DataFrame, as_of: datetime
) -> DataFrame:
    """silver/user_days of the days before as_of's date, plus as_of's own date up to as_of
    from bronze, keyed as of as_of."""
    midnight = datetime.combine(as_of.date(), datetime.min.time())
    days_df = lake.read_table(spark, root, lake.USER_DAYS).filter(
        F.col("event_date") < F.lit(as_of.date())
    )
    if as_of > midnight:
        partial_df = user_days(
            events_df.filter(
                (F.col("event_date") == F.lit(as_of.date())) & (F.col("event_time") < F.lit(as_of))
            )
        )
        days_df = days_df.unionByName(lake.conform(partial_df, lake.USER_DAYS))
    mapping_df = identity_at(identity_df, as_of).withColumnRenamed("user_key", "_mapped")
    return days_df.join(mapping_df, on="anonymous_id", how="left").withColumn(
        "user_key", F.coalesce(F.col("_mapped"), F.col("raw_key"))
    )


def features_as_of(
    spark: SparkSession,
    root: str,
    *,
    as_of: datetime,
    features: list[Feature],
    inactivity_timeout: timedelta,
    max_session_length: timedelta,
) -> DataFrame:
    """One row per user key with an event before as_of: user_key, as_of, then the features in
    order. silver must be up to date with bronze (run_sessionize)."""
    events_df = lake.read_table(spark, root, lake.EVENTS)
    identity_df = lake.read_table(spark, root, lake.IDENTITY_MAP).select(
        "anonymous_id", "user_key", "first_seen"
    )
    days_df = _days_at(spark, root, events_df, identity_df, as_of)
    sessions_df = sessions_at(
        spark,
        root,
        events_df,
        identity_df,
        as_of=as_of,
        inactivity_timeout=inactivity_timeout,
        max_session_length=max_session_length,
    )
    week_start = as_of - timedelta(days=7)
    recent_df = _with_keys(
        events_df.filter(
            _dates(week_start, as_of)
            & (F.col("event_time") >= F.lit(week_start))
            & (F.col("event_time") < F.lit(as_of))
        ),
        identity_df,
        as_of,
    )
    return assemble(
        _event_level(days_df),
        sessions_df,
        unbought_views_7d(recent_df, as_of),
        as_of=as_of,
        features=features,
    )
