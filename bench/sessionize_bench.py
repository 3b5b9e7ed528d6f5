"""Pipeline benchmark: microseg vs a DuckDB yardstick vs a naive PySpark baseline, per stage.

    .venv/bin/python bench/sessionize_bench.py --events 1000000 5000000 20000000
    .venv/bin/python bench/sessionize_bench.py --events 1000000 --stages sessionize features

For each size, on the same data: generate synthetic Parquet events once (reused while its
manifest.json exists), ingest them into a Delta lake once (reused while bronze/events holds
the expected count), then run the selected stages in order, each with every system. All
systems read the lake's bronze/events (Delta) and write Delta.

Stage "sessionize" times

* microseg: `run_sessionize(spark, cfg, full=True)`, Delta in, Delta out (silver/sessions,
  plus silver/identity_map and the watermark it also maintains), local[*] with
  conf/local.yaml and --set overrides (default spark.conf.spark.driver.memory=8g);
* duckdb: bench/duckdb_sessions.sql over the bronze table's current Parquet files (listed
  by the `deltalake` package), streamed into a Delta table with `deltalake.write_deltalake`;
* naive: Spark join for identities, then groupBy("user_key").applyInPandas with the Python
  loop of bench/naive_sessionizer.py, written to Delta; only up to --naive-max-events.

Stage "features" (user features as of a time T, --as-of; by default the UTC midnight
before the latest event) times

* microseg: `run_features(spark, cfg, as_of=T)`, which computes all of its features (or,
  with --microseg-features shared, only the ten below) from silver (sessions, identity map
  and the user_days rollups that the sessionize stage maintains; when that stage did not
  run, run_features brings silver up to date first and that time counts here) plus bronze
  at the open edge around T, and writes gold/user_features. "sessionize + features" is the
  like-for-like sum against the other two systems, which rebuild sessions from the events;
* duckdb: the same events before T through bench/duckdb_sessions.sql, then
  bench/duckdb_features.sql, written with `deltalake.write_deltalake`;
* naive: Spark filter and identity join, then groupBy("user_key").applyInPandas that
  sessionizes each user with bench/naive_sessionizer.py and computes the features in pandas
  and Python (bench/naive_features.py), written to Delta; only up to --naive-max-events.
The yardsticks compute ten features (FEATURE_INTS, FEATURE_FLOATS, FEATURE_STRINGS), one or
more of every kind; microseg's output is compared on those columns.

After every stage it checks that the systems agree (row count and column sums, and a
row-by-row comparison on the stage's key: session_id or user_key), prints a table and
writes bench/results/pipeline-<size>.json; at the end bench/results/pipeline.md. Exits 1
when any system fails or disagrees.

The stages are a registry (STAGES): one function per system per stage plus a summary and a
comparison per stage.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
DUCKDB_SQL = BENCH / "duckdb_sessions.sql"
DUCKDB_FEATURES_SQL = BENCH / "duckdb_features.sql"
NAIVE_MODULES = [BENCH / "naive_sessionizer.py", BENCH / "naive_features.py"]
DEFAULT_SETS = ["spark.conf.spark.driver.memory=8g"]

log = logging.getLogger("sessionize_bench")


# --------------------------------------------------------------------------------------
# data: generate once, ingest once


@dataclass
class Dataset:
    requested: int  # the --events value
    events: int  # rows in bronze/events
    users: int
    data_dir: Path
    lake_root: Path
    cfg: Any  # microseg Config with lake.root = lake_root
    generated_now: bool = False
    ingested_now: bool = False
    prepare_seconds: dict[str, float] = field(default_factory=dict)
    load_before: list[float] = field(default_factory=list)  # 1/5/15 min load averages
    as_of: datetime | None = None  # T of stage "features", timezone-aware UTC
    events_before_as_of: int | None = None


def parse_as_of(text: str) -> datetime | None:
    """--as-of: "auto" (None here) or an ISO time; without a time zone it is UTC."""
    if text == "auto":
        return None
    value = datetime.fromisoformat(text)
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


def resolve_as_of(args, bronze: Path, as_of: datetime | None) -> tuple[datetime, int]:
    """T (given, or the UTC midnight before the latest event) and the events before it,
    counted by DuckDB over the bronze table's current files."""
    con = duckdb_connect(args)
    try:
        parquet_view(con, "b", delta_files(bronze))
        if as_of is None:
            latest = con.execute("SELECT max(event_time)::TIMESTAMP FROM b").fetchone()[0]
            as_of = datetime(latest.year, latest.month, latest.day, tzinfo=timezone.utc)
        us = _micros(as_of)
        before = con.execute(
            f"SELECT count(*) FROM b WHERE event_time::TIMESTAMP < make_timestamp({us})"
        ).fetchone()[0]
    finally:
        con.close()
    return as_of.astimezone(timezone.utc), int(before)


