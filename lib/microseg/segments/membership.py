"""Versioned segment membership: the writer every segment source uses, and the queries.

gold/segment_membership holds one row per user, segment and validity interval
[valid_from, valid_to): a run as of T for one source (rule, cluster, propensity) compares the
members it computed with the members valid at T and, in one MERGE, closes the intervals of
users who left (valid_to = T) and opens intervals for users who entered (valid_from = T).
Users who stay are left alone; when a segment's definition version changes, the members who
stay get a new interval under the new version (and no change row). Before that MERGE, the
enters and exits go to gold/segment_changes with insert-only MERGE, so a run that fails
between the two commits is completed by running it again, and re-running an as-of that
already ran finds nothing to change.

Runs of one source move forward in time: a run as of a time earlier than the latest one
already written is refused if it would change anything (re-running an as-of that already ran
is a no-op).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from microseg.core import lake

REASONS = (
    "rule_matched",
    "parent_fallback",
    "no_longer_matched",
    "definition_changed",
    "below_minimum_size",
    "segment_retired",
    "outranked_in_exclusive_group",
)


@dataclass(frozen=True)
class SegmentStats:
    segment_id: str
    size: int
    previous_size: int | None
    entered: int
    exited: int

    @property
    def stability(self) -> float | None:
        if not self.previous_size:
            return None
        return (self.previous_size - self.exited) / self.previous_size


def valid_at(at: datetime) -> F.Column:
    """Membership rows valid at `at`: valid_from <= at < valid_to (or still open)."""
    return (F.col("valid_from") <= F.lit(at)) & (
        F.col("valid_to").isNull() | (F.col("valid_to") > F.lit(at))
    )


def write_membership(
    spark: SparkSession,
    root: str,
    *,
    source: str,
    as_of: datetime,
    run_id: str,
    members_df: DataFrame,
    versions: dict[str, str],
    exit_reasons: dict[str, str] | None = None,
    held_df: DataFrame | None = None,
) -> dict[str, SegmentStats]:
    """Record the members of every segment of `source` as of `as_of`.

    members_df: user_key, segment_id, score (double, may be null), fallback (boolean: entered
    because a child segment was not published). versions: segment_id -> definition version
    for every segment the source publishes now; current members of any other segment of the
    source exit with reason segment_retired. The reason of an exit is, in this order: the
    reason in held_df (user_key, segment_id, reason: users who still qualify but are held
    back, e.g. below_minimum_size), exit_reasons[segment_id], definition_changed when the
    segment's version changed, no_longer_matched.
    """
    exit_reasons = dict(exit_reasons or {})
    membership = lake.ensure_table(spark, root, lake.SEGMENT_MEMBERSHIP)
    history_df = lake.read_table(spark, root, lake.SEGMENT_MEMBERSHIP).filter(
        F.col("source") == source
    )
    latest = history_df.agg(
        F.greatest(F.max("valid_from"), F.max("valid_to")).alias("latest")
    ).first()["latest"]
    state_df = history_df.filter(valid_at(as_of)).persist()
    version_df = spark.createDataFrame(
        list(versions.items()) or [("", "")], "segment_id string, definition_version string"
    ).filter(F.col("segment_id") != "")
    desired_df = members_df.join(F.broadcast(version_df), on="segment_id").persist()

    previous_versions = {
        (r.segment_id, r.definition_version)
        for r in state_df.select("segment_id", "definition_version").distinct().collect()
    }
    changed = {
        sid for sid, version in previous_versions if sid in versions and versions[sid] != version
    }
    retired = {sid for sid, _ in previous_versions if sid not in versions}
    for sid in changed:
        exit_reasons.setdefault(sid, "definition_changed")
    for sid in retired:
        exit_reasons.setdefault(sid, "segment_retired")

    user_segment = ["user_key", "segment_id"]
    interval = ["user_key", "segment_id", "definition_version"]
    entered_df = desired_df.join(state_df.select(*user_segment), on=user_segment, how="left_anti")
    exited_df = state_df.join(desired_df.select(*user_segment), on=user_segment, how="left_anti")
    enter_reason = (
        F.when(F.col("segment_id").isin(sorted(changed) or [""]), "definition_changed")
        .when(F.col("fallback"), "parent_fallback")
        .otherwise("rule_matched" if source == "rule" else f"{source}_assigned")
    )
    exit_reason = F.lit("no_longer_matched")
    for sid, reason in sorted(exit_reasons.items()):
        exit_reason = F.when(F.col("segment_id") == sid, reason).otherwise(exit_reason)
    if held_df is not None:
        exited_df = exited_df.join(
            held_df.select(*user_segment, F.col("reason").alias("_held")),
            on=user_segment,
            how="left",
        )
        exit_reason = F.coalesce(F.col("_held"), exit_reason)
    common = {
        "source": F.lit(source),
        "changed_at": F.lit(as_of),
        "run_id": F.lit(run_id),
        "recorded_at": F.current_timestamp(),
    }
    changes_df = entered_df.select(
        *user_segment,
        F.lit("enter").alias("change"),
        enter_reason.alias("reason"),
        "definition_version",
        *[v.alias(k) for k, v in common.items()],
    ).unionByName(
        exited_df.select(
            *user_segment,
            F.lit("exit").alias("change"),
            exit_reason.alias("reason"),
            "definition_version",
            *[v.alias(k) for k, v in common.items()],
        )
    )
    changes_df = changes_df.persist()
    opens_df = desired_df.join(state_df.select(*interval), on=interval, how="left_anti").select(
        *interval, "score", F.lit("open").alias("_action")
    )
    closes_df = state_df.join(desired_df.select(*interval), on=interval, how="left_anti").select(
        *interval, F.lit(None).cast("double").alias("score"), F.lit("close").alias("_action")
    )
    actions_df = opens_df.unionByName(closes_df).persist()
    has_changes = changes_df.limit(1).count() > 0
    has_actions = actions_df.limit(1).count() > 0
    if latest is not None and latest > as_of and (has_changes or has_actions):
        for df in (actions_df, changes_df, desired_df, state_df):
            df.unpersist()
        raise ValueError(
            f"segment membership for source '{source}' already runs to {latest.isoformat()}; "
            f"a run as of {as_of.isoformat()} would rewrite that history: runs must move "
            "forward in time (re-running an earlier as-of is allowed only if nothing differs)"
        )
    if has_changes:
        lake.insert_new(
            spark,
            root,
            lake.SEGMENT_CHANGES,
            changes_df,
            ("user_key", "segment_id", "source", "changed_at", "change"),
        )
    else:
        lake.ensure_table(spark, root, lake.SEGMENT_CHANGES)

    if has_actions:
        (
            membership.alias("t")
            .merge(
                actions_df.alias("s"),
                "s._action = 'close' AND t.is_current AND t.source = '"
                + source
                + "' AND t.user_key = s.user_key AND t.segment_id = s.segment_id "
                "AND t.definition_version = s.definition_version",
            )
            .whenMatchedUpdate(
                set={
                    "valid_to": F.lit(as_of),
                    "is_current": F.lit(False),
                    "closed_by_run_id": F.lit(run_id),
                }
            )
            .whenNotMatchedInsert(
                condition="s._action = 'open'",
                values={
                    "user_key": "s.user_key",
                    "segment_id": "s.segment_id",
                    "source": F.lit(source),
                    "definition_version": "s.definition_version",
                    "score": "s.score",
                    "valid_from": F.lit(as_of),
                    "valid_to": F.lit(None).cast("timestamp"),
                    "is_current": F.lit(True),
                    "run_id": F.lit(run_id),
                    "closed_by_run_id": F.lit(None).cast("string"),
                },
            )
            .execute()
        )
    for df in (actions_df, changes_df, desired_df, state_df):
        df.unpersist()
    return segment_stats(spark, root, source=source, as_of=as_of)


def segment_stats(spark: SparkSession, root: str, *, source: str, as_of: datetime) -> dict:
    """Per segment of the source: size at as_of, size just before, entered and exited at it.

    Read back from the tables, so a re-run of the same as-of reports the same numbers."""
    history_df = lake.read_table(spark, root, lake.SEGMENT_MEMBERSHIP).filter(
        F.col("source") == source
    )
    before = (F.col("valid_from") < F.lit(as_of)) & (
        F.col("valid_to").isNull() | (F.col("valid_to") >= F.lit(as_of))
    )
    sizes = (
        history_df.groupBy("segment_id")
        .agg(
            F.count_distinct(F.when(valid_at(as_of), F.col("user_key"))).alias("size"),
            F.count_distinct(F.when(before, F.col("user_key"))).alias("previous"),
            F.max(F.when(F.col("valid_from") < F.lit(as_of), 1)).alias("had_history"),
        )
        .collect()
    )
    changes = (
        lake.read_table(spark, root, lake.SEGMENT_CHANGES)
        .filter((F.col("source") == source) & (F.col("changed_at") == F.lit(as_of)))
        .groupBy("segment_id", "change")
        .count()
        .collect()
    )
    counts = {(r.segment_id, r.change): r["count"] for r in changes}
    return {
        r.segment_id: SegmentStats(
            segment_id=r.segment_id,
            size=r["size"],
            previous_size=r["previous"] if r["had_history"] else None,
            entered=counts.get((r.segment_id, "enter"), 0),
            exited=counts.get((r.segment_id, "exit"), 0),
        )
        for r in sizes
    }


def overlap(spark: SparkSession, root: str, *, as_of: datetime) -> dict[str, dict[str, float]]:
    """Jaccard index between every two segments (any source) with members at as_of."""
    members_df = (
        lake.read_table(spark, root, lake.SEGMENT_MEMBERSHIP)
        .filter(valid_at(as_of))
        .select("user_key", "segment_id")
        .distinct()
        .persist()
    )
    sizes = {r.segment_id: r["count"] for r in members_df.groupBy("segment_id").count().collect()}
    pairs = (
        members_df.alias("a")
        .join(members_df.alias("b"), on="user_key")
        .filter(F.col("a.segment_id") < F.col("b.segment_id"))
        .groupBy(F.col("a.segment_id").alias("a"), F.col("b.segment_id").alias("b"))
        .count()
        .collect()
    )
    members_df.unpersist()
    both = {(r.a, r.b): r["count"] for r in pairs}
    result: dict[str, dict[str, float]] = {s: {} for s in sizes}
    for a in sizes:
        for b in sizes:
            if a == b:
                continue
            inter = both.get((min(a, b), max(a, b)), 0)
            result[a][b] = round(inter / (sizes[a] + sizes[b] - inter), 6)
    return result


_CATALOG_COMPARED = ("definition_version", "matched", "size", "status", "entered", "exited")


def write_catalog(
    spark: SparkSession, root: str, rows: list[dict], *, update_unchanged: bool = False
) -> None:
    """Upsert gold/segment_catalog rows (dicts with every column) keyed on (as_of, source,
    segment_id). A row whose definition version, sizes, status and changes are the same is
    left as it is (first run_id kept) unless update_unchanged."""
    schema = lake.SEGMENT_CATALOG.schema
    rows_df = spark.createDataFrame([[r[f.name] for f in schema.fields] for r in rows], schema)
    changed = " OR ".join(f"t.{c} <> s.{c}" for c in _CATALOG_COMPARED)
    (
        lake.ensure_table(spark, root, lake.SEGMENT_CATALOG)
        .alias("t")
        .merge(
            rows_df.alias("s"),
            "t.as_of = s.as_of AND t.source = s.source AND t.segment_id = s.segment_id",
        )
        .whenMatchedUpdateAll(condition=None if update_unchanged else changed)
        .whenNotMatchedInsertAll()
        .execute()
    )


# --------------------------------------------------------------------------------------
# queries (README "Segment membership queries" has the same in SQL)


def _membership(spark: SparkSession, root: str) -> DataFrame:
    return lake.read_table(spark, root, lake.SEGMENT_MEMBERSHIP)


def members_at(
    spark: SparkSession,
    root: str,
    segment_id: str,
    at: datetime,
    *,
    version: str | None = None,
) -> DataFrame:
    """Members of a segment at time `at` (as decided by the latest run at or before it),
    optionally only under one definition version."""
    df = _membership(spark, root).filter((F.col("segment_id") == segment_id) & valid_at(at))
    if version is not None:
        df = df.filter(F.col("definition_version") == version)
    return df


def current_members(spark: SparkSession, root: str, segment_id: str) -> DataFrame:
    return _membership(spark, root).filter(
        (F.col("segment_id") == segment_id) & F.col("is_current")
    )


def user_history(spark: SparkSession, root: str, user_key: str) -> DataFrame:
    """Every interval of one user, oldest first."""
    return (
        _membership(spark, root)
        .filter(F.col("user_key") == user_key)
        .orderBy("valid_from", "segment_id")
    )
