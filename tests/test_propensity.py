"""Propensity: point-in-time labels, the calibration step, the saved pipeline, scores and
segments. Expected values are written out by hand."""

from __future__ import annotations

import json
import math
import random
import re
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from pyspark.ml import PipelineModel
from pyspark.sql import functions as F
from tests.conftest import make_config
from tests.test_sessions import T0, ev, events_df, write_bronze

from microseg.core import lake
from microseg.core.config import ConfigError
from microseg.ml.propensity.calibration import IsotonicCalibrationModel, IsotonicCalibrator
from microseg.ml.propensity.labels import labeled_snapshot, training_snapshots, with_labels
from microseg.ml.propensity.metrics import evaluate_scores
from microseg.ml.propensity.models import user_fold
from microseg.ml.propensity.score import score_propensity
from microseg.ml.propensity.targets import model_features, segment_id, target_spec
from microseg.ml.propensity.train import train_propensity
from microseg.segments import membership

DAY = 24 * 60
T = datetime(2026, 9, 10)  # a label as-of
H = timedelta(days=7)
SECOND = timedelta(seconds=1)

FAST_MODEL = [
    "propensity.snapshots=2",
    "propensity.grid.max_depth=[2]",
    "propensity.grid.max_iter=[5]",
]


def at(row, when: datetime):
    """An ev() row moved to an exact time."""
    return (row[0], when, *row[2:])


def labels(spark, rows, users, kind="purchase"):
    features_df = spark.createDataFrame([(u,) for u in users], "user_key string")
    got = with_labels(features_df, events_df(spark, rows), as_of=T, kind=kind, horizon=H)
    return {r.user_key: r.label for r in got.collect()}


# --------------------------------------------------------------------------------------
# labels


LABEL_EVENTS = [
    at(ev("b1", 0, "purchase", user="u_before", price=5.0), T - SECOND),
    at(ev("a1", 0, "purchase", user="u_at", price=5.0), T),
    at(ev("e1", 0, "page_view", user="u_end"), T - timedelta(days=1)),
    at(ev("e2", 0, "purchase", user="u_end", price=5.0), T + H),
    at(ev("l1", 0, "purchase", user="u_last", price=5.0), T + H - timedelta(microseconds=1)),
    # a prior buyer who buys again in the window
    at(ev("r1", 0, "purchase", user="u_repeat", price=5.0), T - timedelta(days=3)),
    at(ev("r2", 0, "purchase", user="u_repeat", price=5.0), T + timedelta(days=2)),
    # anonymous before T, logs in during the window and buys
    at(ev("n1", 0, "product_view", anon="a9"), T - timedelta(hours=2)),
    at(ev("n2", 0, "page_view", user="u9", anon="a9"), T + timedelta(days=1)),
    at(ev("n3", 0, "purchase", user="u9", price=5.0), T + timedelta(days=1, minutes=5)),
]
POPULATION = ["u_before", "u_at", "u_end", "u_last", "u_repeat", "anon:a9"]


def test_purchase_label_comes_only_from_t_to_t_plus_horizon(spark):
    assert labels(spark, LABEL_EVENTS, POPULATION) == {
        "u_before": 0.0,  # bought one second before T: a feature, not a label
        "u_at": 1.0,  # at T: inside [T, T + h)
        "u_end": 0.0,  # at T + h: outside
        "u_last": 1.0,  # one microsecond before T + h
        "u_repeat": 1.0,
        "anon:a9": 1.0,  # stitched to u9 by T + h, and u9 bought
    }


def test_churn_population_is_prior_buyers_only(spark):
    assert labels(spark, LABEL_EVENTS, POPULATION, kind="churn") == {
        "u_before": 1.0,  # bought before T, not in the window
        "u_repeat": 0.0,  # bought again in the window
    }


def test_training_snapshots_end_their_label_windows_by_the_evaluation_as_of():
    e = datetime(2026, 10, 23)
    assert training_snapshots(e, horizon=H, interval=timedelta(days=7), count=3) == [
        datetime(2026, 10, 2),
        datetime(2026, 10, 9),
        datetime(2026, 10, 16),
    ]
    assert training_snapshots(e, horizon=timedelta(days=30), interval=H, count=2) == [
        datetime(2026, 9, 16),
        datetime(2026, 9, 23),
    ]


