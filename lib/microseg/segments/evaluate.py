"""Rule segments as of a point in time: evaluate, guard, publish (`microseg segments run`).

For an as-of time T: the users are those with features as of T (gold/user_features); each
segment's rule (its own conditions and its ancestors', see segment_condition) is
evaluated over their features and the event facts before T. Then the guards apply, parents
before children:

* minimum size: a segment matching fewer users than its min_size is not published (status
  below_minimum_size); its members fall back to the parent, which they match too, since a
  child refines its parent. Its descendants are not published either (parent_not_published).
* exclusive groups: a user matching several published segments of one group is a member of
  the one with the best priority (1 beats 2) only.

The members go through membership.write_membership (source "rule"); gold/segment_catalog
gets one row per segment with definition, version, sizes, status, entered/exited, stability
and overlap.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from microseg.core import lake
from microseg.core.clock import naive_utc
from microseg.core.config import Config
from microseg.core.runs import new_run_id
from microseg.features import snapshots
from microseg.features.user_features import keyed_events_before
from microseg.segments import membership, online
from microseg.segments.catalog import CatalogRow, write_catalog
from microseg.segments.compile import exclusive_winners, segment_condition
from microseg.segments.facts import compute_facts, with_facts
from microseg.segments.membership import Scope
from microseg.segments.model import (
    SegmentCatalog,
    SegmentFileError,
    sql_conditions,
)
from microseg.segments.parse import load_segments
from microseg.silver.consent import consented, read_history

SOURCE = "rule"


@dataclass(frozen=True)
class SegmentResult:
    segment_id: str
    name: str
    version: str
    matched: int
    size: int
    status: str
    status_reason: str | None
    previous_size: int | None
    entered: int
    exited: int
    stability: float | None


@dataclass
class SegmentsReport:
    run_id: str
    as_of: datetime
    users: int
    segments: list[SegmentResult]


def _flag(segment_id: str) -> str:
    return f"_m_{segment_id}"


def check_sql(catalog: SegmentCatalog, frame_df: DataFrame) -> None:
    """Every sql condition must resolve over the feature columns and be boolean."""
    problems = []
    for segment in catalog.segments:
        for condition in sql_conditions(segment.condition):
            where = f"{catalog.path} line {condition.line}: segment '{segment.id}': sql"
            try:
                dtype = frame_df.select(F.expr(condition.expression)).schema[0].dataType
            except Exception as exc:  # noqa: BLE001 - Spark's analysis error, reworded
                first = str(exc).strip().splitlines()[0][:300]
                problems.append(f"{where}: {condition.expression!r} does not resolve: {first}")
                continue
            if not isinstance(dtype, T.BooleanType):
                problems.append(
                    f"{where}: {condition.expression!r} is {dtype.simpleString()}, not boolean"
                )
    if problems:
        raise SegmentFileError(problems)


def feature_frame_schema(features: dict[str, str]) -> T.StructType:
    """An empty frame's schema with the feature columns (for checking sql without data)."""
    types = {"number": T.DoubleType(), "string": T.StringType()}
    return T.StructType(
        [T.StructField("user_key", T.StringType())]
        + [T.StructField(name, types[kind]) for name, kind in features.items()]
    )


def evaluate(catalog: SegmentCatalog, frame_df: DataFrame, as_of: datetime) -> DataFrame:
    """user_key and one boolean column `_m_<id>` per segment: does the user match it."""
    as_of_col = F.lit(as_of)
    return frame_df.select(
        "user_key",
        *[segment_condition(catalog, s.id, as_of_col).alias(_flag(s.id)) for s in catalog.segments],
    )


def guard(
    catalog: SegmentCatalog, matched: dict[str, int], users: int
) -> dict[str, tuple[str, str | None]]:
    """segment_id -> (status, reason), parents first."""
    statuses: dict[str, tuple[str, str | None]] = {}
    for segment in catalog.segments:
        parent = segment.parent
        if parent is not None and statuses[parent][0] != "active":
            statuses[segment.id] = (
                "parent_not_published",
                f"parent '{parent}' is not published; members fall back to the nearest "
                "published ancestor",
            )
            continue
        if segment.min_size is not None:
            needed = segment.min_size.threshold(users)
            if matched[segment.id] < needed:
                where = (
                    f"members fall back to '{parent}'"
                    if parent
                    else "no parent: its members are in no segment from it"
                )
                statuses[segment.id] = (
                    "below_minimum_size",
                    f"{matched[segment.id]} users matched, minimum {needed} "
                    f"(min_size {segment.min_size}); {where}",
                )
                continue
        statuses[segment.id] = ("active", None)
    return statuses


