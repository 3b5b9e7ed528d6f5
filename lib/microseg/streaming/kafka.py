"""Kafka as the stream's input: the segment query reads the topic's valid events itself
(kafka_events), and a second query ingests the topic into bronze and quarantine with the batch
ingest's validation (see streaming.query for how the queries run together)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.streaming import StreamingQuery

from microseg.core import lake
from microseg.core.config import Config, ConfigError
from microseg.ingest import files as ingest
from microseg.ingest.canonical import to_canonical
from microseg.ingest.sources import load_source, records_of_lines
from microseg.streaming.checkpoint import checkpoint_path
from microseg.streaming.lifecycle import BatchGate

KAFKA_QUERY_NAME = "microseg_kafka_ingest"


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


def kafka_events(spark: SparkSession, cfg: Config, *, watermark_delay_ms: int) -> DataFrame:
    """The topic's valid events in the canonical schema, for the segment query to read itself
    (the ingest query writes bronze alongside): the records parsed and checked exactly as
    `microseg ingest` does, the invalid ones left out (the ingest query quarantines them),
    with the event-time watermark, and a repeated event_id dropped within it (the ingest query
    quarantines it as duplicate_event). The future-timestamp check uses the micro-batch's time
    (current_timestamp, fixed per batch) plus ingest.max_future_skew."""
    mapping = stream_mapping(cfg)
    skew_ms = int(cfg.ingest.max_future_skew.total_seconds() * 1000)
    checked_df = to_canonical(
        records_of_lines(kafka_lines(spark, cfg), mapping),
        mapping=mapping,
        event_types=tuple(cfg.ingest.event_types),
        earliest=cfg.ingest.min_event_time,
        latest=F.current_timestamp() + F.expr(f"INTERVAL {skew_ms} MILLISECONDS"),
        key=cfg.privacy.key(),
    )
    valid_df = ingest.without_erased(
        spark, cfg, checked_df.filter(F.col("reason").isNull()).withColumn("outcome", F.lit("new"))
    )
    return (
        valid_df.filter(F.col("outcome") == "new")
        .select("event_id", "event_time", "event_type", "user_id", "anonymous_id")
        .withWatermark("event_time", f"{watermark_delay_ms} milliseconds")
        .dropDuplicatesWithinWatermark(["event_id"])
    )


def stream_mapping(cfg: Config):
    """stream.kafka.mapping, which must read text records."""
    mapping = load_source(cfg.ingest.sources_dir, cfg.stream.kafka.mapping)
    if mapping.format == "parquet":
        raise ConfigError(
            f"stream.kafka.mapping: source '{mapping.name}' reads parquet files; Kafka record "
            "values must be json or csv text"
        )
    return mapping


@dataclass
class IngestStats:
    """Counts over the Kafka micro-batches ingested by this process."""

    batches: int = 0
    records: int = 0
    events_added: int = 0
    already_present: int = 0  # a replayed micro-batch: its records are in bronze already
    quarantined: int = 0
    suppressed: int = 0  # records of erased people (ops/suppression), written nowhere


def ingest_kafka_batch(
    lines_df: DataFrame,
    batch_id: int,
    *,
    cfg: Config,
    mapping,
    stats: IngestStats,
    run_id: str,
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
        stats.suppressed += counts.get("suppressed", 0)
        if counts.get("new") or counts.get("quarantined"):
            ingest.write_classified(
                spark,
                cfg.lake.root,
                classified_df,
                source=mapping.name,
                run_id=run_id,
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
    run_id: str,
    gate: BatchGate | None = None,
) -> StreamingQuery:
    """Start the query that ingests stream.kafka.topic into bronze (its own checkpoint);
    `gate`: one to stop it between micro-batches with (streaming.lifecycle)."""
    mapping = stream_mapping(cfg)
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
                partial(ingest_kafka_batch, cfg=cfg, mapping=mapping, stats=stats, run_id=run_id)
            )
        )
    )
    return with_trigger(writer, cfg, available_now).start()


def with_trigger(writer, cfg: Config, available_now: bool):
    if available_now:
        return writer.trigger(availableNow=True)
    seconds = cfg.stream.trigger_interval.total_seconds()
    return writer.trigger(processingTime=f"{int(seconds * 1000)} milliseconds")