def _micros(t: datetime) -> int:
    """Epoch microseconds of a timezone-aware datetime, exactly."""
    return (t - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(microseconds=1)


def _manifest_events(manifest: dict) -> int:
    return int(manifest.get("valid_unique_events", manifest.get("total_records")))


def delta_row_count(path: Path) -> int | None:
    """Rows of a Delta table from its log statistics (no data read); None if no table."""
    from deltalake import DeltaTable

    if not (path / "_delta_log").is_dir():
        return None
    try:
        actions = DeltaTable(str(path)).get_add_actions(flatten=True)
    except Exception:  # noqa: BLE001 - a broken table counts as absent
        return None
    counts = actions.column("num_records").to_pylist()
    if any(c is None for c in counts):
        return None
    return int(sum(counts))


def prepare(args, size: int, spark_holder: dict) -> Dataset:
    """Generated Parquet events and an ingested lake for `size`; neither is timed."""
    from microseg.core import lake
    from microseg.core.config import GenerateConfig, load_config
    from microseg.ingest.files import run_ingest
    from microseg.ingest.generate import estimate_users_for_events, generate

    work = Path(args.work)
    data_dir = work / f"data-parquet-{size}"  # same layout as bench/ingest_throughput.py
    lake_root = work / f"sessionize-lake-{size}"
    cfg = load_config(args.conf, [f"lake.root={lake_root}", *args.sets])
    timings: dict[str, float] = {}

    generated_now = False
    if not (data_dir / "manifest.json").is_file():
        log.info("generating about %s events into %s", f"{size:,}", data_dir)
        t0 = time.monotonic()
        settings = GenerateConfig(
            users=estimate_users_for_events(size), format="parquet", output=str(data_dir)
        )
        generate(settings, data_dir)
        timings["generate"] = round(time.monotonic() - t0, 1)
        generated_now = True
    manifest = json.loads((data_dir / "manifest.json").read_text())
    expected = _manifest_events(manifest)

    bronze = Path(lake.table_path(str(lake_root), lake.EVENTS))
    ingested_now = False
    found = delta_row_count(bronze)
    if found != expected or generated_now:
        log.info(
            "ingesting %s events into a fresh lake %s (found %s)", f"{expected:,}", lake_root, found
        )
        shutil.rmtree(lake_root, ignore_errors=True)
        spark = spark_session(args, cfg, spark_holder)
        t0 = time.monotonic()
        run_ingest(spark, cfg, source="synthetic", path=str(data_dir / "events"), fmt="parquet")
        timings["ingest"] = round(time.monotonic() - t0, 1)
        ingested_now = True
        found = delta_row_count(bronze)
        if found is None:
            found = lake.read_table(spark, str(lake_root), lake.EVENTS).count()
        if found != expected:
            log.warning("bronze/events holds %s events, the manifest says %s", found, expected)
    else:
        log.info("reusing %s (%s events)", lake_root, f"{found:,}")
    as_of = events_before = None
    if "features" in args.stages:
        as_of, events_before = resolve_as_of(args, bronze, parse_as_of(args.as_of))
        log.info("as-of time T = %s (%s events before it)", as_of.isoformat(), f"{events_before:,}")
    return Dataset(
        requested=size,
        events=int(found),
        users=int(manifest["users"]),
        data_dir=data_dir,
        lake_root=lake_root,
        cfg=cfg,
        generated_now=generated_now,
        ingested_now=ingested_now,
        prepare_seconds=timings,
        as_of=as_of,
        events_before_as_of=events_before,
    )


def spark_session(args, cfg, holder: dict):
    """One Spark session for the whole run (JVM settings come from the first config)."""
    if "spark" not in holder:
        from microseg.core.spark import build_spark

        spark = build_spark(cfg.spark, app_name="bench-sessionize")
        # the naive baseline's modules must be importable in the Python workers
        for module in NAIVE_MODULES:
            spark.sparkContext.addPyFile(str(module))
        warm_up(spark, Path(args.work) / "spark-warm-up")
        holder["spark"] = spark
    return holder["spark"]


def warm_up(spark, path: Path) -> None:
    """Load the classes of a Delta write, a Delta read and a shuffle once, untimed, so the
    first timed Spark system does not pay for them (the lake itself is not touched)."""
    t0 = time.monotonic()
    df = spark.range(100_000).selectExpr("id % 97 AS k", "id AS v")
    df.write.format("delta").mode("overwrite").save(str(path))
    spark.read.format("delta").load(str(path)).groupBy("k").count().collect()
    log.info("Spark started and warmed up in %.1f s", time.monotonic() - t0)


# --------------------------------------------------------------------------------------
# the systems


@dataclass
class Context:
    args: argparse.Namespace
    data: Dataset
    spark_holder: dict

    @property
    def spark(self):
        return spark_session(self.args, self.data.cfg, self.spark_holder)

    @property
    def root(self) -> str:
        return str(self.data.lake_root)

    def output(self, system: str, table: str) -> Path:
        """Where a yardstick or baseline writes its table (beside the lake's own tables)."""
        return self.data.lake_root / "bench" / system / table

    @property
    def as_of(self) -> datetime:
        if self.data.as_of is None:
            raise RuntimeError("no as-of time: the dataset was prepared without stage features")
        return self.data.as_of

    @property
    def as_of_us(self) -> int:
        return _micros(self.as_of)


def delta_files(path: Path | str) -> list[str]:
    """The current Parquet files of a Delta table, refusing tables DuckDB cannot read as
    plain Parquet (deletion vectors, column mapping)."""
    from deltalake import DeltaTable

    table = DeltaTable(str(path))
    features = set(table.protocol().reader_features or [])
    unsupported = features & {"deletionVectors", "columnMapping"}
    if unsupported:
        raise RuntimeError(f"{path}: reader features {sorted(unsupported)} need a Delta reader")
    return [uri.removeprefix("file://") for uri in table.file_uris()]


def _sql_list(paths: list[str]) -> str:
    return "[" + ", ".join("'" + p.replace("'", "''") + "'" for p in paths) + "]"


def duckdb_connect(args):
    import duckdb

    tmp = Path(args.work) / "duckdb-tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    con.execute(f"SET threads = {int(args.duckdb_threads)}")
    con.execute(f"SET memory_limit = '{args.duckdb_memory}'")
    con.execute(f"SET temp_directory = '{tmp}'")
    con.execute("SET preserve_insertion_order = false")
    con.execute("SET TimeZone = 'UTC'")
    return con


def parquet_view(con, name: str, files: list[str]) -> None:
    con.execute(
        f"CREATE OR REPLACE TEMP VIEW {name} AS "
        f"SELECT * FROM read_parquet({_sql_list(files)}, hive_partitioning = false)"
    )


# stage "sessionize" ---------------------------------------------------------------------


def microseg_sessionize(ctx: Context) -> tuple[Path, dict]:
    from microseg.core import lake
    from microseg.silver.sessions import run_sessionize

    spark = ctx.spark
    spark.catalog.clearCache()
    report = run_sessionize(spark, ctx.data.cfg, full=True)
    out = Path(lake.table_path(ctx.root, lake.SESSIONS))
    return out, {
        "mode": report.mode,
        "sessions_written": report.sessions_written,
        "split_visits": report.split_visits,
        "users_touched": report.users_touched,
        "identity_conflicts": report.identity_conflicts,
    }


def duckdb_sessionize(ctx: Context) -> tuple[Path, dict]:
    from deltalake import write_deltalake

    from microseg.core import lake

    conf = ctx.data.cfg.sessions
    out = ctx.output("duckdb", "sessions")
    files = delta_files(lake.table_path(ctx.root, lake.EVENTS))
    con = duckdb_connect(ctx.args)
    try:
        con.execute(
            "CREATE OR REPLACE TEMP VIEW bronze_events AS "
            "SELECT * REPLACE (event_time::TIMESTAMP AS event_time) "
            f"FROM read_parquet({_sql_list(files)}, hive_partitioning = false)"
        )
        timeout_s = conf.inactivity_timeout.total_seconds()
        max_len_s = conf.max_session_length.total_seconds()
        con.execute(f"SET VARIABLE inactivity_timeout_s = {timeout_s!r}::DOUBLE")
        con.execute(f"SET VARIABLE max_session_length_s = {max_len_s!r}::DOUBLE")
        con.execute(DUCKDB_SQL.read_text())
        reader = con.sql("SELECT * FROM sessions").to_arrow_reader(ctx.args.duckdb_batch_rows)
        write_deltalake(
            str(out),
            reader,
            mode="overwrite",
            schema_mode="overwrite",
            partition_by=["session_date"],
        )
    finally:
        con.close()
    return out, {"input_files": len(files), "output_format": "delta (deltalake.write_deltalake)"}


def naive_sessionize(ctx: Context) -> tuple[Path, dict]:
    import naive_sessionizer
    from microseg.core import lake

    conf = ctx.data.cfg.sessions
    out = ctx.output("naive", "sessions")
    spark = ctx.spark
    spark.catalog.clearCache()
    events_df = spark.read.format("delta").load(lake.table_path(ctx.root, lake.EVENTS))
    sessions_df = naive_sessionizer.naive_sessions(
        events_df,
        inactivity_timeout=conf.inactivity_timeout,
        max_session_length=conf.max_session_length,
    )
    (
        sessions_df.write.format("delta")
        .mode("overwrite")
        .option("overwriteSchema", "true")
        .partitionBy("session_date")
        .save(str(out))
    )
    return out, {}


# what the sessions of every system are compared on
SESSION_SUMS = [
    "events",
    "page_views",
    "product_views",
    "cart_adds",
    "purchase_events",
    "items",
    "searches",
    "cart_removes",
    "wishlist_adds",
    "checkouts",
    "distinct_products",
    "distinct_categories",
    "visit_part",
]
SESSION_COUNTS = ["is_bounce", "has_purchase", "is_cart_abandoned"]
SESSION_FLOAT_SUMS = ["revenue", "duration_seconds"]
REL_TOLERANCE = 1e-6
# columns compared row by row (joined on session_id); times as epoch microseconds
ROW_EXACT = [
    "user_key",
    "first_event_id",
    "events",
    "page_views",
    "product_views",
    "searches",
    "cart_adds",
    "cart_removes",
    "wishlist_adds",
    "checkouts",
    "purchase_events",
    "distinct_products",
    "distinct_categories",
    "landing_page",
    "exit_page",
    "landing_product",
    "exit_product",
    "has_cart_add",
    "has_checkout",
    "has_purchase",
    "is_cart_abandoned",
    "items",
    "device",
    "country",
    "utm_source",
    "utm_medium",
    "utm_campaign",
    "is_bounce",
    "visit_part",
]
ROW_TIMES = ["session_start", "session_end", "visit_start"]
ROW_FLOATS = ["revenue", "duration_seconds"]


def summarize_sessions(ctx: Context, path: Path) -> dict:
    """Session count and column sums of a sessions table (computed in DuckDB)."""
    con = duckdb_connect(ctx.args)
    try:
        parquet_view(con, "s", delta_files(path))
        exprs = [
            "count(*) AS sessions",
            "count(DISTINCT session_id) AS distinct_session_ids",
            "count(DISTINCT user_key) AS user_keys",
            *[f"sum({c})::BIGINT AS {c}" for c in SESSION_SUMS],
            *[f"count(*) FILTER (WHERE {c}) AS {c}" for c in SESSION_COUNTS],
            *[f"sum({c})::DOUBLE AS {c}" for c in SESSION_FLOAT_SUMS],
        ]
        cursor = con.execute(f"SELECT {', '.join(exprs)} FROM s")
        names = [d[0] for d in cursor.description]
        row = cursor.fetchone()
    finally:
        con.close()
    return {n: (0 if v is None else v) for n, v in zip(names, row, strict=True)}


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REL_TOLERANCE, abs_tol=1e-9)


