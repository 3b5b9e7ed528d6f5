"""Identity stitching and sessionization (silver/identity_map, silver/sessions).

User key: an event's own user_id; else the user its anonymous_id is stitched to; else
`anon:<anonymous_id>`. Stitching rule: an anonymous id seen together with exactly one user id
maps to it; seen with several (a shared device), it maps to the user id it was seen with
first (earliest event_time, then the smallest user id), and the anonymous id is counted as a
conflict. The mapping is applied retroactively: earlier anonymous-only events move to the user.

Sessions: per user key, events ordered by (event_time, event_id). A gap strictly longer than
the inactivity timeout starts a new visit; a gap exactly equal to it does not. A visit longer
than the maximum session length is cut into consecutive sessions of that length, measured
from the visit's first event. session_id = first 32 hex digits of
sha256(user_key || 0x1f || first event_id).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import reduce
from operator import and_

from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from microseg.core import lake, progress
from microseg.core.config import Config
from microseg.core.failpoints import durable
from microseg.core.runs import new_run_id
from microseg.silver import rollups
from microseg.silver.consent import consent_history
from microseg.silver.keys import ANON_PREFIX, user_key_of

JOB = "sessionize"
BROADCAST_IDENTITIES = 2_000_000  # identity maps up to this many rows are broadcast


# --------------------------------------------------------------------------------------
# identity stitching


def identity_map(events_df: DataFrame) -> DataFrame:
    """One row per anonymous id seen with a user id: anonymous_id, user_key, user_ids_seen,
    is_conflict, first_seen, last_seen (of the anonymous id with any user id)."""
    pairs_df = (
        events_df.filter(F.col("anonymous_id").isNotNull() & F.col("user_id").isNotNull())
        .groupBy("anonymous_id", "user_id")
        .agg(F.min("event_time").alias("pair_first"), F.max("event_time").alias("pair_last"))
    )
    return pairs_df.groupBy("anonymous_id").agg(
        F.min_by("user_id", F.struct("pair_first", "user_id")).alias("user_key"),
        F.count(F.lit(1)).alias("user_ids_seen"),
        F.array_sort(F.collect_list("user_id")).alias("user_ids"),
        (F.count(F.lit(1)) > 1).alias("is_conflict"),
        F.min("pair_first").alias("first_seen"),
        F.max("pair_last").alias("last_seen"),
    )


def merge_identities(previous_df: DataFrame, batch_df: DataFrame) -> DataFrame:
    """The identity map of two sets of events (overlapping or not) from the map of each:
    the earliest link wins in both, so the winner of the union is the earlier of the two
    winners; the user ids seen are the union of both. Same columns as identity_map."""
    p, b = previous_df.alias("p"), batch_df.alias("b")
    link = F.least(  # least skips a null struct (the side without the id)
        *[
            F.when(
                F.col(f"{side}.user_key").isNotNull(),
                F.struct(
                    F.col(f"{side}.first_seen").alias("t"), F.col(f"{side}.user_key").alias("k")
                ),
            )
            for side in ("p", "b")
        ]
    )
    user_ids = F.array_sort(
        F.array_union(
            F.coalesce(F.col("p.user_ids"), F.array().cast("array<string>")),
            F.coalesce(F.col("b.user_ids"), F.array().cast("array<string>")),
        )
    )
    return (
        p.join(b, on="anonymous_id", how="full")
        .select(
            "anonymous_id",
            link["k"].alias("user_key"),
            user_ids.alias("user_ids"),
            F.least("p.first_seen", "b.first_seen").alias("first_seen"),
            F.greatest("p.last_seen", "b.last_seen").alias("last_seen"),
        )
        .select(
            "anonymous_id",
            "user_key",
            F.size("user_ids").cast("long").alias("user_ids_seen"),
            "user_ids",
            (F.size("user_ids") > 1).alias("is_conflict"),
            "first_seen",
            "last_seen",
        )
    )


def with_user_key(
    events_df: DataFrame, identity_df: DataFrame, *, broadcast: bool = False
) -> DataFrame:
    """events_df plus `user_key` (see the module docstring); events with no id get none.

    `broadcast` ships the identity map to every task instead of shuffling the events: right
    when the map is small (up to a few million ids).
    """
    mapping_df = identity_df.select(
        F.col("anonymous_id").alias("_map_anonymous_id"), F.col("user_key").alias("_mapped_key")
    )
    joined_df = events_df.join(
        F.broadcast(mapping_df) if broadcast else mapping_df,
        (events_df.user_id.isNull()) & (events_df.anonymous_id == mapping_df._map_anonymous_id),
        how="left",
    )
    return joined_df.select(
        *events_df.columns,
        user_key_of(F.col("user_id"), F.col("anonymous_id"), F.col("_mapped_key")).alias(
            "user_key"
        ),
    )


# --------------------------------------------------------------------------------------
# sessionization


def session_id_of(user_key: Column, first_event_id: Column) -> Column:
    return F.substring(F.sha2(F.concat_ws("\u001f", user_key, first_event_id), 256), 1, 32)


def _first(value: Column, order: Column) -> Column:
    """Value of the earliest event (by `order`) among those where value is not null."""
    return F.min_by(value, F.when(value.isNotNull(), order))


def _last(value: Column, order: Column) -> Column:
    return F.max_by(value, F.when(value.isNotNull(), order))


def _count_type(*types: str) -> Column:
    return F.count(F.when(F.col("event_type").isin(*types), F.lit(1))).cast("int")


def label_sessions(
    keyed_events_df: DataFrame, *, inactivity_timeout: timedelta, max_session_length: timedelta
) -> DataFrame:
    """Events carrying `user_key`, each labelled with its session: `_visit` (the n-th visit,
    i.e. inactivity-gap session, of the user), `visit_start` and `_piece` (the cut of a visit
    longer than the maximum session length). (user_key, _visit, _piece) identifies a session.
    """
    timeout_s = inactivity_timeout.total_seconds()
    max_len_s = max_session_length.total_seconds()
    by_user = Window.partitionBy("user_key").orderBy("event_time", "event_id")
    seconds = F.unix_micros("event_time") / 1e6
    prev_seconds = F.lag(seconds).over(by_user)
    flagged_df = keyed_events_df.filter(F.col("user_key").isNotNull()).withColumn(
        "_new_visit",
        F.when(prev_seconds.isNull() | (seconds - prev_seconds > timeout_s), 1).otherwise(0),
    )
    # Same partitioning and order as the flags, so Spark sorts the events once.
    running = by_user.rowsBetween(Window.unboundedPreceding, 0)
    return flagged_df.select(
        "*",
        F.sum("_new_visit").over(running).alias("_visit"),
        F.last(F.when(F.col("_new_visit") == 1, F.col("event_time")), ignorenulls=True)
        .over(running)
        .alias("visit_start"),
    ).withColumn(
        "_piece",
        F.floor((seconds - F.unix_micros("visit_start") / 1e6) / max_len_s).cast("int"),
    )


def sessionize(
    keyed_events_df: DataFrame, *, inactivity_timeout: timedelta, max_session_length: timedelta
) -> DataFrame:
    """Sessions of events carrying `user_key`, one row per session (see SESSION columns).

    Events must be unique by event_id (bronze/events is). Times are UTC.
    """
    piece_df = label_sessions(
        keyed_events_df,
        inactivity_timeout=inactivity_timeout,
        max_session_length=max_session_length,
    )
    order = F.struct("event_time", "event_id")
    revenue = F.when(
        F.col("event_type") == "purchase", F.col("price") * F.coalesce(F.col("quantity"), F.lit(1))
    )
    items = F.when(F.col("event_type") == "purchase", F.coalesce(F.col("quantity"), F.lit(1)))
    sessions_df = piece_df.groupBy("user_key", "_visit", "_piece").agg(
        F.min_by("event_id", order).alias("first_event_id"),
        F.min("event_time").alias("session_start"),
        F.max("event_time").alias("session_end"),
        F.first("visit_start").alias("visit_start"),
        F.count(F.lit(1)).cast("int").alias("events"),
        _count_type("page_view").alias("page_views"),
        _count_type("product_view").alias("product_views"),
        _count_type("search").alias("searches"),
        _count_type("add_to_cart").alias("cart_adds"),
        _count_type("remove_from_cart").alias("cart_removes"),
        _count_type("add_to_wishlist").alias("wishlist_adds"),
        _count_type("checkout_started").alias("checkouts"),
        _count_type("purchase").alias("purchase_events"),
        # size(collect_set) rather than count_distinct: no Expand, no extra shuffle
        F.size(F.collect_set("product_id")).alias("distinct_products"),
        F.size(F.collect_set("category")).alias("distinct_categories"),
        _first(F.col("page_url"), order).alias("landing_page"),
        _last(F.col("page_url"), order).alias("exit_page"),
        _first(F.col("product_id"), order).alias("landing_product"),
        _last(F.col("product_id"), order).alias("exit_product"),
        F.coalesce(F.sum(revenue), F.lit(0.0)).alias("revenue"),
        F.coalesce(F.sum(items), F.lit(0)).cast("int").alias("items"),
        _first(F.col("device"), order).alias("device"),
        _first(F.col("country"), order).alias("country"),
        F.min_by("utm_source", order).alias("utm_source"),
        F.min_by("utm_medium", order).alias("utm_medium"),
        F.min_by("utm_campaign", order).alias("utm_campaign"),
        F.array_sort(
            F.collect_set(
                F.when(
                    F.col("user_id").isNull()
                    & (F.col("user_key") != F.concat(F.lit(ANON_PREFIX), F.col("anonymous_id"))),
                    F.col("anonymous_id"),
                )
            )
        ).alias("anonymous_ids"),
    )
    return sessions_df.select(
        session_id_of(F.col("user_key"), F.col("first_event_id")).alias("session_id"),
        "user_key",
        "session_start",
        "session_end",
        ((F.unix_micros("session_end") - F.unix_micros("session_start")) / 1e6).alias(
            "duration_seconds"
        ),
        "events",
        "page_views",
        "product_views",
        "searches",
        "cart_adds",
        "cart_removes",
        "wishlist_adds",
        "checkouts",
        "purchase_events",
        "distinct_products",
        "distinct_categories",
        "landing_page",
        "exit_page",
        "landing_product",
        "exit_product",
        (F.col("cart_adds") > 0).alias("has_cart_add"),
        (F.col("checkouts") > 0).alias("has_checkout"),
        (F.col("purchase_events") > 0).alias("has_purchase"),
        ((F.col("cart_adds") > 0) & (F.col("purchase_events") == 0)).alias("is_cart_abandoned"),
        "revenue",
        "items",
        "device",
        "country",
        "utm_source",
        "utm_medium",
        "utm_campaign",
        (F.col("events") == 1).alias("is_bounce"),
        F.col("_piece").alias("visit_part"),
        "visit_start",
        "first_event_id",
        F.to_date("session_start").alias("session_date"),
        "anonymous_ids",
    )


# --------------------------------------------------------------------------------------
# the incremental job


@dataclass
class SessionizeReport:
    run_id: str
    mode: str  # "full", "incremental" or "nothing new"
    new_events: int = 0
    users_touched: int = 0
    sessions_written: int = 0
    sessions_removed: int = 0
    split_visits: int = 0
    identity_conflicts: int = 0
    identities_changed: int = 0
    watermark: datetime | None = None


_BEGINNING = datetime(1900, 1, 1)


def affected_ranges(
    touched_df: DataFrame, existing_df: DataFrame, *, inactivity_timeout: timedelta
) -> DataFrame:
    """Per touched user key (user_key, t_min), the time `recompute_from` from which its
    sessions must be rebuilt: the start of the visit of its earliest existing session that
    ends at or after t_min - timeout (such a session can merge with an event at t_min), else
    t_min. Sessions that start earlier are separated from every new event by more than the
    timeout and stay as they are."""
    reach = F.col("t_min") - F.expr(f"INTERVAL {int(inactivity_timeout.total_seconds())} SECONDS")
    candidates_df = touched_df.join(
        existing_df.select("user_key", "visit_start", "session_end"), on="user_key", how="left"
    )
    return candidates_df.groupBy("user_key").agg(
        F.least(
            F.min("t_min"), F.min(F.when(F.col("session_end") >= reach, F.col("visit_start")))
        ).alias("recompute_from")
    )


def run_sessionize(
    spark: SparkSession, cfg: Config, *, full: bool = False, run_id: str | None = None
) -> SessionizeReport:
    """Bring silver/identity_map, silver/sessions and silver/user_days up to date with
    bronze/events.

    Reads the events ingested since the last run (ingested_at after the stored watermark minus
    `sessions.lookback`), merges their identity links into the map, moves the sessions of
    newly linked anonymous ids to their user, rebuilds the sessions of the user keys the new
    events touch (or whose visits now merge) from the point they can reach (see
    affected_ranges), reading bronze only from the earliest such point, and applies it all
    with one MERGE bounded to the dates it can touch. The first run, or `full`, rebuilds
    everything.
    """
    root = cfg.lake.root
    conf = cfg.sessions
    report = SessionizeReport(run_id=run_id or new_run_id(), mode="incremental")
    if not lake.table_exists(spark, root, lake.EVENTS):
        raise FileNotFoundError(f"no bronze/events table under {root}: run `microseg ingest` first")
    events_df = lake.read_table(spark, root, lake.EVENTS)
    watermark = None if full else lake.read_watermark(spark, root, JOB)
    if not _silver_complete(spark, root):
        watermark = None
    # ingested_at has file statistics: an incremental run reads only the newer files
    since = None if watermark is None else watermark - conf.lookback
    new_df = events_df if since is None else events_df.filter(F.col("ingested_at") > F.lit(since))
    latest = new_df.agg(F.max("ingested_at")).first()[0]
    if latest is None or (watermark is not None and latest <= watermark):
        report.mode = "nothing new"
        report.watermark = watermark
        return report
    report.watermark = latest

    progress.step("stitching identities")
    previous_df = None
    if watermark is None:
        identity_df = identity_map(events_df).persist()
    else:
        previous_df = lake.read_table(spark, root, lake.IDENTITY_MAP)  # with updated_at
        identity_df = merge_identities(previous_df, identity_map(new_df)).persist()
    identities, report.identity_conflicts = identity_df.agg(
        F.count(F.lit(1)), F.count(F.when(F.col("is_conflict"), 1))
    ).first()
    small_map = identities <= BROADCAST_IDENTITIES
    try:
        if watermark is None:
            report.mode = "full"
            progress.step("building every session")
            sessions_df = sessionize(
                with_user_key(events_df, identity_df, broadcast=small_map),
                inactivity_timeout=conf.inactivity_timeout,
                max_session_length=conf.max_session_length,
            )
            lake.overwrite(spark, root, lake.SESSIONS, sessions_df)
            # the run's counts from the (small) table just written, not a second computation
            totals = (
                lake.read_table(spark, root, lake.SESSIONS)
                .agg(
                    F.count(F.lit(1)),
                    F.count(F.when(F.col("visit_part") == 1, 1)),
                    F.count_distinct("user_key"),
                    F.sum("events"),
                )
                .first()
            )
            report.sessions_written, report.split_visits = totals[0], totals[1]
            report.users_touched, report.new_events = totals[2], totals[3] or 0
        else:
            _incremental(
                spark,
                cfg,
                events_df,
                new_df,
                identity_df,
                previous_df,
                watermark,
                report,
                small_map,
            )
        progress.step("rolling up events per user and day")
        rollups.refresh_user_days(spark, root, events_df, None if watermark is None else new_df)
        progress.step("writing silver/consent")
        lake.overwrite(
            spark,
            root,
            lake.CONSENT,
            consent_history(with_user_key(events_df, identity_df, broadcast=small_map)),
        )
        progress.step("writing silver/identity_map")
        _write_identities(spark, root, identity_df, previous_df)
        lake.write_watermark(spark, root, JOB, latest, report.run_id)
    finally:
        identity_df.unpersist()
    return report


def _write_identities(
    spark: SparkSession, root: str, identity_df: DataFrame, previous_df: DataFrame | None
) -> None:
    """Replace silver/identity_map with identity_df; a row keeps its updated_at (from
    previous_df, the stored map) unless it changed (identities are few next to events: one
    small overwrite)."""
    stamped_df = identity_df.withColumn("updated_at", F.current_timestamp())
    if previous_df is not None:
        columns = [c for c in identity_df.columns if c != "anonymous_id"]
        same = reduce(and_, [F.col(f"n.{c}").eqNullSafe(F.col(f"o.{c}")) for c in columns])
        stamped_df = (
            stamped_df.alias("n")
            .join(previous_df.alias("o"), on="anonymous_id", how="left")
            .select(
                "anonymous_id",
                *[F.col(f"n.{c}").alias(c) for c in columns],
                F.when(same, F.col("o.updated_at"))
                .otherwise(F.col("n.updated_at"))
                .alias("updated_at"),
            )
        )
    lake.overwrite(spark, root, lake.IDENTITY_MAP, stamped_df.localCheckpoint(eager=True))


def _silver_complete(spark: SparkSession, root: str) -> bool:
    """Whether silver has every table in the layout this release maintains incrementally
    (a lake written by an older release is rebuilt once)."""
    return all(
        (found := lake.layout(spark, root, table)) is not None
        and found == (tuple(table.schema.names), table.partition_by)
        for table in (lake.SESSIONS, lake.USER_DAYS, lake.IDENTITY_MAP)
    )


def _incremental(
    spark, cfg, events_df, new_df, identity_df, previous_df, watermark, report, small_map
) -> None:
    root, conf = cfg.lake.root, cfg.sessions
    progress.step("rebuilding the sessions of the users with new events")
    timeout = conf.inactivity_timeout
    touched_df = (
        with_user_key(new_df, identity_df, broadcast=small_map)
        .filter(F.col("user_key").isNotNull())
        .groupBy("user_key")
        .agg(F.min("event_time").alias("t_min"))
    )
    existing_df = lake.read_table(spark, root, lake.SESSIONS)
    changed_df = (
        identity_df.select("anonymous_id", F.col("user_key").alias("new_key"))
        .join(
            previous_df.select("anonymous_id", F.col("user_key").alias("old_key")),
            on="anonymous_id",
            how="left",
        )
        .filter(~F.col("new_key").eqNullSafe(F.col("old_key")))
        .persist()
    )
    # Sessions as they stand under the new identity map ("virtual"): the sessions of an
    # anonymous id linked for the first time move to its user as they are (re-keyed, no event
    # read), unless a visit of theirs comes within the timeout of another visit of that user,
    # which rebuilds the user from there. An id that moves from one user to another (an earlier
    # link arrived late) rebuilds both users from its first session.
    relinked_df = changed_df.filter(F.col("old_key").isNull()).select(
        F.concat(F.lit(ANON_PREFIX), F.col("anonymous_id")).alias("user_key"),
        F.col("new_key"),
        F.array("anonymous_id").alias("_ids"),
    )
    try:
        report.identities_changed = changed_df.count()
        moved = changed_df.filter(F.col("old_key").isNotNull())
        if report.identities_changed and not moved.limit(1).isEmpty():
            touched_df = touched_df.unionByName(_moved(moved, existing_df))
        rekeyed_df = (
            existing_df.join(F.broadcast(relinked_df), on="user_key")
            .withColumn("_old_id", F.col("session_id"))
            .withColumn("_origin", F.col("user_key"))
            .withColumn("user_key", F.col("new_key"))
            .withColumn("session_id", session_id_of(F.col("user_key"), F.col("first_event_id")))
            .withColumn("anonymous_ids", F.col("_ids"))
            .drop("new_key", "_ids")
            .localCheckpoint(eager=True)
        )
    finally:
        changed_df.unpersist()
    virtual_df = (
        existing_df.join(relinked_df.select("user_key"), on="user_key", how="left_anti")
        .withColumn("_old_id", F.col("session_id"))
        .withColumn("_origin", F.col("user_key"))
        .unionByName(rekeyed_df)
    )
    touched_df = touched_df.unionByName(_visit_clashes(virtual_df, rekeyed_df, timeout))
    ranges_df = affected_ranges(
        touched_df.groupBy("user_key").agg(F.min("t_min").alias("t_min")),
        virtual_df,
        inactivity_timeout=timeout,
    ).persist()
    try:
        report.users_touched, earliest = ranges_df.agg(
            F.count(F.lit(1)), F.min("recompute_from")
        ).first()
        report.new_events = events_df.filter(F.col("ingested_at") > F.lit(watermark)).count()
        moved_since = rekeyed_df.agg(F.min("session_date")).first()[0]
        if earliest is None and moved_since is None:
            return
        rebuilt_df = None
        stale_df = None
        if earliest is not None:
            # nothing before `earliest` is rebuilt: bronze is read (a literal date bound,
            # so Delta prunes partitions) from its date on only
            keyed_df = with_user_key(
                events_df.filter(
                    (F.col("event_date") >= F.lit(earliest.date()))
                    & (F.col("event_time") >= F.lit(earliest))
                ),
                identity_df,
                broadcast=small_map,
            ).join(
                F.broadcast(ranges_df) if report.users_touched < 100_000 else ranges_df,
                on="user_key",
                how="inner",
            )
            rebuilt_df = sessionize(
                keyed_df.filter(F.col("event_time") >= F.col("recompute_from")),
                inactivity_timeout=timeout,
                max_session_length=conf.max_session_length,
            )
            stale_df = (
                virtual_df.join(ranges_df, on="user_key", how="inner")
                .filter(F.col("visit_start") >= F.col("recompute_from"))
                .select(F.col("_old_id").alias("session_id"))
            )
        changes_df = _session_changes(rebuilt_df, stale_df, rekeyed_df, ranges_df).persist()
        counts = changes_df.agg(
            F.count(F.when(~F.col("_remove"), 1)),
            F.count(F.when(F.col("_remove"), 1)),
            F.count(F.when(F.col("visit_part") == 1, 1)),
        ).first()
        report.sessions_written, report.sessions_removed, report.split_visits = counts
        bound = min(d for d in (earliest and earliest.date(), moved_since) if d is not None)
        target = lake.ensure_table(spark, root, lake.SESSIONS)
        (
            target.alias("t")
            .merge(
                changes_df.alias("s"),
                f"t.session_id = s.session_id AND t.session_date >= DATE'{bound}'",
            )
            .whenMatchedDelete(condition="s._remove")
            .whenMatchedUpdate(set={c: f"s.`{c}`" for c in lake.SESSIONS.schema.names})
            .whenNotMatchedInsert(
                condition="NOT s._remove",
                values={c: f"s.`{c}`" for c in lake.SESSIONS.schema.names},
            )
            .execute()
        )
        durable(lake.SESSIONS.name)
        changes_df.unpersist()
    finally:
        ranges_df.unpersist()


def _session_changes(rebuilt_df, stale_df, rekeyed_df, ranges_df) -> DataFrame:
    """The rows of one MERGE into silver/sessions: the rebuilt sessions and the re-keyed ones
    not rebuilt (upserts), and the session ids that no longer exist (`_remove`): every old id
    of a re-keyed session, and the stale ids of rebuilt ranges that the rebuild did not
    produce again."""
    kept_df = rekeyed_df.join(ranges_df, on="user_key", how="left").filter(
        F.col("recompute_from").isNull() | (F.col("visit_start") < F.col("recompute_from"))
    )
    upserts_df = lake.conform(kept_df, lake.SESSIONS)
    removed_df = rekeyed_df.select(F.col("_old_id").alias("session_id"))
    if rebuilt_df is not None:
        upserts_df = upserts_df.unionByName(lake.conform(rebuilt_df, lake.SESSIONS))
        removed_df = removed_df.unionByName(stale_df)
    removed_df = removed_df.distinct().join(
        upserts_df.select("session_id"), on="session_id", how="left_anti"
    )
    return upserts_df.withColumn("_remove", F.lit(False)).unionByName(
        removed_df.withColumn("_remove", F.lit(True)), allowMissingColumns=True
    )


def _visit_clashes(virtual_df: DataFrame, rekeyed_df: DataFrame, timeout: timedelta) -> DataFrame:
    """user_key, t_min for each user that received re-keyed sessions and now has two visits
    (of different origins) within the timeout of each other: they merge, so the user is
    rebuilt from the later one's start (affected_ranges reaches back to the earlier)."""
    keys_df = rekeyed_df.select("user_key").distinct()
    visits_df = (
        virtual_df.join(keys_df, on="user_key", how="left_semi")
        .groupBy("user_key", "_origin", "visit_start")
        .agg(F.max("session_end").alias("visit_end"))
    )
    before = (
        Window.partitionBy("user_key")
        .orderBy("visit_start")
        .rowsBetween(Window.unboundedPreceding, -1)
    )
    reach = F.max("visit_end").over(before) + F.expr(
        f"INTERVAL {int(timeout.total_seconds())} SECONDS"
    )
    return (
        visits_df.withColumn("_reach", reach)
        .filter(F.col("visit_start") <= F.col("_reach"))
        .select("user_key", F.col("visit_start").alias("t_min"))
    )


def _moved(moved_df: DataFrame, existing_df: DataFrame) -> DataFrame:
    """user_key, t_min for the anonymous ids of moved_df (anonymous_id, old_key, new_key: a
    link that changed from one user to another): both users, from the start of the earliest
    existing session that lists the id among its anonymous_ids."""
    first_df = (
        existing_df.select(F.explode("anonymous_ids").alias("anonymous_id"), "session_start")
        .join(moved_df.select("anonymous_id"), on="anonymous_id", how="left_semi")
        .groupBy("anonymous_id")
        .agg(F.min("session_start").alias("t_min"))
    )
    return moved_df.join(first_df, on="anonymous_id").select(
        F.explode(F.array("old_key", "new_key")).alias("user_key"), "t_min"
    )
