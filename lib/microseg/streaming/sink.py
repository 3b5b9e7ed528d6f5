"""The foreachBatch sink: facts at evaluation points -> member flags -> transitions -> the
one membership writer (idempotent per micro-batch)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from microseg.core import lake
from microseg.core.config import Config
from microseg.core.runs import new_run_id
from microseg.features import snapshots
from microseg.segments.compile import exclusive_winners, segment_condition
from microseg.segments.membership import (
    MembershipDiff,
    Scope,
    apply_diff,
    scope_history,
)
from microseg.segments.model import (
    SegmentCatalog,
)
from microseg.segments.parse import available_features
from microseg.streaming.state import FactPlan, fact_plan

SOURCE = "stream"  # gold/segment_membership.source of the stream's rows


@dataclass
class BatchStats:
    """Counts over the micro-batches a sink wrote, and per batch the seconds of each step."""

    batches: int = 0
    points: int = 0
    changes: int = 0
    timings: list[dict[str, float]] = field(default_factory=list)


@dataclass
class StreamSink:
    """What the foreachBatch function needs: the lake, the rules, the fact plan and the
    features rules may use."""

    root: str
    catalog: SegmentCatalog
    segment_ids: list[str]
    plan: FactPlan
    scope: Scope
    run_id: str  # the ops/runs row of the stream run: every row it writes carries it
    features: dict[str, str] = field(default_factory=dict)  # name -> kind, rules may use
    stats: BatchStats = field(default_factory=BatchStats)
    # called after a micro-batch with changes is written: (batch id, {(segment, change): n})
    on_changes: Callable[[int, dict[tuple[str, str], int]], None] | None = None


def stream_sink(
    spark: SparkSession,
    cfg: Config,
    catalog: SegmentCatalog,
    segment_ids: list[str],
    *,
    run_id: str | None = None,
) -> StreamSink:
    """The sink of a query over `segment_ids`, its tables created if they do not exist; its
    rows carry `run_id` (default a new one)."""
    for table in (lake.SEGMENT_MEMBERSHIP, lake.SEGMENT_CHANGES):
        lake.ensure_table(spark, cfg.lake.root, table)
    return StreamSink(
        root=cfg.lake.root,
        catalog=catalog,
        segment_ids=segment_ids,
        plan=fact_plan(catalog, segment_ids),
        scope=Scope(SOURCE, catalog.name),
        run_id=run_id or new_run_id(),
        features=available_features(cfg),
    )


def member_flags(catalog: SegmentCatalog, segment_ids: list[str], frame_df: DataFrame) -> DataFrame:
    """user_key, as_of, segment_id, matched (the rule holds), member (matched and not outranked
    in its exclusive group among the streamed segments): one row per point and segment."""
    matched = {
        sid: segment_condition(catalog, sid, F.col("as_of")).alias(sid) for sid in segment_ids
    }
    flags_df = frame_df.select("user_key", "as_of", *matched.values())
    winners = exclusive_winners([catalog[sid] for sid in segment_ids], lambda sid: sid)
    entries = []
    for sid in segment_ids:
        group = catalog[sid].exclusive_group
        member = F.col(sid) if group is None else F.col(sid) & (winners[group] == sid)
        entries.append(
            F.struct(
                F.lit(sid).alias("segment_id"),
                F.col(sid).alias("matched"),
                F.coalesce(member, F.lit(False)).alias("member"),
            )
        )
    return flags_df.select("user_key", "as_of", F.explode(F.array(*entries)).alias("f")).select(
        "user_key", "as_of", "f.segment_id", "f.matched", "f.member"
    )


def transitions(
    flags_df: DataFrame, membership_df: DataFrame, versions: dict[str, str]
) -> DataFrame:
    """Enter / exit rows: user_key, segment_id, as_of, change, reason, definition_version,
    first (the first transition of the pair in this batch), next_as_of (the pair's next
    transition in this batch). membership_df: the stream scope's intervals."""
    firsts_df = flags_df.groupBy("user_key").agg(F.min("as_of").alias("_first"))
    before_df = (
        membership_df.join(F.broadcast(firsts_df), on="user_key")
        .filter(
            (F.col("valid_from") < F.col("_first"))
            & (F.col("valid_to").isNull() | (F.col("valid_to") >= F.col("_first")))
        )
        .select(
            "user_key",
            "segment_id",
            F.lit(True).alias("_was"),
            F.col("definition_version").alias("_was_version"),
        )
    )
    by_pair = Window.partitionBy("user_key", "segment_id").orderBy("as_of")
    version = F.lit(None).cast("string")
    for sid, v in versions.items():
        version = F.when(F.col("segment_id") == sid, F.lit(v)).otherwise(version)
    changed_df = (
        flags_df.join(before_df, on=["user_key", "segment_id"], how="left")
        .withColumn(
            "_previous",
            F.coalesce(F.lag("member").over(by_pair), F.col("_was"), F.lit(False)),
        )
        .filter(F.col("member") != F.col("_previous"))
    )
    first = F.row_number().over(by_pair) == 1
    return changed_df.select(
        "user_key",
        "segment_id",
        "as_of",
        F.when(F.col("member"), "enter").otherwise("exit").alias("change"),
        F.when(F.col("member"), "rule_matched")
        .when(F.col("matched"), "outranked_in_exclusive_group")
        .otherwise("no_longer_matched")
        .alias("reason"),
        F.when(~F.col("member") & first, F.col("_was_version"))
        .otherwise(version)
        .alias("definition_version"),
        first.alias("first"),
        F.lead("as_of").over(by_pair).alias("next_as_of"),
    )


