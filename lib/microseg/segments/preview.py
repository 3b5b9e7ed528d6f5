"""`microseg segments preview FILE`: what a new or changed segment file would publish, without
publishing it.

At an as-of (default: the newest feature snapshot), the file's rules are evaluated exactly as
`microseg segments run` evaluates them (segments.evaluate.rule_flags, guard, assign), and
nothing is written. Per segment of the file: the users matching its rule, its size after the
guards (min_size, exclusive groups, parents), its status, how many of them are already
current members of a segment with the same id (any source) and how many current members it
would lose, the current segments it shares most members with, and a few members.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from pyspark.sql import SparkSession, Window
from pyspark.sql import functions as F

from microseg.core import lake
from microseg.core.clock import naive_utc
from microseg.core.config import Config, ConfigError
from microseg.features.snapshots import latest_as_of
from microseg.segments.evaluate import assign, guard, match_counts, rule_flags
from microseg.segments.membership import valid_at
from microseg.segments.parse import load_segments


@dataclass
class SegmentPreview:
    segment_id: str
    name: str
    version: str
    matched: int
    size: int
    status: str
    status_reason: str | None
    published: int | None  # current members of the same id now (None: no such segment)
    kept: int  # of the preview's members, how many are current members of the same id
    overlaps: list[tuple[str, int]] = field(default_factory=list)  # (other segment, shared)
    sample: list[str] = field(default_factory=list)


@dataclass
class PreviewReport:
    path: str
    as_of: datetime
    users: int
    segments: list[SegmentPreview]


def preview_segments(
    spark: SparkSession,
    cfg: Config,
    path: str | Path,
    *,
    as_of: datetime | None = None,
    sample: int = 5,
    overlaps: int = 3,
) -> PreviewReport:
    root = cfg.lake.root
    catalog = load_segments(cfg, path)
    as_of = naive_utc(as_of) if as_of else latest_as_of(spark, root)
    if as_of is None:
        raise ConfigError("no feature snapshot yet: run `microseg features --as-of T` first")
    flags_df = rule_flags(spark, cfg, catalog, as_of).persist()
    members_df = None
    try:
        users, matched = match_counts(catalog, flags_df)
        statuses = guard(catalog, matched, users)
        members_df = assign(catalog, flags_df, statuses).select("user_key", "segment_id").persist()
        sizes = {
            r.segment_id: r["count"] for r in members_df.groupBy("segment_id").count().collect()
        }
        ranked = Window.partitionBy("segment_id").orderBy("user_key")
        samples: dict[str, list[str]] = {}
        for row in (
            members_df.withColumn("_n", F.row_number().over(ranked))
            .filter(F.col("_n") <= sample)
            .orderBy("segment_id", "user_key")
            .collect()
        ):
            samples.setdefault(row.segment_id, []).append(row.user_key)
        published: dict[str, int] = {}
        shared: dict[str, dict[str, int]] = {}
        if lake.table_exists(spark, root, lake.SEGMENT_MEMBERSHIP):
            current_df = (
                lake.read_table(spark, root, lake.SEGMENT_MEMBERSHIP)
                .filter(valid_at(as_of))
                .select("user_key", F.col("segment_id").alias("other"))
                .distinct()
            )
            published = {r.other: r["count"] for r in current_df.groupBy("other").count().collect()}
            for row in (
                members_df.join(current_df, "user_key").groupBy("segment_id", "other").count()
            ).collect():
                shared.setdefault(row.segment_id, {})[row.other] = row["count"]
    finally:
        flags_df.unpersist()
        if members_df is not None:
            members_df.unpersist()
    results = []
    for segment in catalog.segments:
        both = shared.get(segment.id, {})
        others = sorted(
            ((o, n) for o, n in both.items() if o != segment.id), key=lambda x: (-x[1], x[0])
        )
        status, reason = statuses[segment.id]
        results.append(
            SegmentPreview(
                segment_id=segment.id,
                name=segment.name,
                version=catalog.version(segment.id),
                matched=matched[segment.id],
                size=sizes.get(segment.id, 0),
                status=status,
                status_reason=reason,
                published=published.get(segment.id),
                kept=both.get(segment.id, 0),
                overlaps=others[:overlaps],
                sample=samples.get(segment.id, []),
            )
        )
    return PreviewReport(str(path), as_of, users, results)