# --------------------------------------------------------------------------------------
# config


def test_unknown_feature_or_target_is_a_config_error(tmp_path):
    with pytest.raises(
        ConfigError, match=r"propensity\.features: unknown feature\(s\) \['revenu_7d'\]"
    ):
        model_features(make_config(tmp_path, "propensity.features=[revenue_7d, revenu_7d]"))
    with pytest.raises(ConfigError, match=r"propensity\.features: \['top_category'\] not numeric"):
        model_features(make_config(tmp_path, "propensity.features=[top_category]"))
    with pytest.raises(ConfigError, match=r"propensity\.features: \['orders_7d'\] not computed"):
        model_features(
            make_config(
                tmp_path,
                "features.include=[orders_30d]",
                "propensity.features=[orders_7d]",
            )
        )
    with pytest.raises(ConfigError, match=r"propensity\.targets: unknown target 'buy_7d'"):
        target_spec(make_config(tmp_path), "buy_7d")
    with pytest.raises(ConfigError, match=r"propensity\.targets\.x\.kind"):
        make_config(tmp_path, "propensity.targets.x={kind: sale, horizon: 7d}")


def test_default_features_are_the_numeric_computed_ones(tmp_path):
    got = model_features(make_config(tmp_path))
    assert "orders_lifetime" in got and "engagement_score" in got
    assert "top_category" not in got
    assert model_features(
        make_config(tmp_path, "features.include=[orders_lifetime, top_category, tenure_days]")
    ) == ["orders_lifetime", "tenure_days"]


def test_cross_validation_folds_keep_each_user_in_one_fold(spark):
    rows = [(f"u{u}", day) for u in range(30) for day in (1, 8, 15)]
    df = spark.createDataFrame(rows, "user_key string, day int")
    folds = df.select("user_key", user_fold(3, 42).alias("fold")).distinct().collect()
    per_user = {}
    for r in folds:
        per_user.setdefault(r.user_key, set()).add(r.fold)
    assert len(per_user) == 30 and all(len(f) == 1 for f in per_user.values())
    assert set().union(*per_user.values()) == {0, 1, 2}


def test_segment_naming():
    assert segment_id("purchase_7d", 0.1) == "propensity_purchase_7d_top10"
    assert segment_id("churn_30d", 0.05) == "propensity_churn_30d_top5"
    assert segment_id("churn_30d", 0.025) == "propensity_churn_30d_top2p5"


# --------------------------------------------------------------------------------------
# calibration and metrics


def test_isotonic_calibration_is_monotone_and_round_trips(spark, tmp_path):
    fit_df = spark.createDataFrame(
        [(0.1, 0.0), (0.2, 1.0), (0.3, 0.0), (0.4, 1.0)], "raw double, label double"
    )
    model = IsotonicCalibrator(inputCol="raw").fit(fit_df)
    # pooled adjacent violators: 0 | (1, 0) -> 0.5 | 1; clipped to [0.5/4, 1 - 0.5/4]
    grid = [i / 100 for i in range(0, 101)]
    probe_df = spark.createDataFrame([(x,) for x in grid], "raw double")
    got = {r.raw_score: r.score for r in model.transform(probe_df).collect()}
    assert got[0.05] == pytest.approx(0.125)
    assert got[0.15] == pytest.approx(0.25)
    assert got[0.25] == pytest.approx(0.5)
    assert got[0.35] == pytest.approx(0.75)
    assert got[0.5] == pytest.approx(0.875)
    ordered = [got[x] for x in grid]
    assert all(a <= b for a, b in zip(ordered, ordered[1:], strict=False))
    model.write().overwrite().save(str(tmp_path / "calibrator"))
    loaded = IsotonicCalibrationModel.load(str(tmp_path / "calibrator"))
    assert loaded.getOrDefault(loaded.epsilon) == pytest.approx(0.125)
    again = {r.raw_score: r.score for r in loaded.transform(probe_df).collect()}
    assert again == got


