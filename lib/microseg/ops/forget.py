"""`microseg forget`: erase people from every table, file version and store of the lake.

For the ids given (user ids or anonymous ids, raw as the person knows them), `resolve` finds
every key of each person as the lake stores it: the id itself and its pseudonym (keyed hash),
the user an anonymous id was stitched to (silver/identity_map, else the one user id bronze
saw with it), and every anonymous id stitched to that user. Then, in this order, so that an
interruption is completed by running the same request again:

1. the keys' audit hashes go to ops/suppression: ingest (batch and stream) drops records of
   erased people from then on, so re-ingesting old files does not bring them back;
2. the online store loses the people's members, aliases and pending change rows, and its
   file is rewritten (SQLite: VACUUM, then the write-ahead log is truncated); the stream's
   checkpoints are deleted: its state holds per-user facts. The next `microseg stream`
   rebuilds them from the erased lake (stop the stream before forgetting);
3. every table with identifier columns (`lake.Table.identifiers`) loses the people's rows in
   one MERGE each, joined against a one-row source holding the keys: a DELETE's predicate,
   literal values included, would be written into the Delta log. Arrays that list other
   people too (identity_map.user_ids) lose only the erased ids. Derived tables go first,
   the two `resolve` reads last (`erasure_order`), so that a rerun finds the same people;
4. where deletion vectors are on, `REORG TABLE ... APPLY (PURGE)` rewrites the files they
   mark (a deletion vector leaves the row in its Parquet file);
5. VACUUM with privacy.erasure_retention removes the replaced files and the Change Data Feed
   files (`_change_data/`) that still hold the rows, once they are that old;
6. a row in ops/erasures records the request with hashed ids only.

Delta keeps no file statistics on identifier columns (`delta.dataSkippingStatsColumns`), so
the transaction log never holds an id; `microseg.ops.verify` checks every file.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from delta.tables import DeltaTable
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from microseg.core import lake, progress
from microseg.core.clock import utc_now
from microseg.core.config import Config, ConfigError
from microseg.core.failpoints import durable
from microseg.core.online_store import open_store
from microseg.core.privacy import audit_hash, audit_key, id_pattern, keyed_hash, pseudonym
from microseg.core.runs import RunRecord, recorded
from microseg.core.spark import session_conf
from microseg.streaming.checkpoint import checkpoint_path, history_checkpoint_path

# Delta's shortest VACUUM retention without turning its safety check off
_DELTA_MIN_RETENTION = timedelta(days=7)


@dataclass
class Subjects:
    """The people to erase: the ids given, and every key of theirs the lake stores."""

    given: list[str]
    user_ids: set[str] = field(default_factory=set)
    anonymous_ids: set[str] = field(default_factory=set)
    forms: dict[str, str] = field(default_factory=dict)  # id or pseudonym -> the given id
    found: set[str] = field(default_factory=set)  # given ids with data in the lake

    @property
    def keys(self) -> set[str]:
        """Every value an identifier column of a person may hold."""
        return (
            set(self.forms)
            | self.user_ids
            | self.anonymous_ids
            | {f"anon:{a}" for a in self.anonymous_ids}
        )

    @property
    def stored_ids(self) -> set[str]:
        """The ids (not user keys) ingest compares with the suppression list."""
        return set(self.forms) | self.user_ids | self.anonymous_ids


@dataclass
class ErasureReport:
    request_id: str
    subjects: Subjects
    rows_removed: dict[str, int] = field(default_factory=dict)
    store_entries_removed: int = 0
    destinations_notified: dict[str, int] = field(default_factory=dict)  # id -> people
    checkpoints_removed: list[str] = field(default_factory=list)
    purged: list[str] = field(default_factory=list)  # tables whose deletion vectors were purged
    vacuumed_files: int = 0
    retention: timedelta = timedelta(0)
    requested_at: datetime | None = None
    completed_at: datetime | None = None


def require_key(cfg: Config) -> bytes:
    key = cfg.privacy.key()
    if key is None:
        raise ConfigError(
            "forget needs the pseudonymization key (to find pseudonymized ids and to hash the "
            "audit and suppression rows): export MICROSEG_PSEUDONYMIZATION_KEY"
        )
    return key


def resolve(spark: SparkSession, cfg: Config, ids: list[str], key: bytes) -> Subjects:
    """Every stored key of the people the ids name (see the module docstring)."""
    root = cfg.lake.root
    subjects = Subjects(given=list(dict.fromkeys(ids)))
    for given in subjects.given:
        subjects.forms[given] = given
        subjects.forms[pseudonym(given, key)] = given
    forms = set(subjects.forms)
    stitched: dict[str, str] = {}  # anonymous id -> user key, from the identity map
    if lake.table_exists(spark, root, lake.IDENTITY_MAP):
        identity_df = lake.read_table(spark, root, lake.IDENTITY_MAP)
        rows = identity_df.filter(
            F.col("anonymous_id").isin(*forms) | F.col("user_key").isin(*forms)
        ).collect()
        for row in rows:
            stitched[row.anonymous_id] = row.user_key
            subjects.user_ids.add(row.user_key)
            subjects.found.add(subjects.forms.get(row.anonymous_id) or subjects.forms[row.user_key])
    if lake.table_exists(spark, root, lake.EVENTS):
        events_df = lake.read_table(spark, root, lake.EVENTS)
        pairs = (
            events_df.filter(
                F.col("user_id").isin(*forms, *subjects.user_ids)
                | F.col("anonymous_id").isin(*forms)
            )
            .select("user_id", "anonymous_id")
            .distinct()
            .collect()
        )
        for row in pairs:
            for value in (row.user_id, row.anonymous_id):
                if value in subjects.forms:
                    subjects.found.add(subjects.forms[value])
            if row.user_id in forms:
                subjects.user_ids.add(row.user_id)
            if row.anonymous_id in forms:
                subjects.anonymous_ids.add(row.anonymous_id)
        # an anonymous id seen with one of the users is theirs where the identity map stitches
        # it to them, or (not stitched yet) where they are the only user seen with it
        candidates = {
            r.anonymous_id for r in pairs if r.anonymous_id and r.anonymous_id not in stitched
        }
        if candidates:
            seen = (
                events_df.filter(
                    F.col("anonymous_id").isin(*candidates) & F.col("user_id").isNotNull()
                )
                .groupBy("anonymous_id")
                .agg(F.collect_set("user_id").alias("users"))
                .collect()
            )
            for row in seen:
                users = set(row.users)
                if len(users) == 1 and row.anonymous_id in forms:
                    subjects.user_ids |= users  # a given anonymous id that logged in
                if users <= subjects.user_ids:
                    subjects.anonymous_ids.add(row.anonymous_id)
    if lake.table_exists(spark, root, lake.IDENTITY_MAP):
        for row in (
            lake.read_table(spark, root, lake.IDENTITY_MAP)
            .filter(F.col("user_key").isin(*subjects.user_ids) | F.col("anonymous_id").isin(*forms))
            .select("anonymous_id")
            .collect()
        ):
            subjects.anonymous_ids.add(row.anonymous_id)
    return subjects


# --------------------------------------------------------------------------------------
# the tables


# Columns computed from an identifier array, set again when an erased id leaves the array
_DERIVED = {
    lake.IDENTITY_MAP.name: {
        "user_ids_seen": "CAST(size(array_except(t.user_ids, s.keys)) AS BIGINT)",
        "is_conflict": "size(array_except(t.user_ids, s.keys)) > 1",
    }
}


def erase_clauses(table: lake.Table) -> tuple[str, str, dict[str, str]]:
    """(match condition, delete condition, updates) of the MERGE that erases the people from
    `table`, against a source `s` with `keys` (array) and `pattern` (regex of the raw ids).
    A row is deleted where a person's key is its own identifier (or its text quotes one); a
    row that only lists one among others in an array keeps the others."""
    own, listed = [], []
    for column, kind in table.identifiers.items():
        if kind in ("user_id", "anonymous_id", "user_key"):
            own.append(f"array_contains(s.keys, t.`{column}`)")
        elif kind in ("user_ids", "anonymous_ids"):
            listed.append(column)
        elif kind == "text":
            own.append(f"coalesce(t.`{column}` RLIKE s.pattern, false)")
        else:
            raise ValueError(f"{table.name}.{column}: unknown identifier kind {kind!r}")
    delete = " OR ".join(own) if own else "false"
    match = " OR ".join([*own, *(f"arrays_overlap(t.`{c}`, s.keys)" for c in listed)])
    updates = {f"`{c}`": f"array_except(t.`{c}`, s.keys)" for c in listed}
    updates.update(_DERIVED.get(table.name, {}))
    return match, delete, updates


def _erase_table(spark: SparkSession, root: str, table: lake.Table, source_df) -> int:
    match, delete, updates = erase_clauses(table)
    target = DeltaTable.forPath(spark, lake.table_path(root, table))
    before = target.history(1).first()["version"]
    merge = target.alias("t").merge(source_df.alias("s"), match).whenMatchedDelete(delete)
    if updates:
        merge = merge.whenMatchedUpdate(set=updates)
    merge.execute()
    last = target.history(1).first()
    if last["version"] == before:  # nothing matched: Delta made no commit
        return 0
    metrics = last["operationMetrics"] or {}
    return int(metrics.get("numTargetRowsDeleted") or 0) + int(
        metrics.get("numTargetRowsUpdated") or 0
    )


def _table_property(spark: SparkSession, root: str, table: lake.Table, name: str) -> str | None:
    detail = DeltaTable.forPath(spark, lake.table_path(root, table)).detail().first()
    return (detail["properties"] or {}).get(name)


def protect_table(spark: SparkSession, root: str, table: lake.Table) -> None:
    """Give an existing table the properties its declaration has now (e.g. no statistics on
    identifier columns, for a table created before they were declared)."""
    path = lake.table_path(root, table)
    wanted = table.table_properties()
    current = DeltaTable.forPath(spark, path).detail().first()["properties"] or {}
    missing = {k: v for k, v in wanted.items() if current.get(k) != v}
    if missing:
        settings = ", ".join(f"'{k}' = '{v}'" for k, v in missing.items())
        spark.sql(f"ALTER TABLE delta.`{path}` SET TBLPROPERTIES ({settings})")


def vacuum(spark: SparkSession, root: str, table: lake.Table, retention: timedelta) -> int:
    """VACUUM the table with `retention`; the files it deleted."""
    path = lake.table_path(root, table)
    settings = {
        # its file listing runs this many tasks (Spark's default, 10000, takes ~20 s a table)
        "spark.sql.sources.parallelPartitionDiscovery.parallelism": str(
            spark.sparkContext.defaultParallelism
        ),
    }
    if retention < _DELTA_MIN_RETENTION:
        settings["spark.databricks.delta.retentionDurationCheck.enabled"] = "false"
    with session_conf(spark, settings):
        spark.sql(
            f"VACUUM delta.`{path}` RETAIN {retention.total_seconds() / 3600:.6f} HOURS"
        ).collect()
    metrics = DeltaTable.forPath(spark, path).history(1).first()
    if metrics["operation"] == "VACUUM END":
        return int((metrics["operationMetrics"] or {}).get("numDeletedFiles") or 0)
    return 0


def erasure_order() -> list[lake.Table]:
    """The tables with identifiers, in the order forget erases them: derived ones first, then
    bronze/events, and silver/identity_map last. `resolve` reads the last two, so a forget
    interrupted at any point finds the same people when it runs again."""
    last = [lake.EVENTS, lake.IDENTITY_MAP]
    derived = [t for t in reversed(lake.ALL_TABLES) if t.identifiers and t not in last]
    return [*derived, *last]


def _delete_folder(spark: SparkSession, path: str) -> bool:
    jvm = spark._jvm
    hadoop_path = jvm.org.apache.hadoop.fs.Path(path)
    fs = hadoop_path.getFileSystem(spark._jsc.hadoopConfiguration())
    if not fs.exists(hadoop_path):
        return False
    return bool(fs.delete(hadoop_path, True))


# --------------------------------------------------------------------------------------
# the job


def run_forget(
    spark: SparkSession, cfg: Config, ids: list[str], *, request_id: str
) -> ErasureReport:
    """Erase the people `ids` name from the lake, the online store and the stream's state."""
    if not ids:
        raise ConfigError("forget needs at least one id")
    key = require_key(cfg)
    root = cfg.lake.root
    report = ErasureReport(request_id=request_id, subjects=Subjects(given=ids))
    report.requested_at = utc_now()
    report.retention = cfg.privacy.erasure_retention

    progress.step("finding every id of the people")
    subjects = resolve(spark, cfg, ids, key)
    report.subjects = subjects

    progress.step("adding them to ops/suppression")
    now = utc_now()
    suppression_df = spark.createDataFrame(
        [(audit_hash(i, key), request_id, now) for i in sorted(subjects.stored_ids)],
        lake.SUPPRESSION.schema,
    )
    lake.insert_new(spark, root, lake.SUPPRESSION, suppression_df, keys=("id_hash",))

    progress.step("sending removals to the destinations that had them")
    from microseg.activation.deliver import notify_erasure

    report.destinations_notified = notify_erasure(spark, cfg, subjects.keys)
    durable("destinations")

    progress.step("erasing from the online store")
    store = open_store(cfg)
    try:
        report.store_entries_removed = store.forget(subjects.keys, subjects.anonymous_ids)
    finally:
        store.close()
    durable("store")
    for path in (checkpoint_path(cfg), history_checkpoint_path(cfg)):
        if _delete_folder(spark, path):
            report.checkpoints_removed.append(path)
            durable(f"checkpoint {path}")

    source_df = spark.createDataFrame(
        [(sorted(subjects.keys), id_pattern(subjects.keys))],
        "keys array<string>, pattern string",
    )
    for table in erasure_order():
        if not lake.table_exists(spark, root, table):
            continue
        progress.step(f"erasing from {table.name}")
        protect_table(spark, root, table)
        report.rows_removed[table.name] = _erase_table(spark, root, table, source_df)
        durable(table.name)
        if (_table_property(spark, root, table, "delta.enableDeletionVectors") or "") == "true":
            spark.sql(f"REORG TABLE delta.`{lake.table_path(root, table)}` APPLY (PURGE)")
            report.purged.append(table.name)
            durable(f"{table.name} purge")

    for table in erasure_order():
        if lake.table_exists(spark, root, table):
            progress.step(f"vacuuming {table.name}")
            report.vacuumed_files += vacuum(spark, root, table, report.retention)
            durable(f"{table.name} vacuum")

    report.completed_at = utc_now()
    return report