def assign(
    catalog: SegmentCatalog,
    flags_df: DataFrame,
    statuses: dict[str, tuple[str, str | None]],
) -> DataFrame:
    """Members: user_key, segment_id, score (null for rules), fallback."""
    published = [s for s in catalog.segments if statuses[s.id][0] == "active"]
    winners = exclusive_winners(published, _flag)
    entries = []
    for segment in published:
        member = F.col(_flag(segment.id))
        if segment.exclusive_group is not None:
            member = member & (winners[segment.exclusive_group] == segment.id)
        unpublished_children = [
            s.id
            for s in catalog.segments
            if s.id != segment.id
            and statuses[s.id][0] != "active"
            and segment in catalog.chain(s.id)
        ]
        fallback = F.lit(False)
        for child in unpublished_children:
            fallback = fallback | F.col(_flag(child))
        entries.append(
            F.when(
                member,
                F.struct(F.lit(segment.id).alias("segment_id"), fallback.alias("fallback")),
            )
        )
    if not entries:
        return flags_df.select(
            "user_key",
            F.lit(None).cast("string").alias("segment_id"),
            F.lit(None).cast("double").alias("score"),
            F.lit(False).alias("fallback"),
        ).limit(0)
    return (
        flags_df.select("user_key", F.explode(F.array(*entries)).alias("m"))
        .filter(F.col("m").isNotNull())
        .select(
            "user_key",
            "m.segment_id",
            F.lit(None).cast("double").alias("score"),
            "m.fallback",
        )
    )


def held_back(
    catalog: SegmentCatalog,
    flags_df: DataFrame,
    members_df: DataFrame,
    statuses: dict[str, tuple[str, str | None]],
) -> DataFrame:
    """Users who match a segment but are not its members, and why: user_key, segment_id,
    reason (below_minimum_size, or outranked_in_exclusive_group)."""
    entries = [
        F.when(
            F.col(_flag(s.id)),
            F.struct(
                F.lit(s.id).alias("segment_id"),
                F.lit(
                    "outranked_in_exclusive_group"
                    if statuses[s.id][0] == "active"
                    else "below_minimum_size"
                ).alias("reason"),
            ),
        )
        for s in catalog.segments
    ]
    matched_df = (
        flags_df.select("user_key", F.explode(F.array(*entries)).alias("m"))
        .filter(F.col("m").isNotNull())
        .select("user_key", "m.segment_id", "m.reason")
    )
    return matched_df.join(
        members_df.select("user_key", "segment_id"), on=["user_key", "segment_id"], how="left_anti"
    )


def with_marketing_consent(spark, cfg: Config, catalog, flags_df, as_of: datetime):
    """flags_df with the flags of marketing segments (privacy.consent.marketing_tags) false
    for users whose marketing consent does not hold at as_of."""
    tags = set(cfg.privacy.consent.marketing_tags)
    marketing = [s for s in catalog.segments if tags & set(s.tags or ())]
    if not marketing:
        return flags_df
    allowed_df = consented(
        flags_df.select("user_key"),
        read_history(spark, cfg.lake.root),
        "marketing",
        as_of,
        default=cfg.privacy.consent.marketing_unknown == "granted",
    ).select("user_key", F.lit(True).alias("_marketing_ok"))
    joined_df = flags_df.join(allowed_df, on="user_key", how="left")
    ok = F.coalesce(F.col("_marketing_ok"), F.lit(False))
    for segment in marketing:
        joined_df = joined_df.withColumn(_flag(segment.id), F.col(_flag(segment.id)) & ok)
    return joined_df.drop("_marketing_ok")


def rule_flags(spark: SparkSession, cfg: Config, catalog: SegmentCatalog, as_of: datetime):
    """user_key and a flag per segment (`_m_<id>`) for every user of the feature snapshot at
    as_of: the rules evaluated on the features and the facts from events before as_of, with
    the marketing consent requirement applied."""
    root = cfg.lake.root
    features_df = snapshots.snapshot(spark, root, as_of)
    check_sql(catalog, features_df)
    facts = catalog.facts()
    facts_df = None
    if facts:
        keyed_df = keyed_events_before(lake.read_table(spark, root, lake.EVENTS), as_of)
        facts_df = compute_facts(
            keyed_df,
            facts,
            as_of=as_of,
            inactivity_timeout=cfg.sessions.inactivity_timeout,
            max_session_length=cfg.sessions.max_session_length,
        )
    frame_df = with_facts(features_df, facts_df, facts)
    return with_marketing_consent(spark, cfg, catalog, evaluate(catalog, frame_df, as_of), as_of)


