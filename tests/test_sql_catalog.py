"""BI access: tables by name and views, the Spark Thrift Server with a real JDBC client
(beeline), and every gold table read without Spark (the `deltalake` package), with time travel.

The lake is test_segments' three rule runs (T1, T2, T3 a week apart; at T3 the definition of
`buyers` changes from orders_lifetime >= 1 to >= 2). By hand, from its FEATURES:
buyers at T1 = u1 u2 u3 (u4 has no order), at T2 = u1..u4, at T3 = u2 u3.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from deltalake import DeltaTable
from tests.conftest import ROOT, TEST_SETTINGS, make_config
from tests.test_segments import FEATURES, T1, T2, T3, run, write_features

from microseg.core.config import ConfigError
from microseg.serving.sql_catalog import register_tables


@pytest.fixture(scope="module")
def segment_lake(spark, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("bi")
    cfg = make_config(tmp_path)
    for as_of, rows in FEATURES.items():
        write_features(spark, cfg, as_of, rows)
    run(spark, cfg, tmp_path, T1)
    run(spark, cfg, tmp_path, T2)
    run(spark, cfg, tmp_path, T3, min_orders=2)
    return cfg, tmp_path


def test_register_tables_and_views(spark, segment_lake):
    cfg, _ = segment_lake
    report = register_tables(spark, cfg.lake.root, prefix="bi1_")
    assert sorted(name for name, _ in report.registered) == [
        "bi1_gold.segment_catalog",
        "bi1_gold.segment_changes",
        "bi1_gold.segment_membership",
        "bi1_gold.user_features",
    ]
    assert "bi1_bronze.events" in report.missing  # this lake has no bronze
    assert report.views == [
        "bi1_gold.current_segment_members",
        "bi1_gold.segment_sizes",
        "bi1_gold.current_segment_sizes",
    ]
    at_t1_5 = spark.sql(
        "SELECT user_key FROM bi1_gold.segment_membership WHERE segment_id = 'buyers' "
        "AND valid_from <= TIMESTAMP '2026-10-05 00:00:00' "
        "AND (valid_to IS NULL OR valid_to > TIMESTAMP '2026-10-05 00:00:00')"
    )
    assert sorted(r.user_key for r in at_t1_5.collect()) == ["u1", "u2", "u3"]
    current = spark.sql(
        "SELECT user_key FROM bi1_gold.current_segment_members WHERE segment_id = 'buyers'"
    )
    assert sorted(r.user_key for r in current.collect()) == ["u2", "u3"]
    sizes = spark.sql(
        "SELECT as_of, size FROM bi1_gold.segment_sizes WHERE segment_id = 'buyers' ORDER BY as_of"
    )
    assert [(r.as_of, r.size) for r in sizes.collect()] == [(T1, 3), (T2, 4), (T3, 2)]
    counts = spark.sql(
        "SELECT members FROM bi1_gold.current_segment_sizes WHERE segment_id = 'buyers'"
    )
    assert [r.members for r in counts.collect()] == [2]

    # again: nothing changes; the same names over another lake: refused, naming both places
    again = register_tables(spark, cfg.lake.root, prefix="bi1_")
    assert again.registered == report.registered
    other = make_config(Path(cfg.lake.root).parent / "other")
    write_features(spark, other, T1, FEATURES[T1])
    with pytest.raises(ConfigError, match=r"bi1_gold.user_features is registered at .*drop it"):
        register_tables(spark, other.lake.root, prefix="bi1_")


def test_every_gold_table_reads_without_spark_with_time_travel(segment_lake):
    cfg, _ = segment_lake
    root = Path(cfg.lake.root)
    features = DeltaTable(str(root / "gold/user_features")).to_pandas()
    assert len(features) == 12  # 4 users x 3 as-of times
    catalog = DeltaTable(str(root / "gold/segment_catalog")).to_pandas()
    buyers = catalog[catalog.segment_id == "buyers"].sort_values("as_of")
    assert buyers["size"].tolist() == [3, 4, 2]
    changes = DeltaTable(str(root / "gold/segment_changes")).to_pandas()
    entered = changes[(changes.segment_id == "buyers") & (changes.change == "enter")]
    # u4 enters at T2; u2 and u3 stay through T3's new definition (a new interval, no change)
    assert sorted(entered.user_key) == ["u1", "u2", "u3", "u4"]

    membership = DeltaTable(str(root / "gold/segment_membership"))
    now = membership.to_pandas()
    current = now[(now.segment_id == "buyers") & now.is_current]
    assert sorted(current.user_key) == ["u2", "u3"]
    # time travel: the version the T1 run committed (its first MERGE) holds T1's answer
    merges = sorted(h["version"] for h in membership.history() if h["operation"] == "MERGE")
    at_t1 = DeltaTable(str(root / "gold/segment_membership"), version=merges[0]).to_pandas()
    buyers_t1 = at_t1[at_t1.segment_id == "buyers"]
    assert sorted(buyers_t1.user_key) == ["u1", "u2", "u3"]
    assert buyers_t1.is_current.all()


# --------------------------------------------------------------------------------------
# the Spark Thrift Server and beeline, as a BI tool would connect


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def beeline(port: int, sql: str) -> list[list[str]]:
    """Rows of one query through beeline (the Hive JDBC client that ships in pyspark)."""
    import pyspark

    jars = Path(pyspark.__file__).parent / "jars"
    result = subprocess.run(
        [
            "java",
            "-cp",
            f"{jars}/*",
            "org.apache.hive.beeline.BeeLine",
            "-u",
            f"jdbc:hive2://127.0.0.1:{port}/",
            "-n",
            "bi-user",
            "--silent=true",
            "--showHeader=false",
            "--outputformat=csv2",
            "-e",
            sql,
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # beeline prefixes the first line with its prompt ("0: jdbc:hive2://...> ")
    lines = [re.sub(r"^\d+: jdbc:hive2://\S+> ", "", line) for line in result.stdout.splitlines()]
    return [line.split(",") for line in lines if line.strip()]


@pytest.mark.slow
def test_thrift_server_serves_segments_over_jdbc(segment_lake, tmp_path):
    cfg, lake_dir = segment_lake
    port = _free_port()
    settings = [
        *TEST_SETTINGS,
        f"lake.root={cfg.lake.root}",
        f"sql.metastore_dir={tmp_path / 'metastore'}",
        "sql.database_prefix=jdbc_",
    ]
    command = [sys.executable, "-m", "microseg", "sql-server", "--port", str(port)]
    for setting in settings:
        command += ["--set", setting]
    log = tmp_path / "sql-server.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, f"sql-server exited:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no listener:\n{log.read_text()[-4000:]}"
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(1)
        tables = beeline(port, "SHOW TABLES IN jdbc_gold")
        assert {row[1] for row in tables} >= {
            "segment_membership",
            "segment_changes",
            "segment_catalog",
            "user_features",
            "current_segment_members",
            "segment_sizes",
        }
        # point in time: who was a buyer on 2026-10-05 (the T1 run's answer)
        at = beeline(
            port,
            "SELECT user_key FROM jdbc_gold.segment_membership WHERE segment_id = 'buyers' "
            "AND valid_from <= TIMESTAMP '2026-10-05 00:00:00' "
            "AND (valid_to IS NULL OR valid_to > TIMESTAMP '2026-10-05 00:00:00') "
            "ORDER BY user_key",
        )
        assert at == [["u1"], ["u2"], ["u3"]]
        sizes = beeline(
            port,
            "SELECT CAST(as_of AS DATE), size FROM jdbc_gold.segment_sizes "
            "WHERE segment_id = 'buyers' ORDER BY as_of",
        )
        assert sizes == [["2026-10-01", "3"], ["2026-10-08", "4"], ["2026-10-15", "2"]]
    finally:
        stop_group(server)


def stop_group(process: subprocess.Popen) -> None:
    """Stop the process and its children (spark-submit's JVM) by their process group."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
