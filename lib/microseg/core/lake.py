"""The Delta lake: where each table lives, how it is created, and insert-only MERGE."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from microseg.core import schemas
from microseg.core.failpoints import durable


@dataclass(frozen=True)
class Table:
    name: str  # layer/table, also its folder under the lake root
    schema: T.StructType
    partition_by: tuple[str, ...] = ()
    generated: dict[str, str] = field(default_factory=dict)  # column -> SQL expression
    properties: dict[str, str] = field(default_factory=dict)
    comment: str = ""
    # Columns that identify a person, by kind: user_id, anonymous_id, user_key (a user id or
    # anon:<anonymous id>), user_ids / anonymous_ids (arrays of them), or text (free text
    # that may quote a raw id). `microseg forget` erases by them, and Delta keeps no file
    # statistics on them: min/max values in the transaction log would outlive the rows.
    identifiers: dict[str, str] = field(default_factory=dict)

    def table_properties(self) -> dict[str, str]:
        """The declared properties, plus the columns Delta may keep statistics on (every
        primitive column that is not an identifier) for a table that holds identifiers."""
        if not self.identifiers:
            return dict(self.properties)
        stats = [
            f.name
            for f in self.schema.fields
            if f.name not in self.identifiers
            and f.name not in self.partition_by
            and isinstance(f.dataType, _STATS_TYPES)
        ]
        return {**self.properties, STATS_COLUMNS: ",".join(stats)}


STATS_COLUMNS = "delta.dataSkippingStatsColumns"
# the types Delta keeps min/max statistics of
_STATS_TYPES = (T.StringType, T.NumericType, T.DateType, T.TimestampType, T.TimestampNTZType)


EVENTS = Table(
    "bronze/events",
    schemas.EVENTS,
    partition_by=("event_date",),
    generated={"event_date": "CAST(event_time AS DATE)"},
    comment="Validated events in the canonical schema; event_id unique.",
    identifiers={"user_id": "user_id", "anonymous_id": "anonymous_id"},
)
QUARANTINE = Table(
    "bronze/quarantine",
    schemas.QUARANTINE,
    comment="Rejected input records with their raw text and a reason; nothing is dropped.",
    identifiers={"raw": "text", "message": "text"},
)
INGESTED_FILES = Table(
    "ops/ingested_files",
    schemas.INGESTED_FILES,
    comment="One row per input file completely ingested; later runs skip these files.",
)


IDENTITY_MAP = Table(
    "silver/identity_map",
    schemas.IDENTITY_MAP,
    comment="Anonymous ids stitched to a user key.",
    identifiers={"anonymous_id": "anonymous_id", "user_key": "user_key", "user_ids": "user_ids"},
)
SESSIONS = Table(
    "silver/sessions",
    schemas.SESSIONS,
    partition_by=("session_date",),
    comment="One row per session; session_id deterministic.",
    identifiers={"user_key": "user_key", "anonymous_ids": "anonymous_ids"},
)
USER_DAYS = Table(
    "silver/user_days",
    schemas.USER_DAYS,
    comment="Per raw key and day: event counts, first/last times, per-category and per-hour "
    "counts; maintained incrementally by sessionize.",
    identifiers={"raw_key": "user_key", "anonymous_id": "anonymous_id"},
)
CONSENT = Table(
    "silver/consent",
    schemas.CONSENT,
    comment="Consent history: per user key and purpose (analytics, marketing), one row per "
    "state, from the events' consent fields; rebuilt by sessionize.",
    identifiers={"user_key": "user_key"},
)
USER_FEATURES = Table(
    "gold/user_features",
    schemas.USER_FEATURES_KEYS,
    partition_by=("as_of_date",),
    comment="One row per user key per as-of time; feature columns as selected in config.",
    identifiers={"user_key": "user_key"},
)
WATERMARKS = Table(
    "ops/watermarks",
    schemas.WATERMARKS,
    comment="Per incremental job, the latest ingested_at it has processed.",
)


def table_path(root: str, table: Table) -> str:
    """Where the table lives; a relative local root is taken from the current directory."""
    if "://" not in root and not root.startswith(("file:", "/")):
        root = os.path.abspath(root)
    return f"{root.rstrip('/')}/{table.name}"


def ensure_table(spark: SparkSession, root: str, table: Table) -> DeltaTable:
    """Create the table with its declared schema if it does not exist; return it."""
    builder = (
        DeltaTable.createIfNotExists(spark).location(table_path(root, table)).comment(table.comment)
    )
    for column in table.schema.fields:
        builder = builder.addColumn(
            column.name,
            column.dataType,
            nullable=column.nullable,
            generatedAlwaysAs=table.generated.get(column.name),
            comment=column.metadata.get("comment"),
        )
    if table.partition_by:
        builder = builder.partitionedBy(*table.partition_by)
    for key, value in table.table_properties().items():
        builder = builder.property(key, value)
    return builder.execute()


def read_table(spark: SparkSession, root: str, table: Table) -> DataFrame:
    return spark.read.format("delta").load(table_path(root, table))


def table_exists(spark: SparkSession, root: str, table: Table) -> bool:
    return DeltaTable.isDeltaTable(spark, table_path(root, table))


def _snapshot(spark: SparkSession, root: str, table: Table):
    """The table's latest Delta snapshot (a JVM object; None if there is no table), read
    from its log on the driver: no Spark job, unlike `DeltaTable.history(1)` or `detail()`
    (a job each, ~0.25 s on a small table)."""
    jvm = spark._jvm
    none = getattr(getattr(jvm.scala, "None$"), "MODULE$")
    delta_log = jvm.org.apache.spark.sql.delta.DeltaLog.forTable(
        spark._jsparkSession, table_path(root, table)
    )
    if not delta_log.tableExists():
        return None
    return delta_log.update(False, none, none)


def table_version(spark: SparkSession, root: str, table: Table) -> int | None:
    """The table's latest Delta version (None if there is no table)."""
    snapshot = _snapshot(spark, root, table)
    return None if snapshot is None else int(snapshot.version())