def test_metrics_by_hand(spark):
    labels_ = [1, 1, 0, 1, 0, 0, 0, 0, 0, 0]
    rows = [(f"u{i}", float(y), 0.9 - i / 10, 0.5 if i < 5 else 0.1) for i, y in enumerate(labels_)]
    df = spark.createDataFrame(rows, "user_key string, label double, raw double, p double")
    metrics, table = evaluate_scores(df, rank_col="raw", probability_col="p", top_share=0.1)
    assert metrics["roc_auc"] == pytest.approx(20 / 21)
    # PR curve from (0, 1): (1/3, 1) (2/3, 1) (2/3, 2/3) (1, 3/4) ... trapezoids
    assert metrics["pr_auc"] == pytest.approx(2 / 3 + (2 / 3 + 3 / 4) / 2 / 3)
    assert metrics["base_rate"] == pytest.approx(0.3)
    assert metrics["precision_top"] == 1.0
    assert metrics["lift_top"] == pytest.approx(1 / 0.3)
    expected_loss = -(3 * math.log(0.5) + 2 * math.log(0.5) + 5 * math.log(0.9)) / 10
    assert metrics["log_loss"] == pytest.approx(expected_loss)
    assert [r["rows"] for r in table] == [1] * 10
    assert [r["mean_predicted"] for r in table] == [0.1] * 5 + [0.5] * 5
    # deciles ordered by p, then raw: the five 0.1 rows are u9..u5, the 0.5 rows u4..u0
    assert [r["observed_rate"] for r in table] == [0, 0, 0, 0, 0, 0, 1, 0, 1, 1]


# --------------------------------------------------------------------------------------
# training, the saved pipeline, scoring


def shop_events(users: int = 60, days: int = 36, seed: int = 7) -> list[tuple]:
    """Users with a daily visit chance and a buy chance per visit; frequent visitors buy more."""
    rng = random.Random(seed)
    rows = []
    for u in range(users):
        visit = rng.choice([0.05, 0.15, 0.4, 0.7])
        buy = 0.05 + 0.5 * visit
        for day in range(days):
            if rng.random() >= visit:
                continue
            minute = day * DAY + rng.randrange(0, 20 * 60)
            key = f"u{u}-{day}"
            rows.append(ev(f"{key}-v", minute, "product_view", user=f"u{u}", product="p1"))
            if rng.random() < buy:
                rows.append(ev(f"{key}-b", minute + 3, "purchase", user=f"u{u}", price=20.0))
    rows.append(ev("last", days * DAY, "page_view", user="u0"))
    return rows


EVAL_AS_OF = T0.replace(hour=0) + timedelta(days=28)
TC = EVAL_AS_OF - H  # the calibration snapshot
# hand-made users around TC; the events at or after TC would change their features if they
# leaked: lx1's orders and revenue, lx2's recency and sessions, cx3's user key
BEFORE_TC = [
    at(ev("x1a", 0, "purchase", user="lx1", product="x", price=10.0), TC - timedelta(days=2)),
    at(ev("x1b", 0, "product_view", user="lx1", product="x"), TC - timedelta(days=1)),
    at(ev("x2a", 0, "page_view", user="lx2", anon="cx2"), TC - timedelta(days=4)),
    at(ev("x3a", 0, "page_view", anon="cx3"), TC - timedelta(hours=3)),
]
AFTER_TC = [
    at(ev("z1", 0, "purchase", user="lx1", product="x", price=99.0), TC),
    at(ev("z2", 0, "product_view", user="lx2", product="y"), TC + timedelta(minutes=1)),
    at(ev("z3", 0, "page_view", user="lx3", anon="cx3"), TC + timedelta(hours=1)),
    at(ev("z4", 0, "purchase", user="lx3", price=1.0), TC + timedelta(hours=2)),
    at(ev("z5", 0, "purchase", user="lx4", price=1.0), TC + timedelta(days=3)),
    at(ev("z6", 0, "purchase", user="lx2", price=1.0), TC + H),  # at TC + h: not a label
]


@pytest.fixture(scope="module")
def trained(spark, tmp_path_factory):
    root = tmp_path_factory.mktemp("propensity")
    cfg = make_config(root, *FAST_MODEL)
    write_bronze(spark, cfg, shop_events() + BEFORE_TC + AFTER_TC)
    report = train_propensity(spark, cfg, target="purchase_7d", as_of=EVAL_AS_OF)
    return cfg, report


