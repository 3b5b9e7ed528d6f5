"""Near-real-time rule segments with Structured Streaming (`microseg stream`).

One query: live events -> per-user state -> facts at evaluation points -> the same compiled
rules as the batch job -> enter / exit transitions MERGEd into gold/segment_changes and
gold/segment_membership (source "stream"). One sink, one checkpoint (`stream.checkpoint`).

Source. The segment query reads bronze/events as a Delta stream from its first version (so
the state is built from the whole history), `skipChangeCommits` on (deletes by a forget job
do not stop the stream). With stream.source kafka, a second query (checkpoint
`<stream.checkpoint>_kafka_ingest`) reads stream.kafka.topic with Spark's Kafka connector and
ingests each micro-batch into bronze/events and bronze/quarantine through the batch ingest's
validation (ingest.validate / ingest.write_classified; records are keyed
`kafka:<topic>/<partition>` and offset, so a replayed micro-batch adds nothing); the segment
query picks the new bronze commits up like any other.

Keys. user_key as in microseg.silver.sessions: user_id; else the user id the anonymous id is
stitched to in silver/identity_map (a broadcast stream-static join with the table as the Delta
reader sees it; without the table at the query start, no stitching until a restart); else
`anon:<anonymous_id>`. Limitation: events keyed before their anonymous id was stitched keep
their live state under `anon:<id>`; the batch job re-keys history, the stream does not.

Which segments. Those of `stream.segments`, default every segment that
SegmentCatalog.streaming_capable accepts and whose rule (with its ancestors') has at least one
event condition: a rule over snapshot features only changes when a new feature snapshot is
written, which the batch job publishes. Guards: exclusive groups apply among the streamed
segments of a group; `min_size` is a population-level guard and is not applied by the stream.

State per user_key (applyInPandasWithState, one JSON string): `clock`, the user's latest
evaluation point; per event-count fact, the times of its events still inside its window,
ascending, at most `cap` of them (cap = the largest at_least, or at_most + 1, of its
conditions: min(count, cap) decides every condition, and keeping the latest ones keeps that
exact as older events lapse); per `since_last` anchor, the time of the last anchor event
(counted times at or before it are dropped); per last-time fact, the latest time. All times
are integer microseconds. Counts without `within` never lapse; the state of a user is small
and is never removed (last-time facts are lifetime facts).

Clock: evaluation points in event time, per user. Facts as of a point P mean events strictly
before P, exactly as the batch job's as-of. A user is evaluated
* just after each distinct event time t of theirs: P = t + 1 microsecond (events of one
  instant together; an event older than the user's clock, i.e. out of order but not late, is
  evaluated at clock + 1 microsecond), and
* at each lapse L: the first instant a fact changes because time passed (an event leaving a
  `within` window at t + within + 1us; a `last ... within/older_than d` flipping at
  last + d + 1us). A lapse is evaluated when the user's next event is later, or when the
  watermark W (latest event time - `stream.watermark_delay`) reaches it: an event-time timer
  (GroupStateTimeout.EventTimeTimeout, millisecond precision) is set to fire as soon as
  W >= L, and then the point is L itself, not the watermark.
So the points, and hence changed_at, valid_from and valid_to, are event times that do not
depend on how the input was cut into micro-batches (given events of one user arrive in time
order), and at the end of the input each user's membership is the batch job's answer as of
max(their last event + 1us, W): with W past T and no events at or after T, that is the batch
job's as-of T.

Features: the latest snapshot of gold/user_features (its largest as_of), read at each
micro-batch and joined to the points; feature conditions compare the snapshot as it is.

Late events: rows older than the watermark are dropped by the stateful operator and counted by
Spark as `numRowsDroppedByWatermark` (query progress, `stateOperators`); run_stream reports
their sum. They are in bronze/events, so the next batch run (`microseg segments run`) uses
them.

Writing (write_batch, the foreachBatch function): the facts rows of a micro-batch become
per (user, segment, point) member flags; comparing each with the previous point (the first
with the stream's membership valid just before the user's first point of the batch) gives the
transitions. Then, in the order membership.write_membership uses, an insert-only MERGE of the
change rows keyed on (user_key, segment_id, source, changed_at, change), and one MERGE of the
intervals: an exit closes the open interval that began before it (`is_current` and
`valid_from < valid_to`), an enter inserts the interval [point, next exit) keyed on
(user_key, segment_id, source, valid_from). Replaying a micro-batch (after a crash the engine
re-runs the last uncommitted one with the same input and the restored state) computes the
same transitions, since "valid just before the first point" does not see the batch's own
rows, and both MERGEs find every key in place: nothing changes. The keys are event times, not
batch ids, so a new checkpoint that re-reads bronze from the start re-derives the same rows of
unchanged segments without duplicating them.

Changing the streamed segments (a rule, or the list) changes what the state must hold: the
checkpoint records the segments' versions (`microseg-segments.json`) and a query with other
versions refuses to start. Stop the stream, delete the source='stream' rows of the changed
segments from gold/segment_membership and gold/segment_changes, and start on a new
`stream.checkpoint`: it rebuilds the state from bronze/events.
"""

