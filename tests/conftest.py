"""One Spark session for the whole run, tuned for 2 cores; per-test lake folders."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from microseg.core import lake
from microseg.core.config import Config, load_config
from microseg.core.jars import kafka_connector_jars
from microseg.core.spark import build_spark

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
SHARED_DATA = ROOT.parent / "shared" / "data"
TEST_KEY = "test-only-pseudonymization-key"

TEST_SETTINGS = [
    "spark.master=local[2]",
    "spark.shuffle_partitions=2",
    "spark.conf.spark.ui.enabled=false",
    "spark.conf.spark.sql.adaptive.coalescePartitions.initialPartitionNum=2",
    "spark.conf.spark.default.parallelism=2",
    "spark.conf.spark.databricks.delta.snapshotPartitions=1",
    "spark.conf.spark.sql.sources.parallelPartitionDiscovery.parallelism=2",
]


def make_config(tmp_path: Path, *overrides: str) -> Config:
    return load_config(
        ROOT / "conf" / "local.yaml",
        [
            *TEST_SETTINGS,
            f"lake.root={tmp_path / 'lake'}",
            f"ingest.sources_dir={ROOT / 'conf' / 'sources'}",
            *overrides,
        ],
    )


# Why the test session has no Kafka connector (it could not be resolved); read it through
# the kafka_connector_problem fixture (conftest may be imported under two module names).
_KAFKA_CONNECTOR_PROBLEM: list[str] = []


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    os.chdir(ROOT)  # conf/ paths (log4j, sources) are relative to the repository
    cfg = make_config(tmp_path_factory.mktemp("session"))
    # Spark's Kafka connector for the Kafka stream test; resolved once into the JAR cache
    kafka = True
    try:
        kafka_connector_jars(cfg.spark.delta_jars)
    except Exception as exc:  # noqa: BLE001 - the Kafka test skips and says why
        _KAFKA_CONNECTOR_PROBLEM.append(str(exc))
        kafka = False
    session = build_spark(cfg.spark, app_name="microseg-tests", kafka=kafka)
    yield session
    session.stop()


@pytest.fixture(scope="session")
def kafka_connector_problem(spark) -> str | None:
    """Why the session has no Kafka connector, or None."""
    return _KAFKA_CONNECTOR_PROBLEM[0] if _KAFKA_CONNECTOR_PROBLEM else None


@pytest.fixture
def cfg(tmp_path) -> Config:
    return make_config(tmp_path)


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv("MICROSEG_PSEUDONYMIZATION_KEY", TEST_KEY)
    return TEST_KEY


@pytest.fixture
def sources_dir(tmp_path) -> Path:
    """A private copy of conf/sources that a test may add mappings to."""
    target = tmp_path / "sources"
    shutil.copytree(ROOT / "conf" / "sources", target)
    return target


def lineage(spark, root: str) -> dict[str, set[str]]:
    """Per table with rows, the jobs (from ops/runs) of the run ids its rows carry; a run id
    that ops/runs lacks shows as "missing"."""
    runs_df = lake.read_table(spark, root, lake.RUNS).select("run_id", "job")
    found = {}
    for table in lake.ALL_TABLES:
        if table is lake.RUNS or not lake.table_exists(spark, root, table):
            continue
        column = next((c for c in ("run_id", "ingest_run_id") if c in table.schema.names), None)
        rows_df = lake.read_table(spark, root, table)
        if column is None or rows_df.limit(1).count() == 0:
            continue
        jobs = (
            rows_df.select(F.col(column).alias("run_id"))
            .distinct()
            .join(runs_df, on="run_id", how="left")
            .select(F.coalesce("job", F.lit("missing")).alias("job"))
            .distinct()
            .collect()
        )
        found[table.name] = {r.job for r in jobs}
    return found


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A real redis-server for the session (skips, saying why, where it cannot start)."""
    from tests.redis_server import RedisUnavailable, start_redis, stop_redis

    try:
        process, url = start_redis(tmp_path_factory.mktemp("redis"))
    except RedisUnavailable as exc:
        pytest.skip(str(exc))
    yield url
    stop_redis(process)


def pytest_collection_modifyitems(config, items):
    """Soak tests run only when asked for by name (-m soak): they take about half an hour."""
    wanted = config.getoption("markexpr") or ""
    if "soak" in wanted and "not soak" not in wanted:
        return
    skip = pytest.mark.skip(reason="soak test: run with ./scripts/test -m soak")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)
