"""Batch ingest: input files -> validated canonical events in bronze/events, rejects in
bronze/quarantine with a reason. Every input record ends in exactly one of the two.

The mapping to the canonical schema and the checks are in `microseg.ingest.canonical`; this
module finds the files, classifies their records against bronze and writes the tables.

Re-running on the same files adds nothing: events are keyed by event_id, quarantined records
by file and line, and each table is written in one atomic commit (quarantine first, then
events, then the file log), so a crash at any point is completed by running again.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone

from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from microseg.core import lake, progress
from microseg.core.config import Config, ConfigError
from microseg.core.failpoints import failpoint
from microseg.core.runs import new_run_id
from microseg.core.schemas import MAPPABLE_FIELDS
from microseg.ingest.canonical import classify, suppress, to_canonical
from microseg.ingest.sources import (
    InputFile,
    SourceMapping,
    list_input_files,
    load_source,
    read_records,
)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------
# classified records -> table rows


def quarantine_rows(
    classified_df: DataFrame, *, source: str, run_id: str, now: datetime
) -> DataFrame:
    return classified_df.filter(F.col("outcome") == "quarantined").select(
        F.sha2(
            F.concat_ws("\u001f", "source_file", F.col("source_line").cast("string")), 256
        ).alias("record_id"),
        F.lit(source).alias("source"),
        "source_file",
        "source_line",
        "raw",
        "reason",
        "message",
        "event_id",
        F.lit(now).alias("quarantined_at"),
        F.lit(run_id).alias("ingest_run_id"),
    )


def event_rows(classified_df: DataFrame, *, source: str, run_id: str, now: datetime) -> DataFrame:
    return classified_df.filter(F.col("outcome") == "new").select(
        *MAPPABLE_FIELDS,
        "properties",
        F.to_date("event_time").alias("event_date"),
        F.lit(source).alias("source"),
        "source_file",
        "source_line",
        F.lit(now).alias("ingested_at"),
        F.lit(run_id).alias("ingest_run_id"),
    )


def validate(
    spark: SparkSession,
    cfg: Config,
    records_df: DataFrame,
    *,
    mapping: SourceMapping,
    now: datetime,
) -> DataFrame:
    """read_records' rows -> classified canonical records (see classify), checked against
    what bronze/events holds; the raw text is kept for quarantined records only."""
    checked_df = to_canonical(
        records_df,
        mapping=mapping,
        event_types=tuple(cfg.ingest.event_types),
        earliest=cfg.ingest.min_event_time,
        latest=now + cfg.ingest.max_future_skew,
        key=cfg.privacy.key(),
    )
    root = cfg.lake.root
    existing_df = (
        lake.read_table(spark, root, lake.EVENTS).select("event_id", "source_file", "source_line")
        if lake.table_exists(spark, root, lake.EVENTS)
        else None
    )
    classified_df = without_erased(spark, cfg, classify(checked_df, existing_df))
    return classified_df.withColumn("raw", F.when(F.col("outcome") == "quarantined", F.col("raw")))


def without_erased(spark: SparkSession, cfg: Config, classified_df: DataFrame) -> DataFrame:
    """classified_df with outcome `suppressed` for the records of people `microseg forget`
    erased (ops/suppression; see canonical.suppress)."""
    if not lake.table_exists(spark, cfg.lake.root, lake.SUPPRESSION):
        return classified_df
    suppressed_df = lake.read_table(spark, cfg.lake.root, lake.SUPPRESSION)
    if suppressed_df.isEmpty():
        return classified_df
    key = cfg.privacy.key()
    if key is None:
        raise ConfigError(
            "ops/suppression lists erased people, and checking records against it needs the "
            "pseudonymization key: export MICROSEG_PSEUDONYMIZATION_KEY"
        )
    return suppress(classified_df, suppressed_df, key)


def write_classified(
    spark: SparkSession,
    root: str,
    classified_df: DataFrame,
    *,
    source: str,
    run_id: str,
    now: datetime,
) -> None:
    """Quarantine first, then events, each one atomic insert-only commit: running it again on
    the same records adds nothing, so a crash between the two is completed by a re-run."""
    with timed("write bronze/quarantine"):
        lake.insert_new(
            spark,
            root,
            lake.QUARANTINE,
            quarantine_rows(classified_df, source=source, run_id=run_id, now=now),
            keys=("record_id",),
        )
    failpoint("ingest.after_quarantine")
    with timed("write bronze/events"):
        lake.insert_new(
            spark,
            root,
            lake.EVENTS,
            event_rows(classified_df, source=source, run_id=run_id, now=now),
            keys=("event_id",),
        )


# --------------------------------------------------------------------------------------
# the job


@contextmanager
def timed(step: str):
    started = time.monotonic()
    progress.step(step)
    yield
    log.debug("ingest: %s took %.1f s", step, time.monotonic() - started)


@dataclass
class FileReport:
    file: InputFile
    records: int = 0
    events_added: int = 0
    already_present: int = 0
    quarantined: int = 0
    suppressed: int = 0  # records of erased people (ops/suppression), written nowhere


@dataclass
class IngestReport:
    run_id: str
    source: str
    started_at: datetime
    files: list[FileReport] = field(default_factory=list)
    skipped_files: list[InputFile] = field(default_factory=list)
    reasons: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def records(self) -> int:
        return sum(f.records for f in self.files)

    @property
    def events_added(self) -> int:
        return sum(f.events_added for f in self.files)

    @property
    def already_present(self) -> int:
        return sum(f.already_present for f in self.files)

    @property
    def quarantined(self) -> int:
        return sum(f.quarantined for f in self.files)

    @property
    def suppressed(self) -> int:
        return sum(f.suppressed for f in self.files)


def _already_ingested(spark: SparkSession, root: str, source: str) -> set[tuple]:
    if not lake.table_exists(spark, root, lake.INGESTED_FILES):
        return set()
    rows = (
        lake.read_table(spark, root, lake.INGESTED_FILES)
        .filter(F.col("source") == source)
        .select("file_path", "file_size", "file_modified_at")
        .collect()
    )
    return {
        (r.file_path, r.file_size, r.file_modified_at.replace(tzinfo=timezone.utc)) for r in rows
    }


def run_ingest(
    spark: SparkSession,
    cfg: Config,
    *,
    source: str,
    path: str,
    fmt: str | None = None,
    reprocess: bool = False,
    now: datetime | None = None,
    run_id: str | None = None,
) -> IngestReport:
    """Ingest the files at `path` (file, folder or glob) through source mapping `source`.

    Files already completely ingested (same path, size and modification time) are skipped
    unless `reprocess`; re-processing them adds nothing either.
    """
    mapping = load_source(cfg.ingest.sources_dir, source)
    clock = now or datetime.now(timezone.utc)
    started = clock.replace(microsecond=clock.microsecond // 1000 * 1000)
    report = IngestReport(run_id=run_id or new_run_id(), source=source, started_at=started)
    root = cfg.lake.root

    files = list_input_files(spark, path)
    done = set() if reprocess else _already_ingested(spark, root, source)
    todo = [f for f in files if (f.path, f.size, f.modified_at) not in done]
    report.skipped_files = [f for f in files if f not in todo]
    if not todo:
        return report

    records_df = read_records(spark, mapping, todo, fmt)
    classified_df = validate(spark, cfg, records_df, mapping=mapping, now=started).persist(
        StorageLevel.MEMORY_AND_DISK
    )
    try:
        with timed("validate and classify"):
            counts = classified_df.groupBy("source_file", "outcome", "reason").count().collect()
        by_path = {f.path: FileReport(f) for f in todo}
        for row in counts:
            file_report = by_path.get(row.source_file)
            if file_report is None:  # the reader's path spelling differs from the listing's
                raise RuntimeError(f"read a record from an unlisted file {row.source_file}")
            file_report.records += row["count"]
            if row.outcome == "new":
                file_report.events_added += row["count"]
            elif row.outcome == "present":
                file_report.already_present += row["count"]
            elif row.outcome == "suppressed":
                file_report.suppressed += row["count"]
            else:
                file_report.quarantined += row["count"]
                report.reasons[row.reason] = report.reasons.get(row.reason, 0) + row["count"]
        report.files = list(by_path.values())

        write_classified(
            spark, root, classified_df, source=source, run_id=report.run_id, now=started
        )
        failpoint("ingest.after_events")
        with timed("write ops/ingested_files"):
            _log_files(spark, root, report)
    finally:
        classified_df.unpersist()
    report.seconds = (datetime.now(timezone.utc) - clock).total_seconds() if now is None else 0.0
    return report


def _log_files(spark: SparkSession, root: str, report: IngestReport) -> None:
    rows = [
        (
            report.source,
            f.file.path,
            f.file.size,
            f.file.modified_at,
            f.records,
            f.events_added,
            f.already_present,
            f.quarantined,
            report.started_at,
            report.run_id,
        )
        for f in report.files
    ]
    log_df = spark.createDataFrame(rows, lake.INGESTED_FILES.schema)
    lake.insert_new(
        spark,
        root,
        lake.INGESTED_FILES,
        log_df,
        keys=("source", "file_path", "file_size", "file_modified_at"),
    )
