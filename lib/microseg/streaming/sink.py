"""The stream's writers: write_batch, the segment query's foreachBatch function (facts at
evaluation points -> member flags -> transitions -> the online store and the change rows,
idempotent per micro-batch), and apply_history, the history query's (change rows ->
membership intervals)."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import groupby

from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from microseg.core import lake
from microseg.core.config import Config
from microseg.core.failpoints import failpoint
from microseg.core.online_store import Member, OnlineStore, open_store
from microseg.core.runs import new_run_id
from microseg.features import snapshots
from microseg.segments.compile import exclusive_winners, segment_condition
from microseg.segments.membership import MembershipDiff, Scope, merge_intervals
from microseg.segments.model import (
    SegmentCatalog,
)
from microseg.segments.parse import available_features
from microseg.silver.consent import consent_at_points
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
    store: OnlineStore
    features: dict[str, str] = field(default_factory=dict)  # name -> kind, rules may use
    # marketing segments (privacy.consent.marketing_tags) and whether no signal is consent
    marketing: frozenset[str] = frozenset()
    marketing_unknown_granted: bool = False
    stats: BatchStats = field(default_factory=BatchStats)
    # called after a micro-batch with changes is written: (batch id, {(segment, change): n})
    on_changes: Callable[[int, dict[tuple[str, str], int]], None] | None = None
    # the store's batch marker and Delta's txnAppId: set per checkpoint (streaming.checkpoint)
    writer: str = "stream"
    _snapshot: tuple[int | None, DataFrame | None] | None = None
    _consent: tuple[int | None, DataFrame | None] | None = None

    @property
    def versions(self) -> dict[str, str]:
        return {sid: self.catalog.version(sid) for sid in self.segment_ids}

    def features_snapshot(self, spark: SparkSession) -> DataFrame | None:
        """The latest feature snapshot, cached until gold/user_features gets a new version."""
        version = lake.table_version(spark, self.root, lake.USER_FEATURES)
        if self._snapshot is None or self._snapshot[0] != version:
            if self._snapshot is not None and self._snapshot[1] is not None:
                self._snapshot[1].unpersist()
            df = None if version is None else snapshots.latest_snapshot(spark, self.root)
            self._snapshot = (version, None if df is None else df.persist())
        return self._snapshot[1]

    def consent_history(self, spark: SparkSession) -> DataFrame | None:
        """silver/consent, cached until it gets a new version (sessionize writes it)."""
        version = lake.table_version(spark, self.root, lake.CONSENT)
        if self._consent is None or self._consent[0] != version:
            if self._consent is not None and self._consent[1] is not None:
                self._consent[1].unpersist()
            df = None if version is None else lake.read_table(spark, self.root, lake.CONSENT)
            self._consent = (version, None if df is None else df.persist())
        return self._consent[1]

    def close(self) -> None:
        for cached in (self._snapshot, self._consent):
            if cached is not None and cached[1] is not None:
                cached[1].unpersist()
        self._snapshot = self._consent = None
        self.store.close()


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
    tags = set(cfg.privacy.consent.marketing_tags)
    return StreamSink(
        root=cfg.lake.root,
        catalog=catalog,
        segment_ids=segment_ids,
        plan=fact_plan(catalog, segment_ids),
        scope=Scope(SOURCE, catalog.name),
        run_id=run_id or new_run_id(),
        store=open_store(cfg),
        features=available_features(cfg),
        marketing=frozenset(s for s in segment_ids if tags & set(catalog[s].tags or ())),
        marketing_unknown_granted=cfg.privacy.consent.marketing_unknown == "granted",
    )


def member_flags(
    catalog: SegmentCatalog,
    segment_ids: list[str],
    frame_df: DataFrame,
    gated: frozenset[str] = frozenset(),
) -> DataFrame:
    """user_key, as_of, segment_id, matched (the rule holds and, for a `gated` segment, the
    frame's consent_ok), member (matched and not outranked in its exclusive group among the
    streamed segments): one row per point and segment."""
    matched = {}
    for sid in segment_ids:
        condition = segment_condition(catalog, sid, F.col("as_of"))
        if sid in gated:  # as the batch run: a user without consent does not match
            condition = condition & F.col("consent_ok")
        matched[sid] = condition.alias(sid)
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


@dataclass(frozen=True)
class Transition:
    user_key: str
    segment_id: str
    as_of: int  # microseconds
    change: str  # enter or exit
    reason: str
    definition_version: str


def transitions(
    flags: list[tuple[str, str, int, bool, bool]],
    before: dict[tuple[str, str], Member],
    versions: dict[str, str],
    *,
    scope: Scope,
) -> tuple[list[Transition], list[Member], list[tuple[str, str]]]:
    """A micro-batch's enters and exits, and what the store must then hold.

    flags: (user_key, segment_id, as_of (us), matched, member) per evaluation point and segment;
    before: the scope's current members in the store (membership just before each user's
    first point of the batch). Returns the transitions in time order per pair, the members to
    upsert (a pair that is a member after its last point and entered in this batch) and the
    pairs to remove (members before, not after)."""
    out: list[Transition] = []
    upserts: list[Member] = []
    removes: list[tuple[str, str]] = []
    for (user_key, segment_id), points in groupby(sorted(flags), key=lambda f: f[:2]):
        was = before.get((user_key, segment_id))
        member = was is not None
        entered: Member | None = None
        for _, _, as_of, matched, now in points:
            if now == member:
                continue
            member = now
            if now:
                version = versions[segment_id]
                out.append(
                    Transition(user_key, segment_id, as_of, "enter", "rule_matched", version)
                )
                entered = Member(
                    user_key, segment_id, scope.source, scope.name, version, None, as_of
                )
            else:
                reason = "outranked_in_exclusive_group" if matched else "no_longer_matched"
                version = entered.definition_version if entered else was.definition_version
                out.append(Transition(user_key, segment_id, as_of, "exit", reason, version))
        if member and entered is not None:
            upserts.append(entered)
        elif not member and was is not None:
            removes.append((user_key, segment_id))
    return out, upserts, removes


def history_diff(changes_df: DataFrame) -> MembershipDiff:
    """Change rows of the stream (user_key, segment_id, change, changed_at, definition_version)
    as the membership writer's diff: the first exit of a pair closes its open interval; each
    enter opens [changed_at, the pair's next exit among these rows)."""
    by_pair = Window.partitionBy("user_key", "segment_id").orderBy("changed_at")
    ordered_df = changes_df.select(
        "user_key",
        "segment_id",
        "change",
        "changed_at",
        "definition_version",
        (F.row_number().over(by_pair) == 1).alias("first"),
        F.lead("changed_at").over(by_pair).alias("next_at"),
    )
    enter = F.col("change") == "enter"
    return MembershipDiff(
        closes=ordered_df.filter(~enter & F.col("first")).select(
            "user_key", "segment_id", F.col("changed_at").alias("valid_to")
        ),
        opens=ordered_df.filter(enter).select(
            "user_key",
            "segment_id",
            "definition_version",
            F.lit(None).cast("double").alias("score"),
            F.col("changed_at").alias("valid_from"),
            F.col("next_at").alias("valid_to"),
        ),
        changes=changes_df.limit(0),
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
    """The foreachBatch function (the hot path): the batch's transitions against the online
    store's current members, then one store transaction (upserts, removes, the batch marker
    and the change rows as its payload), then one blind append of the change rows to
    gold/segment_changes (Delta txnAppId/txnVersion). No MERGE, no read of the membership
    table; the intervals follow off the hot path (apply_history).

    Replays: a batch at the store's marker was written to the store by an attempt that died
    before, or right after, its Delta append: the append is retried from the marker's payload
    (Delta skips it when it is in). A batch past the marker is new."""
    spark = batch_df.sparkSession
    clock = time.monotonic()
    timing: dict[str, float] = {"batch_id": batch_id}

    def lap(step: str) -> None:
        nonlocal clock
        now = time.monotonic()
        timing[step] = round(now - clock, 3)
        clock = now

    marker = sink.store.marker(sink.writer)
    if marker is not None and marker.batch > batch_id:
        raise RuntimeError(
            f"online store {sink.store.location} has micro-batch {marker.batch} of this stream "
            f"but the checkpoint is at {batch_id}: the store is ahead of the checkpoint"
        )
    if marker is not None and marker.batch == batch_id:
        _append_changes(spark, sink, _rows_of(marker.payload), batch_id)
        # the stateful operator's state of the batch is committed only once the batch's
        # every partition ran (Spark checks): run it, writing nothing
        batch_df.write.format("noop").mode("overwrite").save()
        return
    frame_df = points_frame(batch_df, sink.plan, sink.features_snapshot(spark), sink.features)
    if sink.marketing:
        frame_df = consent_at_points(
            frame_df, sink.consent_history(spark), "marketing", sink.marketing_unknown_granted
        )
    flags_df = member_flags(sink.catalog, sink.segment_ids, frame_df, sink.marketing)
    flags = [
        (r.user_key, r.segment_id, r.t, bool(r.matched), bool(r.member))
        for r in flags_df.select("*", F.unix_micros("as_of").alias("t")).collect()
    ]
    lap("state_s")
    points = len({(f[0], f[2]) for f in flags})
    sink.stats.batches += 1
    sink.stats.points += points
    before = sink.store.scope_members(
        sink.scope.source, sink.scope.name, sorted({f[0] for f in flags})
    )
    changes, upserts, removes = transitions(flags, before, sink.versions, scope=sink.scope)
    lap("transitions_s")
    payload = json.dumps([_row_of(c) for c in changes], separators=(",", ":"))
    sink.store.apply_batch(
        sink.writer,
        batch_id,
        upserts,
        removes,
        source=sink.scope.source,
        scope=sink.scope.name,
        payload=payload,
    )
    lap("store_s")
    failpoint("stream.after_store")
    _append_changes(spark, sink, _rows_of(payload), batch_id)
    lap("changes_s")
    sink.stats.changes += len(changes)
    if changes and sink.on_changes is not None:
        counted = Counter((c.segment_id, c.change) for c in changes)
        sink.on_changes(batch_id, dict(counted))
    timing.update(points=points, changes=len(changes))
    sink.stats.timings.append(timing)


def _row_of(change: Transition) -> list:
    return [
        change.user_key,
        change.segment_id,
        change.change,
        change.reason,
        change.as_of,
        change.definition_version,
    ]


def _rows_of(payload: str | None) -> list[tuple]:
    return [tuple(row) for row in json.loads(payload or "[]")]


CHANGE_ROW = (
    "user_key string, segment_id string, change string, reason string, "
    "changed_at_us long, definition_version string"
)


def _append_changes(spark: SparkSession, sink: StreamSink, rows: list[tuple], batch_id: int):
    """Blind append of a micro-batch's change rows, at most once per (writer, batch id)."""
    if not rows:
        return
    rows_df = spark.createDataFrame(rows, CHANGE_ROW).select(
        "*",
        F.timestamp_micros("changed_at_us").alias("changed_at"),
        F.lit(sink.scope.source).alias("source"),
        F.lit(sink.scope.name).alias("scope"),
        F.lit(sink.run_id).alias("run_id"),
        F.current_timestamp().alias("recorded_at"),
    )
    (
        lake.conform(rows_df, lake.SEGMENT_CHANGES)
        .write.format("delta")
        .mode("append")
        .option("txnAppId", sink.writer)
        .option("txnVersion", batch_id)
        .save(lake.table_path(sink.root, lake.SEGMENT_CHANGES))
    )


def apply_history(changes_df: DataFrame, batch_id: int, *, sink: StreamSink) -> None:
    """The foreachBatch function of the history query (off the hot path): new change rows of
    the stream's scope -> one MERGE of the intervals in gold/segment_membership (keyed, so a
    replay changes nothing)."""
    rows_df = changes_df.filter(sink.scope.rows()).persist()
    try:
        if rows_df.limit(1).count():
            merge_intervals(
                changes_df.sparkSession,
                sink.root,
                sink.scope,
                history_diff(rows_df),
                run_id=sink.run_id,
            )
    finally:
        rows_df.unpersist()
