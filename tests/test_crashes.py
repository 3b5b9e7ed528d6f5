"""Every batch job killed at every one of its kill points, then run again: the lake (every
table, row for row, and the online store) equals what one uninterrupted run leaves.

A kill point is each step whose effect outlives the process (a Delta commit, a saved model,
a store write): microseg.core.failpoints numbers them. Killing between two such steps leaves
the lake as killing right after the first does (a Delta commit is atomic), so these points
cover every state a kill -9 can leave. Here the kill is the in-process `Crash` (no cleanup
handler runs, no ops/runs row); tests/test_cli.py kills real processes at the same points
with SIGKILL's exit.

The fixture runs the chain once on a small generated lake and keeps a copy of the lake
before each job and a digest of it after; each test restarts from the copy."""

from __future__ import annotations

import json
import shutil
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

import pytest
from tests.conftest import make_config

from microseg.core import lake
from microseg.core.config import GenerateConfig
from microseg.core.failpoints import Crash, crash_at
from microseg.features.job import run_features
from microseg.ingest.files import run_ingest
from microseg.ingest.generate import generate
from microseg.ml.clustering import assign_clusters
from microseg.ml.clustering.jobs import train_clusters
from microseg.ml.propensity import score_propensity
from microseg.ml.propensity.train import train_propensity
from microseg.ops.forget import run_forget
from microseg.ops.maintain import run_maintain
from microseg.segments.evaluate import run_segments
from microseg.silver.sessions import run_sessionize

pytestmark = pytest.mark.soak

AS_OF = datetime(2026, 9, 22, tzinfo=timezone.utc)
SETTINGS = [
    "privacy.pseudonymization_key=crash-test-key",
    "privacy.pseudonymization_key_env=MICROSEG_TEST_UNSET_KEY",
    "privacy.erasure_retention=0h",
    "maintain.retention=25d",
    "propensity.snapshots=2",
    "propensity.grid.max_depth=[2]",
    "propensity.grid.max_iter=[3]",
    "cluster.k_min=3",
    "cluster.k_max=3",
]
# what a rerun writes differently by nature: run ids, wall-clock times, time-based model
# versions and their paths
VOLATILE = {
    "run_id",
    "closed_by_run_id",
    "ingest_run_id",
    "computed_at",
    "recorded_at",
    "updated_at",
    "scored_at",
    "trained_at",
    "version",
    "model_version",
    "path",
    "requested_at",
    "completed_at",
    "added_at",
    "request_id",
    "training_seconds",
    "features_computed",  # which snapshots this run had to compute itself
}
# a kill after a training's last step (its registry row) is a finished training: training
# again adds a version, by design
FINISHED_AT_LAST_STEP = {"cluster train", "propensity train"}

JOBS = {
    "sessionize": lambda spark, cfg: run_sessionize(spark, cfg),
    "features": lambda spark, cfg: run_features(spark, cfg, as_of=AS_OF),
    "segments run": lambda spark, cfg: run_segments(spark, cfg, as_of=AS_OF),
    "cluster train": lambda spark, cfg: train_clusters(spark, cfg, as_of=AS_OF),
    "cluster assign": lambda spark, cfg: assign_clusters(spark, cfg, as_of=AS_OF),
    "propensity train": lambda spark, cfg: train_propensity(
        spark, cfg, target="purchase_7d", as_of=AS_OF
    ),
    "propensity score": lambda spark, cfg: score_propensity(
        spark, cfg, target="purchase_7d", as_of=AS_OF
    ),
    "maintain": lambda spark, cfg: run_maintain(
        spark, cfg, now=datetime(2026, 10, 1, tzinfo=timezone.utc)
    ),
    "forget": lambda spark, cfg: run_forget(spark, cfg, ["u0000004", "a00000010"], request_id="r"),
}


def _plain(value):
    """A value with its volatile parts dropped, in a form json can sort."""
    if hasattr(value, "asDict"):
        value = value.asDict(recursive=True)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return round(value, 9)
    if isinstance(value, str) and value.startswith("{"):
        try:
            return _plain(json.loads(value))  # details: JSON text
        except ValueError:
            return value
    return value


def digest(spark, root: Path) -> dict[str, list[str]]:
    """Every table (ops/runs aside) and the online store, as sorted rows."""
    out = {}
    for table in lake.ALL_TABLES:
        if table is lake.RUNS or not lake.table_exists(spark, str(root), table):
            continue
        rows = lake.read_table(spark, str(root), table).collect()
        out[table.name] = sorted(json.dumps(_plain(r), default=str, sort_keys=True) for r in rows)
    store = root / "_online" / "segments.sqlite"
    if store.exists():
        with sqlite3.connect(store) as db:
            for t in ("members", "aliases", "streamed"):
                out[f"store {t}"] = sorted(map(str, db.execute(f"SELECT * FROM {t}").fetchall()))
    return out


@pytest.fixture(scope="module")
def chain(spark, tmp_path_factory):
    """stage(job): the lake before the job, the digest after it and the job's kill points;
    the jobs run in order, each once, as far as the tests ask."""
    base = tmp_path_factory.mktemp("crashes")
    cfg = make_config(base, *SETTINGS)
    generate(
        GenerateConfig(
            seed=11,
            users=100,
            days=30,
            start=datetime(2026, 9, 1, tzinfo=timezone.utc),
            output=str(base / "data"),
            malformed_share=0.01,
            invalid_share=0.01,
        )
    )
    run_ingest(spark, cfg, source="synthetic", path=str(base / "data" / "events"))
    root = Path(cfg.lake.root)
    stages: dict[str, dict] = {}

    def stage(wanted: str) -> dict:
        for name, job in JOBS.items():
            if name not in stages:
                before = base / "before" / name
                shutil.copytree(root, before)
                with crash_at() as steps:
                    job(spark, cfg)
                after = digest(spark, root)
                stages[name] = {"before": before, "after": after, "steps": list(steps)}
            if name == wanted:
                return stages[name]
        raise KeyError(wanted)

    return stage


def points(count: int, most: int = 8) -> list[int]:
    """Every kill point (1..count), or `most` of them spread evenly, first and last included:
    maintain and forget repeat the same few steps per table."""
    if count <= most:
        return list(range(1, count + 1))
    return sorted({1 + round(i * (count - 1) / (most - 1)) for i in range(most)})


def test_points_spread_evenly():
    assert points(3) == [1, 2, 3]
    assert points(36) == [1, 6, 11, 16, 21, 26, 31, 36]


@pytest.mark.parametrize("job", list(JOBS))
def test_killed_at_each_point_then_rerun_equals_one_run(spark, chain, tmp_path, job):
    stage = chain(job)
    steps = stage["steps"]
    assert steps, f"{job} made no durable step"
    last = len(steps) - (job in FINISHED_AT_LAST_STEP)
    for point in points(last):
        folder = tmp_path / str(point)
        shutil.copytree(stage["before"], folder / "lake")
        cfg = make_config(folder, *SETTINGS)
        with pytest.raises(Crash), crash_at(step=point):
            JOBS[job](spark, cfg)
        JOBS[job](spark, cfg)
        got = digest(spark, folder / "lake")
        assert got == stage["after"], f"{job} killed after step {point} ({steps[point - 1]})"
        shutil.rmtree(folder)