# a job's start and a forget's suppression rows may come from two machines' clocks
_CLOCK_SLACK = timedelta(minutes=5)


def settle_erasures(spark: SparkSession, cfg: Config, since: datetime) -> dict[str, int]:
    """Erase again the people whose erasure began after `since` (ops/suppression rows added
    since), from every identifier table and the online store: a job that read their events
    before a concurrent `forget` erased them may have written their rows after it. Rows
    removed per table; {} (one small read) when nobody was erased meanwhile."""
    root = cfg.lake.root
    if not lake.table_exists(spark, root, lake.SUPPRESSION):
        return {}
    hashes_df = (
        lake.read_table(spark, root, lake.SUPPRESSION)
        .filter(F.col("added_at") >= F.lit(since - _CLOCK_SLACK))
        .select("id_hash")
    )
    hashes = [r.id_hash for r in hashes_df.collect()]
    if not hashes:
        return {}
    key = audit_key(require_key(cfg))
    hashes_df = spark.createDataFrame([(h,) for h in hashes], "id_hash string")
    tables = [t for t in erasure_order() if lake.table_exists(spark, root, t)]
    keys: set[str] = set()
    for table in tables:
        for column, kind in table.identifiers.items():
            if kind not in ("user_id", "anonymous_id", "user_key"):
                continue
            values_df = (
                lake.read_table(spark, root, table)
                .select(F.col(column).alias("value"))
                .distinct()
                .withColumn("bare", F.regexp_replace("value", "^anon:", ""))
            )
            found = values_df.join(
                F.broadcast(hashes_df), keyed_hash(F.col("bare"), key) == F.col("id_hash"), "semi"
            )
            for row in found.collect():
                keys |= {row.value, row.bare, f"anon:{row.bare}"}
    if not keys:
        return {}
    store = open_store(cfg)
    try:
        store.forget(keys, keys)
    finally:
        store.close()
    source_df = spark.createDataFrame(
        [(sorted(keys), id_pattern(keys))], "keys array<string>, pattern string"
    )
    removed = {}
    for table in tables:
        progress.step(f"erasing people erased meanwhile from {table.name}")
        removed[table.name] = _erase_table(spark, root, table, source_df)
        if removed[table.name]:
            vacuum(spark, root, table, cfg.privacy.erasure_retention)
    return removed