def conform(df: DataFrame, table: Table) -> DataFrame:
    """Select exactly the table's columns, in order, cast to the declared types."""
    return df.select([df[f.name].cast(f.dataType).alias(f.name) for f in table.schema.fields])


def insert_new(
    spark: SparkSession,
    root: str,
    table: Table,
    rows: DataFrame,
    keys: tuple[str, ...],
    *,
    where: str | None = None,
) -> None:
    """Insert the rows whose key is not in the table yet (one atomic, idempotent commit).
    `where`: a condition on the target `t` that every matching row meets (a literal bound
    lets Delta skip files)."""
    target = ensure_table(spark, root, table)
    condition = " AND ".join([*(f"t.`{k}` = s.`{k}`" for k in keys), *([where] if where else [])])
    (
        target.alias("t")
        .merge(conform(rows, table).alias("s"), condition)
        .whenNotMatchedInsertAll()
        .execute()
    )
    durable(table.name)


SEGMENT_MEMBERSHIP = Table(
    "gold/segment_membership",
    schemas.SEGMENT_MEMBERSHIP,
    properties={"delta.enableChangeDataFeed": "true"},
    comment="Segment membership history: one row per user, segment and validity interval.",
    identifiers={"user_key": "user_key"},
)
SEGMENT_CHANGES = Table(
    "gold/segment_changes",
    schemas.SEGMENT_CHANGES,
    comment="One row per user entering or leaving a segment.",
    identifiers={"user_key": "user_key"},
)
SEGMENT_CATALOG = Table(
    "gold/segment_catalog",
    schemas.SEGMENT_CATALOG,
    comment="Per as-of and segment: definition, version, size, status, overlap.",
)

SEGMENT_KPIS = Table(
    "gold/segment_kpis",
    schemas.SEGMENT_KPIS,
    partition_by=("as_of_date",),
    comment="Per as-of and segment: conversion, revenue, order value, sessions, retention.",
)
SEGMENT_ALERTS = Table(
    "gold/segment_alerts",
    schemas.SEGMENT_ALERTS,
    comment="Per as-of: segment size and engagement anomalies, segments not distinct.",
)

MODEL_REGISTRY = Table(
    "gold/model_registry",
    schemas.MODEL_REGISTRY,
    comment="One row per trained model version, with parameters, metrics and saved path.",
)


PROPENSITY_SCORES = Table(
    "gold/propensity_scores",
    schemas.PROPENSITY_SCORES,
    partition_by=("as_of_date",),
    comment="Propensity score and percentile per target, as-of time and user.",
    identifiers={"user_key": "user_key"},
)

EXPERIMENT_ASSIGNMENTS = Table(
    "gold/experiment_assignments",
    schemas.EXPERIMENT_ASSIGNMENTS,
    comment="Insert-once variant per experiment and user (GrowthBook-compatible hashing).",
    identifiers={"user_key": "user_key"},
)
EXPOSURES = Table(
    "gold/exposures",
    schemas.EXPOSURES,
    comment="Insert-once first exposure per experiment and assigned user.",
    identifiers={"user_key": "user_key"},
)
EXPERIMENT_RESULTS = Table(
    "gold/experiment_results",
    schemas.EXPERIMENT_RESULTS,
    comment="Per analysis run, experiment and variant: conversion, revenue, lift, tests, SRM.",
)
EXPERIMENT_ALLOCATIONS = Table(
    "gold/experiment_allocations",
    schemas.EXPERIMENT_ALLOCATIONS,
    comment="Thompson-sampling allocation weights per experiment, versioned.",
)

TRIGGER_FIRINGS = Table(
    "gold/trigger_firings",
    schemas.TRIGGER_FIRINGS,
    comment="Insert-once decision per trigger, user and anchor: fired, or suppressed and why.",
    identifiers={"user_key": "user_key"},
)