def test_training_splits_by_time_and_registers_the_model(spark, trained):
    cfg, report = trained
    assert report.training_as_of == [EVAL_AS_OF - timedelta(days=14), EVAL_AS_OF - H]
    assert report.calibration_as_of == EVAL_AS_OF - H
    assert [s["role"] for s in report.snapshots] == ["fit", "calibration", "evaluation"]
    assert report.features_computed == [*report.training_as_of, EVAL_AS_OF]
    assert re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{6}", report.version)
    assert set(report.metrics) == {"gbt", "logistic_regression", "heuristic"}
    assert report.heuristic == "(1 + orders_lifetime) / (1 + days_since_last_event)"
    assert len(report.calibration_table) == 10
    row = lake.read_table(spark, cfg.lake.root, lake.MODEL_REGISTRY).first()
    assert (row.model_name, row.version, row.kind) == ("purchase_7d", report.version, "propensity")
    assert row.training_as_of == report.training_as_of
    assert row.evaluation_as_of == EVAL_AS_OF
    assert row.path == lake.model_path(cfg.lake.root, "purchase_7d", report.version)
    for name in ("roc_auc", "pr_auc", "log_loss", "precision_top", "lift_top"):
        for model in ("gbt", "logistic_regression", "heuristic"):
            assert f"{model}_{name}" in row.metrics
    assert row.metrics["gbt_beats_baselines_roc_auc"] in (0.0, 1.0)
    details = json.loads(row.details)
    assert details["verdict"] == report.verdict
    assert set(details["calibration_tables"]) == {"gbt", "logistic_regression", "heuristic"}
    assert json.loads(row.params)["chosen"] == {"maxDepth": 2, "maxIter": 5, "stepSize": 0.1}
    assert len(row.training_data_hash) == 64


def test_training_rows_see_no_event_at_or_after_t(spark, trained):
    cfg, _ = trained
    frame_df, computed = labeled_snapshot(spark, cfg, target="purchase_7d", as_of=TC)
    assert not computed  # training computed the snapshot; this reads the same rows
    names = ["orders_lifetime", "revenue_lifetime", "days_since_last_event", "sessions_lifetime"]
    got = {
        r.user_key: tuple(r[c] for c in [*names, "label"])
        for r in frame_df.filter(
            F.col("user_key").isin("lx1", "lx2", "lx3", "lx4", "anon:cx3")
        ).collect()
    }
    assert got == {
        "lx1": (1, 10.0, pytest.approx(1.0), 2, 1.0),  # bought again at TC: a label, not a feature
        "lx2": (0, 0.0, pytest.approx(4.0), 1, 0.0),  # bought at TC + h: neither
        "anon:cx3": (0, 0.0, pytest.approx(0.125), 1, 1.0),  # logged in as lx3 and bought
    }


def test_saved_pipeline_loads_as_one_model_with_identical_scores(spark, trained):
    cfg, report = trained
    loaded = PipelineModel.load(report.path)
    kinds = [type(s).__name__ for s in loaded.stages]
    assert kinds == [
        "ImputerModel",
        "VectorAssembler",
        "GBTClassificationModel",
        "IsotonicCalibrationModel",
    ]
    rows_df, _ = labeled_snapshot(spark, cfg, target="purchase_7d", as_of=EVAL_AS_OF)

    def scores(model):
        return {
            r.user_key: (r.raw_score, r.score)
            for r in model.transform(rows_df).select("user_key", "raw_score", "score").collect()
        }

    before = scores(report.model)
    assert len(before) > 20
    assert scores(loaded) == before
    ordered = sorted(before.values())
    assert all(a[1] <= b[1] for a, b in zip(ordered, ordered[1:], strict=False))


def test_evaluation_window_must_be_complete(spark, trained):
    cfg, _ = trained
    with pytest.raises(ValueError, match="not complete"):
        train_propensity(spark, cfg, target="purchase_7d", as_of=EVAL_AS_OF + timedelta(days=2))


