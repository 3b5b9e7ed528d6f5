"""gold/model_registry: one typed entry per trained model version, one writer, one reader.

Cluster models (kind "cluster", model_name = cluster.model_name) and propensity models (kind
"propensity", model_name = the target) share the table. Versions come from `new_version` and
sort by training time; the latest version is the last one trained.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from typing import Any

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from microseg.core import lake

KEY = ("model_name", "version")
TRAIN_COMMAND = {
    "cluster": "microseg cluster train --as-of T",
    "propensity": "microseg propensity train --target {model_name} --as-of T",
}


class ModelNotFoundError(FileNotFoundError):
    """No registry entry for a model (or for one version of it)."""


@dataclass(frozen=True)
class RegistryEntry:
    """One gold/model_registry row, field for field (params and details are the parsed JSON
    of their columns; trained_at and the as-of times are naive UTC)."""

    model_name: str
    version: str
    kind: str
    trained_at: datetime
    training_as_of: tuple[datetime, ...]
    evaluation_as_of: datetime | None
    params: dict[str, Any]
    metrics: dict[str, float]
    details: dict[str, Any] | None
    training_data_hash: str
    path: str
    run_id: str

    @classmethod
    def from_row(cls, row) -> RegistryEntry:
        return cls(
            model_name=row.model_name,
            version=row.version,
            kind=row.kind,
            trained_at=row.trained_at,
            training_as_of=tuple(row.training_as_of),
            evaluation_as_of=row.evaluation_as_of,
            params=json.loads(row.params),
            metrics=dict(row.metrics),
            details=None if row.details is None else json.loads(row.details),
            training_data_hash=row.training_data_hash,
            path=row.path,
            run_id=row.run_id,
        )

    def to_row(self) -> tuple:
        """The row in MODEL_REGISTRY's column order; a NaN metric (one that could not be
        computed) is left out of the map."""
        values = {
            "params": json.dumps(self.params, sort_keys=True),
            "metrics": {k: float(v) for k, v in self.metrics.items() if not math.isnan(v)},
            "details": None if self.details is None else json.dumps(self.details, sort_keys=True),
            "training_as_of": list(self.training_as_of),
        }
        return tuple(values.get(f.name, getattr(self, f.name)) for f in fields(self))


def new_version(now: datetime | None = None) -> str:
    """'20261124T051500Z-0a1b2c': the UTC time (default: now), then its microseconds as 6 hex
    digits, so versions sort by training time."""
    now = now or datetime.now(timezone.utc)
    if now.tzinfo is not None:
        now = now.astimezone(timezone.utc)
    return f"{now:%Y%m%dT%H%M%SZ}-{now.microsecond:06x}"


def _as_text(column: str, data_type: T.DataType) -> Column:
    if isinstance(data_type, T.NumericType | T.BooleanType):
        text = F.col(column).cast("double").cast("string")
    elif isinstance(data_type, T.TimestampType):
        text = F.unix_micros(F.col(column)).cast("string")
    else:
        text = F.col(column).cast("string")
    return F.coalesce(text, F.lit("\\N"))


def training_data_hash(rows_df: DataFrame, columns: Sequence[str]) -> str:
    """sha256 (hex) of the JSON {"columns": columns, "rows": row count, "sums": [s0 .. s3]},
    where s_i is the sum over the rows of the i-th 60-bit slice (hex digits 15i+1 .. 15i+15)
    of sha256(the row's values of `columns` joined by U+001F). A value is written as text:
    a number as a double (1 and 1.0 agree), a timestamp as microseconds since the epoch (no
    session time zone), anything else cast to string, null as \\N. The same rows in any order
    and partitioning give the same hash."""
    types = {f.name: f.dataType for f in rows_df.schema.fields}
    row_hash = F.sha2(F.concat_ws("\x1f", *[_as_text(c, types[c]) for c in columns]), 256)
    slices = [
        F.sum(F.conv(F.substring("_h", 1 + 15 * i, 15), 16, 10).cast("decimal(38,0)"))
        .cast("string")
        .alias(f"s{i}")
        for i in range(4)
    ]
    summary = rows_df.select(row_hash.alias("_h")).agg(F.count(F.lit(1)).alias("n"), *slices)
    row = summary.first()
    payload = {
        "columns": list(columns),
        "rows": row["n"],
        "sums": [row[f"s{i}"] or "0" for i in range(4)],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def register(spark: SparkSession, root: str, entry: RegistryEntry) -> None:
    """Add the entry to gold/model_registry (an entry already there under its model_name and
    version is left as it is)."""
    row_df = spark.createDataFrame([entry.to_row()], lake.MODEL_REGISTRY.schema)
    lake.insert_new(spark, root, lake.MODEL_REGISTRY, row_df, KEY)


def _rows(spark: SparkSession, root: str, kind: str, model_name: str | None) -> DataFrame | None:
    if not lake.table_exists(spark, root, lake.MODEL_REGISTRY):
        return None
    rows_df = lake.read_table(spark, root, lake.MODEL_REGISTRY).filter(F.col("kind") == kind)
    if model_name is not None:
        rows_df = rows_df.filter(F.col("model_name") == model_name)
    return rows_df


def entries(
    spark: SparkSession, root: str, *, kind: str, model_name: str | None = None
) -> list[RegistryEntry]:
    """The entries of `kind` (and `model_name`), oldest first; [] when there is no registry."""
    rows_df = _rows(spark, root, kind, model_name)
    if rows_df is None:
        return []
    return [
        RegistryEntry.from_row(r)
        for r in rows_df.orderBy("trained_at", "version", "model_name").collect()
    ]


def exists(spark: SparkSession, root: str, model_name: str, *, kind: str) -> bool:
    """Whether any version of the model is registered."""
    rows_df = _rows(spark, root, kind, model_name)
    return rows_df is not None and not rows_df.isEmpty()


def get(
    spark: SparkSession, root: str, model_name: str, *, kind: str, version: str | None = None
) -> RegistryEntry:
    """The entry of `version`, or the latest version; ModelNotFoundError (a
    FileNotFoundError) naming the model and the version when there is none."""
    rows_df = _rows(spark, root, kind, model_name)
    if rows_df is not None and version is not None:
        rows_df = rows_df.filter(F.col("version") == version)
    row = (
        None
        if rows_df is None
        else rows_df.orderBy(F.desc("trained_at"), F.desc("version")).first()
    )
    if row is not None:
        return RegistryEntry.from_row(row)
    which = f"{kind} model '{model_name}'" + ("" if version is None else f" version {version}")
    hint = TRAIN_COMMAND.get(kind, "").format(model_name=model_name)
    raise ModelNotFoundError(
        f"no {which} in gold/model_registry under {root}"
        + (f": run `{hint}` first" if hint and version is None else "")
    )
