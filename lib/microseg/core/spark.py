"""The one Spark session builder: Delta Lake on, UTC, everything else from config."""

from __future__ import annotations

import os
import sys
import time

from pyspark.sql import SparkSession

from microseg.core.config import SparkConfig
from microseg.core.jars import delta_jars, kafka_connector_jars, kafka_coordinates

# Settings every microseg session needs; config may add to them but not change them.
REQUIRED_CONF = {
    "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
    "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
    # Event times are UTC end to end: dates, hours and day-of-week are computed in UTC.
    "spark.sql.session.timeZone": "UTC",
}


def use_utc_clock() -> None:
    """Make this Python process's local time zone UTC.

    PySpark converts naive Python datetimes through the process's local zone (F.lit of a
    datetime, createDataFrame, collect). microseg's naive datetimes mean UTC, so the driver
    (and local Python workers, which inherit the variable) must run in UTC, or an as-of time
    would shift by the local offset.
    """
    if os.environ.get("TZ") != "UTC":
        os.environ["TZ"] = "UTC"
        time.tzset()


def build_spark(
    cfg: SparkConfig,
    *,
    app_name: str | None = None,
    kafka: bool = False,
    conf: dict[str, str] | None = None,
) -> SparkSession:
    """Return the session for a job: Delta extensions and catalog on, session time zone UTC.

    When a session already exists in this process (spark-submit, a notebook, the test
    fixture) it is reused, and the JVM-level settings (master, JARs) it was started with win.
    `kafka`: also load Spark's Kafka connector (resolved into the cfg.delta_jars folder like
    Delta's JARs; without that folder, added to spark.jars.packages). `conf`: settings a job
    adds to cfg.conf (e.g. its catalog: microseg.serving.sql_catalog.session_settings).
    """
    use_utc_clock()
    if cfg.master and cfg.master.startswith("local"):
        # local mode talks to itself only: loopback, not the first network interface
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        # Python workers (the stream's per-user state, pandas UDFs) run this interpreter,
        # whose environment has pandas and pyarrow, unless the user chose another one.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(app_name or cfg.app_name)
    if cfg.master:
        builder = builder.master(cfg.master)
    settings = {
        "spark.sql.shuffle.partitions": str(cfg.shuffle_partitions),
        "spark.executorEnv.TZ": "UTC",  # Python workers on a cluster, as use_utc_clock
        **cfg.conf,
        **(conf or {}),
    }
    if cfg.delta_jars:
        jars = [j for j in settings.get("spark.jars", "").split(",") if j]
        if kafka:
            jars = [*kafka_connector_jars(cfg.delta_jars), *jars]
        settings["spark.jars"] = ",".join(dict.fromkeys([*delta_jars(cfg.delta_jars), *jars]))
    elif kafka:
        listed = [p for p in settings.get("spark.jars.packages", "").split(",") if p]
        settings["spark.jars.packages"] = ",".join([*listed, kafka_coordinates()])
    settings.update(REQUIRED_CONF)
    for key, value in settings.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    # getOrCreate applies SQL settings to an existing session too; make sure of the required ones.
    for key, value in REQUIRED_CONF.items():
        if key.startswith("spark.sql.session"):
            spark.conf.set(key, value)
    return spark
