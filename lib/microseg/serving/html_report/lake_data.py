"""Reading the report's data from the lake: small Spark aggregates, collected to pandas.

The lake is only read; a missing table gives None (its section then says which command fills
it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import pandas as pd
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from microseg.core import lake

MAX_RUNS = 2000  # the latest runs drawn in the run history


@dataclass
class TableVersion:
    table: str
    version: int | None
    operation: str | None
    timestamp: datetime | None


def _read(spark: SparkSession, root: str, table: lake.Table) -> DataFrame | None:
    if not lake.table_exists(spark, root, table):
        return None
    return lake.read_table(spark, root, table)


def _frame(df: DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """Collect rows as a pandas frame (maps stay dicts, timestamps naive UTC)."""
    rows = [r.asDict(recursive=False) for r in df.collect()]
    return pd.DataFrame(rows, columns=list(columns))


def table_versions(spark: SparkSession, root: str) -> list[TableVersion]:
    from delta.tables import DeltaTable

    versions = []
    for table in lake.ALL_TABLES:
        if not lake.table_exists(spark, root, table):
            versions.append(TableVersion(table.name, None, None, None))
            continue
        last = DeltaTable.forPath(spark, lake.table_path(root, table)).history(1).first()
        versions.append(
            TableVersion(table.name, last["version"], last["operation"], last["timestamp"])
        )
    return versions


CATALOG_COLUMNS = (
    "as_of",
    "source",
    "segment_id",
    "name",
    "status",
    "matched",
    "size",
    "entered",
    "exited",
    "stability",
    "overlap",
)


def load_catalog(spark: SparkSession, root: str) -> pd.DataFrame | None:
    df = _read(spark, root, lake.SEGMENT_CATALOG)
    return None if df is None else _frame(df.select(*CATALOG_COLUMNS), CATALOG_COLUMNS)


REGISTRY_COLUMNS = (
    "model_name",
    "version",
    "kind",
    "trained_at",
    "evaluation_as_of",
    "metrics",
    "details",
)


def load_latest_models(spark: SparkSession, root: str) -> pd.DataFrame | None:
    """The latest version (versions sort by time) of every model in gold/model_registry."""
    df = _read(spark, root, lake.MODEL_REGISTRY)
    if df is None:
        return None
    latest = Window.partitionBy("kind", "model_name").orderBy(F.desc("version"))
    df = df.withColumn("_n", F.row_number().over(latest)).filter(F.col("_n") == 1)
    return _frame(df.select(*REGISTRY_COLUMNS), REGISTRY_COLUMNS)


def load_quarantine(spark: SparkSession, root: str) -> pd.DataFrame | None:
    df = _read(spark, root, lake.QUARANTINE)
    if df is None:
        return None
    counts = df.groupBy(F.to_date("quarantined_at").alias("day"), "reason").count()
    return _frame(counts, ("day", "reason", "count"))


EXPERIMENT_COLUMNS = (
    "experiment_id",
    "as_of",
    "variant",
    "is_control",
    "assigned",
    "exposed",
    "conversions",
    "conversion_rate",
    "revenue_per_user",
    "lift",
    "lift_ci_low",
    "lift_ci_high",
    "p_value",
    "srm_p_value",
    "srm_flag",
)


def load_experiments(spark: SparkSession, root: str) -> pd.DataFrame | None:
    """Each experiment's rows of its latest analysis (gold/experiment_results)."""
    df = _read(spark, root, lake.EXPERIMENT_RESULTS)
    if df is None:
        return None
    latest = df.groupBy("experiment_id").agg(F.max("as_of").alias("as_of"))
    return _frame(df.join(latest, ["experiment_id", "as_of"]), EXPERIMENT_COLUMNS)


RUN_COLUMNS = ("run_id", "job", "as_of", "started_at", "ended_at", "status", "error")


def load_runs(spark: SparkSession, root: str) -> pd.DataFrame | None:
    df = _read(spark, root, lake.RUNS)
    if df is None:
        return None
    latest = df.select(*RUN_COLUMNS).orderBy(F.desc("started_at")).limit(MAX_RUNS)
    return _frame(latest, RUN_COLUMNS)


HEALTH_KPI_COLUMNS = (
    "as_of",
    "segment_id",
    "members",
    "conversion_rate_30d",
    "revenue_per_user_30d",
    "aov_30d",
    "sessions_per_user_30d",
    "retention_30d",
)
ALERT_COLUMNS = ("as_of", "segment_id", "alert", "message")


def load_health(spark: SparkSession, root: str) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """Every gold/segment_kpis row and every gold/segment_alerts row."""
    kpis = _read(spark, root, lake.SEGMENT_KPIS)
    alerts = _read(spark, root, lake.SEGMENT_ALERTS)
    return (
        None if kpis is None else _frame(kpis, HEALTH_KPI_COLUMNS),
        None if alerts is None else _frame(alerts, ALERT_COLUMNS),
    )
