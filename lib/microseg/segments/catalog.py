"""gold/segment_catalog: per run (as-of), scope and segment, its definition, size and health.

Every segment source (rules, clusters, propensity) describes its segments with CatalogRow and
writes them with write_catalog, keyed on (as_of, source, scope, segment_id).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from microseg.core import lake
from microseg.core.clock import utc_now
from microseg.core.failpoints import durable
from microseg.segments.membership import Scope, SegmentStats

# a row whose values in these columns are unchanged keeps its first run_id
_COMPARED = ("definition_version", "matched", "size", "status", "entered", "exited")


@dataclass(frozen=True)
class CatalogRow:
    """One gold/segment_catalog row (core/schemas.SEGMENT_CATALOG documents each column)."""

    as_of: datetime
    source: str
    scope: str
    segment_id: str
    name: str
    definition: str  # JSON
    definition_version: str
    matched: int
    size: int
    status: str
    entered: int
    exited: int
    run_id: str
    description: str | None = None
    tags: tuple[str, ...] = ()
    parent: str | None = None
    exclusive_group: str | None = None
    priority: int | None = None
    min_size: str | None = None
    status_reason: str | None = None
    previous_size: int | None = None
    stability: float | None = None
    overlap: dict[str, float] | None = None
    recorded_at: datetime = field(default_factory=utc_now)

    @classmethod
    def of(
        cls,
        scope: Scope,
        segment_id: str,
        stats: SegmentStats | None,
        *,
        as_of: datetime,
        run_id: str,
        definition: Any,
        overlaps: dict[str, dict[str, float]],
        **columns: Any,
    ) -> CatalogRow:
        """A row whose sizes and changes come from the membership writer's stats (a segment
        without members has none) and `definition` is JSON-encoded; `columns` give the rest
        (name, definition_version, matched, status, ...; `size` overrides the stats')."""
        measured: dict[str, Any] = {"size": 0, "entered": 0, "exited": 0}
        if stats is not None:
            measured = {
                "size": stats.size,
                "previous_size": stats.previous_size,
                "entered": stats.entered,
                "exited": stats.exited,
                "stability": stats.stability,
            }
        size = columns.pop("size", measured.pop("size"))
        return cls(
            as_of=as_of,
            source=scope.source,
            scope=scope.name,
            segment_id=segment_id,
            definition=json.dumps(definition, sort_keys=True, default=str),
            run_id=run_id,
            size=size,
            overlap=overlaps.get(segment_id) if size else None,
            **{**measured, **columns},
        )


def write_catalog(
    spark: SparkSession, root: str, rows: list[CatalogRow], *, update_unchanged: bool = False
) -> None:
    """Upsert the rows keyed on (as_of, source, scope, segment_id). A row whose definition
    version, sizes, status and changes are the same is left as it is (first run_id kept)
    unless update_unchanged."""
    schema = lake.SEGMENT_CATALOG.schema
    values = [asdict(row) for row in rows]
    rows_df = spark.createDataFrame(
        [[{**v, "tags": list(v["tags"])}[f.name] for f in schema.fields] for v in values], schema
    )
    changed = " OR ".join(f"t.{c} <> s.{c}" for c in _COMPARED)
    (
        lake.ensure_table(spark, root, lake.SEGMENT_CATALOG)
        .alias("t")
        .merge(
            rows_df.alias("s"),
            "t.as_of = s.as_of AND t.source = s.source AND t.scope = s.scope "
            "AND t.segment_id = s.segment_id",
        )
        .whenMatchedUpdateAll(condition=None if update_unchanged else changed)
        .whenNotMatchedInsertAll()
        .execute()
    )
    durable(lake.SEGMENT_CATALOG.name)


def catalog_history(spark: SparkSession, root: str, segment_id: str) -> DataFrame | None:
    """Every catalog row of a segment, newest as-of first; None before any run."""
    if not lake.table_exists(spark, root, lake.SEGMENT_CATALOG):
        return None
    return (
        lake.read_table(spark, root, lake.SEGMENT_CATALOG)
        .filter(F.col("segment_id") == segment_id)
        .orderBy(F.desc("as_of"))
    )