def _diff_sums(left: dict, right: dict, floats: list[str]) -> list[str]:
    problems = []
    for key in left:
        a, b = left[key], right.get(key)
        same = _close(a, b) if key in floats and a is not None and b is not None else a == b
        if not same:
            problems.append(f"{key}: {a!r} vs {b!r}")
    return problems


def diff_sums(left: dict, right: dict) -> list[str]:
    return _diff_sums(left, right, SESSION_FLOAT_SUMS)


def diff_rows(ctx: Context, left: Path, right: Path) -> dict:
    """Row-by-row comparison of two sessions tables joined on session_id."""
    con = duckdb_connect(ctx.args)
    try:
        parquet_view(con, "l", delta_files(left))
        parquet_view(con, "r", delta_files(right))
        differs = [f"l.{c} IS DISTINCT FROM r.{c}" for c in ROW_EXACT]
        differs += [f"epoch_us(l.{c}) IS DISTINCT FROM epoch_us(r.{c})" for c in ROW_TIMES]
        differs += [
            f"abs(l.{c} - r.{c}) > {REL_TOLERANCE} * greatest(abs(l.{c}), abs(r.{c}), 1e-3)"
            for c in ROW_FLOATS
        ]
        con.execute(
            "CREATE TEMP TABLE d AS SELECT coalesce(l.session_id, r.session_id) AS session_id, "
            "l.session_id IS NULL AS only_right, r.session_id IS NULL AS only_left, "
            f"({' OR '.join(differs)}) AS differs "
            "FROM l FULL OUTER JOIN r ON l.session_id = r.session_id "
            "WHERE l.session_id IS NULL OR r.session_id IS NULL "
            f"OR {' OR '.join(differs)}"
        )
        only_left, only_right, differing = con.execute(
            "SELECT count(*) FILTER (WHERE only_left), count(*) FILTER (WHERE only_right), "
            "count(*) FILTER (WHERE NOT only_left AND NOT only_right) FROM d"
        ).fetchone()
        examples = [r[0] for r in con.execute("SELECT session_id FROM d LIMIT 5").fetchall()]
    finally:
        con.close()
    return {
        "only_left": only_left,
        "only_right": only_right,
        "differing": differing,
        "examples": examples,
    }


# stage "features" ------------------------------------------------------------------------

# the features the yardsticks compute, by kind; microseg's output is compared on these
FEATURE_INTS = [
    "orders_lifetime",
    "sessions_30d",
    "cart_adds_90d",
    "cart_abandoned_sessions_7d",
    "distinct_categories",
    "max_views_one_product_unbought_7d",
]
FEATURE_FLOATS = ["days_since_last_event", "revenue_lifetime", "bounce_rate_30d"]
FEATURE_STRINGS = ["top_category"]
SHARED_FEATURES = [*FEATURE_INTS, *FEATURE_FLOATS, *FEATURE_STRINGS]


def microseg_features(ctx: Context) -> tuple[Path, dict]:
    from microseg.core import lake
    from microseg.core.config import load_config
    from microseg.features.job import run_features

    cfg = ctx.data.cfg
    if ctx.args.microseg_features == "shared":
        include = f"features.include=[{', '.join(SHARED_FEATURES)}]"
        cfg = load_config(ctx.args.conf, [f"lake.root={ctx.root}", *ctx.args.sets, include])
    spark = ctx.spark
    spark.catalog.clearCache()
    report = run_features(spark, cfg, as_of=ctx.as_of)
    out = Path(lake.table_path(ctx.root, lake.USER_FEATURES))
    return out, {"users": report.users, "features": report.features, "run_id": report.run_id}


def duckdb_features(ctx: Context) -> tuple[Path, dict]:
    from deltalake import write_deltalake

    from microseg.core import lake

    conf = ctx.data.cfg.sessions
    out = ctx.output("duckdb", "user_features")
    files = delta_files(lake.table_path(ctx.root, lake.EVENTS))
    con = duckdb_connect(ctx.args)
    try:
        # only the events strictly before T: identities and sessions are rebuilt from them
        con.execute(
            "CREATE OR REPLACE TEMP VIEW bronze_events AS SELECT * FROM ("
            "SELECT * REPLACE (event_time::TIMESTAMP AS event_time) "
            f"FROM read_parquet({_sql_list(files)}, hive_partitioning = false)"
            f") WHERE event_time < make_timestamp({ctx.as_of_us})"
        )
        timeout_s = conf.inactivity_timeout.total_seconds()
        max_len_s = conf.max_session_length.total_seconds()
        con.execute(f"SET VARIABLE inactivity_timeout_s = {timeout_s!r}::DOUBLE")
        con.execute(f"SET VARIABLE max_session_length_s = {max_len_s!r}::DOUBLE")
        con.execute(f"SET VARIABLE as_of_us = {ctx.as_of_us}::BIGINT")
        con.execute(DUCKDB_SQL.read_text())
        con.execute(DUCKDB_FEATURES_SQL.read_text())
        reader = con.sql("SELECT * FROM user_features").to_arrow_reader(ctx.args.duckdb_batch_rows)
        write_deltalake(str(out), reader, mode="overwrite", schema_mode="overwrite")
    finally:
        con.close()
    return out, {"input_files": len(files), "output_format": "delta (deltalake.write_deltalake)"}


def naive_features(ctx: Context) -> tuple[Path, dict]:
    import naive_features as naive
    from microseg.core import lake

    conf = ctx.data.cfg.sessions
    out = ctx.output("naive", "user_features")
    spark = ctx.spark
    spark.catalog.clearCache()
    events_df = spark.read.format("delta").load(lake.table_path(ctx.root, lake.EVENTS))
    features_df = naive.naive_features(
        events_df,
        as_of=ctx.as_of,
        inactivity_timeout=conf.inactivity_timeout,
        max_session_length=conf.max_session_length,
    )
    features_df.write.format("delta").mode("overwrite").option("overwriteSchema", "true").save(
        str(out)
    )
    return out, {}


def _features_view(con, name: str, ctx: Context, path: Path) -> None:
    """The rows of a features table at the run's as-of time (gold/user_features keeps other
    as-of times too; its files may differ in columns over time)."""
    con.execute(
        f"CREATE OR REPLACE TEMP VIEW {name} AS SELECT * FROM read_parquet("
        f"{_sql_list(delta_files(path))}, hive_partitioning = false, union_by_name = true) "
        f"WHERE epoch_us(as_of) = {ctx.as_of_us}"
    )


