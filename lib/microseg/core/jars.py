"""JARs from Maven Central (Delta Lake; the Kafka connector for `microseg stream`): resolved
once, then loaded from a local folder.

Resolving `spark.jars.packages` at every start costs seconds, prints a long Ivy report and
needs the network. Instead the first start resolves the JARs into a folder (quietly, with the
report in a log file beside it) and every later start, online or not, uses that folder.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_FETCH = """
import sys
from pyspark.sql import SparkSession
spark = (SparkSession.builder.master("local[1]")
         .config("spark.jars.packages", sys.argv[1]).config("spark.jars.ivy", sys.argv[2])
         .config("spark.jars.excludes", sys.argv[3])
         .config("spark.ui.enabled", "false").getOrCreate())
spark.stop()
"""


def delta_coordinates() -> str:
    """Maven coordinates of the Delta JAR matching the installed pyspark and delta-spark."""
    from importlib.metadata import version

    import pyspark

    spark_minor = ".".join(pyspark.__version__.split(".")[:2])
    return f"io.delta:delta-spark_{spark_minor}_2.13:{version('delta-spark')}"


def kafka_coordinates() -> str:
    """Maven coordinates of Spark's Kafka connector for the installed pyspark."""
    import pyspark

    return f"org.apache.spark:spark-sql-kafka-0-10_2.13:{pyspark.__version__}"


# The connector's own kafka-clients (3.9.x for Spark 4.2) is not on every Maven mirror; the
# 4.x client speaks the same protocol and API the connector uses.
KAFKA_CLIENTS = "org.apache.kafka:kafka-clients:4.1.1"


def kafka_connector_jars(cache_dir: str) -> list[str]:
    """Spark's Kafka connector and a kafka-clients it works with, resolved into cache_dir,
    without the libraries pyspark ships."""
    connector = resolved_jars(
        cache_dir, kafka_coordinates(), excludes="org.apache.kafka:kafka-clients"
    )
    return without_shipped([*connector, *resolved_jars(cache_dir, KAFKA_CLIENTS)])


def without_shipped(jars: list[str]) -> list[str]:
    """The JARs whose library pyspark does not ship itself (Hadoop client, Jackson, slf4j,
    Parquet, codecs ...): two versions of one library on a class path is a conflict waiting
    to happen (the Thrift Server, with Delta on its driver class path, fails on Jackson)."""
    shipped = {_artifact(j.name) for j in _pyspark_jars()}
    return [j for j in jars if _artifact(Path(j).name.split("_", 1)[-1]) not in shipped]


def _pyspark_jars() -> list[Path]:
    import pyspark

    return sorted(Path(pyspark.__file__).parent.joinpath("jars").glob("*.jar"))


def _artifact(file_name: str) -> str:
    """The artifact id of a JAR file name: everything before -<version>."""
    match = re.match(r"(.+?)-\d", file_name)
    return match.group(1) if match else file_name


def delta_jars(cache_dir: str) -> list[str]:
    """Paths of the Delta JARs in cache_dir (resolving them from Maven first if absent),
    without the libraries pyspark ships."""
    return without_shipped(resolved_jars(cache_dir, delta_coordinates()))


def resolved_jars(cache_dir: str, coordinates: str, excludes: str = "") -> list[str]:
    """Paths of the JARs of `coordinates` (with their dependencies, but not `excludes`:
    comma-separated group:artifact) in cache_dir, resolving them from Maven first if absent.
    Spark's resolver leaves out what every Spark has (scala-library, Spark's modules)."""
    folder = Path(cache_dir).expanduser() / coordinates.split(":", 1)[1].replace(":", "-")
    jars = sorted(folder.glob("*.jar"))
    if jars:
        return [str(j) for j in jars]
    folder.parent.mkdir(parents=True, exist_ok=True)
    log_path = folder.parent / f"{folder.name}.resolve.log"
    with tempfile.TemporaryDirectory(dir=folder.parent) as ivy_dir, open(log_path, "w") as log:
        print(f"microseg: resolving {coordinates} from Maven Central (once) ...", file=sys.stderr)
        result = subprocess.run(
            [sys.executable, "-c", _FETCH, coordinates, ivy_dir, excludes],
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=900,
            check=False,
        )
        resolved = sorted(Path(ivy_dir, "jars").glob("*.jar"))
        if result.returncode != 0 or not resolved:
            raise RuntimeError(
                f"could not resolve {coordinates} from Maven Central; see {log_path} "
                f"(offline? copy the JARs into {folder} or set spark.delta_jars: null and "
                "pass them with --packages/--jars)"
            )
        staging = Path(ivy_dir, "staging")
        staging.mkdir()
        for jar in resolved:
            shutil.copy2(jar, staging / jar.name)
        staging.rename(folder)  # atomic: a folder with JARs is always complete
    return [str(j) for j in sorted(folder.glob("*.jar"))]
