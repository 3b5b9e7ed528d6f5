"""Near-real-time rule segments with Structured Streaming (`microseg stream`).

The segment query: live events -> per-user state -> facts at evaluation points -> the same
compiled rules as the batch job -> enter / exit transitions -> the online store (one
transaction with the batch marker) and gold/segment_changes (one blind append, Delta
txnAppId/txnVersion); source "stream", checkpoint `stream.checkpoint`. The history query
(checkpoint `<stream.checkpoint>_history`, every stream.history_interval) reads the change
rows as a Delta stream and MERGEs the intervals of gold/segment_membership, off the hot path.

Source. With stream.source delta the segment query reads bronze/events as a Delta stream from
its first version (so the state is built from the whole history), `skipChangeCommits` on
(deletes by a forget job do not stop the stream). With stream.source kafka it reads
stream.kafka.topic itself (streaming.kafka.kafka_events: parsed and checked as `microseg
ingest` does, invalid records left out, a repeated event_id dropped within the watermark),
and a second query (checkpoint `<stream.checkpoint>_kafka_ingest`) ingests the same records
into bronze/events and bronze/quarantine alongside, through the batch ingest's validation
(ingest.validate / ingest.write_classified; records are keyed `kafka:<topic>/<partition>` and
offset, so a replayed micro-batch adds nothing). The checkpoint records its source: a query
over the other source refuses to start on it.

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

State per user_key (stream.state_api: transformWithState by default, a value state holding
the JSON and the registered timer; or applyInPandasWithState, the JSON alone): `clock`, the
user's latest evaluation point; per event-count fact, the times of its events still inside
its window, ascending, at most `cap` of them (cap = the largest at_least, or at_most + 1, of its
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
  (millisecond precision) is set to fire as soon as W >= L, and then the point is L itself,
  not the watermark.
So the points, and hence changed_at, valid_from and valid_to, are event times that do not
depend on how the input was cut into micro-batches (given events of one user arrive in time
order), and at the end of the input each user's membership is the batch job's answer as of
max(their last event + 1us, W): with W past T and no events at or after T, that is the batch
job's as-of T.

Features: the latest snapshot of gold/user_features (its largest as_of), cached until the
table has a new version, joined to the points; feature conditions compare the snapshot as
it is.

Late events: rows older than the watermark are dropped by the stateful operator and counted by
Spark as `numRowsDroppedByWatermark` (query progress, `stateOperators`); run_stream reports
their sum. They are in bronze/events, so the next batch run (`microseg segments run`) uses
them.

Writing: streaming.sink.write_batch (the hot path: no MERGE, no read of the membership
table; transitions against the store's current members; replays are recognized by the store's
batch marker) and streaming.sink.apply_history (the history query's MERGE, keyed, so a replay
changes nothing). The change rows' keys are event times, not batch ids, so a new checkpoint
that re-reads bronze from the start re-derives the same rows of unchanged segments.

Changing the streamed segments (a rule, or the list) changes what the state must hold: the
checkpoint records the segments' versions, its writer id and its state API
(`microseg-segments.json`), and a query with other versions refuses to start. A new
`stream.checkpoint` rebuilds the stream's rows: its first start deletes the scope's
source='stream' rows from gold/segment_membership, gold/segment_changes and the store, and
the state is rebuilt from bronze/events.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.streaming import StreamingQuery

from microseg.core import lake, progress
from microseg.core.config import Config, ConfigError
from microseg.core.spark import session_conf
from microseg.segments.parse import load_segments
from microseg.streaming import lifecycle
from microseg.streaming.checkpoint import (
    check_checkpoint,
    checkpoint_path,
    history_checkpoint_path,
)
from microseg.streaming.kafka import IngestStats, kafka_events, start_kafka_ingest, with_trigger
from microseg.streaming.lifecycle import BatchGate, StatusSteps, stop_between_batches
from microseg.streaming.sink import StreamSink, apply_history, stream_sink, write_batch
from microseg.streaming.state import keyed_events, live_facts, micros, streamed_segments

QUERY_NAME = "microseg_stream"
HISTORY_QUERY_NAME = "microseg_stream_history"
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
    catalog = load_segments(cfg, path)
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
    info = check_checkpoint(
        spark,
        checkpoint_path(cfg),
        sink.catalog,
        sink.segment_ids,
        state_api=cfg.stream.state_api,
        source=cfg.stream.source,
    )
    sink.writer = info.writer
    if info.is_new:
        reset_stream_rows(spark, cfg, sink)
    identity_df = (
        lake.read_table(spark, root, lake.IDENTITY_MAP)
        if lake.table_exists(spark, root, lake.IDENTITY_MAP)
        else None
    )
    delay_ms = micros(cfg.stream.watermark_delay) // 1000
    if cfg.stream.source == "kafka":
        # the topic itself (its events watermarked and deduplicated), not bronze's commits
        events_df = kafka_events(spark, cfg, watermark_delay_ms=delay_ms)
        delay_ms = None
    else:
        events_df = delta_events(spark, cfg)
    facts_df = live_facts(
        keyed_events(events_df, identity_df),
        sink.plan,
        watermark_delay_ms=delay_ms,
        state_api=info.state_api,
    )
    writer = (
        facts_df.writeStream.queryName(QUERY_NAME)
        .option("checkpointLocation", checkpoint_path(cfg))
        .foreachBatch((gate or BatchGate()).wrap(partial(write_batch, sink=sink)))
    )
    writer = with_trigger(writer, cfg, available_now)
    # The query copies the session's settings when it starts; the first run of a checkpoint
    # records the state partitions and store there, and later runs keep them.
    settings = {
        "spark.sql.shuffle.partitions": str(cfg.stream.state_partitions),
        "spark.sql.streaming.stateStore.providerClass": STATE_STORES[cfg.stream.state_store],
        # RocksDB: commit a changelog per micro-batch, a full snapshot only now and then
        "spark.sql.streaming.stateStore.rocksdb.changelogCheckpointing.enabled": "true",
    }
    with session_conf(spark, settings):
        return writer.start()


def reset_stream_rows(spark: SparkSession, cfg: Config, sink: StreamSink) -> None:
    """A new checkpoint rebuilds the stream's rows from bronze/events: delete the scope's
    rows from the history tables and the store, and the history query's checkpoint."""
    for table in (lake.SEGMENT_CHANGES, lake.SEGMENT_MEMBERSHIP):
        if lake.read_table(spark, cfg.lake.root, table).filter(sink.scope.rows()).limit(1).count():
            lake.ensure_table(spark, cfg.lake.root, table).delete(sink.scope.rows())
    sink.store.reset_scope(sink.scope.source, sink.scope.name, sink.segment_ids, sink.writer)
    jvm = spark.sparkContext._jvm
    path = jvm.org.apache.hadoop.fs.Path(history_checkpoint_path(cfg))
    fs = path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())
    if fs.exists(path):
        fs.delete(path, True)


