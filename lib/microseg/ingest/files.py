"""Batch ingest: input files -> validated canonical events in bronze/events, rejects in
bronze/quarantine with a reason. Every input record ends in exactly one of the two.

Re-running on the same files adds nothing: events are keyed by event_id, quarantined records
by file and line, and each table is written in one atomic commit (quarantine first, then
events, then the file log), so a crash at any point is completed by running again.
"""

from __future__ import annotations

import logging
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import reduce

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from microseg.core import lake, progress
from microseg.core.config import Config, ConfigError
from microseg.core.failpoints import failpoint
from microseg.core.privacy import keyed_hash
from microseg.core.schemas import EVENT_FIELDS, MAPPABLE_FIELDS, USER_KEY_FIELDS
from microseg.ingest.sources import (
    InputFile,
    SourceMapping,
    column_for,
    list_input_files,
    load_source,
    read_records,
)

log = logging.getLogger(__name__)

# Reason codes of bronze/quarantine, in the order they are checked (a record gets the first).
REASONS = {
    "malformed_record": "the line is not valid JSON / has the wrong number of CSV columns",
    "missing_required_field": "event_time, event_type, or both user_id and anonymous_id missing",
    "unparseable_timestamp": "event_time does not match the source's timestamp format",
    "timestamp_out_of_range": "event_time is before ingest.min_event_time",
    "future_timestamp": "event_time is later than the ingest time plus ingest.max_future_skew",
    "unknown_event_type": "event_type (after the value map) is not in ingest.event_types",
    "wrong_type": "a value cannot be read as its field's type (number, integer, boolean)",
    "impossible_value": "negative price, quantity below 1, non-finite number, bad currency code",
    "duplicate_event": "an event with the same event_id was already accepted",
}

_NUMERIC_TYPE_NAMES = {"double": "a number", "int": "a whole number", "boolean": "true or false"}
_TRUE = ("true", "t", "yes", "y", "1")
_FALSE = ("false", "f", "no", "n", "0")


# --------------------------------------------------------------------------------------
# mapping and validation (pure DataFrame functions)


def _parse_time(raw: Column, fmt: str | None) -> Column:
    if fmt in (None, "iso8601"):
        return F.try_to_timestamp(raw)
    if fmt in ("epoch_seconds", "epoch_millis"):
        seconds = raw.try_cast("double") / (1000 if fmt == "epoch_millis" else 1)
        # bounds keep the conversion from overflowing on absurd numbers (year 1 .. 9999)
        return F.when(seconds.between(-62135596800, 253402300799), F.timestamp_seconds(seconds))
    return F.try_to_timestamp(raw, F.lit(fmt))


def _typed(name: str, raw: Column, fmt: str | None) -> tuple[Column, str | None]:
    """The typed value of a canonical field and, for non-string fields, the type's name."""
    dtype = EVENT_FIELDS[name][0]
    if name == "event_time":
        return _parse_time(raw, fmt), None
    if isinstance(dtype, T.DoubleType):
        return raw.try_cast("double"), "double"
    if isinstance(dtype, T.IntegerType):
        number = raw.try_cast("double")
        whole = number.isNotNull() & (number == F.floor(number)) & (F.abs(number) < 2**31)
        return F.when(whole, number.cast("int")), "int"
    if isinstance(dtype, T.BooleanType):
        lowered = F.lower(raw)
        return (
            F.when(lowered.isin(*_TRUE), F.lit(True)).when(lowered.isin(*_FALSE), F.lit(False)),
            "boolean",
        )
    if name in ("event_type", "device"):
        return F.lower(raw), None
    if name == "currency":
        return F.upper(raw), None
    return raw, None


def _quote(column: Column) -> Column:
    return F.concat(F.lit("'"), column, F.lit("'"))


