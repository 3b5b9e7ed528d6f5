"""Facts from events (batch): per user, the event counts and last-event times rules need.

Facts as of T use events strictly before T (the caller filters them with
features.user_features.keyed_events_before); a count `within` d covers [T - d, T).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from microseg.segments.model import PER, EventCount, Fact, LastTime, _digest


def _type_match(types: tuple[str, ...] | None) -> Column:
    return F.lit(True) if types is None else F.col("event_type").isin(list(types))


def _window_match(within: timedelta | None, as_of: datetime) -> Column:
    return F.lit(True) if within is None else F.col("event_time") >= F.lit(as_of - within)


def compute_facts(
    keyed_events_df: DataFrame,
    facts: list[Fact],
    *,
    as_of: datetime,
    inactivity_timeout: timedelta,
    max_session_length: timedelta,
) -> DataFrame | None:
    """Per user_key, one column per fact, from events strictly before as_of (already keyed
    and filtered by features.keyed_events_before). None when there are no facts."""
    if not facts:
        return None
    events_df = keyed_events_df.filter(F.col("user_key").isNotNull())
    simple = [f for f in facts if isinstance(f, LastTime) or (f.streamable and not f.since_last)]
    anchored = [f for f in facts if isinstance(f, EventCount) and f.since_last]
    grouped = [f for f in facts if isinstance(f, EventCount) and not f.streamable]
    parts: list[DataFrame] = []
    aggs = []
    for fact in simple:
        if isinstance(fact, LastTime):
            aggs.append(
                F.max(F.when(_type_match(fact.types), F.col("event_time"))).alias(fact.name)
            )
        else:
            inside = _type_match(fact.types) & _window_match(fact.within, as_of)
            aggs.append(F.count(F.when(inside, 1)).alias(fact.name))
    anchors = {f"_anchor_{_digest(repr(f.since_last))[:12]}": f.since_last for f in anchored}
    for name, types in anchors.items():
        aggs.append(F.max(F.when(_type_match(types), F.col("event_time"))).alias(name))
    if aggs:
        parts.append(events_df.groupBy("user_key").agg(*aggs))
    if anchored:
        anchor_df = parts[0].select("user_key", *anchors)
        joined_df = events_df.join(anchor_df, on="user_key")
        counts = []
        for fact in anchored:
            anchor = F.col(f"_anchor_{_digest(repr(fact.since_last))[:12]}")
            inside = (
                _type_match(fact.types)
                & _window_match(fact.within, as_of)
                & (F.col("event_time") > anchor)
            )
            # null when the user never had the anchor event: the condition is then false
            counts.append(
                F.when(F.max(anchor).isNotNull(), F.count(F.when(inside, 1))).alias(fact.name)
            )
        parts.append(joined_df.groupBy("user_key").agg(*counts))
    if grouped:
        parts.append(
            _grouped_counts(events_df, grouped, as_of, inactivity_timeout, max_session_length)
        )
    result = parts[0].drop(*anchors)
    for part in parts[1:]:
        result = result.join(part, on="user_key", how="full")
    return result


def _grouped_counts(
    events_df: DataFrame,
    facts: list[EventCount],
    as_of: datetime,
    inactivity_timeout: timedelta,
    max_session_length: timedelta,
) -> DataFrame:
    """Largest count of one product / category / session per user, per fact."""
    from microseg.silver.sessions import label_sessions

    if any(f.in_one_session for f in facts):
        events_df = label_sessions(
            events_df, inactivity_timeout=inactivity_timeout, max_session_length=max_session_length
        )
    out = None
    for fact in facts:
        keys = ["user_key"]
        if fact.in_one_session:
            keys += ["_visit", "_piece"]
        selected = events_df.filter(_type_match(fact.types) & _window_match(fact.within, as_of))
        if fact.per is not None:
            keys.append(PER[fact.per])
            selected = selected.filter(F.col(PER[fact.per]).isNotNull())
        part = (
            selected.groupBy(*keys).count().groupBy("user_key").agg(F.max("count").alias(fact.name))
        )
        out = part if out is None else out.join(part, on="user_key", how="full")
    assert out is not None
    return out


def with_facts(features_df: DataFrame, facts_df: DataFrame | None, facts: list[Fact]) -> DataFrame:
    """Features joined with the facts; users without events in a count get 0."""
    if facts_df is None:
        return features_df
    joined = features_df.join(facts_df, on="user_key", how="left")
    for fact in facts:
        if isinstance(fact, EventCount) and not fact.since_last:
            joined = joined.withColumn(fact.name, F.coalesce(F.col(fact.name), F.lit(0)))
    return joined


def facts_at_points(
    keyed_events_df: DataFrame, facts: list[Fact], points_df: DataFrame, *, key: str, at: str
) -> DataFrame:
    """Facts at a point per row: points_df (one row per `key`, with user_key and the point's
    time in column `at`) with one column per fact from the user's events strictly before it, as
    compute_facts gives them at an as-of (a count without events is 0; a since_last count is
    null without the anchor event). Streamable facts only (no per-product/session counts).
    Triggers check their conditions with it at each firing's own time."""
    if not facts:
        return points_df
    events_df = keyed_events_df.select(F.col("user_key").alias("_user"), "event_type", "event_time")
    point_micros = F.unix_micros(at)

    def inside(types, within: timedelta | None) -> Column:
        out = _type_match(types)
        if within is not None:
            start = point_micros - int(within.total_seconds() * 1_000_000)
            out = out & (F.unix_micros("event_time") >= start)
        return out

    joined_df = points_df.join(
        events_df,
        (F.col("user_key") == F.col("_user")) & (F.col("event_time") < F.col(at)),
        "left",
    )
    anchors = {
        f"_anchor_{_digest(repr(f.since_last))[:12]}": f.since_last
        for f in facts
        if isinstance(f, EventCount) and f.since_last
    }
    point = Window.partitionBy(key)  # the grouping below reuses this partitioning
    for name, types in anchors.items():
        last = F.max(F.when(_type_match(types), F.col("event_time"))).over(point)
        joined_df = joined_df.withColumn(name, last)
    aggs = []
    for fact in facts:
        if isinstance(fact, LastTime):
            aggs.append(
                F.max(F.when(_type_match(fact.types), F.col("event_time"))).alias(fact.name)
            )
        elif fact.since_last:
            anchor = F.col(f"_anchor_{_digest(repr(fact.since_last))[:12]}")
            counted = F.count(
                F.when(inside(fact.types, fact.within) & (F.col("event_time") > anchor), 1)
            )
            aggs.append(F.when(F.max(anchor).isNotNull(), counted).alias(fact.name))
        else:
            aggs.append(F.count(F.when(inside(fact.types, fact.within), 1)).alias(fact.name))
    return joined_df.groupBy(*points_df.columns).agg(*aggs)