def stream_diff(transitions_df: DataFrame) -> MembershipDiff:
    """The transitions of a micro-batch as the membership writer's diff: the first exit of a
    pair closes its open interval; each enter opens [point, the pair's next exit)."""
    enter = F.col("change") == "enter"
    return MembershipDiff(
        closes=transitions_df.filter(~enter & F.col("first")).select(
            "user_key", "segment_id", F.col("as_of").alias("valid_to")
        ),
        opens=transitions_df.filter(enter).select(
            "user_key",
            "segment_id",
            "definition_version",
            F.lit(None).cast("double").alias("score"),
            F.col("as_of").alias("valid_from"),
            F.col("next_as_of").alias("valid_to"),
        ),
        changes=transitions_df.select(
            "user_key",
            "segment_id",
            "change",
            "reason",
            F.col("as_of").alias("changed_at"),
            "definition_version",
        ),
    )


def points_frame(
    facts_df: DataFrame,
    plan: FactPlan,
    features_df: DataFrame | None,
    features: dict[str, str],
) -> DataFrame:
    """The facts rows as the frame rules compile against: user_key, as_of (timestamp), fact
    columns (last times as timestamps), then the snapshot's feature columns; `features`
    (name -> kind) missing from the snapshot, or all without one, are null."""
    frame_df = facts_df.select(
        "user_key",
        F.timestamp_micros("point").alias("as_of"),
        *[F.col(c.name) for c in plan.counts],
        *[F.timestamp_micros(x.name).alias(x.name) for x in plan.lasts],
    )
    if features_df is not None:
        frame_df = frame_df.join(features_df, on="user_key", how="left")
    kinds = {"number": "double", "string": "string"}
    missing = [name for name in features if name not in frame_df.columns]
    return frame_df.select(
        "*", *[F.lit(None).cast(kinds[features[name]]).alias(name) for name in missing]
    )


def write_batch(batch_df: DataFrame, batch_id: int, *, sink: StreamSink) -> None:
    """The foreachBatch function: transitions of the batch's points, then the change rows
    and the intervals, each one MERGE; replaying a batch changes nothing."""
    spark = batch_df.sparkSession
    clock = time.monotonic()
    timing: dict[str, float] = {"batch_id": batch_id}

    def lap(step: str) -> None:
        nonlocal clock
        now = time.monotonic()
        timing[step] = round(now - clock, 3)
        clock = now

    facts_df = batch_df.persist()
    try:
        points = facts_df.count()
        lap("state_s")
        sink.stats.batches += 1
        sink.stats.points += points
        if points == 0:
            return
        frame_df = points_frame(
            facts_df, sink.plan, snapshots.latest_snapshot(spark, sink.root), sink.features
        )
        membership_df = scope_history(spark, sink.root, sink.scope)
        versions = {sid: sink.catalog.version(sid) for sid in sink.segment_ids}
        transitions_df = transitions(
            member_flags(sink.catalog, sink.segment_ids, frame_df), membership_df, versions
        ).persist()
        try:
            changes = transitions_df.count()
            lap("transitions_s")
            sink.stats.changes += changes
            if changes:
                earliest = transitions_df.agg(F.min("as_of")).first()[0]
                apply_diff(
                    spark,
                    sink.root,
                    sink.scope,
                    stream_diff(transitions_df),
                    run_id=sink.run_id,
                    since=earliest,
                )
                lap("membership_s")
                if sink.on_changes is not None:
                    counted = transitions_df.groupBy("segment_id", "change").count().collect()
                    sink.on_changes(
                        batch_id, {(r.segment_id, r.change): r["count"] for r in counted}
                    )
            timing.update(points=points, changes=changes)
            sink.stats.timings.append(timing)
        finally:
            transitions_df.unpersist()
    finally:
        facts_df.unpersist()
