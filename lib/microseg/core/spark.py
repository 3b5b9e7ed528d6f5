"""The one Spark session builder: Delta Lake on, UTC, everything else from config.

The driver's Spark log follows spark.log_config (conf/log4j2.properties), off unless `verbose`:
a failure reaches the caller as an exception. `verbose` shows Spark's warnings and errors with
Java stack traces, the JVM's notes about itself and the Python workers' warnings.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from pyspark import SparkConf, SparkContext
from pyspark.java_gateway import launch_gateway
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


# What the driver JVM says on stderr about itself rather than about the job (shown when
# verbose): Spark's launcher always adds the Vector API's incubator module, and the JVM
# announces it at every start; without a system BLAS library (libblas.so.3), netlib says so
# from native code before Spark's ML falls back to its Java BLAS. The state API v2's driver
# worker (the stream's transformWithState) prints its lifecycle, each line followed by an
# empty one, to its stdout, which Spark copies to the JVM's stderr.
JVM_NOTICES = (
    "WARNING: Using incubator modules:",
    "netlib-blas: JNI_OnLoad: dlopen(",
    "netlib-lapack: JNI_OnLoad: dlopen(",
    "Starting Streaming TransformWithStateInPandas Python worker",
    "Streaming TransformWithStateInPandas Python worker",
)


# What -Dmicroseg.* conf/log4j2.properties reads: a command's quiet and verbose logs
SPARK_LOG = {
    "quiet": ("-Dmicroseg.spark.log=off",),
    "verbose": ("-Dmicroseg.spark.log=warn", "-Dmicroseg.spark.trace=full"),
    "default": (),  # the file's own: errors, one line each
}
SparkLog = Literal["quiet", "verbose", "default"]


def driver_java_options(cfg: SparkConfig, *, log: SparkLog = "default") -> str:
    """JVM options for a driver microseg starts: its log4j2 configuration (cfg.log_config)
    and the level that file reads (SPARK_LOG)."""
    if not cfg.log_config:
        return ""
    uri = Path(cfg.log_config).expanduser().resolve().as_uri()
    return " ".join([f"-Dlog4j2.configurationFile={uri}", *SPARK_LOG[log]])


def with_driver_options(
    settings: dict[str, str], cfg: SparkConfig, *, log: SparkLog = "default"
) -> dict[str, str]:
    """`settings` with driver_java_options(cfg) ahead of their spark.driver.extraJavaOptions."""
    key = "spark.driver.extraJavaOptions"
    options = " ".join(o for o in (driver_java_options(cfg, log=log), settings.get(key)) if o)
    return {**settings, key: options} if options else dict(settings)


# What the driver JVM prints on its stdout that is not for people: Delta's VACUUM counts the
# files it deleted there (microseg reports them itself)
JVM_STDOUT_NOTICES = ("Deleted ",)


def relay_stderr(stream, *, drop: tuple[str, ...] = JVM_NOTICES, to: str = "stderr") -> None:
    """Copy the driver JVM's stderr (or stdout: `to`) to sys.stderr (sys.stdout) as it is at
    each line (so that a live progress display or a test's capture gets it), without the
    lines that start with `drop`. Keeps reading to the end whatever happens to the target: a
    JVM blocked on a full pipe would stop the job."""
    dropped = False
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace")
        if (drop and line.startswith(drop)) or (dropped and not line.strip()):
            dropped = True  # and the empty line that may follow it
            continue
        dropped = False
        for target in (getattr(sys, to), getattr(sys, f"__{to}__")):
            try:
                target.write(line)
                target.flush()
                break
            except (AttributeError, OSError, ValueError):  # None, or closed at exit
                continue


def _start_driver(settings: dict[str, str], *, verbose: bool) -> None:
    """Start the driver JVM and its SparkContext with `settings`, its stderr relayed (from
    the start: when the JVM cannot start, what it says is the reason)."""
    conf = SparkConf().setAll(list(settings.items()))
    write_ends = {}
    for to, notices in (("stderr", JVM_NOTICES), ("stdout", JVM_STDOUT_NOTICES)):
        read_end, write_ends[to] = os.pipe()
        threading.Thread(
            target=relay_stderr,
            args=(os.fdopen(read_end, "rb"),),
            kwargs={"drop": () if verbose else notices, "to": to},
            name=f"spark-driver-{to}",
            daemon=True,
        ).start()
    try:
        gateway = launch_gateway(conf, popen_kwargs=dict(write_ends))  # it adds its own
    finally:
        for write_end in write_ends.values():
            os.close(write_end)  # the JVM (and the Python workers it starts) hold them now
    SparkContext(conf=conf, gateway=gateway)


def build_spark(
    cfg: SparkConfig,
    *,
    app_name: str | None = None,
    kafka: bool = False,
    conf: dict[str, str] | None = None,
    verbose: bool = False,
) -> SparkSession:
    """Return the session for a job: Delta extensions and catalog on, session time zone UTC.

    When a session already exists in this process (spark-submit, a notebook, the test
    fixture) it is reused, and the JVM-level settings (master, JARs, log) it was started with
    win; `verbose` then lowers its log level to warnings. `kafka`: also load Spark's Kafka
    connector (resolved into the cfg.delta_jars folder like Delta's JARs; without that
    folder, added to spark.jars.packages). `conf`: settings a job adds to cfg.conf (e.g. its
    catalog: microseg.serving.sql_catalog.session_settings).
    """
    use_utc_clock()
    if cfg.master and cfg.master.startswith("local"):
        # local mode talks to itself only: loopback, not the first network interface
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        # Python workers (the stream's per-user state, pandas UDFs) run this interpreter,
        # whose environment has pandas and pyarrow, unless the user chose another one.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    settings = {
        "spark.app.name": app_name or cfg.app_name,
        **({"spark.master": cfg.master} if cfg.master else {}),
        "spark.sql.shuffle.partitions": str(cfg.shuffle_partitions),
        "spark.executorEnv.TZ": "UTC",  # Python workers on a cluster, as use_utc_clock
        # library deprecation notices from the Python workers are for --verbose
        **({} if verbose else {"spark.executorEnv.PYTHONWARNINGS": "ignore"}),
        **cfg.conf,
        **(conf or {}),
    }
    settings = with_driver_options(settings, cfg, log="verbose" if verbose else "quiet")
    if cfg.delta_jars:
        jars = [j for j in settings.get("spark.jars", "").split(",") if j]
        if kafka:
            jars = [*kafka_connector_jars(cfg.delta_jars), *jars]
        settings["spark.jars"] = ",".join(dict.fromkeys([*delta_jars(cfg.delta_jars), *jars]))
    elif kafka:
        listed = [p for p in settings.get("spark.jars.packages", "").split(",") if p]
        settings["spark.jars.packages"] = ",".join([*listed, kafka_coordinates()])
    settings.update(REQUIRED_CONF)
    # The private attribute is the one way to know whether this process has a JVM already
    # (a stopped session keeps it); spark-submit's driver has one and passes its port.
    started_here = SparkContext._gateway is None and "PYSPARK_GATEWAY_PORT" not in os.environ
    if started_here:
        _start_driver(settings, verbose=verbose)
    spark = SparkSession.builder.config(map=settings).getOrCreate()
    if verbose and not started_here:
        spark.sparkContext.setLogLevel("WARN")
    # getOrCreate applies SQL settings to an existing session too; make sure of the required ones.
    for key, value in REQUIRED_CONF.items():
        if key.startswith("spark.sql.session"):
            spark.conf.set(key, value)
    return spark


@contextmanager
def session_conf(spark: SparkSession, settings: dict[str, str]) -> Iterator[None]:
    """The session's SQL settings set to `settings` inside the block, as they were after it."""
    previous = {key: spark.conf.get(key, None) for key in settings}
    for key, value in settings.items():
        spark.conf.set(key, value)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                spark.conf.unset(key)
            else:
                spark.conf.set(key, value)