def summarize_features(ctx: Context, path: Path) -> dict:
    """User count, column sums and non-null counts of a features table (in DuckDB)."""
    con = duckdb_connect(ctx.args)
    try:
        _features_view(con, "f", ctx, path)
        exprs = [
            "count(*) AS users",
            "count(DISTINCT user_key) AS distinct_user_keys",
            "count(*) FILTER (WHERE user_key IS NULL) AS rows_without_user_key",
            *[f"sum({c})::BIGINT AS {c}" for c in FEATURE_INTS],
            *[f"sum({c})::DOUBLE AS {c}" for c in FEATURE_FLOATS],
            *[f"count({c}) AS {c}_not_null" for c in FEATURE_FLOATS + FEATURE_STRINGS],
            *[
                f"bit_xor(hash(user_key || chr(31) || {c})) AS {c}_checksum"
                for c in FEATURE_STRINGS
            ],
        ]
        cursor = con.execute(f"SELECT {', '.join(exprs)} FROM f")
        names = [d[0] for d in cursor.description]
        row = cursor.fetchone()
    finally:
        con.close()
    return dict(zip(names, row, strict=True))


def diff_feature_sums(left: dict, right: dict) -> list[str]:
    return _diff_sums(left, right, FEATURE_FLOATS)


def diff_feature_rows(ctx: Context, left: Path, right: Path) -> dict:
    """Row-by-row comparison of two features tables joined on user_key, on the shared
    features: integers and strings exactly, doubles within REL_TOLERANCE."""
    con = duckdb_connect(ctx.args)
    try:
        _features_view(con, "l", ctx, left)
        _features_view(con, "r", ctx, right)
        differs = [f"l.{c} IS DISTINCT FROM r.{c}" for c in FEATURE_INTS + FEATURE_STRINGS]
        differs += [
            f"((l.{c} IS NULL) <> (r.{c} IS NULL) OR coalesce(abs(l.{c} - r.{c}) > "
            f"{REL_TOLERANCE} * greatest(abs(l.{c}), abs(r.{c}), 1e-3), false))"
            for c in FEATURE_FLOATS
        ]
        # a row without a user key (there should be none) matches nothing: it is "only"
        con.execute(
            "CREATE TEMP TABLE d AS SELECT coalesce(l.user_key, r.user_key) AS user_key, "
            "r._in IS NULL AS only_left, l._in IS NULL AS only_right "
            "FROM (SELECT *, true AS _in FROM l) AS l "
            "FULL OUTER JOIN (SELECT *, true AS _in FROM r) AS r ON l.user_key = r.user_key "
            f"WHERE l._in IS NULL OR r._in IS NULL OR {' OR '.join(differs)}"
        )
        only_left, only_right, differing = con.execute(
            "SELECT count(*) FILTER (WHERE only_left), count(*) FILTER (WHERE only_right), "
            "count(*) FILTER (WHERE NOT only_left AND NOT only_right) FROM d"
        ).fetchone()
        examples = [str(r[0]) for r in con.execute("SELECT user_key FROM d LIMIT 5").fetchall()]
    finally:
        con.close()
    return {
        "only_left": only_left,
        "only_right": only_right,
        "differing": differing,
        "examples": examples,
    }


# --------------------------------------------------------------------------------------
# the stage registry


@dataclass
class System:
    run: Callable[[Context], tuple[Path, dict]]
    uses_spark: bool = True  # the session is started before the clock starts
    max_events: Callable[[argparse.Namespace], int | None] = lambda args: None


@dataclass
class Stage:
    systems: dict[str, System]
    summarize: Callable[[Context, Path], dict]  # sums of an output table
    diff_sums: Callable[[dict, dict], list[str]]
    diff_rows: Callable[[Context, Path, Path], dict] | None = None
    unit: str = "rows"  # the summary's row count, e.g. "sessions"
    unit_label: str = ""  # its column title in pipeline.md (default: unit)


STAGES: dict[str, Stage] = {
    "sessionize": Stage(
        systems={
            "microseg": System(microseg_sessionize),
            "duckdb": System(duckdb_sessionize, uses_spark=False),
            "naive": System(naive_sessionize, max_events=lambda args: args.naive_max_events),
        },
        summarize=summarize_sessions,
        diff_sums=diff_sums,
        diff_rows=diff_rows,
        unit="sessions",
    ),
    "features": Stage(
        systems={
            "microseg": System(microseg_features),
            "duckdb": System(duckdb_features, uses_spark=False),
            "naive": System(naive_features, max_events=lambda args: args.naive_max_events),
        },
        summarize=summarize_features,
        diff_sums=diff_feature_sums,
        diff_rows=diff_feature_rows,
        unit="users",
        unit_label="user rows",
    ),
}


@dataclass
class Run:
    system: str
    seconds: float | None = None
    all_seconds: list[float] = field(default_factory=list)
    output: Path | None = None
    extra: dict = field(default_factory=dict)
    summary: dict | None = None
    error: str | None = None
    skipped: str | None = None
    verdict: str = ""
    disagreements: list[str] = field(default_factory=list)


def run_stage(args, stage_name: str, data: Dataset, spark_holder: dict) -> list[Run]:
    stage = STAGES[stage_name]
    ctx = Context(args=args, data=data, spark_holder=spark_holder)
    runs = []
    data.load_before = [round(x, 2) for x in os.getloadavg()]
    for name in args.systems:
        system = stage.systems[name]
        run = Run(system=name)
        runs.append(run)
        limit = system.max_events(args)
        if limit is not None and data.requested > limit:
            run.skipped = f"size above {limit:,}"
            log.info("%s %s: skipped (%s)", stage_name, name, run.skipped)
            continue
        if system.uses_spark:
            _ = ctx.spark
        for attempt in range(args.repeat):
            log.info("%s %s: run %d of %d", stage_name, name, attempt + 1, args.repeat)
            try:
                t0 = time.monotonic()
                run.output, run.extra = system.run(ctx)
                run.all_seconds.append(round(time.monotonic() - t0, 2))
            except Exception as exc:  # noqa: BLE001 - report it and go on with the others
                traceback.print_exc()
                run.error = f"{type(exc).__name__}: {exc}"
                break
            log.info("%s %s: %.1f s", stage_name, name, run.all_seconds[-1])
        if run.error is None:
            run.seconds = min(run.all_seconds)
            try:
                run.summary = stage.summarize(ctx, run.output)
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                run.error = f"reading its output: {type(exc).__name__}: {exc}"
    check(ctx, stage, runs)
    return runs


def check(ctx: Context, stage: Stage, runs: list[Run]) -> None:
    """Every system that ran is compared with every other; it passes when all agree."""
    done = [r for r in runs if r.summary is not None]
    for run in runs:
        if run.skipped:
            run.verdict = "SKIPPED"
        elif run.error:
            run.verdict = "FAIL"
            run.disagreements.append(run.error)
    for i, left in enumerate(done):
        for right in done[i + 1 :]:
            problems = [f"sum {p}" for p in stage.diff_sums(left.summary, right.summary)]
            if stage.diff_rows is not None and not ctx.args.no_row_diff:
                try:
                    rows = stage.diff_rows(ctx, left.output, right.output)
                except Exception as exc:  # noqa: BLE001
                    traceback.print_exc()
                    rows = {"only_left": "?", "only_right": "?", "differing": "?"}
                    rows["examples"] = [f"comparison failed: {type(exc).__name__}: {exc}"]
                if rows["only_left"] or rows["only_right"] or rows["differing"]:
                    problems.append(
                        f"rows: {rows['only_left']} only in {left.system}, "
                        f"{rows['only_right']} only in {right.system}, "
                        f"{rows['differing']} differing (e.g. {', '.join(rows['examples'])})"
                    )
            for a, b in ((left, right), (right, left)):
                a.disagreements += [f"vs {b.system}: {p}" for p in problems]
    for run in done:
        run.verdict = "FAIL" if run.disagreements else "PASS"
    if len(done) < 2:
        for run in done:
            run.verdict = "PASS (alone)" if not run.disagreements else "FAIL"


# --------------------------------------------------------------------------------------
# self-check: hand-made edge cases the generated data never has