def to_canonical(
    records_df: DataFrame,
    *,
    mapping: SourceMapping,
    event_types: tuple[str, ...],
    earliest: datetime,
    latest: datetime,
    key: bytes | None,
) -> DataFrame:
    """Map raw records to canonical columns and name what is wrong with each.

    Returns source_file, source_line, raw, every canonical event field, and `reason` /
    `message` (null for a valid record). `latest` is the ingest time plus the allowed skew.
    """
    index_of = {path: i for i, path in enumerate(mapping.input_columns())}
    raw: dict[str, Column] = {}
    for name, field_mapping in mapping.fields.items():
        value = column_for(field_mapping, index_of)
        if field_mapping.values:
            lookup = F.create_map(*[F.lit(x) for kv in field_mapping.values.items() for x in kv])
            value = F.coalesce(lookup[value], value)
        raw[name] = value
    staged_df = records_df.select(
        "source_file",
        "source_line",
        "raw",
        "malformed",
        *[col.alias(f"_raw_{name}") for name, col in raw.items()],
        *[
            column_for(m, index_of).alias(f"_prop_{i}")
            for i, m in enumerate(mapping.properties.values())
        ],
    )

    def raw_of(name: str) -> Column:
        return F.col(f"_raw_{name}")

    typed: dict[str, Column] = {}
    type_names: dict[str, str] = {}
    for name in mapping.fields:
        fmt = mapping.fields[name].format
        typed[name], type_name = _typed(name, raw_of(name), fmt)
        if type_name:
            type_names[name] = type_name

    checks: list[tuple[Column, str, Column]] = [
        (F.col("malformed").isNotNull(), "malformed_record", F.col("malformed"))
    ]
    required = ["event_time", "event_type"] + (["event_id"] if "event_id" in mapping.fields else [])
    for name in required:
        source_col = mapping.fields[name].column
        checks.append(
            (
                raw_of(name).isNull(),
                "missing_required_field",
                F.lit(f"missing required field {name} (input column '{source_col}')"),
            )
        )
    user_keys = [k for k in USER_KEY_FIELDS if k in mapping.fields]
    checks.append(
        (
            reduce(lambda a, b: a & b, [raw_of(k).isNull() for k in user_keys]),
            "missing_required_field",
            F.lit(f"missing {' and '.join(user_keys)}: a user key is required"),
        )
    )
    time_format = mapping.fields["event_time"].format or "iso8601"
    event_time = F.col("_t_event_time")
    checks += [
        (
            event_time.isNull(),
            "unparseable_timestamp",
            F.concat(
                F.lit("event_time "),
                _quote(raw_of("event_time")),
                F.lit(f" does not match format '{time_format}'"),
            ),
        ),
        (
            event_time < F.lit(earliest),
            "timestamp_out_of_range",
            F.concat(
                F.lit("event_time "),
                event_time.cast("string"),
                F.lit(f" is before ingest.min_event_time {earliest.isoformat()}"),
            ),
        ),
        (
            event_time > F.lit(latest),
            "future_timestamp",
            F.concat(
                F.lit("event_time "),
                event_time.cast("string"),
                F.lit(f" is after the ingest time plus max_future_skew ({latest.isoformat()})"),
            ),
        ),
        (
            ~F.col("_t_event_type").isin(*event_types),
            "unknown_event_type",
            F.concat(
                F.lit("event_type "),
                _quote(raw_of("event_type")),
                F.lit(" is not one of ingest.event_types"),
            ),
        ),
    ]
    for name, type_name in type_names.items():
        checks.append(
            (
                raw_of(name).isNotNull() & F.col(f"_t_{name}").isNull(),
                "wrong_type",
                F.concat(
                    F.lit(f"{name} "),
                    _quote(raw_of(name)),
                    F.lit(f" is not {_NUMERIC_TYPE_NAMES[type_name]}"),
                ),
            )
        )
    impossible = {
        "price": [
            (
                F.isnan("_t_price") | F.col("_t_price").isin(float("inf"), float("-inf")),
                "is not finite",
            ),
            (F.col("_t_price") < 0, "is negative"),
        ],
        "quantity": [(F.col("_t_quantity") < 1, "is less than 1")],
        "currency": [
            (~F.col("_t_currency").rlike("^[A-Z]{3}$"), "is not a 3-letter ISO 4217 code")
        ],
    }
    for name, conditions in impossible.items():
        if name in mapping.fields:
            for condition, text in conditions:
                checks.append(
                    (
                        F.coalesce(condition, F.lit(False)),
                        "impossible_value",
                        F.concat(
                            F.lit(f"{name} "), F.col(f"_t_{name}").cast("string"), F.lit(f" {text}")
                        ),
                    )
                )

    def first_failing(pick: int) -> Column:
        result = None
        for check in checks:
            condition, value = F.coalesce(check[0], F.lit(False)), check[pick]
            value = F.lit(value) if isinstance(value, str) else value
            result = F.when(condition, value) if result is None else result.when(condition, value)
        return result

    typed_df = staged_df.select(
        "*", *[col.alias(f"_t_{name}") for name, col in typed.items()]
    ).select("*", first_failing(1).alias("reason"), first_failing(2).alias("message"))

    personal = {name for name, m in mapping.fields.items() if m.personal}
    if mapping.personal_fields() and key is None:
        raise ConfigError(
            f"source '{mapping.name}' marks {mapping.personal_fields()} as personal data but "
            "no pseudonymization key is set: export MICROSEG_PSEUDONYMIZATION_KEY (or the "
            "variable named by privacy.pseudonymization_key_env) or set "
            "privacy.pseudonymization_key"
        )

    def final(name: str) -> Column:
        dtype = EVENT_FIELDS[name][0]
        if name not in mapping.fields:
            return F.lit(None).cast(dtype)
        value = F.col(f"_t_{name}")
        return keyed_hash(value, key) if name in personal else value

    event_id = (
        final("event_id")
        if "event_id" in mapping.fields
        else F.substring(
            F.sha2(F.concat_ws("\u001f", F.lit(mapping.name), F.col("raw")), 256), 1, 32
        )
    )
    property_entries = []
    for i, (prop, prop_mapping) in enumerate(mapping.properties.items()):
        value = F.col(f"_prop_{i}")
        property_entries += [
            F.lit(prop),
            keyed_hash(value, key) if prop_mapping.personal else value,
        ]
    properties = (
        F.map_filter(F.create_map(*property_entries), lambda _k, v: v.isNotNull())
        if property_entries
        else F.create_map().cast(EVENT_FIELDS["properties"][0])
    )
    canonical = {
        name: (event_id if name == "event_id" else final(name)).alias(name)
        for name in MAPPABLE_FIELDS
    }
    return typed_df.select(
        "source_file",
        "source_line",
        "raw",
        *canonical.values(),
        properties.alias("properties"),
        "reason",
        "message",
    )


