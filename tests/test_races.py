"""Two writers of the same tables at once, as two people or a scheduler and a person would
start them: two `segments run`, and a `forget` while features and segments are computed.
Delta's optimistic concurrency lets one commit and makes the other retry or fail; either
way, no table may end wrong (no duplicate change, no second current interval, nobody
erased brought back), and a failed run run again completes.

The two run on threads of one Spark session: Delta checks conflicts per commit the same way
within one JVM as across clusters."""

from __future__ import annotations

import shutil
import threading
from datetime import datetime, timedelta

import pytest
from tests.conftest import make_config
from tests.test_crashes import digest
from tests.test_sessions import ev, write_bronze

from microseg.cli import _one_line
from microseg.core import lake
from microseg.features.job import run_features
from microseg.ops.forget import recorded_job, run_forget
from microseg.segments.evaluate import run_segments
from microseg.silver.sessions import run_sessionize

pytestmark = [pytest.mark.slow, pytest.mark.soak]  # about 3 minutes: with -m soak

AS_OF = datetime(2026, 9, 3)
SETTINGS = [
    "privacy.pseudonymization_key=race-test-key",
    "privacy.pseudonymization_key_env=MICROSEG_TEST_UNSET_KEY",
    "privacy.erasure_retention=0h",
]


def _history() -> list[tuple]:
    """Four users: u1 and u2 buy (u2 twice), u3 browses, u4 abandons a cart."""
    rows = []
    for n, user in enumerate(("u1", "u2", "u3", "u4")):
        rows += [
            ev(f"{user}-v1", 10 * n, user=user, anon=f"a{n}", device="mobile"),
            ev(f"{user}-v2", 10 * n + 2, "product_view", user=user, product="p1", price=20.0),
        ]
    rows += [
        ev("u1-b", 5, "purchase", user="u1", product="p1", price=20.0, qty=1),
        ev("u2-b1", 15, "purchase", user="u2", product="p1", price=20.0, qty=2),
        ev("u2-b2", 60 * 24 + 15, "purchase", user="u2", product="p1", price=20.0, qty=1),
        ev("u4-c", 35, "add_to_cart", user="u4", product="p1", price=20.0, qty=1),
    ]
    return rows


def together(*jobs):
    """Run the jobs on threads started at once; [(result, None) or (None, exception)]."""
    outcomes = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def run(i, job):
        barrier.wait()
        try:
            outcomes[i] = (job(), None)
        except Exception as exc:  # noqa: BLE001 - the test looks at what failed and how
            outcomes[i] = (None, exc)

    threads = [threading.Thread(target=run, args=(i, j)) for i, j in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    return outcomes


def conflict_line(exc: Exception) -> str:
    """The one line the CLI prints for the failure; it must name Delta's conflict."""
    line = _one_line(exc)
    assert "\n" not in line
    assert "concurrent" in line.lower(), line
    return line


@pytest.fixture(scope="module")
def featured(spark, tmp_path_factory):
    """A lake with sessions and features as of AS_OF; and its digest after one segments run."""
    base = tmp_path_factory.mktemp("races")
    cfg = make_config(base, *SETTINGS)
    write_bronze(spark, cfg, _history())
    run_sessionize(spark, cfg)
    run_features(spark, cfg, as_of=AS_OF)
    pristine = base / "pristine"
    shutil.copytree(cfg.lake.root, pristine)
    run_segments(spark, cfg, as_of=AS_OF)
    return {"pristine": pristine, "after_segments": digest(spark, base / "lake")}


def test_two_segments_runs_at_once_leave_the_tables_of_one_run(spark, featured, tmp_path):
    shutil.copytree(featured["pristine"], tmp_path / "lake")
    cfg = make_config(tmp_path, *SETTINGS)
    outcomes = together(
        lambda: run_segments(spark, cfg, as_of=AS_OF),
        lambda: run_segments(spark, cfg, as_of=AS_OF),
    )
    failed = [exc for _, exc in outcomes if exc is not None]
    assert len(failed) < 2, [str(e)[:300] for e in failed]
    for exc in failed:
        conflict_line(exc)
    if failed:  # the person runs it again
        run_segments(spark, cfg, as_of=AS_OF)
    got = digest(spark, tmp_path / "lake")
    assert got == featured["after_segments"]
    # by hand: u2 and u1 bought, so each is in at most one interval per segment
    membership = lake.read_table(spark, cfg.lake.root, lake.SEGMENT_MEMBERSHIP)
    assert (
        membership.filter("is_current")
        .groupBy("user_key", "segment_id")
        .count()
        .filter("count > 1")
        .count()
        == 0
    )


def test_forget_while_features_and_segments_run_brings_nobody_back(spark, featured, tmp_path):
    shutil.copytree(featured["pristine"], tmp_path / "lake")
    cfg = make_config(tmp_path, *SETTINGS)
    later = AS_OF + timedelta(days=1)

    def pipeline():  # as the commands and `microseg pipeline` run them
        with recorded_job(spark, cfg, job="features", as_of=later):
            run_features(spark, cfg, as_of=later)
        with recorded_job(spark, cfg, job="segments run", as_of=later):
            return run_segments(spark, cfg, as_of=later)

    outcomes = together(pipeline, lambda: run_forget(spark, cfg, ["u2"], request_id="r"))
    for _, exc in outcomes:
        if exc is not None:
            conflict_line(exc)
    if outcomes[1][1] is not None:
        run_forget(spark, cfg, ["u2"], request_id="again")
    if outcomes[0][1] is not None:
        pipeline()
    root = cfg.lake.root
    for table in lake.ALL_TABLES:
        if not table.identifiers or not lake.table_exists(spark, root, table):
            continue
        text = [str(r) for r in lake.read_table(spark, root, table).collect()]
        assert not [t for t in text if "'u2'" in t or "anon:a1" in t], table.name
    features = lake.read_table(spark, root, lake.USER_FEATURES).filter(
        f"as_of = TIMESTAMP '{later}'"
    )
    assert sorted(r.user_key for r in features.collect()) == ["u1", "u3", "u4"]