from __future__ import annotations

import bisect
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial

import pandas as pd
from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.streaming import StreamingQuery
from pyspark.sql.streaming.state import GroupState, GroupStateTimeout

from microseg.core import lake, progress
from microseg.core.config import Config, ConfigError
from microseg.features import snapshots
from microseg.ingest import files as ingest
from microseg.ingest.sources import load_source, records_of_lines
from microseg.segments import rules
from microseg.silver.sessions import user_key_of, with_user_key
from microseg.streaming.lifecycle import BatchGate, StatusSteps, stop_between_batches

SOURCE = "stream"
QUERY_NAME = "microseg_stream"
KAFKA_QUERY_NAME = "microseg_kafka_ingest"
STATE_STORES = {
    "hdfs": "org.apache.spark.sql.execution.streaming.state.HDFSBackedStateStoreProvider",
    "rocksdb": "org.apache.spark.sql.execution.streaming.state.RocksDBStateStoreProvider",
}


# --------------------------------------------------------------------------------------
# sources: each returns the live events in the canonical schema (schemas.EVENTS)


def delta_events(spark: SparkSession, cfg: Config) -> DataFrame:
    """bronze/events as a Delta stream, from its first version."""
    lake.ensure_table(spark, cfg.lake.root, lake.EVENTS)
    reader = spark.readStream.format("delta").option("skipChangeCommits", "true")
    if cfg.stream.max_files_per_trigger is not None:
        reader = reader.option("maxFilesPerTrigger", cfg.stream.max_files_per_trigger)
    return reader.load(lake.table_path(cfg.lake.root, lake.EVENTS))


# --------------------------------------------------------------------------------------
# Kafka: a second query ingests the topic into bronze (same validation as batch ingest)


def kafka_checkpoint_path(cfg: Config) -> str:
    """The Kafka ingest query's checkpoint: kafka_ingest/ beside the segment query's."""
    return checkpoint_path(cfg).rstrip("/") + "_kafka_ingest"


def kafka_lines(spark: SparkSession, cfg: Config) -> DataFrame:
    """The topic as text records: source_file `kafka:<topic>/<partition>`, source_line the
    offset, raw the record value (read_records' input shape)."""
    kafka = cfg.stream.kafka
    reader = (
        spark.readStream.format("kafka")
        .option("kafka.bootstrap.servers", kafka.bootstrap_servers)
        .option("subscribe", kafka.topic)
        .option("startingOffsets", kafka.starting_offsets)
        # retention deleting unread records is data loss: fail loudly, never skip silently
        .option("failOnDataLoss", "true")
    )
    if kafka.max_offsets_per_trigger is not None:
        reader = reader.option("maxOffsetsPerTrigger", kafka.max_offsets_per_trigger)
    for key, value in kafka.options.items():
        reader = reader.option(key, value)
    return reader.load().select(
        F.format_string("kafka:%s/%d", "topic", "partition").alias("source_file"),
        F.col("offset").alias("source_line"),
        F.col("value").cast("string").alias("raw"),
    )


@dataclass
class IngestStats:
    """Counts over the Kafka micro-batches ingested by this process."""

    batches: int = 0
    records: int = 0
    events_added: int = 0
    already_present: int = 0  # a replayed micro-batch: its records are in bronze already
    quarantined: int = 0