def _edge_case_events() -> list[tuple]:
    """(event_id, event_time, event_type, user_id, anonymous_id, product_id, price, quantity,
    page_url, device, country, utm_source) rows for the rules the generator never exercises:
    a gap of exactly the timeout, visits longer than the maximum length, ties in event_time,
    identity conflicts (first seen, then smallest id), events without any id, purchases
    without price or quantity."""
    import random
    from datetime import timedelta as td

    t0 = datetime(2026, 9, 1, 22, 0, tzinfo=timezone.utc)
    rows: list[tuple] = []

    def ev(eid, t, etype="page_view", user=None, anon=None, product=None, price=None,
           qty=None, page="/", device="desktop", country="NL", utm=None):  # fmt: skip
        rows.append((eid, t, etype, user, anon, product, price, qty, page, device, country, utm))

    # gap rule: exactly the timeout continues a visit, one microsecond more starts one
    ev("g1", t0, user="u1")
    ev("g2", t0 + td(minutes=30), user="u1")
    ev("g3", t0 + td(minutes=60, microseconds=1), user="u1")
    ev("g4", t0 + td(minutes=90, microseconds=1), user="u1")
    # exactly-timeout gaps between times with microsecond fractions (seconds as doubles
    # keep them exactly 1800 apart between 2004 and 2038: same binade): one session each
    rng = random.Random(7)
    for k in range(20):
        start = t0 + td(days=1, hours=k % 20, microseconds=rng.randrange(1, 1_000_000))
        ev(f"r{k}a", start, user=f"r{k:02d}")
        ev(f"r{k}b", start + td(minutes=30), user=f"r{k:02d}")
    # a 14-hour visit (an event every 20 minutes, one exactly 6 h and 12 h after its start):
    # three sessions, the pieces crossing midnight
    for i in range(43):
        ev(f"long{i:02d}", t0 + td(minutes=20 * i), user="u2", etype="product_view",
           product=f"p{i % 5}")  # fmt: skip
    # ties in event_time are ordered by event_id; "first" columns skip nulls, utm does not
    t1 = t0 + td(days=2)
    ev("t-b", t1, user="u3", page="/b", device="mobile", country=None, utm="google")
    ev("t-a", t1, user="u3", page=None, device=None, country="DE", utm=None)
    ev("t-c", t1 + td(minutes=1), user="u3", page="/c", product="p9", etype="product_view")
    # identity: a1 seen with u4 first, then u5 (conflict) -> u4, also retroactively
    t2 = t0 + td(days=3)
    ev("i1", t2, anon="a1")
    ev("i2", t2 + td(minutes=5), user="u4", anon="a1")
    ev("i3", t2 + td(minutes=10), user="u5", anon="a1")
    ev("i4", t2 + td(minutes=15), anon="a1")
    # a2 seen with u7 and u6 at the same time -> the smaller id, u6
    t3 = t0 + td(days=4)
    ev("j1", t3, user="u7", anon="a2")
    ev("j2", t3, user="u6", anon="a2")
    ev("j3", t3 + td(minutes=1), anon="a2")
    # byte order of ids: "zeta" < "Äpfel"
    ev("k1", t3 + td(hours=1), user="\u00c4pfel", anon="a4")
    ev("k2", t3 + td(hours=1), user="zeta", anon="a4")
    ev("k3", t3 + td(hours=1, minutes=1), anon="a4")
    # never stitched, and no id at all (dropped)
    ev("n1", t3 + td(hours=2), anon="a3")
    ev("n2", t3 + td(hours=2, minutes=29), anon="a3")
    ev("n3", t3 + td(hours=2, minutes=5))
    # purchases: revenue = price * coalesce(quantity, 1) of purchases only
    t4 = t0 + td(days=5)
    ev("m1", t4, user="u8", etype="add_to_cart", product="p1", price=10.0, qty=2)
    ev("m2", t4 + td(minutes=1), user="u8", etype="purchase", product="p1", price=9.99, qty=3)
    ev("m3", t4 + td(minutes=2), user="u8", etype="purchase", product="p2", price=None, qty=2)
    ev("m4", t4 + td(minutes=3), user="u8", etype="purchase", product="p3", price=5.5)
    ev("m5", t4 + td(minutes=4), user="u8", etype="checkout_started")
    ev("m6", t4 + td(minutes=5), user="u8", etype="search")
    ev("m7", t4 + td(minutes=6), user="u8", etype="remove_from_cart", product="p1")
    ev("m8", t4 + td(minutes=7), user="u8", etype="add_to_wishlist", product="p4")

    # stage "features", as of T = t4 + 4 min (m5 above is exactly at T: excluded)
    T = SELF_CHECK_AS_OF
    assert t4 + td(minutes=4) == T
    day, us = td(days=1), td(microseconds=1)
    # f1: product views at exactly T - 7d (in), 1 us before it (out), a minute after (in)
    ev("f1a", T - 7 * day - us, "product_view", user="f1", product="q1")
    ev("f1b", T - 7 * day, "product_view", user="f1", product="q1")
    ev("f1c", T - 7 * day + td(minutes=1), "product_view", user="f1", product="q1")
    # f2: q3 viewed 3 times and bought exactly at T (out: still unbought); q4 viewed 4 times
    # and bought before T (bought: not counted)
    for i in range(3):
        ev(f"f2v{i}", T - 2 * day + td(minutes=i), "product_view", user="f2", product="q3")
    ev("f2p", T, "purchase", user="f2", product="q3", price=5.0)
    for i in range(4):
        ev(f"f2w{i}", T - 3 * day + td(minutes=i), "product_view", user="f2", product="q4")
    ev("f2q", T - td(hours=1), "purchase", user="f2", product="q4", price=2.0, qty=2)
    # f3: one session starting exactly at T - 30d (in); f4: 1 us earlier (out)
    ev("f3a", T - 30 * day, user="f3")
    ev("f4a", T - 30 * day - us, user="f4")
    # f5: a session starting 10 min before T - 30d and running into the window (out)
    ev("f5a", T - 30 * day - td(minutes=10), user="f5")
    ev("f5b", T - 30 * day + td(minutes=10), user="f5")
    # f6: a cart add exactly at T - 90d (in), one an hour earlier (out)
    ev("f6a", T - 90 * day - td(hours=1), "add_to_cart", user="f6", product="q5")
    ev("f6b", T - 90 * day, "add_to_cart", user="f6", product="q5")
    # f7: abandoned carts at T - 7d (in) and 10 min before T, its purchase exactly at T
    # (out: the session is cut at T, so abandoned); a bought cart 6 days before T
    ev("f7a", T - 7 * day, "add_to_cart", user="f7", product="q6")
    ev("f7b", T - 6 * day, "add_to_cart", user="f7", product="q6")
    ev("f7c", T - 6 * day + td(minutes=1), "purchase", user="f7", product="q6", price=3.0)
    ev("f7d", T - td(minutes=10), "add_to_cart", user="f7", product="q6")
    ev("f7e", T, "purchase", user="f7", product="q6", price=3.0)
    # f8: a session running across T; its purchase at T and event after T are out
    ev("f8a", T - td(minutes=10), user="f8")
    ev("f8b", T, "purchase", user="f8", product="q7", price=100.0)
    ev("f8c", T + td(minutes=5), user="f8")
    # anonymous fa seen with f9 only at T: before T it stays anon:fa; f9 has no row
    ev("fa1", T - td(hours=1), anon="fa")
    ev("fa2", T, user="f9", anon="fa")
    # f10: categories cat-b x2, cat-a x2, cat-c x1: the tie goes to cat-a
    for i, product in enumerate(["b", "a", "b", "a", "c"]):
        ev(f"f10{i}", T - 2 * day + td(minutes=i), "product_view", user="f10", product=product)
    return rows


