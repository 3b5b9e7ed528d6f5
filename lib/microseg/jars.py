"""The Delta Lake JARs: resolved from Maven Central once, then loaded from a local folder.

Resolving `spark.jars.packages` at every start costs seconds, prints a long Ivy report and
needs the network. Instead the first start resolves the JARs into a folder (quietly, with the
report in a log file beside it) and every later start, online or not, uses that folder.
"""

from __future__ import annotations

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
         .config("spark.ui.enabled", "false").getOrCreate())
spark.stop()
"""


def delta_coordinates() -> str:
    """Maven coordinates of the Delta JAR matching the installed pyspark and delta-spark."""
    from importlib.metadata import version

    import pyspark

    spark_minor = ".".join(pyspark.__version__.split(".")[:2])
    return f"io.delta:delta-spark_{spark_minor}_2.13:{version('delta-spark')}"


def delta_jars(cache_dir: str) -> list[str]:
    """Paths of the Delta JARs in cache_dir, resolving them from Maven first if absent."""
    coordinates = delta_coordinates()
    folder = Path(cache_dir).expanduser() / coordinates.split(":", 1)[1].replace(":", "-")
    jars = sorted(folder.glob("*.jar"))
    if jars:
        return [str(j) for j in jars]
    folder.parent.mkdir(parents=True, exist_ok=True)
    log_path = folder.parent / f"{folder.name}.resolve.log"
    with tempfile.TemporaryDirectory(dir=folder.parent) as ivy_dir, open(log_path, "w") as log:
        print(f"microseg: resolving {coordinates} from Maven Central (once) ...", file=sys.stderr)
        result = subprocess.run(
            [sys.executable, "-c", _FETCH, coordinates, ivy_dir],
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