def classify(checked_df: DataFrame, existing_df: DataFrame | None) -> DataFrame:
    """Add `outcome`: new, present (this very record is in bronze already) or quarantined.

    A valid record whose event_id was accepted before (from another file or line, or earlier
    in this batch) is quarantined as duplicate_event, so that nothing is dropped silently.
    existing_df holds bronze's event_id, source_file, source_line.
    """
    valid = F.col("reason").isNull()
    # Valid records first, so a valid record's rank counts valid ones only. Partitioning by
    # event_id alone lets the join below reuse this shuffle.
    same_id = Window.partitionBy("event_id").orderBy(valid.desc(), "source_file", "source_line")
    ranked_df = checked_df.select(
        "*",
        F.row_number().over(same_id).alias("_rank"),
        F.first("source_file").over(same_id).alias("_first_file"),
        F.first("source_line").over(same_id).alias("_first_line"),
    )
    if existing_df is None:
        joined_df = ranked_df.select(
            "*",
            F.lit(None).cast("string").alias("_b_file"),
            F.lit(None).cast("long").alias("_b_line"),
        )
    else:
        joined_df = ranked_df.join(
            existing_df.select(
                "event_id",
                F.col("source_file").alias("_b_file"),
                F.col("source_line").alias("_b_line"),
            ),
            on="event_id",
            how="left",
        )
    in_bronze = F.col("_b_file").isNotNull()
    this_record = (F.col("_b_file") == F.col("source_file")) & (
        F.col("_b_line") == F.col("source_line")
    )
    duplicate = valid & ((in_bronze & ~this_record) | (~in_bronze & (F.col("_rank") > 1)))
    duplicate_message = F.when(
        in_bronze,
        F.format_string(
            "event_id %s was already ingested from %s line %d", "event_id", "_b_file", "_b_line"
        ),
    ).otherwise(
        F.format_string("event_id %s repeats %s line %d", "event_id", "_first_file", "_first_line")
    )
    return joined_df.select(
        *[c for c in checked_df.columns if c not in ("reason", "message")],
        F.when(duplicate, F.lit("duplicate_event")).otherwise(F.col("reason")).alias("reason"),
        F.when(duplicate, duplicate_message).otherwise(F.col("message")).alias("message"),
        F.when(~valid | duplicate, F.lit("quarantined"))
        .when(in_bronze, F.lit("present"))
        .otherwise(F.lit("new"))
        .alias("outcome"),
    )


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
    return classify(checked_df, existing_df).withColumn(
        "raw", F.when(F.col("outcome") == "quarantined", F.col("raw"))
    )


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
) -> IngestReport:
    """Ingest the files at `path` (file, folder or glob) through source mapping `source`.

    Files already completely ingested (same path, size and modification time) are skipped
    unless `reprocess`; re-processing them adds nothing either.
    """
    mapping = load_source(cfg.ingest.sources_dir, source)
    clock = now or datetime.now(timezone.utc)
    started = clock.replace(microsecond=clock.microsecond // 1000 * 1000)
    report = IngestReport(run_id=uuid.uuid4().hex, source=source, started_at=started)
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