# (what, SQL over the sessions table `s` giving one value, expected)
EDGE_EXPECTATIONS = [
    ("u1: exact timeout continues, +1 us splits", "count(*) FILTER (WHERE user_key = 'u1')", 2),
    ("r*: fractional exact timeouts continue", "count(*) FILTER (WHERE user_key LIKE 'r%')", 20),
    ("u2: 14 h visit -> 3 pieces", "count(*) FILTER (WHERE user_key = 'u2')", 3),
    ("u2: last piece is 2", "max(visit_part) FILTER (WHERE user_key = 'u2')", 2),
    ("u2: piece 1 starts exactly 6 h in", "max(events) FILTER (WHERE user_key = 'u2')", 18),
    ("u2: one visit start", "count(DISTINCT visit_start) FILTER (WHERE user_key = 'u2')", 1),
    (
        "u3: first event by event_id",
        "any_value(first_event_id) FILTER (WHERE user_key = 'u3')",
        "t-a",
    ),  # fmt: skip
    (
        "u3: landing page skips null",
        "any_value(landing_page) FILTER (WHERE user_key = 'u3')",
        "/b",
    ),  # fmt: skip
    ("u3: exit page", "any_value(exit_page) FILTER (WHERE user_key = 'u3')", "/c"),
    (
        "u3: utm of the first event (null)",
        "count(*) FILTER (WHERE user_key = 'u3' AND utm_source IS NULL)",
        1,
    ),  # fmt: skip
    ("u3: device skips null", "any_value(device) FILTER (WHERE user_key = 'u3')", "mobile"),
    ("u3: country skips null", "any_value(country) FILTER (WHERE user_key = 'u3')", "DE"),
    ("a1 -> u4 (first seen), retroactively", "sum(events) FILTER (WHERE user_key = 'u4')", 3),
    ("u5 keeps its own event", "sum(events) FILTER (WHERE user_key = 'u5')", 1),
    ("a2 -> u6 (tie: smaller id)", "sum(events) FILTER (WHERE user_key = 'u6')", 2),
    ("a4 -> zeta (byte order)", "sum(events) FILTER (WHERE user_key = 'zeta')", 2),
    ("a3 stays anonymous", "sum(events) FILTER (WHERE user_key = 'anon:a3')", 2),
    ("no-id event dropped", "count(*) FILTER (WHERE first_event_id = 'n3')", 0),
    ("u8 revenue", "round(sum(revenue) FILTER (WHERE user_key = 'u8'), 6)", 35.47),
    ("u8 items", "sum(items) FILTER (WHERE user_key = 'u8')", 6),
    ("u8 purchase events", "sum(purchase_events) FILTER (WHERE user_key = 'u8')", 3),
    ("u8 distinct products", "sum(distinct_products) FILTER (WHERE user_key = 'u8')", 4),
]


SELF_CHECK_AS_OF = datetime(2026, 9, 6, 22, 4, tzinfo=timezone.utc)

# (what, SQL over the features table `f` at SELF_CHECK_AS_OF giving one value, expected)
FEATURE_EDGE_EXPECTATIONS = [
    ("f1: 7d window starts exactly at T - 7d", "max(max_views_one_product_unbought_7d) "
     "FILTER (WHERE user_key = 'f1')", 2),
    ("f2: purchase at T excluded, bought product skipped",
     "max(max_views_one_product_unbought_7d) FILTER (WHERE user_key = 'f2')", 3),
    ("f2: one order before T", "max(orders_lifetime) FILTER (WHERE user_key = 'f2')", 1),
    ("f2: revenue before T", "max(revenue_lifetime) FILTER (WHERE user_key = 'f2')", 4.0),
    ("f3: session at exactly T - 30d counts", "max(sessions_30d) FILTER (WHERE user_key = 'f3')",
     1),
    ("f3: bounce rate", "max(bounce_rate_30d) FILTER (WHERE user_key = 'f3')", 1.0),
    ("f4: 1 us before T - 30d does not", "max(sessions_30d) FILTER (WHERE user_key = 'f4')", 0),
    ("f4: bounce rate null without sessions",
     "count(bounce_rate_30d) FILTER (WHERE user_key = 'f4')", 0),
    ("f5: session counted by its start", "max(sessions_30d) FILTER (WHERE user_key = 'f5')", 0),
    ("f6: cart add at exactly T - 90d counts",
     "max(cart_adds_90d) FILTER (WHERE user_key = 'f6')", 1),
    ("f7: abandoned at T - 7d and cut at T",
     "max(cart_abandoned_sessions_7d) FILTER (WHERE user_key = 'f7')", 2),
    ("f7: one order", "max(orders_lifetime) FILTER (WHERE user_key = 'f7')", 1),
    ("f8: purchase at T excluded", "max(orders_lifetime) FILTER (WHERE user_key = 'f8')", 0),
    ("f8: no revenue", "max(revenue_lifetime) FILTER (WHERE user_key = 'f8')", 0.0),
    ("f8: last event 10 min before T",
     "max(days_since_last_event) FILTER (WHERE user_key = 'f8')", 10 / 1440),
    ("u8: event at T excluded, last 1 min before",
     "max(days_since_last_event) FILTER (WHERE user_key = 'u8')", 1 / 1440),
    ("u8: revenue", "max(revenue_lifetime) FILTER (WHERE user_key = 'u8')", 35.47),
    ("fa: identity seen only at T not used", "count(*) FILTER (WHERE user_key = 'anon:fa')", 1),
    ("f9: only events at T, no row", "count(*) FILTER (WHERE user_key = 'f9')", 0),
    ("a1 -> u4: anon:a1 has no row", "count(*) FILTER (WHERE user_key = 'anon:a1')", 0),
    ("a1 -> u4: its last event is a1's",
     "max(days_since_last_event) FILTER (WHERE user_key = 'u4')", (2 * 1440 - 11) / 1440),
    ("f10: top category tie -> alphabetically first",
     "any_value(top_category) FILTER (WHERE user_key = 'f10')", "cat-a"),
    ("f10: distinct categories", "max(distinct_categories) FILTER (WHERE user_key = 'f10')", 3),
    ("u1: no category -> top category null",
     "count(top_category) FILTER (WHERE user_key = 'u1')", 0),
    ("u2: 5 products, 5 categories, tie -> cat-p0",
     "any_value(top_category) FILTER (WHERE user_key = 'u2')", "cat-p0"),
    ("no row without a user key (no-id events are dropped)",
     "count(*) FILTER (WHERE user_key IS NULL)", 0),
]  # fmt: skip


def _expectations(con, table: str, expectations: list) -> list[str]:
    failures = []
    for what, sql, expected in expectations:
        got = con.execute(f"SELECT {sql} FROM {table}").fetchone()[0]
        same = (
            _close(float(got), expected)
            if isinstance(expected, float) and got is not None
            else got == expected
        )
        if not same:
            failures.append(f"{what}: got {got!r}, expected {expected!r}")
    return failures