def ingest_kafka_batch(
    lines_df: DataFrame, batch_id: int, *, cfg: Config, mapping, stats: IngestStats
) -> None:
    """The Kafka query's foreachBatch function: validate the records as `microseg ingest`
    does and write bronze/quarantine, then bronze/events, insert-only by record and event id,
    so a replayed micro-batch adds nothing."""
    spark = lines_df.sparkSession
    clock = datetime.now(timezone.utc)
    now = clock.replace(microsecond=clock.microsecond // 1000 * 1000)
    records_df = records_of_lines(lines_df, mapping)
    classified_df = ingest.validate(spark, cfg, records_df, mapping=mapping, now=now).persist()
    try:
        counts = {r.outcome: r["count"] for r in classified_df.groupBy("outcome").count().collect()}
        stats.batches += 1
        stats.records += sum(counts.values())
        stats.events_added += counts.get("new", 0)
        stats.already_present += counts.get("present", 0)
        stats.quarantined += counts.get("quarantined", 0)
        if counts.get("new") or counts.get("quarantined"):
            ingest.write_classified(
                spark,
                cfg.lake.root,
                classified_df,
                source=mapping.name,
                run_id=f"kafka-{cfg.stream.kafka.topic}-{batch_id:06d}",
                now=now,
            )
    finally:
        classified_df.unpersist()


def start_kafka_ingest(
    spark: SparkSession,
    cfg: Config,
    *,
    available_now: bool,
    stats: IngestStats,
    gate: BatchGate | None = None,
) -> StreamingQuery:
    """Start the query that ingests stream.kafka.topic into bronze (its own checkpoint);
    `gate`: one to stop it between micro-batches with (streaming.lifecycle)."""
    mapping = load_source(cfg.ingest.sources_dir, cfg.stream.kafka.mapping)
    if mapping.format == "parquet":
        raise ConfigError(
            f"stream.kafka.mapping: source '{mapping.name}' reads parquet files; Kafka record "
            "values must be json or csv text"
        )
    for table in (lake.EVENTS, lake.QUARANTINE):
        lake.ensure_table(spark, cfg.lake.root, table)
    # mapping problems (e.g. personal fields without a key) now, not in the first micro-batch
    empty_df = spark.createDataFrame([], "source_file string, source_line long, raw string")
    ingest.validate(
        spark,
        cfg,
        records_of_lines(empty_df, mapping),
        mapping=mapping,
        now=datetime.now(timezone.utc),
    )
    writer = (
        kafka_lines(spark, cfg)
        .writeStream.queryName(KAFKA_QUERY_NAME)
        .option("checkpointLocation", kafka_checkpoint_path(cfg))
        .foreachBatch(
            (gate or BatchGate()).wrap(
                partial(ingest_kafka_batch, cfg=cfg, mapping=mapping, stats=stats)
            )
        )
    )
    return _with_trigger(writer, cfg, available_now).start()


def _with_trigger(writer, cfg: Config, available_now: bool):
    if available_now:
        return writer.trigger(availableNow=True)
    seconds = cfg.stream.trigger_interval.total_seconds()
    return writer.trigger(processingTime=f"{int(seconds * 1000)} milliseconds")


# --------------------------------------------------------------------------------------
# which segments, and what the state must keep for them


def streamed_segments(catalog: rules.SegmentCatalog, chosen: tuple[str, ...] | None) -> list[str]:
    """Ids of the segments the stream keeps, in catalog order (see the module docstring)."""
    if chosen is not None:
        problems = []
        for segment_id in chosen:
            if segment_id not in catalog.ids():
                problems.append(f"stream.segments: unknown segment '{segment_id}'")
                continue
            capable, why = catalog.streaming_capable(segment_id)
            if not capable:
                problems.append(f"stream.segments: '{segment_id}' cannot be streamed: {why}")
        if problems:
            raise ConfigError("; ".join(problems))
        return [s for s in catalog.ids() if s in chosen]
    return [
        s.id
        for s in catalog.segments
        if catalog.streaming_capable(s.id)[0]
        and any(rules.facts_of(c.condition) for c in catalog.chain(s.id))
    ]


@dataclass(frozen=True)
class CountPlan:
    name: str  # the fact's column name (rules.EventCount.name)
    types: tuple[str, ...] | None
    within: int | None  # microseconds
    anchor: str | None  # key of the since_last anchor
    cap: int


@dataclass(frozen=True)
class LastPlan:
    name: str  # rules.LastTime.name
    types: tuple[str, ...] | None
    lapses: tuple[int, ...]  # durations d (us): a condition flips at last + d + 1us


@dataclass(frozen=True)
class FactPlan:
    counts: tuple[CountPlan, ...]
    lasts: tuple[LastPlan, ...]
    anchors: tuple[tuple[str, tuple[str, ...] | None], ...]

    def names(self) -> list[str]:
        return [c.name for c in self.counts] + [x.name for x in self.lasts]


def _micros(delta) -> int:
    return round(delta.total_seconds() * 1_000_000)


def _conditions(condition: rules.Condition) -> Iterator[rules.Condition]:
    yield condition
    for child in rules._children(condition):
        yield from _conditions(child)


def fact_plan(catalog: rules.SegmentCatalog, segment_ids: list[str]) -> FactPlan:
    """What the state keeps for the facts of the segments' rules (and their ancestors')."""
    caps: dict[rules.EventCount, int] = {}
    lapses: dict[rules.LastTime, set[int]] = {}
    seen: set[str] = set()
    for segment_id in segment_ids:
        for segment in catalog.chain(segment_id):
            if segment.id in seen:
                continue
            seen.add(segment.id)
            for condition in _conditions(segment.condition):
                if isinstance(condition, rules.EventCondition):
                    bounds = [condition.at_least or 0]
                    if condition.at_most is not None:
                        bounds.append(condition.at_most + 1)
                    caps[condition.fact] = max(caps.get(condition.fact, 1), *bounds)
                elif isinstance(condition, rules.LastCondition):
                    durations = lapses.setdefault(condition.fact, set())
                    for d in (condition.within, condition.older_than):
                        if d is not None:
                            durations.add(_micros(d))
    anchors = sorted({f.since_last for f in caps if f.since_last}, key=repr)
    anchor_keys = {types: f"a{i}" for i, types in enumerate(anchors)}
    return FactPlan(
        counts=tuple(
            CountPlan(
                name=f.name,
                types=f.types,
                within=None if f.within is None else _micros(f.within),
                anchor=anchor_keys[f.since_last] if f.since_last else None,
                cap=cap,
            )
            for f, cap in sorted(caps.items(), key=lambda item: item[0].name)
        ),
        lasts=tuple(
            LastPlan(name=f.name, types=f.types, lapses=tuple(sorted(ds)))
            for f, ds in sorted(lapses.items(), key=lambda item: item[0].name)
        ),
        anchors=tuple((key, types) for types, key in anchor_keys.items()),
    )


# --------------------------------------------------------------------------------------
# the per-user state machine (plain Python over integer microseconds)


def _matches(types: tuple[str, ...] | None, event_type: str) -> bool:
    return types is None or event_type in types


@dataclass
class UserState:
    clock: int | None = None
    times: dict[str, list[int]] = field(default_factory=dict)  # count fact -> ascending times
    anchors: dict[str, int] = field(default_factory=dict)
    lasts: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {"clock": self.clock, "n": self.times, "a": self.anchors, "l": self.lasts},
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> UserState:
        data = json.loads(text)
        return cls(data["clock"], data["n"], data["a"], data["l"])


def apply_event(plan: FactPlan, state: UserState, event_type: str, t: int) -> None:
    for key, types in plan.anchors:
        if _matches(types, event_type) and t > state.anchors.get(key, t - 1):
            state.anchors[key] = t
    for count in plan.counts:
        times = state.times.setdefault(count.name, [])
        if count.anchor is not None:
            anchor = state.anchors.get(count.anchor)
            if anchor is None:
                continue  # no anchor yet: nothing counts (the fact is null)
            if times and times[0] <= anchor:
                times[:] = [x for x in times if x > anchor]
            if t <= anchor:
                continue
        if _matches(count.types, event_type):
            bisect.insort(times, t)
            if len(times) > count.cap:
                del times[: len(times) - count.cap]
    for last in plan.lasts:
        if _matches(last.types, event_type) and t > state.lasts.get(last.name, t - 1):
            state.lasts[last.name] = t


def fact_values(plan: FactPlan, state: UserState, point: int) -> list[int | None]:
    """Every fact as of `point` (events strictly before it), in plan.names() order."""
    values: list[int | None] = []
    for count in plan.counts:
        if count.anchor is not None and count.anchor not in state.anchors:
            values.append(None)
            continue
        times = state.times.get(count.name, [])
        start = bisect.bisect_left(times, point - count.within) if count.within is not None else 0
        values.append(bisect.bisect_left(times, point) - start)
    values.extend(state.lasts.get(last.name) for last in plan.lasts)
    return values


def next_lapse(plan: FactPlan, state: UserState) -> int | None:
    """The first instant after the clock at which a fact changes with no new event."""
    clock = state.clock
    if clock is None:
        return None
    candidates = []
    for count in plan.counts:
        if count.within is None:
            continue
        times = state.times.get(count.name, [])
        # an event at x is inside [P - within, P) up to P = x + within
        i = bisect.bisect_left(times, clock - count.within)
        if i < len(times):
            candidates.append(times[i] + count.within + 1)
    for last in plan.lasts:
        t = state.lasts.get(last.name)
        if t is not None:
            candidates += [t + d + 1 for d in last.lapses if t + d + 1 > clock]
    return min(candidates) if candidates else None


def _prune(plan: FactPlan, state: UserState) -> None:
    for count in plan.counts:
        times = state.times.get(count.name)
        if count.within is not None and times and state.clock is not None:
            keep = bisect.bisect_left(times, state.clock - count.within)
            if keep:
                del times[:keep]


def advance(
    plan: FactPlan,
    state: UserState,
    events: list[tuple[int, str]],
    watermark: int | None,
) -> list[tuple[int, list[int | None]]]:
    """Apply new events (t, event_type) and return the evaluation points (point, facts) in
    time order: lapses before each event, just after each event time, and lapses up to the
    watermark (all in microseconds; see the module docstring)."""
    events = sorted(events)
    out: list[tuple[int, list[int | None]]] = []

    def evaluate(point: int) -> None:
        state.clock = point
        out.append((point, fact_values(plan, state, point)))
        _prune(plan, state)

    i = 0
    while True:
        lapse = next_lapse(plan, state)
        if i < len(events):
            t = events[i][0]
            if lapse is not None and lapse <= t:
                evaluate(lapse)
                continue
            while i < len(events) and events[i][0] == t:
                apply_event(plan, state, events[i][1], t)
                i += 1
            evaluate(t + 1 if state.clock is None else max(t + 1, state.clock + 1))
        elif lapse is not None and watermark is not None and lapse <= watermark:
            evaluate(lapse)
        else:
            return out


def timer_ms(lapse: int) -> int:
    """The event-time timeout (ms) that fires exactly when the watermark reaches `lapse` (us):
    Spark fires a timeout t once the watermark (ms) is past t."""
    return -(-lapse // 1000) - 1


# --------------------------------------------------------------------------------------
# the streaming query


def facts_schema(plan: FactPlan) -> T.StructType:
    return T.StructType(
        [T.StructField("user_key", T.StringType()), T.StructField("point", T.LongType())]
        + [T.StructField(name, T.LongType()) for name in plan.names()]
    )


def _advance_group(
    plan: FactPlan, key: tuple, frames: Iterator[pd.DataFrame], group: GroupState
) -> Iterator[pd.DataFrame]:
    state = UserState.from_json(group.get[0]) if group.exists else UserState()
    events: list[tuple[int, str]] = []
    for frame in frames:
        events.extend(zip(frame["t"].tolist(), frame["event_type"].tolist(), strict=True))
    watermark_ms = group.getCurrentWatermarkMs()
    points = advance(plan, state, events, watermark_ms * 1000 if watermark_ms > 0 else None)
    group.update((state.to_json(),))
    lapse = next_lapse(plan, state)
    if lapse is not None:
        group.setTimeoutTimestamp(timer_ms(lapse))
    if points:
        columns = ["user_key", "point", *plan.names()]
        rows = [(key[0], point, *values) for point, values in points]
        # object columns of ints and None: Arrow makes them bigint with nulls, and this is
        # ~15x cheaper per user than nullable Int64 columns (it runs once per user and batch)
        yield pd.DataFrame(rows, columns=columns, dtype=object)


def keyed_events(events_df: DataFrame, identity_df: DataFrame | None) -> DataFrame:
    """user_key, event_time, event_type of events with a key (see the module docstring)."""
    if identity_df is None:
        keyed_df = events_df.withColumn(
            "user_key",
            user_key_of(F.col("user_id"), F.col("anonymous_id"), F.lit(None).cast("string")),
        )
    else:
        keyed_df = with_user_key(events_df, identity_df, broadcast=True)
    return keyed_df.filter(F.col("user_key").isNotNull()).select(
        "user_key", "event_time", "event_type"
    )


def live_facts(keyed_df: DataFrame, plan: FactPlan, *, watermark_delay_ms: int) -> DataFrame:
    """Per user and evaluation point: user_key, point (us), one column per fact (us for
    last times), from a streaming frame of keyed events."""
    return (
        keyed_df.withWatermark("event_time", f"{watermark_delay_ms} milliseconds")
        .select("user_key", "event_time", F.unix_micros("event_time").alias("t"), "event_type")
        .groupBy("user_key")
        .applyInPandasWithState(
            partial(_advance_group, plan),
            facts_schema(plan),
            "state string",
            "append",
            GroupStateTimeout.EventTimeTimeout,
        )
    )


def checkpoint_path(cfg: Config) -> str:
    """stream.checkpoint, else <lake root>/_checkpoints/stream."""
    if cfg.stream.checkpoint:
        return cfg.stream.checkpoint
    base = lake.table_path(cfg.lake.root, lake.EVENTS).rsplit("/bronze/", 1)[0]
    return f"{base}/_checkpoints/stream"


SEGMENTS_FILE = "microseg-segments.json"


def check_checkpoint(
    spark: SparkSession, checkpoint: str, catalog: rules.SegmentCatalog, segment_ids: list[str]
) -> None:
    """Record the streamed segments' versions in a new checkpoint; refuse one that was made
    for other versions (its state holds the facts of those rules)."""
    wanted = {sid: catalog.version(sid) for sid in segment_ids}
    jvm = spark.sparkContext._jvm
    path = jvm.org.apache.hadoop.fs.Path(f"{checkpoint}/{SEGMENTS_FILE}")
    fs = path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())
    if fs.exists(path):
        text = spark.read.text(str(path), wholetext=True).first()[0]
        recorded = json.loads(text)["segments"]
        if recorded != wanted:
            raise ConfigError(
                f"stream checkpoint {checkpoint} was made for other segments or rules "
                f"({_describe(recorded, wanted)}): its state does not fit them. Start on a new "
                "stream.checkpoint (see microseg.streaming.query on the stream's rows to delete "
                "first)"
            )
        return
    out = fs.create(path, False)
    try:
        out.write(bytearray(json.dumps({"segments": wanted}, indent=2).encode()))
    finally:
        out.close()


def _describe(recorded: dict[str, str], wanted: dict[str, str]) -> str:
    parts = [f"'{s}' added" for s in wanted if s not in recorded]
    parts += [f"'{s}' removed" for s in recorded if s not in wanted]
    parts += [f"'{s}' changed" for s in wanted if s in recorded and recorded[s] != wanted[s]]
    return ", ".join(parts)


# --------------------------------------------------------------------------------------
# one micro-batch: facts -> member flags -> transitions -> MERGE (idempotent)


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
    catalog: rules.SegmentCatalog
    segment_ids: list[str]
    plan: FactPlan
    run_prefix: str
    features: dict[str, str] = field(default_factory=dict)  # name -> kind, rules may use
    stats: BatchStats = field(default_factory=BatchStats)
    # called after a micro-batch with changes is written: (batch id, {(segment, change): n})
    on_changes: Callable[[int, dict[tuple[str, str], int]], None] | None = None


def stream_sink(
    spark: SparkSession,
    cfg: Config,
    catalog: rules.SegmentCatalog,
    segment_ids: list[str],
) -> StreamSink:
    """The sink of a query over `segment_ids`, its tables created if they do not exist."""
    for table in (lake.SEGMENT_MEMBERSHIP, lake.SEGMENT_CHANGES):
        lake.ensure_table(spark, cfg.lake.root, table)
    prefix = "stream-" + datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    return StreamSink(
        root=cfg.lake.root,
        catalog=catalog,
        segment_ids=segment_ids,
        plan=fact_plan(catalog, segment_ids),
        run_prefix=f"{prefix}-{uuid.uuid4().hex[:6]}",
        features=rules.available_features(cfg),
    )


def member_flags(
    catalog: rules.SegmentCatalog, segment_ids: list[str], frame_df: DataFrame
) -> DataFrame:
    """user_key, as_of, segment_id, matched (the rule holds), member (matched and not outranked
    in its exclusive group among the streamed segments): one row per point and segment."""
    matched = {
        sid: rules.segment_condition(catalog, sid, F.col("as_of")).alias(sid) for sid in segment_ids
    }
    flags_df = frame_df.select("user_key", "as_of", *matched.values())
    winners = rules.exclusive_winners([catalog[sid] for sid in segment_ids], lambda sid: sid)
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
    transition in this batch)."""
    firsts_df = flags_df.groupBy("user_key").agg(F.min("as_of").alias("_first"))
    before_df = (
        membership_df.filter(F.col("source") == SOURCE)
        .join(F.broadcast(firsts_df), on="user_key")
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


def insert_changes(
    spark: SparkSession, root: str, transitions_df: DataFrame, *, run_id: str
) -> None:
    """Insert the change rows whose key (user_key, segment_id, source, changed_at, change) is
    not in gold/segment_changes yet: a replayed micro-batch inserts nothing."""
    changes_df = lake.conform(
        transitions_df.select(
            "user_key",
            "segment_id",
            F.lit(SOURCE).alias("source"),
            "change",
            "reason",
            F.col("as_of").alias("changed_at"),
            "definition_version",
            F.lit(run_id).alias("run_id"),
            F.current_timestamp().alias("recorded_at"),
        ),
        lake.SEGMENT_CHANGES,
    )
    earliest = transitions_df.agg(F.min("as_of")).first()[0]
    keys = ("user_key", "segment_id", "source", "changed_at", "change")
    condition = " AND ".join(f"t.{k} = s.{k}" for k in keys)
    # a literal bound on the target lets Delta skip the files of older changes
    condition += f" AND t.changed_at >= TIMESTAMP '{earliest.isoformat(sep=' ')}'"
    (
        DeltaTable.forPath(spark, lake.table_path(root, lake.SEGMENT_CHANGES))
        .alias("t")
        .merge(changes_df.alias("s"), condition)
        .whenNotMatchedInsertAll()
        .execute()
    )


def merge_intervals(
    spark: SparkSession, root: str, transitions_df: DataFrame, *, run_id: str
) -> None:
    actions_df = transitions_df.filter((F.col("change") == "enter") | F.col("first")).select(
        "user_key",
        "segment_id",
        "definition_version",
        F.when(F.col("change") == "enter", "open").otherwise("close").alias("_action"),
        F.when(F.col("change") == "enter", F.col("as_of")).alias("valid_from"),
        F.when(F.col("change") == "enter", F.col("next_as_of"))
        .otherwise(F.col("as_of"))
        .alias("valid_to"),
    )
    target = DeltaTable.forPath(spark, lake.table_path(root, lake.SEGMENT_MEMBERSHIP))
    (
        target.alias("t")
        .merge(
            actions_df.alias("s"),
            f"t.source = '{SOURCE}' AND t.user_key = s.user_key "
            "AND t.segment_id = s.segment_id AND ("
            "(s._action = 'close' AND t.is_current AND t.valid_from < s.valid_to) "
            "OR (s._action = 'open' AND t.valid_from = s.valid_from))",
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
                "source": F.lit(SOURCE),
                "definition_version": "s.definition_version",
                "score": F.lit(None).cast("double"),
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
        membership_df = lake.read_table(spark, sink.root, lake.SEGMENT_MEMBERSHIP)
        versions = {sid: sink.catalog.version(sid) for sid in sink.segment_ids}
        transitions_df = transitions(
            member_flags(sink.catalog, sink.segment_ids, frame_df), membership_df, versions
        ).persist()
        try:
            changes = transitions_df.count()
            lap("transitions_s")
            sink.stats.changes += changes
            if changes:
                run_id = f"{sink.run_prefix}-{batch_id:06d}"
                insert_changes(spark, sink.root, transitions_df, run_id=run_id)
                lap("changes_s")
                merge_intervals(spark, sink.root, transitions_df, run_id=run_id)
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


# --------------------------------------------------------------------------------------
# entry points


@dataclass
class StreamReport:
    query_id: str
    run_id: str
    segments: list[str]
    batches: int
    input_rows: int
    points: int
    changes: int
    late_events: int  # dropped by the watermark (in bronze; the next batch run uses them)
    kafka: IngestStats | None = None  # stream.source kafka: what the ingest query wrote


def _load(spark: SparkSession, cfg: Config, path: str | None):
    catalog = rules.load_segments(cfg, path)
    segment_ids = streamed_segments(catalog, cfg.stream.segments)
    if not segment_ids:
        raise ConfigError(f"{catalog.path}: no segment the stream can keep (stream.segments)")
    return catalog, segment_ids


def start_stream(
    spark: SparkSession,
    cfg: Config,
    *,
    available_now: bool = False,
    path: str | None = None,
    sink: StreamSink | None = None,
    gate: BatchGate | None = None,
) -> StreamingQuery:
    """Start the query; available_now processes what is in the source, then stops.

    `path`: the segment file (default segments.file); `sink`: a stream_sink(...) to keep,
    e.g. to read its stats; `gate`: one to stop it between micro-batches with."""
    root = cfg.lake.root
    if sink is None:
        catalog, segment_ids = _load(spark, cfg, path)
        sink = stream_sink(spark, cfg, catalog, segment_ids)
    check_checkpoint(spark, checkpoint_path(cfg), sink.catalog, sink.segment_ids)
    identity_df = (
        lake.read_table(spark, root, lake.IDENTITY_MAP)
        if lake.table_exists(spark, root, lake.IDENTITY_MAP)
        else None
    )
    events_df = delta_events(spark, cfg)
    facts_df = live_facts(
        keyed_events(events_df, identity_df),
        sink.plan,
        watermark_delay_ms=_micros(cfg.stream.watermark_delay) // 1000,
    )
    writer = (
        facts_df.writeStream.queryName(QUERY_NAME)
        .option("checkpointLocation", checkpoint_path(cfg))
        .foreachBatch((gate or BatchGate()).wrap(partial(write_batch, sink=sink)))
    )
    writer = _with_trigger(writer, cfg, available_now)
    # The query copies the session's settings when it starts; the first run of a checkpoint
    # records the state partitions and store there, and later runs keep them.
    settings = {
        "spark.sql.shuffle.partitions": str(cfg.stream.state_partitions),
        "spark.sql.streaming.stateStore.providerClass": STATE_STORES[cfg.stream.state_store],
    }
    previous = {key: spark.conf.get(key, None) for key in settings}
    for key, value in settings.items():
        spark.conf.set(key, value)
    try:
        return writer.start()
    finally:
        for key, value in previous.items():
            if value is None:
                spark.conf.unset(key)
            else:
                spark.conf.set(key, value)


def _progress_sum(query: StreamingQuery) -> tuple[int, int]:
    """(input rows, rows dropped by the watermark) over the query's recent progress."""
    rows = late = 0
    for update in query.recentProgress:
        data = update if isinstance(update, dict) else json.loads(update.json)
        rows += int(data.get("numInputRows") or 0)
        for operator in data.get("stateOperators") or []:
            late += int(operator.get("numRowsDroppedByWatermark") or 0)
    return rows, late


