"""Versioned segment membership: the one writer every segment source uses, and the queries.

gold/segment_membership holds one row per user, segment and validity interval
[valid_from, valid_to). Membership is kept per *scope*: a source (rule, cluster, propensity,
stream) and what one of its runs covers (the rule file, the cluster model name, the
propensity target). A run of one scope never touches another scope's rows.

Writing is two steps:
* `membership_diff` (pure DataFrames): the intervals of a scope valid at T and the members a
  batch run computed as of T give the intervals to close, the intervals to open and the
  enter / exit change rows. Users who stay are left alone; when a segment's definition
  version changes, the members who stay get a new interval under the new version (and no
  change row). The stream derives the same three frames from its event-time transitions.
* `apply_diff`: the change rows go to gold/segment_changes (insert-only, keyed, so a replay
  adds nothing), then one MERGE closes and opens the intervals (an open is keyed on its
  valid_from and version, so a replay inserts nothing). A run that fails between the two
  commits is completed by running it again.

Batch runs of one scope move forward in time: a run as of a time earlier than the latest one
already written for the scope is refused if it would change anything (re-running an as-of
that already ran is a no-op).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from microseg.core import lake
from microseg.core.failpoints import durable

REASONS = (
    "rule_matched",
    "parent_fallback",
    "no_longer_matched",
    "definition_changed",
    "below_minimum_size",
    "segment_retired",
    "outranked_in_exclusive_group",
)
CHANGE_KEYS = ("user_key", "segment_id", "source", "scope", "changed_at", "change")


@dataclass(frozen=True)
class Scope:
    """What one run's membership covers: `source` (rule, cluster, propensity, stream) and
    `name` (the rule file's name, the cluster model name, the propensity target)."""

    source: str
    name: str

    def rows(self) -> Column:
        """Rows of gold/segment_membership, segment_changes or segment_catalog in the scope."""
        return (F.col("source") == self.source) & (F.col("scope") == self.name)

    @property
    def enter_reason(self) -> str:
        return "rule_matched" if self.source in ("rule", "stream") else f"{self.source}_assigned"


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


@dataclass(frozen=True)
class MembershipDiff:
    """closes: user_key, segment_id, valid_to (the end of the pair's open interval).
    opens: user_key, segment_id, definition_version, score, valid_from, valid_to (null while
    open). changes: user_key, segment_id, change, reason, changed_at, definition_version."""

    closes: DataFrame
    opens: DataFrame
    changes: DataFrame

    def persist(self) -> MembershipDiff:
        return MembershipDiff(self.closes.persist(), self.opens.persist(), self.changes.persist())

    def unpersist(self) -> None:
        for df in (self.closes, self.opens, self.changes):
            df.unpersist()

    def is_empty(self) -> bool:
        return all(df.limit(1).count() == 0 for df in (self.closes, self.opens, self.changes))


def valid_at(at: datetime) -> Column:
    """Membership rows valid at `at`: valid_from <= at < valid_to (or still open)."""
    return (F.col("valid_from") <= F.lit(at)) & (
        F.col("valid_to").isNull() | (F.col("valid_to") > F.lit(at))
    )


def _by_segment(mapping: dict[str, str], otherwise: Column) -> Column:
    out = otherwise
    for segment_id, value in sorted(mapping.items()):
        out = F.when(F.col("segment_id") == segment_id, F.lit(value)).otherwise(out)
    return out


def membership_diff(
    previous_df: DataFrame,
    members_df: DataFrame,
    *,
    as_of: datetime,
    versions: dict[str, str],
    enter_reason: str = "rule_matched",
    exit_reasons: dict[str, str] | None = None,
    held_df: DataFrame | None = None,
) -> MembershipDiff:
    """What a batch run as of `as_of` changes in one scope.

    previous_df: the scope's intervals valid at as_of (user_key, segment_id,
    definition_version). members_df: user_key, segment_id, score (double, may be null),
    fallback (boolean: entered because a child segment was not published). versions:
    segment_id -> definition version of every segment the scope publishes now; members of
    any other segment exit (segment_retired). An enter's reason: definition_changed when the
    segment's version changed, parent_fallback for a fallback, else `enter_reason`. An exit's
    reason, in this order: the reason in held_df (user_key, segment_id, reason: users who
    still qualify but are held back, e.g. below_minimum_size), exit_reasons[segment_id],
    definition_changed, segment_retired, no_longer_matched."""
    spark = members_df.sparkSession
    pair = ["user_key", "segment_id"]
    interval = [*pair, "definition_version"]
    version_df = F.broadcast(
        spark.createDataFrame(
            sorted(versions.items()), "segment_id string, definition_version string"
        )
    )
    desired_df = members_df.join(version_df, on="segment_id")
    # segments whose version changed, and segments no longer published, as flags per segment
    segment_df = (
        previous_df.select("segment_id", F.col("definition_version").alias("_before"))
        .distinct()
        .join(version_df, on="segment_id", how="left")
        .groupBy("segment_id")
        .agg(
            F.max(F.col("definition_version").isNull()).alias("_retired"),
            F.max(F.col("_before") != F.col("definition_version")).alias("_changed"),
        )
    )
    entered_df = desired_df.join(previous_df.select(*pair), on=pair, how="left_anti").join(
        segment_df, on="segment_id", how="left"
    )
    exited_df = previous_df.join(desired_df.select(*pair), on=pair, how="left_anti").join(
        segment_df, on="segment_id", how="left"
    )
    held = F.lit(None).cast("string")
    if held_df is not None:
        exited_df = exited_df.join(
            held_df.select(*pair, F.col("reason").alias("_held")), on=pair, how="left"
        )
        held = F.col("_held")
    enter = (
        F.when(F.coalesce(F.col("_changed"), F.lit(False)), "definition_changed")
        .when(F.col("fallback"), "parent_fallback")
        .otherwise(enter_reason)
    )
    explicit = _by_segment(exit_reasons or {}, F.lit(None).cast("string"))
    exit_ = F.coalesce(
        held,
        explicit,
        F.when(F.col("_retired"), "segment_retired").when(F.col("_changed"), "definition_changed"),
        F.lit("no_longer_matched"),
    )
    at = F.lit(as_of).cast("timestamp")

    def change_rows(df: DataFrame, change: str, reason: Column) -> DataFrame:
        return df.select(
            *pair,
            F.lit(change).alias("change"),
            reason.alias("reason"),
            at.alias("changed_at"),
            "definition_version",
        )

    return MembershipDiff(
        closes=previous_df.join(desired_df.select(*interval), on=interval, how="left_anti").select(
            *pair, at.alias("valid_to")
        ),
        opens=desired_df.join(previous_df.select(*interval), on=interval, how="left_anti").select(
            *interval,
            F.col("score").cast("double").alias("score"),
            at.alias("valid_from"),
            F.lit(None).cast("timestamp").alias("valid_to"),
        ),
        changes=change_rows(entered_df, "enter", enter).unionByName(
            change_rows(exited_df, "exit", exit_)
        ),
    )


def apply_diff(
    spark: SparkSession,
    root: str,
    scope: Scope,
    diff: MembershipDiff,
    *,
    run_id: str,
    since: datetime | None = None,
) -> None:
    """Write a diff of `scope`: the change rows, then the intervals (two commits).
    Idempotent: applying the same diff again changes nothing, also after a crash between
    the commits. `since`: a lower bound of the diff's times, which lets Delta skip older
    files of gold/segment_changes."""
    insert_changes(spark, root, scope, diff.changes, run_id=run_id, since=since)
    merge_intervals(spark, root, scope, diff, run_id=run_id)


def insert_changes(
    spark: SparkSession,
    root: str,
    scope: Scope,
    changes_df: DataFrame,
    *,
    run_id: str,
    since: datetime | None = None,
) -> None:
    """Insert the change rows whose key (CHANGE_KEYS) is not in gold/segment_changes yet."""
    rows_df = changes_df.select(
        "*",
        F.lit(scope.source).alias("source"),
        F.lit(scope.name).alias("scope"),
        F.lit(run_id).alias("run_id"),
        F.current_timestamp().alias("recorded_at"),
    )
    bound = None if since is None else f"t.changed_at >= TIMESTAMP '{since.isoformat(sep=' ')}'"
    lake.insert_new(spark, root, lake.SEGMENT_CHANGES, rows_df, CHANGE_KEYS, where=bound)


def merge_intervals(
    spark: SparkSession, root: str, scope: Scope, diff: MembershipDiff, *, run_id: str
) -> None:
    """One MERGE: each close ends the pair's open interval that began at or before it; each
    open inserts an interval unless one with its valid_from and version is there already."""
    actions_df = diff.closes.select(
        "user_key",
        "segment_id",
        F.lit("close").alias("_action"),
        F.lit(None).cast("string").alias("definition_version"),
        F.lit(None).cast("double").alias("score"),
        F.lit(None).cast("timestamp").alias("valid_from"),
        "valid_to",
    ).unionByName(diff.opens.select("*", F.lit("open").alias("_action")))
    (
        lake.ensure_table(spark, root, lake.SEGMENT_MEMBERSHIP)
        .alias("t")
        .merge(
            actions_df.alias("s"),
            f"t.source = '{scope.source}' AND t.scope = '{scope.name}' "
            "AND t.user_key = s.user_key AND t.segment_id = s.segment_id AND ("
            "(s._action = 'close' AND t.is_current AND t.valid_from <= s.valid_to) OR "
            "(s._action = 'open' AND t.valid_from = s.valid_from "
            "AND t.definition_version = s.definition_version))",
        )
        .whenMatchedUpdate(
            condition="s._action = 'close'",
            set={
                "valid_to": "s.valid_to",
                "is_current": F.lit(False),
                "closed_by_run_id": F.lit(run_id),
            },
        )
        .whenNotMatchedInsert(
            condition="s._action = 'open'",
            values={
                "user_key": "s.user_key",
                "segment_id": "s.segment_id",
                "source": F.lit(scope.source),
                "scope": F.lit(scope.name),
                "definition_version": "s.definition_version",
                "score": "s.score",
                "valid_from": "s.valid_from",
                "valid_to": "s.valid_to",
                "is_current": F.col("s.valid_to").isNull(),
                "run_id": F.lit(run_id),
                "closed_by_run_id": F.when(
                    F.col("s.valid_to").isNotNull(), F.lit(run_id)
                ).otherwise(F.lit(None).cast("string")),
            },
        )
        .execute()
    )
    durable(lake.SEGMENT_MEMBERSHIP.name)


def scope_history(spark: SparkSession, root: str, scope: Scope) -> DataFrame:
    """Every interval of the scope (an empty table is created when there is none)."""
    lake.ensure_table(spark, root, lake.SEGMENT_MEMBERSHIP)
    return lake.read_table(spark, root, lake.SEGMENT_MEMBERSHIP).filter(scope.rows())


def write_membership(
    spark: SparkSession,
    root: str,
    *,
    scope: Scope,
    as_of: datetime,
    run_id: str,
    members_df: DataFrame,
    versions: dict[str, str],
    exit_reasons: dict[str, str] | None = None,
    held_df: DataFrame | None = None,
) -> dict[str, SegmentStats]:
    """Record the members of every segment of `scope` as of `as_of` (see membership_diff for
    the arguments) and return per segment its stats at as_of."""
    history_df = scope_history(spark, root, scope)
    diff = membership_diff(
        history_df.filter(valid_at(as_of)),
        members_df,
        as_of=as_of,
        versions=versions,
        enter_reason=scope.enter_reason,
        exit_reasons=exit_reasons,
        held_df=held_df,
    ).persist()
    try:
        if not diff.is_empty():
            latest = history_df.agg(
                F.greatest(F.max("valid_from"), F.max("valid_to")).alias("latest")
            ).first()["latest"]
            if latest is not None and latest > as_of:
                raise ValueError(
                    f"segment membership of {scope.source} '{scope.name}' already runs to "
                    f"{latest.isoformat()}; a run as of {as_of.isoformat()} would rewrite that "
                    "history: runs must move forward in time (re-running an earlier as-of is "
                    "allowed only if nothing differs)"
                )
            apply_diff(spark, root, scope, diff, run_id=run_id, since=as_of)
        else:
            lake.ensure_table(spark, root, lake.SEGMENT_CHANGES)
    finally:
        diff.unpersist()
    return segment_stats(spark, root, scope=scope, as_of=as_of)


def segment_stats(
    spark: SparkSession, root: str, *, scope: Scope, as_of: datetime
) -> dict[str, SegmentStats]:
    """Per segment of the scope: size at as_of, size just before, entered and exited at it.

    Read back from the tables, so a re-run of the same as-of reports the same numbers."""
    history_df = scope_history(spark, root, scope)
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
        .filter(scope.rows() & (F.col("changed_at") == F.lit(as_of)))
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
