"""ops/runs: one row per job run, whatever the job and however it ended.

`recorded(spark, cfg, job=..., as_of=...)` wraps a job: it notes each lake table's Delta
version before, runs the job, then appends a row with the status, the error message if it
failed, the Delta versions the run produced per table and the rows written per table (from
the Delta commit metrics of those versions). Rows read are what the job reports through
`RunRecord.read(table, rows)`. Commits by other writers running at the same time would be
counted too; microseg jobs on one lake are meant to run one at a time (`microseg pipeline`).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime

from delta.tables import DeltaTable
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from microseg.core import lake, progress
from microseg.core.clock import naive_utc, utc_now
from microseg.core.config import Config
from microseg.core.failpoints import Crash

log = logging.getLogger("microseg")


def _rows_changed(metrics: dict[str, str]) -> int:
    """Rows a commit added or changed, from its Delta operation metrics."""

    def get(*keys: str) -> int:
        return sum(int(metrics.get(k) or 0) for k in keys)

    if "numTargetRowsInserted" in metrics:  # MERGE (its numOutputRows counts copies too)
        return get("numTargetRowsInserted", "numTargetRowsUpdated", "numTargetRowsDeleted")
    if "numUpdatedRows" in metrics or "numDeletedRows" in metrics:  # UPDATE, DELETE
        return get("numUpdatedRows", "numDeletedRows")
    return get("numOutputRows")  # WRITE, replaceWhere, CREATE TABLE AS SELECT


@dataclass
class RunRecord:
    run_id: str
    job: str
    as_of: datetime | None
    started_at: datetime
    rows_read: dict[str, int] = field(default_factory=dict)
    rows_written: dict[str, int] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    status: str = "running"
    error: str | None = None
    ended_at: datetime | None = None

    def read(self, table: str, rows: int) -> None:
        self.rows_read[table] = self.rows_read.get(table, 0) + int(rows)


def new_run_id() -> str:
    """A fresh run id (32 hex digits): what recorded() gives a run, and what a library call
    made outside recorded() writes under."""
    return uuid.uuid4().hex


def table_versions(spark: SparkSession, root: str) -> dict[str, int]:
    """Latest Delta version of every lake table that exists (ops/runs itself excluded)."""
    tables = [t for t in lake.ALL_TABLES if t is not lake.RUNS]
    found = {t.name: lake.table_version(spark, root, t) for t in tables}
    return {name: version for name, version in found.items() if version is not None}


def _written(spark: SparkSession, root: str, name: str, after: int) -> int:
    table = next(t for t in lake.ALL_TABLES if t.name == name)
    history = (
        DeltaTable.forPath(spark, lake.table_path(root, table))
        .history()
        .filter(F.col("version") > after)
        .select("operationMetrics")
        .collect()
    )
    total = 0
    for row in history:
        total += _rows_changed(row.operationMetrics or {})
    return total


@contextmanager
def recorded(
    spark: SparkSession, cfg: Config, *, job: str, as_of: datetime | None = None
) -> Iterator[RunRecord]:
    """Run the body as one job run and append its row to ops/runs, also when it fails."""
    root = cfg.lake.root
    record = RunRecord(
        run_id=new_run_id(),
        job=job,
        as_of=None if as_of is None else naive_utc(as_of),
        started_at=utc_now(),
    )
    before = table_versions(spark, root)
    try:
        yield record
        if record.status == "running":  # the job may have said it failed (RunRecord.error)
            record.status = "succeeded"
    except Crash:
        record.status = "killed"  # a test's kill point: a killed process records nothing
        raise
    except BaseException as exc:
        record.status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        record.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:1000]}"[:1100]
        raise
    finally:
        if record.status != "killed":
            _record(spark, root, record, before)


def _record(spark: SparkSession, root: str, record: RunRecord, before: dict[str, int]) -> None:
    record.ended_at = utc_now()
    try:
        progress.step("recording the run in ops/runs")
        after = table_versions(spark, root)
        for name, version in after.items():
            if version != before.get(name):
                record.versions[name] = version
                record.rows_written[name] = _written(spark, root, name, before.get(name, -1))
        append(spark, root, record)
    except Exception:  # noqa: BLE001 - never hide the job's own outcome
        log.warning("could not record the run in ops/runs", exc_info=True)


def append(spark: SparkSession, root: str, record: RunRecord) -> None:
    row = {
        "run_id": record.run_id,
        "job": record.job,
        "as_of": record.as_of,
        "started_at": record.started_at,
        "ended_at": record.ended_at,
        "status": record.status,
        "rows_read": record.rows_read,
        "rows_written": record.rows_written,
        "delta_versions": record.versions,
        "error": record.error,
    }
    schema = lake.RUNS.schema
    lake.ensure_table(spark, root, lake.RUNS)
    (
        spark.createDataFrame([[row[f.name] for f in schema.fields]], schema)
        .coalesce(1)
        .write.format("delta")
        .mode("append")
        .save(lake.table_path(root, lake.RUNS))
    )


def recent_runs(spark: SparkSession, root: str, *, limit: int = 20, job: str | None = None):
    if not lake.table_exists(spark, root, lake.RUNS):
        return []
    runs_df = lake.read_table(spark, root, lake.RUNS)
    if job:
        runs_df = runs_df.filter(F.col("job") == job)
    return runs_df.orderBy(F.desc("started_at")).limit(limit).collect()