def run_stream(
    spark: SparkSession,
    cfg: Config,
    *,
    available_now: bool = False,
    timeout: float | None = None,
    path: str | None = None,
    on_changes: Callable[[int, dict[tuple[str, str], int]], None] | None = None,
) -> StreamReport:
    """Run the query until it ends (available_now: when the source is drained) or `timeout`
    seconds pass, then stop it after its running micro-batch (streaming.lifecycle); a failure
    in the query is raised here.

    With stream.source kafka the Kafka ingest query runs too: alongside, or (available_now)
    first, so that the segment query then sees everything the topic held."""
    catalog, segment_ids = _load(spark, cfg, path)
    sink = stream_sink(spark, cfg, catalog, segment_ids)
    sink.on_changes = on_changes
    deadline = None if timeout is None else time.monotonic() + timeout
    queries: list[StreamingQuery] = []
    gate = BatchGate()
    kafka_stats = None
    try:
        if cfg.stream.source == "kafka":
            kafka_stats = IngestStats()
            progress.step("ingesting the Kafka topic")
            queries.append(
                start_kafka_ingest(
                    spark, cfg, available_now=available_now, stats=kafka_stats, gate=gate
                )
            )
            if available_now:
                _await(queries[0], deadline)
        progress.step("starting the query")
        query = start_stream(spark, cfg, available_now=available_now, sink=sink, gate=gate)
        queries.append(query)
        if available_now:
            progress.step("processing what bronze/events holds")
            _await(query, deadline)
        else:
            _await_any(spark, queries, deadline)
    finally:
        stop_between_batches(queries, gate)
    rows, late = _progress_sum(query)
    return StreamReport(
        query_id=str(query.id),
        run_id=str(query.runId),
        segments=segment_ids,
        batches=sink.stats.batches,
        input_rows=rows,
        points=sink.stats.points,
        changes=sink.stats.changes,
        late_events=late,
        kafka=kafka_stats,
    )


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(deadline - time.monotonic(), 0.001)


def _await(query: StreamingQuery, deadline: float | None) -> None:
    """Wait for the query to end or the deadline; raises the query's failure."""
    left = _left(deadline)
    if left is None:
        query.awaitTermination()
    else:
        query.awaitTermination(left)


def _await_any(spark: SparkSession, queries: list[StreamingQuery], deadline: float | None) -> None:
    """Wait until one of the queries ends (a failure is raised) or the deadline passes;
    meanwhile the last query's status is the progress step."""
    steps = StatusSteps()
    while any(q.isActive for q in queries):
        left = _left(deadline)
        if left is not None and left <= 0.001:
            return
        spark.streams.resetTerminated()
        if spark.streams.awaitAnyTermination(min(left or 1.0, 1.0)):
            for q in queries:
                if q.exception() is not None:
                    raise q.exception()
            return
        steps.update(queries[-1])