DELIVERIES = Table(
    "gold/deliveries",
    schemas.DELIVERIES,
    comment="Delivery ledger: per destination and segment change, its batch and status.",
    identifiers={"user_key": "user_key", "payload": "text"},
)

RUNS = Table(
    "ops/runs",
    schemas.RUNS,
    comment="One row per job run: status, rows read and written, Delta versions, error.",
)

ERASURES = Table(
    "ops/erasures",
    schemas.ERASURES,
    comment="Audit of erasure requests (microseg forget): hashed ids, tables, rows, verified.",
)
SUPPRESSION = Table(
    "ops/suppression",
    schemas.SUPPRESSION,
    comment="Hashed identifiers of erased people; ingest drops their records.",
)


def model_path(root: str, model_name: str, version: str) -> str:
    """Where a model version's PipelineModel is saved: <lake root>/models/<name>/<version>."""
    base = table_path(root, MODEL_REGISTRY).rsplit("/gold/", 1)[0]
    return f"{base}/models/{model_name}/{version}"


ALL_TABLES = (
    EVENTS,
    QUARANTINE,
    INGESTED_FILES,
    IDENTITY_MAP,
    SESSIONS,
    USER_DAYS,
    CONSENT,
    USER_FEATURES,
    SEGMENT_MEMBERSHIP,
    SEGMENT_CHANGES,
    SEGMENT_CATALOG,
    SEGMENT_KPIS,
    SEGMENT_ALERTS,
    MODEL_REGISTRY,
    PROPENSITY_SCORES,
    EXPERIMENT_ASSIGNMENTS,
    EXPOSURES,
    EXPERIMENT_RESULTS,
    EXPERIMENT_ALLOCATIONS,
    TRIGGER_FIRINGS,
    DELIVERIES,
    WATERMARKS,
    RUNS,
    ERASURES,
    SUPPRESSION,
)


def overwrite(spark: SparkSession, root: str, table: Table, rows: DataFrame) -> None:
    """Replace the table's contents in one atomic commit, with its declared schema and
    partitioning (a table an older release wrote with other columns or partitions takes
    them on)."""
    writer = conform(rows, table).write.format("delta").mode("overwrite")
    current = layout(spark, root, table)
    if current is None:
        ensure_table(spark, root, table)
    elif current != (tuple(table.schema.names), table.partition_by):
        writer = writer.option("overwriteSchema", "true")
    writer.partitionBy(*table.partition_by).save(table_path(root, table))
    durable(table.name)


def layout(spark: SparkSession, root: str, table: Table) -> tuple[tuple, tuple] | None:
    """(column names, partition columns) of the table as it is in the lake; None if absent."""
    snapshot = _snapshot(spark, root, table)
    if snapshot is None:
        return None
    metadata = snapshot.metadata()
    partitions = metadata.partitionColumns()
    return (
        tuple(metadata.schema().fieldNames()),
        tuple(partitions.apply(i) for i in range(partitions.size())),
    )


def last_commit_rows(spark: SparkSession, root: str, table: Table) -> int:
    """Rows written by the table's latest commit (a write's numOutputRows), from the Delta
    log instead of counting them again."""
    last = DeltaTable.forPath(spark, table_path(root, table)).history(1).first()
    return int((last["operationMetrics"] or {}).get("numOutputRows") or 0)


def read_watermark(spark: SparkSession, root: str, job: str):
    if not table_exists(spark, root, WATERMARKS):
        return None
    row = read_table(spark, root, WATERMARKS).filter(F.col("job") == job).first()
    return None if row is None else row.watermark


def write_watermark(spark: SparkSession, root: str, job: str, watermark, run_id: str) -> None:
    """Set the job's watermark: one small atomic overwrite of the job's row."""
    ensure_table(spark, root, WATERMARKS)
    row_df = spark.createDataFrame(
        [(job, watermark, run_id)], "job string, watermark timestamp, run_id string"
    ).withColumn("updated_at", F.current_timestamp())
    (
        conform(row_df, WATERMARKS)
        .coalesce(1)
        .write.format("delta")
        .mode("overwrite")
        .option("replaceWhere", f"job = '{job}'")
        .save(table_path(root, WATERMARKS))
    )
    durable(f"{WATERMARKS.name}:{job}")


def summarize(spark: SparkSession, root: str) -> list[dict]:
    """Per known table: name, rows, latest Delta version and operation (None if absent)."""
    summary = []
    for table in ALL_TABLES:
        if not table_exists(spark, root, table):
            summary.append({"table": table.name, "rows": None, "version": None, "operation": None})
            continue
        last = DeltaTable.forPath(spark, table_path(root, table)).history(1).first()
        summary.append(
            {
                "table": table.name,
                "rows": read_table(spark, root, table).count(),
                "version": last["version"],
                "operation": last["operation"],
            }
        )
    return summary