def test_score_writes_scores_and_the_top_share_as_a_segment(spark, trained):
    cfg, report = trained
    root = cfg.lake.root
    # another target's segment, published earlier, must be left as it is
    other = spark.createDataFrame(
        [("u1", "propensity_churn_30d_top10", 0.4, False)],
        "user_key string, segment_id string, score double, fallback boolean",
    )
    membership.write_membership(
        spark,
        root,
        source="propensity",
        as_of=EVAL_AS_OF - timedelta(days=1),
        run_id="r0",
        members_df=other,
        versions={"propensity_churn_30d_top10": "v-churn"},
    )
    got = score_propensity(spark, cfg, target="purchase_7d", as_of=EVAL_AS_OF)
    scores_df = lake.read_table(spark, root, lake.PROPENSITY_SCORES)
    rows = {r.user_key: r for r in scores_df.collect()}
    users = len(rows)
    assert got.users == users and got.version == report.version
    assert sorted(r.rank for r in rows.values()) == list(range(1, users + 1))
    top = math.ceil(0.1 * users)
    by_percentile = {u for u, r in rows.items() if r.percentile > 0.9}
    assert len(by_percentile) == top == got.members
    members = membership.members_at(spark, root, "propensity_purchase_7d_top10", EVAL_AS_OF)
    member_rows = {r.user_key: r for r in members.collect()}
    assert set(member_rows) == by_percentile
    for user, r in member_rows.items():
        assert (r.source, r.definition_version) == ("propensity", report.version)
        assert r.score == rows[user].score
    lowest_member = min(rows[u].raw_score for u in by_percentile)
    assert all(r.raw_score <= lowest_member for u, r in rows.items() if u not in by_percentile)
    kept = membership.members_at(spark, root, "propensity_churn_30d_top10", EVAL_AS_OF)
    assert [r.user_key for r in kept.collect()] == ["u1"]
    assert got.other_segments_kept == ["propensity_churn_30d_top10"]
    catalog = lake.read_table(spark, root, lake.SEGMENT_CATALOG).filter(
        F.col("segment_id") == "propensity_purchase_7d_top10"
    )
    assert [(r.source, r.size, r.definition_version) for r in catalog.collect()] == [
        ("propensity", top, report.version)
    ]

    # BI tools without Spark read the same tables (the deltalake package)
    from deltalake import DeltaTable

    scores = DeltaTable(lake.table_path(root, lake.PROPENSITY_SCORES)).to_pandas()
    assert sorted(scores["rank"]) == list(range(1, users + 1))
    registry = DeltaTable(lake.table_path(root, lake.MODEL_REGISTRY)).to_pandas()
    assert [(r.kind, r.version) for r in registry.itertuples()] == [("propensity", report.version)]


def test_model_path_is_under_the_lake(trained):
    cfg, report = trained
    assert Path(report.path).is_dir()
    assert report.path.startswith(str(Path(cfg.lake.root).resolve()))


@pytest.mark.slow
def test_generated_shop_end_to_end(spark, tmp_path, key_env):
    from microseg.ingest.files import run_ingest
    from microseg.ingest.generate import generate

    cfg = make_config(
        tmp_path,
        "generate.users=400",
        "generate.days=36",
        "propensity.snapshots=3",
        "propensity.grid.max_depth=[3]",
        "propensity.grid.max_iter=[15]",
    )
    generate(cfg.generate, tmp_path / "gen")
    run_ingest(spark, cfg, source="synthetic", path=str(tmp_path / "gen" / "events"))
    as_of = datetime(2026, 9, 29)  # events run to 2026-10-06 23:59: the last complete week
    report = train_propensity(spark, cfg, target="purchase_7d", as_of=as_of)
    assert report.training_as_of == [
        datetime(2026, 9, 8),
        datetime(2026, 9, 15),
        datetime(2026, 9, 22),
    ]
    assert report.metrics["gbt"]["roc_auc"] > 0.6  # the personas differ in buying: signal
    assert 0 < report.metrics["gbt"]["log_loss"] < 1
    scored = score_propensity(spark, cfg, target="purchase_7d", as_of=datetime(2026, 10, 6))
    assert scored.features_computed and scored.members == math.ceil(0.1 * scored.users)
    # re-running the as-of replaces its rows and changes no membership
    intervals = lake.read_table(spark, cfg.lake.root, lake.SEGMENT_MEMBERSHIP).count()
    again = score_propensity(spark, cfg, target="purchase_7d", as_of=datetime(2026, 10, 6))
    assert not again.features_computed
    assert (again.users, again.members, again.entered) == (
        scored.users,
        scored.members,
        scored.entered,
    )
    assert lake.read_table(spark, cfg.lake.root, lake.PROPENSITY_SCORES).count() == scored.users
    assert lake.read_table(spark, cfg.lake.root, lake.SEGMENT_MEMBERSHIP).count() == intervals