def start_history(
    spark: SparkSession,
    cfg: Config,
    sink: StreamSink,
    *,
    available_now: bool,
    gate: BatchGate | None = None,
) -> StreamingQuery:
    """Start the history query: the stream's change rows (gold/segment_changes as a Delta
    stream) -> intervals of gold/segment_membership, every stream.history_interval."""
    reader = spark.readStream.format("delta").option("skipChangeCommits", "true")
    writer = (
        reader.load(lake.table_path(cfg.lake.root, lake.SEGMENT_CHANGES))
        .writeStream.queryName(HISTORY_QUERY_NAME)
        .option("checkpointLocation", history_checkpoint_path(cfg))
        .foreachBatch((gate or BatchGate()).wrap(partial(apply_history, sink=sink)))
    )
    if available_now:
        return writer.trigger(availableNow=True).start()
    seconds = cfg.stream.history_interval.total_seconds()
    return writer.trigger(processingTime=f"{int(seconds * 1000)} milliseconds").start()


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
    run_id: str | None = None,
) -> StreamReport:
    """Run the query until it ends (available_now: when the source is drained) or `timeout`
    seconds pass, then stop it after its running micro-batch (streaming.lifecycle); a failure
    in the query is raised here.

    With stream.source kafka the Kafka ingest query runs too: alongside, or (available_now)
    first, so that the segment query then sees everything the topic held."""
    catalog, segment_ids = _load(spark, cfg, path)
    sink = stream_sink(spark, cfg, catalog, segment_ids, run_id=run_id)
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
                    spark,
                    cfg,
                    available_now=available_now,
                    stats=kafka_stats,
                    run_id=sink.run_id,
                    gate=gate,
                )
            )
            if available_now:
                await_query(queries[0], deadline)
        progress.step("starting the query")
        query = start_stream(spark, cfg, available_now=available_now, sink=sink, gate=gate)
        queries.append(query)
        if available_now:
            progress.step("processing what bronze/events holds")
            await_query(query, deadline)
            progress.step("writing the membership intervals")
            history = start_history(spark, cfg, sink, available_now=True, gate=gate)
            queries.append(history)
            await_query(history, deadline)
        else:
            queries.append(start_history(spark, cfg, sink, available_now=False, gate=gate))
            # SIGTERM (lifecycle.stop_requested) or Ctrl-C: stop as at the timeout, and report
            with contextlib.suppress(KeyboardInterrupt):
                await_any(spark, queries, deadline, status_of=query)
    finally:
        stop_between_batches(queries, gate)
        sink.close()
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


def await_query(query: StreamingQuery, deadline: float | None) -> None:
    """Wait for the query to end or the deadline; raises the query's failure."""
    left = _left(deadline)
    if left is None:
        query.awaitTermination()
    else:
        query.awaitTermination(left)


def await_any(
    spark: SparkSession,
    queries: list[StreamingQuery],
    deadline: float | None,
    *,
    status_of: StreamingQuery,
) -> None:
    """Wait until one of the queries ends (a failure is raised) or the deadline passes;
    meanwhile `status_of`'s status is the progress step."""
    steps = StatusSteps()
    while any(q.isActive for q in queries):
        left = _left(deadline)
        if (left is not None and left <= 0.001) or lifecycle.stop_requested.is_set():
            return
        spark.streams.resetTerminated()
        if spark.streams.awaitAnyTermination(min(left or 1.0, 1.0)):
            for q in queries:
                if q.exception() is not None:
                    raise q.exception()
            return
        steps.update(status_of)
