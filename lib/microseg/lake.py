"""The Delta lake: where each table lives, how it is created, and insert-only MERGE."""

from __future__ import annotations

from dataclasses import dataclass, field

from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import types as T

from microseg import schemas


@dataclass(frozen=True)
class Table:
    name: str  # layer/table, also its folder under the lake root
    schema: T.StructType
    partition_by: tuple[str, ...] = ()
    generated: dict[str, str] = field(default_factory=dict)  # column -> SQL expression
    properties: dict[str, str] = field(default_factory=dict)
    comment: str = ""


EVENTS = Table(
    "bronze/events",
    schemas.EVENTS,
    partition_by=("event_date",),
    generated={"event_date": "CAST(event_time AS DATE)"},
    comment="Validated events in the canonical schema; event_id unique.",
)
QUARANTINE = Table(
    "bronze/quarantine",
    schemas.QUARANTINE,
    comment="Rejected input records with their raw text and a reason; nothing is dropped.",
)
INGESTED_FILES = Table(
    "ops/ingested_files",
    schemas.INGESTED_FILES,
    comment="One row per input file completely ingested; later runs skip these files.",
)


def table_path(root: str, table: Table) -> str:
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
    for key, value in table.properties.items():
        builder = builder.property(key, value)
    return builder.execute()


def read_table(spark: SparkSession, root: str, table: Table) -> DataFrame:
    return spark.read.format("delta").load(table_path(root, table))


def table_exists(spark: SparkSession, root: str, table: Table) -> bool:
    return DeltaTable.isDeltaTable(spark, table_path(root, table))


def conform(df: DataFrame, table: Table) -> DataFrame:
    """Select exactly the table's columns, in order, cast to the declared types."""
    return df.select([df[f.name].cast(f.dataType).alias(f.name) for f in table.schema.fields])


def insert_new(
    spark: SparkSession, root: str, table: Table, rows: DataFrame, keys: tuple[str, ...]
) -> None:
    """Insert the rows whose key is not in the table yet (one atomic, idempotent commit)."""
    target = ensure_table(spark, root, table)
    condition = " AND ".join(f"t.`{k}` = s.`{k}`" for k in keys)
    (
        target.alias("t")
        .merge(conform(rows, table).alias("s"), condition)
        .whenNotMatchedInsertAll()
        .execute()
    )


ALL_TABLES = (EVENTS, QUARANTINE, INGESTED_FILES)


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