@contextmanager
def erasures_respected(spark: SparkSession, cfg: Config) -> Iterator[None]:
    """Around a job that writes rows of people: when it succeeds, settle_erasures for the
    requests that began while it ran (no key, no forget: nothing to settle)."""
    started = utc_now()
    yield
    if cfg.privacy.key() is not None:
        settle_erasures(spark, cfg, started)


@contextmanager
def recorded_job(
    spark: SparkSession, cfg: Config, *, job: str, as_of: datetime | None = None
) -> Iterator[RunRecord]:
    """runs.recorded for a job that writes rows of people, with erasures_respected inside
    (what it erases again counts as the run's writes; a failure to, as the run's failure)."""
    with recorded(spark, cfg, job=job, as_of=as_of) as run, erasures_respected(spark, cfg):
        yield run


def record_erasure(
    spark: SparkSession,
    cfg: Config,
    report: ErasureReport,
    *,
    verification=None,
) -> None:
    """Append the request's audit row to ops/erasures (hashed ids only)."""
    key = require_key(cfg)
    row = (
        report.request_id,
        sorted(audit_hash(i, key) for i in report.subjects.given),
        len(report.subjects.stored_ids),
        report.requested_at,
        report.completed_at,
        report.rows_removed,
        report.store_entries_removed,
        report.checkpoints_removed,
        report.retention.total_seconds() / 3600,
        report.completed_at + report.retention,
        None if verification is None else verification.clean,
        None if verification is None else len(verification.hits),
        None if verification is None else verification.files,
    )
    lake.ensure_table(spark, cfg.lake.root, lake.ERASURES)
    (
        spark.createDataFrame([row], lake.ERASURES.schema)
        .write.format("delta")
        .mode("append")
        .save(lake.table_path(cfg.lake.root, lake.ERASURES))
    )