def self_check(args, spark_holder: dict) -> bool:
    """Run every system on the edge cases; they must agree row by row and meet
    EDGE_EXPECTATIONS."""
    from pyspark.sql import functions as F

    from microseg.core import lake
    from microseg.core.config import load_config

    lake_root = Path(args.work) / "self-check-lake"
    shutil.rmtree(lake_root, ignore_errors=True)
    cfg = load_config(args.conf, [f"lake.root={lake_root}", *args.sets])
    spark = spark_session(args, cfg, spark_holder)
    rows = _edge_case_events()
    schema = (
        "event_id string, event_time timestamp, event_type string, user_id string, "
        "anonymous_id string, product_id string, price double, quantity int, page_url string, "
        "device string, country string, utm_source string"
    )
    df = spark.createDataFrame(rows, schema)
    filled = {
        "category": F.concat(F.lit("cat-"), F.col("product_id")),
        "currency": F.lit("EUR"),
        "event_date": F.to_date("event_time"),
        "source": F.lit("self-check"),
        "source_file": F.lit("self-check"),
        "source_line": F.monotonically_increasing_id() + 1,
        "ingested_at": F.current_timestamp(),
        "ingest_run_id": F.lit("self-check"),
    }
    for column in lake.EVENTS.schema.fields:
        if column.name not in df.columns:
            df = df.withColumn(column.name, filled.get(column.name, F.lit(None)))
    lake.overwrite(spark, str(lake_root), lake.EVENTS, df)
    data = Dataset(
        requested=0,
        events=len(rows),
        users=0,
        data_dir=lake_root,
        lake_root=lake_root,
        cfg=cfg,
        as_of=SELF_CHECK_AS_OF,
        events_before_as_of=sum(1 for r in rows if r[1] < SELF_CHECK_AS_OF),
    )
    once = argparse.Namespace(**{**vars(args), "repeat": 1})
    ctx = Context(args=once, data=data, spark_holder=spark_holder)
    checks = {"sessionize": EDGE_EXPECTATIONS, "features": FEATURE_EDGE_EXPECTATIONS}
    ok = True
    for stage_name in args.stages:
        runs = run_stage(once, stage_name, data, spark_holder)
        unit = STAGES[stage_name].unit
        print(f"\n== self-check on hand-made edge cases: {stage_name} ==")
        for run in runs:
            failures = list(run.disagreements)
            if run.output is not None and run.error is None:
                con = duckdb_connect(args)
                try:
                    if stage_name == "features":
                        _features_view(con, "t", ctx, run.output)
                    else:
                        parquet_view(con, "t", delta_files(run.output))
                    failures += _expectations(con, "t", checks.get(stage_name, []))
                finally:
                    con.close()
            verdict = "SKIPPED" if run.skipped else ("FAIL" if failures else "PASS")
            ok &= verdict != "FAIL"
            count = (run.summary or {}).get(unit)
            print(f"{run.system:10s} {verdict}  ({count} {unit} of {len(rows)} events)")
            for failure in failures:
                print(f"{'':12s}{failure}")
    return ok


# --------------------------------------------------------------------------------------
# reporting


