"""The lake by name, for SQL and BI tools: one database per layer (`gold.segment_membership`),
views for the questions BI asks most, and the Spark Thrift Server that serves them over the
HiveServer2 (JDBC/ODBC) protocol.

Tables are registered as external Delta tables at their lake paths (`CREATE TABLE ... USING
DELTA LOCATION`), so the catalog holds names only: every job keeps writing by path, and a
reader by name sees each new commit. The catalog is the session's: with `sql.metastore_dir` a
local Hive metastore (Derby) in that folder, shared by `microseg register` and the Thrift
Server; with null, whatever catalog spark.conf configures (an external Hive metastore, Glue,
Unity Catalog, ...).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pyspark.sql import SparkSession

from microseg.core import lake
from microseg.core.config import Config, ConfigError

THRIFT_SERVER_CLASS = "org.apache.spark.sql.hive.thriftserver.HiveThriftServer2"

# view name (in the gold database) -> SELECT over the gold tables ({gold}: that database)
VIEWS = {
    "current_segment_members": (
        "SELECT user_key, segment_id, source, definition_version, score, "
        "valid_from AS member_since, run_id FROM {gold}.segment_membership WHERE is_current"
    ),
    "segment_sizes": (
        "SELECT as_of, source, segment_id, name, status, matched, size, previous_size, "
        "entered, exited, stability FROM {gold}.segment_catalog"
    ),
    "current_segment_sizes": (
        "SELECT source, segment_id, count(*) AS members, min(valid_from) AS oldest_member_since "
        "FROM {gold}.segment_membership WHERE is_current GROUP BY source, segment_id"
    ),
}
VIEW_TABLES = {"segment_membership", "segment_catalog"}


def database_of(table: lake.Table, prefix: str) -> str:
    return prefix + table.name.split("/", 1)[0]


def qualified_name(table: lake.Table, prefix: str = "") -> str:
    """`gold.segment_membership` for gold/segment_membership (with the database prefix)."""
    return f"{database_of(table, prefix)}.{table.name.split('/', 1)[1]}"


def hive_settings(metastore_dir: str) -> dict[str, str]:
    """Spark settings of a local Hive metastore (Derby) and warehouse in metastore_dir."""
    folder = Path(metastore_dir).expanduser().resolve()
    return {
        "spark.sql.catalogImplementation": "hive",
        "spark.hadoop.javax.jdo.option.ConnectionURL": (
            f"jdbc:derby:;databaseName={folder / 'metastore_db'};create=true"
        ),
        "spark.sql.warehouse.dir": str(folder / "warehouse"),
        # Derby writes derby.log into the current directory unless told otherwise
        "spark.driver.extraJavaOptions": f"-Dderby.system.home={folder}",
    }


def session_settings(cfg: Config) -> dict[str, str]:
    """What a session (or the Thrift Server) needs on top of cfg.spark for the catalog."""
    if cfg.sql.metastore_dir is None:
        return {}
    settings = hive_settings(cfg.sql.metastore_dir)
    # keep the driver options of cfg.spark.conf next to Derby's
    java_options = cfg.spark.conf.get("spark.driver.extraJavaOptions")
    if java_options:
        settings["spark.driver.extraJavaOptions"] += f" {java_options}"
    return settings


@dataclass
class RegisterReport:
    registered: list[tuple[str, str]] = field(default_factory=list)  # (name, location)
    missing: list[str] = field(default_factory=list)  # tables not written yet
    views: list[str] = field(default_factory=list)


def register_tables(spark: SparkSession, root: str, *, prefix: str = "") -> RegisterReport:
    """Register every lake table that exists under its layer's database, then the views.

    Idempotent. A name already registered at another location is an error (two lakes behind
    one name would give BI tools the wrong data silently)."""
    report = RegisterReport()
    for table in lake.ALL_TABLES:
        name = qualified_name(table, prefix)
        if not lake.table_exists(spark, root, table):
            report.missing.append(name)
            continue
        location = lake.table_path(root, table)
        spark.sql(f"CREATE DATABASE IF NOT EXISTS `{database_of(table, prefix)}`")
        if spark.catalog.tableExists(name):
            current = _location(spark, name)
            if current is not None and _normal(current) != _normal(location):
                raise ConfigError(
                    f"{name} is registered at {current}, not at this lake's {location}: "
                    "drop it first (DROP TABLE only removes the name for an external table), "
                    "or register this lake with another sql.database_prefix"
                )
        else:
            spark.sql(f"CREATE TABLE {name} USING DELTA LOCATION '{_quote(location)}'")
        report.registered.append((name, location))
    gold = f"{prefix}gold"
    registered = {n.split(".", 1)[1] for n, _ in report.registered if n.startswith(gold + ".")}
    if registered >= VIEW_TABLES:
        for view, select in VIEWS.items():
            spark.sql(f"CREATE OR REPLACE VIEW {gold}.{view} AS {select.format(gold=gold)}")
            report.views.append(f"{gold}.{view}")
    return report


def _location(spark: SparkSession, name: str) -> str | None:
    rows = spark.sql(f"DESCRIBE DETAIL {name}").select("location").collect()
    return rows[0][0] if rows else None


def _normal(location: str) -> str:
    return location.removeprefix("file:").rstrip("/")


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")


# --------------------------------------------------------------------------------------
# the Thrift Server


def thrift_server_command(cfg: Config, *, host: str, port: int) -> list[str]:
    """spark-submit of the Spark Thrift Server on the lake's catalog, in local mode unless
    spark.master says otherwise, with Delta's JARs and settings."""
    import pyspark

    from microseg.core.jars import delta_jars
    from microseg.core.spark import REQUIRED_CONF, with_driver_options

    spark_submit = Path(pyspark.__file__).parent / "bin" / "spark-submit"
    conf = {
        "spark.sql.shuffle.partitions": str(cfg.spark.shuffle_partitions),
        **cfg.spark.conf,
        **REQUIRED_CONF,
        **session_settings(cfg),
    }
    conf = with_driver_options(conf, cfg.spark)
    command = [str(spark_submit), "--class", THRIFT_SERVER_CLASS, "--name", "microseg-sql"]
    if cfg.spark.master:
        command += ["--master", cfg.spark.master]
    if cfg.spark.delta_jars:
        jars = delta_jars(cfg.spark.delta_jars)
        # on the driver's own class path too: the server opens each JDBC session with a class
        # loader that does not see --jars, and the session needs Delta's catalog class
        command += ["--jars", ",".join(jars), "--driver-class-path", os.pathsep.join(jars)]
    for key, value in conf.items():
        command += ["--conf", f"{key}={value}"]
    command += [
        "--hiveconf",
        f"hive.server2.thrift.bind.host={host}",
        "--hiveconf",
        f"hive.server2.thrift.port={port}",
        "spark-internal",
    ]
    return command


def run_thrift_server(cfg: Config, *, host: str, port: int) -> int:
    """Run the Thrift Server in the foreground until it is stopped; its exit status."""
    env = {**os.environ, "PYSPARK_PYTHON": os.environ.get("PYSPARK_PYTHON", sys.executable)}
    process = subprocess.Popen(thrift_server_command(cfg, host=host, port=port), env=env)
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.terminate()
        return process.wait()
