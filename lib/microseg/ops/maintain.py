"""`microseg maintain`: upkeep of every table of the lake.

Per table that exists, in this order:
1. its declared properties (`lake.Table.table_properties`: no statistics on identifier
   columns) and the log settings of `maintain.*`: `delta.logRetentionDuration` (how long the
   transaction log keeps old versions), `delta.deletedFileRetentionDuration`
   (= privacy.erasure_retention) and `delta.checkpointInterval`;
2. with `maintain.retention` set, the retention policy: rows whose time is older than that
   before now are deleted (events by event_time, and what derives from them by its own time:
   see RETENTION_COLUMNS);
3. OPTIMIZE: small files compacted (what micro-batches and incremental runs leave);
4. VACUUM with privacy.erasure_retention: files no version within it needs are deleted.

Safe beside other jobs: each step is one Delta transaction. Appends by others never conflict
with OPTIMIZE; a step that does conflict (a concurrent MERGE rewrote the same files) is tried
again, up to `_ATTEMPTS` times, then reported in one line. Below 7 days of retention, a
reader of an older version (a long query, a stream behind) may find its files gone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime

from delta.tables import DeltaTable
from pyspark.sql import SparkSession

from microseg.core import lake, progress
from microseg.core.clock import utc_now
from microseg.core.config import Config
from microseg.core.failpoints import durable
from microseg.ops.forget import protect_table, vacuum

_ATTEMPTS = 3

# The time column by which the retention policy ages each table's rows (tables not listed
# keep every row: the run log, the catalog, the registry, the audit of erasures).
RETENTION_COLUMNS = {
    lake.EVENTS.name: "event_time",
    lake.QUARANTINE.name: "quarantined_at",
    lake.SESSIONS.name: "session_end",
    lake.USER_DAYS.name: "event_date",
    lake.USER_FEATURES.name: "as_of",
    # intervals that ended before the cutoff; current ones stay, however old
    lake.SEGMENT_MEMBERSHIP.name: "valid_to",
    lake.SEGMENT_CHANGES.name: "changed_at",
    lake.PROPENSITY_SCORES.name: "as_of",
}


@dataclass
class TableUpkeep:
    table: str
    rows_expired: int = 0
    files_compacted: int = 0
    files_vacuumed: int = 0
    problem: str | None = None  # the one line of a step that failed after its attempts


@dataclass
class MaintainReport:
    cutoff: datetime | None
    tables: list[TableUpkeep] = field(default_factory=list)


def _committed(spark: SparkSession, root: str, table: lake.Table, step, metric: str) -> int:
    """Run `step` (with retries); `metric` of the commit it made, 0 if it made none."""
    path = lake.table_path(root, table)
    before = DeltaTable.forPath(spark, path).history(1).first()["version"]
    _with_retries(step)
    last = DeltaTable.forPath(spark, path).history(1).first()
    if last["version"] == before:
        return 0
    durable(f"{table.name} {last['operation']}")
    return int((last["operationMetrics"] or {}).get(metric) or 0)


def _with_retries(step):
    """Run `step`; on a Delta write conflict, again (with a short pause), then give up with
    the conflict as one line."""
    for attempt in range(1, _ATTEMPTS + 1):
        try:
            return step()
        except Exception as exc:  # noqa: BLE001 - py4j wraps Delta's conflicts
            conflict = "Concurrent" in type(exc).__name__ or "DELTA_CONCURRENT" in str(exc)
            if not conflict or attempt == _ATTEMPTS:
                raise
            time.sleep(attempt)
    return None


def _days(duration) -> int:
    return max(1, round(duration.total_seconds() / 86400))


def run_maintain(
    spark: SparkSession, cfg: Config, *, now: datetime | None = None
) -> MaintainReport:
    root = cfg.lake.root
    settings = cfg.maintain
    cutoff = None if settings.retention is None else (now or utc_now()) - settings.retention
    report = MaintainReport(cutoff=cutoff)
    retention = cfg.privacy.erasure_retention
    for table in lake.ALL_TABLES:
        if not lake.table_exists(spark, root, table):
            continue
        upkeep = TableUpkeep(table.name)
        report.tables.append(upkeep)
        path = lake.table_path(root, table)
        try:
            progress.step(f"{table.name}: settings")
            protect_table(spark, root, table)
            spark.sql(
                f"ALTER TABLE delta.`{path}` SET TBLPROPERTIES ("
                f"'delta.logRetentionDuration' = 'interval {_days(settings.log_retention)} days', "
                f"'delta.deletedFileRetentionDuration' = "
                f"'interval {int(retention.total_seconds())} seconds', "
                f"'delta.checkpointInterval' = '{settings.checkpoint_interval}')"
            )
            durable(f"{table.name} settings")
            column = RETENTION_COLUMNS.get(table.name)
            if cutoff is not None and column is not None:
                progress.step(f"{table.name}: deleting rows older than {cutoff:%Y-%m-%d}")
                literal = f"TIMESTAMP '{cutoff:%Y-%m-%d %H:%M:%S}'"
                if column == "event_date":
                    literal = f"DATE '{cutoff:%Y-%m-%d}'"
                condition = f"{column} < {literal}"
                upkeep.rows_expired = _committed(
                    spark,
                    root,
                    table,
                    lambda p=path, c=condition: DeltaTable.forPath(spark, p).delete(c),
                    "numDeletedRows",
                )
            progress.step(f"{table.name}: OPTIMIZE")
            upkeep.files_compacted = _committed(
                spark,
                root,
                table,
                lambda p=path: spark.sql(f"OPTIMIZE delta.`{p}`").collect(),
                "numRemovedFiles",
            )
            progress.step(f"{table.name}: VACUUM")
            upkeep.files_vacuumed = vacuum(spark, root, table, retention)
            durable(f"{table.name} VACUUM")
        except Exception as exc:  # noqa: BLE001 - one table's failure does not stop the rest
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            upkeep.problem = f"{type(exc).__name__}: {text[:300]}"
    return report
