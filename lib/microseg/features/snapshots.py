"""The one reader of gold/user_features snapshots (a snapshot = the rows of one as-of time)."""

from __future__ import annotations

from datetime import datetime

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from microseg.core import lake

KEY_COLUMNS = tuple(f.name for f in lake.USER_FEATURES.schema.fields)  # user_key .. run_id


def _at(as_of: datetime) -> F.Column:
    # as_of_date first: the table is partitioned by it, so only that folder is read
    return (F.col("as_of_date") == F.lit(as_of.date())) & (F.col("as_of") == F.lit(as_of))


def snapshot(
    spark: SparkSession,
    root: str,
    as_of: datetime,
    *,
    columns: list[str] | None = None,
    optional: tuple[str, ...] = (),
    require: bool = True,
) -> DataFrame:
    """The snapshot as of `as_of` (naive UTC): every column, or user_key, as_of, `columns` and
    those of `optional` the table has. FileNotFoundError when it has no row and `require`;
    ValueError naming a column of `columns` the table lacks."""
    missing = FileNotFoundError(
        f"no gold/user_features as of {as_of.isoformat()} under {root}: run "
        f"`microseg features --as-of {as_of.isoformat()}Z` first"
    )
    if not lake.table_exists(spark, root, lake.USER_FEATURES):
        if require:
            raise missing
        return spark.createDataFrame([], lake.USER_FEATURES.schema)
    table_df = lake.read_table(spark, root, lake.USER_FEATURES)
    snapshot_df = table_df.filter(_at(as_of))
    if columns is not None:
        absent = [c for c in columns if c not in table_df.columns]
        if absent:
            raise ValueError(
                f"gold/user_features has no column(s) {absent}: add them to features.include "
                f"and recompute with `microseg features --as-of {as_of.isoformat()}Z`"
            )
        extra = [c for c in optional if c in table_df.columns and c not in columns]
        snapshot_df = snapshot_df.select("user_key", "as_of", *columns, *extra)
    if require and snapshot_df.limit(1).count() == 0:
        raise missing
    return snapshot_df


def latest_as_of(spark: SparkSession, root: str) -> datetime | None:
    """The newest snapshot's as-of time, or None."""
    if not lake.table_exists(spark, root, lake.USER_FEATURES):
        return None
    return lake.read_table(spark, root, lake.USER_FEATURES).agg(F.max("as_of")).first()[0]


def latest_snapshot(spark: SparkSession, root: str) -> DataFrame | None:
    """The newest snapshot's feature columns and user_key (no other key column), or None."""
    latest = latest_as_of(spark, root)
    if latest is None:
        return None
    return snapshot(spark, root, latest, require=False).drop(
        *[c for c in KEY_COLUMNS if c != "user_key"]
    )


def computed_at(spark: SparkSession, root: str, as_of: datetime) -> datetime | None:
    """When the snapshot as of `as_of` was computed, or None when there is none."""
    if not lake.table_exists(spark, root, lake.USER_FEATURES):
        return None
    return (
        lake.read_table(spark, root, lake.USER_FEATURES)
        .filter(_at(as_of))
        .agg(F.max("computed_at"))
        .first()[0]
    )