def machine_facts(args, spark_holder: dict) -> dict:
    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    try:
        with open("/proc/meminfo") as fh:
            mem_kb = int(next(line for line in fh if line.startswith("MemTotal")).split()[1])
        memory_gb = round(mem_kb / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        memory_gb = None
    facts = {
        "cpus": os.cpu_count(),
        "memory_gb": memory_gb,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "pyspark": version("pyspark"),
        "delta-spark": version("delta-spark"),
        "deltalake": version("deltalake"),
        "duckdb": version("duckdb"),
        "pandas": version("pandas"),
        "pyarrow": version("pyarrow"),
        "duckdb_threads": args.duckdb_threads,
        "duckdb_memory_limit": args.duckdb_memory,
        "config": str(args.conf),
        "overrides": list(args.sets),
    }
    spark = spark_holder.get("spark")
    if spark is not None:
        conf = spark.sparkContext.getConf()
        facts["spark_master"] = conf.get("spark.master", None)
        facts["spark_driver_memory"] = conf.get("spark.driver.memory", None)
        facts["spark_shuffle_partitions"] = spark.conf.get("spark.sql.shuffle.partitions")
        facts["java"] = spark.sparkContext._jvm.System.getProperty("java.version")
    return facts


def _fmt_s(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else round(a / b, 2)


def size_result(data: Dataset, started: str) -> dict:
    """The result of one size; stage_result() fills in "stages"."""
    return {
        "requested_events": data.requested,
        "events": data.events,
        "users": data.users,
        "lake": str(data.lake_root),
        "prepared": {
            "generated_now": data.generated_now,
            "ingested_now": data.ingested_now,
            "seconds": data.prepare_seconds,
        },
        "as_of": data.as_of.isoformat() if data.as_of else None,
        "events_before_as_of": data.events_before_as_of,
        "run_started": started,
        "stages": {},
    }


def stage_result(
    stage_name: str, data: Dataset, runs: list[Run], base: tuple[int, float] | None
) -> dict:
    by_name = {r.system: r for r in runs}
    unit = STAGES[stage_name].unit

    def secs(name: str) -> float | None:
        run = by_name.get(name)
        return None if run is None or run.error else run.seconds

    micro = secs("microseg")
    per_event_vs_smallest = None
    if micro is not None and base is not None:
        per_event_vs_smallest = round((micro / data.events) / (base[1] / base[0]), 2)
    return {
        "unit": unit,
        "load_average_before": data.load_before,
        "systems": {
            r.system: {
                "seconds": r.seconds,
                "all_seconds": r.all_seconds,
                # of the whole bronze/events table, the input of every stage
                "events_per_second": round(data.events / r.seconds) if r.seconds else None,
                unit: (r.summary or {}).get(unit),
                "verdict": r.verdict,
                "skipped": r.skipped,
                "error": r.error,
                "disagreements": r.disagreements,
                "output": str(r.output) if r.output else None,
                "summary": r.summary,
                "details": r.extra,
            }
            for r in runs
        },
        "ratios": {
            "microseg_over_duckdb": _ratio(micro, secs("duckdb")),
            "naive_over_microseg": _ratio(secs("naive"), micro),
            "microseg_seconds_per_event_vs_smallest": per_event_vs_smallest,
        },
    }


def print_stage(stage_name: str, result: dict) -> None:
    stage = result["stages"][stage_name]
    unit = stage["unit"]
    as_of = f", as of {result['as_of']}" if stage_name == "features" else ""
    print()
    print(
        f"== {stage_name}, {result['events']:,} events ({result['users']:,} users, "
        f"requested {result['requested_events']:,}){as_of} =="
    )
    print(f"{'system':10s} {'seconds':>9s} {'events/s':>11s} {unit:>10s}  check")
    for name, s in stage["systems"].items():
        eps = f"{s['events_per_second']:,}" if s["events_per_second"] else "-"
        count = f"{s[unit]:,}" if s[unit] is not None else "-"
        note = s["skipped"] or ""
        secs = _fmt_s(s["seconds"])
        print(f"{name:10s} {secs:>9s} {eps:>11s} {count:>10s}  {s['verdict']} {note}")
        for problem in s["disagreements"][:12]:
            print(f"{'':12s}{problem}")
    r = stage["ratios"]

    def x(v):
        return "-" if v is None else f"{v:.2f}x"

    print(
        f"microseg/DuckDB {x(r['microseg_over_duckdb'])}   naive/microseg "
        f"{x(r['naive_over_microseg'])}   microseg time per event vs smallest size "
        f"{x(r['microseg_seconds_per_event_vs_smallest'])}"
    )


STAGE_NOTES = {
    "sessionize": "Sessions of all of bronze/events; output silver/sessions and the "
    "yardsticks' copies.",
    "features": "User features as of T from the events strictly before T (identities and "
    "sessions rebuilt from them, by every system). microseg computes its whole feature "
    "catalog unless --microseg-features shared; the yardsticks compute "
    f"{len(SHARED_FEATURES)} features ({', '.join(SHARED_FEATURES)}), and the check compares "
    "those. events/s is over the whole bronze/events table.",
}


def keep_other_stages(path: Path, result: dict) -> dict:
    """result, plus the stages an earlier run at the same size measured and this one did not
    (each stage result keeps the start time of the run that measured it)."""
    for stage in result["stages"].values():
        stage.setdefault("run_started", result["run_started"])
    if not path.exists():
        return result
    earlier = json.loads(path.read_text())
    for name, stage in earlier.get("stages", {}).items():
        if name not in result["stages"]:
            stage.setdefault("run_started", earlier.get("run_started"))
            result["stages"][name] = stage
    return result


def write_markdown(
    path: Path,
    results: list[dict],
    stage_names: list[str],
    machine: dict,
    started: str,
    self_checked: bool | None,
    args,
) -> None:
    def cell(v, fmt="{:,.1f}"):
        return "-" if v is None else fmt.format(v)

    lines = [
        "# Pipeline benchmark",
        "",
        f"Written {started} by `bench/sessionize_bench.py` (see bench/README.md) from every "
        "bench/results/pipeline-<size>.json; the runs that measured each row are listed under "
        "Run. Seconds are wall-clock, input is the lake's bronze/events (Delta), output a "
        "Delta table.",
    ]
    for stage_name in stage_names:
        unit = STAGES[stage_name].unit
        label = STAGES[stage_name].unit_label or unit
        lines += [
            "",
            f"## {stage_name}",
            "",
            STAGE_NOTES.get(stage_name, ""),
            "",
            f"| events | users | {label} | microseg s | DuckDB s | naive s | microseg ev/s "
            "| DuckDB ev/s | naive ev/s | microseg/DuckDB | naive/microseg "
            "| microseg s/event vs smallest | agree |",
            "|" + "---:|" * 12 + ":---|",
        ]
        for res in results:
            st = res["stages"].get(stage_name)
            if st is None:
                continue
            sy = st["systems"]

            def get(name, key, sy=sy):
                return sy.get(name, {}).get(key)

            count = next((s[unit] for s in sy.values() if s[unit] is not None), None)
            verdicts = ", ".join(f"{n} {s['verdict']}" for n, s in sy.items())
            r = st["ratios"]
            lines.append(
                f"| {res['events']:,} | {res['users']:,} | {cell(count, '{:,}')} "
                f"| {cell(get('microseg', 'seconds'))} | {cell(get('duckdb', 'seconds'))} "
                f"| {cell(get('naive', 'seconds'))} "
                f"| {cell(get('microseg', 'events_per_second'), '{:,}')} "
                f"| {cell(get('duckdb', 'events_per_second'), '{:,}')} "
                f"| {cell(get('naive', 'events_per_second'), '{:,}')} "
                f"| {cell(r['microseg_over_duckdb'], '{:.2f}x')} "
                f"| {cell(r['naive_over_microseg'], '{:.2f}x')} "
                f"| {cell(r['microseg_seconds_per_event_vs_smallest'], '{:.2f}')} | {verdicts} |"
            )
        if stage_name == "features":
            lines += [
                "",
                "As-of time T (events before it): "
                + "; ".join(
                    f"{r['events']:,}: {r['as_of']} ({cell(r['events_before_as_of'], '{:,}')})"
                    for r in results
                ),
                "",
                f"microseg features: {args.microseg_features}",
            ]
    lines += [
        "",
        "## Run",
        "",
        "Self-check on hand-made edge cases (--self-check): "
        + {None: "not run", True: "PASS", False: "FAIL"}[self_checked],
        "",
        "Run start and load average (1, 5, 15 min) before each stage: "
        + "; ".join(
            f"{r['events']:,} {name}: {st.get('run_started', r.get('run_started'))}, "
            f"{st['load_average_before']}"
            for r in results
            for name, st in r["stages"].items()
        ),
        "",
        "Machine:",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in machine.items()]
    path.write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--events", type=int, nargs="+", default=[1_000_000], help="sizes (about N events)"
    )
    parser.add_argument("--work", default=str(BENCH / "work"), help="data, lakes, DuckDB spill")
    parser.add_argument("--results", default=str(BENCH / "results"), help="JSON and markdown")
    parser.add_argument("--conf", default=str(ROOT / "conf" / "local.yaml"))
    parser.add_argument(
        "--set",
        dest="extra_sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"config override, repeatable; applied after {DEFAULT_SETS}",
    )
    parser.add_argument(
        "--naive-max-events", type=int, default=1_000_000, help="skip naive above this size"
    )
    parser.add_argument(
        "--systems",
        nargs="+",
        default=["microseg", "duckdb", "naive"],
        choices=["microseg", "duckdb", "naive"],
    )
    parser.add_argument(
        "--stages",
        nargs="+",
        default=["sessionize"],
        choices=list(STAGES),
        help="stages to run; they always run in the order " + ", ".join(STAGES),
    )
    parser.add_argument(
        "--as-of",
        default="auto",
        help="T of stage features: an ISO time (UTC unless it has an offset), or auto (the "
        "default): the UTC midnight before the latest event, which leaves the last day of the "
        "generated data after T",
    )
    parser.add_argument(
        "--microseg-features",
        choices=["all", "shared"],
        default="all",
        help="stage features: microseg computes its whole catalog (all, the default; what "
        "`microseg features` does) or only the features the yardsticks compute (shared)",
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per system; best is kept")
    parser.add_argument("--duckdb-threads", type=int, default=2)
    parser.add_argument("--duckdb-memory", default="6GB", help="DuckDB memory_limit")
    parser.add_argument("--duckdb-batch-rows", type=int, default=131_072)
    parser.add_argument("--no-row-diff", action="store_true", help="compare sums only")
    parser.add_argument(
        "--self-check",
        action="store_true",
        help="first run every system on hand-made edge cases (exact-timeout gaps, visits "
        "longer than the maximum, identity conflicts; with stage features also events at T "
        "and at window boundaries) and check them",
    )
    parser.add_argument("--self-check-only", action="store_true", help="only the self-check")
    args = parser.parse_args(argv)
    args.sets = [*DEFAULT_SETS, *args.extra_sets]
    args.work = str(Path(args.work).resolve())
    args.results = str(Path(args.results).resolve())
    args.conf = str(Path(args.conf).resolve())
    args.events = sorted(set(args.events))
    args.stages = [name for name in STAGES if name in args.stages]
    try:
        parse_as_of(args.as_of)
    except ValueError as exc:
        parser.error(f"--as-of: {exc}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.chdir(ROOT)  # conf/local.yaml names paths relative to the project
    os.environ.setdefault("MICROSEG_PSEUDONYMIZATION_KEY", "bench-only-key")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    sys.path.insert(0, str(BENCH))
    Path(args.work).mkdir(parents=True, exist_ok=True)
    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    spark_holder: dict = {}
    results = []
    ok = True
    base: dict[str, tuple[int, float]] = {}  # per stage: (events, microseg s) of the smallest
    self_checked = None
    if args.self_check or args.self_check_only:
        self_checked = self_check(args, spark_holder)
        ok &= self_checked
        if args.self_check_only:
            print("SELF-CHECK PASSED" if ok else "SELF-CHECK FAILED")
            return 0 if ok else 1
    machine = {}
    for size in args.events:
        data = prepare(args, size, spark_holder)
        result = size_result(data, started)
        results.append(result)
        for stage_name in args.stages:
            runs = run_stage(args, stage_name, data, spark_holder)
            ok &= all(r.verdict in ("PASS", "PASS (alone)", "SKIPPED") for r in runs)
            micro = next((r for r in runs if r.system == "microseg" and r.seconds), None)
            if stage_name not in base and micro is not None:
                base[stage_name] = (data.events, micro.seconds)
            result["stages"][stage_name] = stage_result(
                stage_name, data, runs, base.get(stage_name)
            )
            print_stage(stage_name, result)
            machine = machine_facts(args, spark_holder)
            result["machine"] = machine
            out = results_dir / f"pipeline-{size}.json"
            out.write_text(json.dumps(keep_other_stages(out, result), indent=2, default=str) + "\n")
            print(f"wrote {out}")
    if results:
        # the summary covers every size and stage measured so far, this run's and earlier ones
        everything = [json.loads(f.read_text()) for f in results_dir.glob("pipeline-*.json")]
        everything.sort(key=lambda r: r["events"])
        stage_names = [n for n in STAGES if any(n in r["stages"] for r in everything)]
        summary = results_dir / "pipeline.md"
        write_markdown(summary, everything, stage_names, machine, started, self_checked, args)
        print(f"wrote {summary}")
    print("ALL AGREE" if ok else "DISAGREEMENT OR FAILURE (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