def match_counts(catalog: SegmentCatalog, flags_df: DataFrame) -> tuple[int, dict[str, int]]:
    """(users, segment id -> users matching its rule)."""
    counts = flags_df.agg(
        F.count(F.lit(1)).alias("_users"),
        *[F.count(F.when(F.col(_flag(s.id)), 1)).alias(s.id) for s in catalog.segments],
    ).first()
    return counts["_users"], {s.id: counts[s.id] for s in catalog.segments}


def run_segments(
    spark: SparkSession,
    cfg: Config,
    *,
    as_of: datetime,
    path: str | None = None,
    run_id: str | None = None,
) -> SegmentsReport:
    """Evaluate every rule segment of the file as of `as_of` and publish the members (scope:
    source rule, the file's name). `run_id`: the ops/runs row this run writes under."""
    root = cfg.lake.root
    as_of = naive_utc(as_of)
    run_id = run_id or new_run_id()
    catalog = load_segments(cfg, path)
    scope = Scope(SOURCE, catalog.name)
    flags_df = rule_flags(spark, cfg, catalog, as_of).persist()
    try:
        users, matched = match_counts(catalog, flags_df)
        statuses = guard(catalog, matched, users)
        members_df = assign(catalog, flags_df, statuses)
        stats = membership.write_membership(
            spark,
            root,
            scope=scope,
            as_of=as_of,
            run_id=run_id,
            members_df=members_df,
            versions={
                s.id: catalog.version(s.id)
                for s in catalog.segments
                if statuses[s.id][0] == "active"
            },
            # unpublished segments: those who still match are held back, the others left
            exit_reasons={
                sid: "no_longer_matched" for sid, (st, _) in statuses.items() if st != "active"
            },
            held_df=held_back(catalog, flags_df, members_df, statuses),
        )
        online.publish(spark, cfg, scope)
    finally:
        flags_df.unpersist()
    rows = catalog_rows(
        catalog,
        scope,
        matched,
        statuses,
        stats,
        membership.overlap(spark, root, as_of=as_of),
        as_of=as_of,
        run_id=run_id,
    )
    write_catalog(spark, root, rows)
    results = [
        SegmentResult(
            segment_id=r.segment_id,
            name=r.name,
            version=r.definition_version,
            matched=r.matched,
            size=r.size,
            status=r.status,
            status_reason=r.status_reason,
            previous_size=r.previous_size,
            entered=r.entered,
            exited=r.exited,
            stability=r.stability,
        )
        for r in rows
    ]
    return SegmentsReport(run_id=run_id, as_of=as_of, users=users, segments=results)


def catalog_rows(
    catalog: SegmentCatalog,
    scope: Scope,
    matched: dict[str, int],
    statuses: dict[str, tuple[str, str | None]],
    stats: dict[str, membership.SegmentStats],
    overlaps: dict[str, dict[str, float]],
    *,
    as_of: datetime,
    run_id: str,
) -> list[CatalogRow]:
    """One row per segment of the file, then one per segment of the scope that left it
    (status retired)."""
    common = {"as_of": as_of, "run_id": run_id, "overlaps": overlaps}
    rows = [
        CatalogRow.of(
            scope,
            s.id,
            stats.get(s.id),
            definition=s.definition,
            name=s.name,
            description=s.description,
            tags=s.tags,
            definition_version=catalog.version(s.id),
            parent=s.parent,
            exclusive_group=s.exclusive_group,
            priority=s.priority,
            min_size=str(s.min_size) if s.min_size else None,
            matched=matched[s.id],
            status=statuses[s.id][0],
            status_reason=statuses[s.id][1],
            **common,
        )
        for s in catalog.segments
    ]
    rows += [
        CatalogRow.of(
            scope,
            segment_id,
            stat,
            definition={},
            name=segment_id,
            definition_version="",
            matched=0,
            status="retired",
            status_reason=f"no longer in {catalog.path}",
            **common,
        )
        for segment_id, stat in stats.items()
        if segment_id not in matched
    ]
    return rows
