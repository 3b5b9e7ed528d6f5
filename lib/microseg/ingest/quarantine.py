"""What bronze/quarantine holds, in summary."""

from __future__ import annotations

from dataclasses import dataclass

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from microseg.core import lake


@dataclass(frozen=True)
class ReasonCount:
    source: str
    reason: str
    records: int


def reason_counts(spark: SparkSession, root: str) -> list[ReasonCount]:
    """Quarantined records per source and reason: by source, then the most frequent reason
    first; empty when the table does not exist yet."""
    if not lake.table_exists(spark, root, lake.QUARANTINE):
        return []
    rows = (
        lake.read_table(spark, root, lake.QUARANTINE)
        .groupBy("source", "reason")
        .agg(F.count(F.lit(1)).alias("records"))
        .orderBy("source", F.desc("records"), "reason")
        .collect()
    )
    return [ReasonCount(r.source, r.reason, r.records) for r in rows]
