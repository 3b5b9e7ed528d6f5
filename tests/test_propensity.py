"""Propensity: point-in-time labels, the calibration step, the saved pipeline, scores and
segments. Expected values are written out by hand."""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from pyspark.ml import PipelineModel
from pyspark.sql import functions as F
from tests.conftest import lineage, make_config
from tests.test_sessions import ev, events_df, write_bronze

from microseg.core import lake
from microseg.core.config import ConfigError
from microseg.core.runs import recorded
from microseg.ml import registry
from microseg.ml.propensity.calibration import IsotonicCalibrationModel, IsotonicCalibrator
from microseg.ml.propensity.labels import labeled_snapshot, training_snapshots, with_labels
from microseg.ml.propensity.metrics import evaluate_scores
from microseg.ml.propensity.models import in_user_holdout, user_fold
from microseg.ml.propensity.score import score_propensity
from microseg.ml.propensity.targets import model_features, segment_id, target_spec
from microseg.ml.propensity.train import _select, _tune_gbt, train_propensity
from microseg.segments import membership

T = datetime(2026, 9, 10)  # a label as-of
H = timedelta(days=7)
SECOND = timedelta(seconds=1)


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


def test_user_holdout_keeps_each_user_on_one_side(spark):
    rows = [(f"u{u}", day) for u in range(400) for day in (1, 8, 15)]
    df = spark.createDataFrame(rows, "user_key string, day int")
    sides = df.select("user_key", in_user_holdout(0.75, 42).alias("held_out")).distinct()
    per_user = {}
    for r in sides.collect():
        per_user.setdefault(r.user_key, set()).add(r.held_out)
    assert len(per_user) == 400 and all(len(s) == 1 for s in per_user.values())
    held_out = sum(1 for s in per_user.values() if True in s)
    assert 70 <= held_out <= 130  # about a quarter of 400 users


@pytest.mark.parametrize("validation", ["train_validation_split", "cross_validation"])
def test_tuning_picks_the_depth_an_interaction_needs(spark, tmp_path, validation):
    # label = a XOR b: stumps (depth 1) add up one effect per feature, and no sum ranks both
    # positive cells above both negative ones; depth 2 trees separate them. 40 more users in
    # cell (a=1, b=0) give the root split a gain. Two snapshots per user.
    cells = [(u % 2, u // 2 % 2) for u in range(240)] + [(1, 0)] * 40
    rows = [
        (f"u{u}", day, float(a), float(b), float(a ^ b))
        for u, (a, b) in enumerate(cells)
        for day in (1, 8)
    ]
    fit_df = spark.createDataFrame(
        rows, "user_key string, day int, a double, b double, label double"
    ).withColumn("weight", F.lit(1.0))
    settings = make_config(
        tmp_path,
        "propensity.grid.max_depth=[1, 2]",
        "propensity.grid.max_iter=[3]",
        f"propensity.validation={validation}",
    ).propensity
    best, validation_metrics = _tune_gbt(fit_df, ["a", "b"], settings)
    assert [(m["maxDepth"], m["maxIter"]) for m in validation_metrics] == [(1, 3), (2, 3)]
    assert validation_metrics[1]["areaUnderPR"] == pytest.approx(1.0)
    assert validation_metrics[0]["areaUnderPR"] < 0.9  # 0.79 and 0.80 measured
    assert best.stages[-1].getMaxDepth() == 2


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
# training, the saved pipeline, scoring: a hand-built shop of eight users
#
# E is the evaluation as-of; with two snapshots a week apart the training uses F = E - 14d
# (fit) and C = E - 7d (calibration, held out). Events, in days from E (P purchase, V visit):
#
#   u1  P -20, P -10, P -4, P +1         u5  V -15, P +2
#   u2  P -18, P -9,  P -5, P +7 (E + h) u6  V -19
#   u3  P -17, P -12, P -2, P +4         u7  V -16
#   u4  P -10, P -7 (exactly at C)       u8  V -13
#
# The model features are orders_lifetime and days_since_last_event. In the fit rows only
# orders_lifetime separates the labels (u5, a non-buyer, visited more recently than every
# buyer), so every GBT tree splits on orders_lifetime <= 0.5 and the GBT puts every user into
# one of two groups: G1 (has bought) above G0 (never bought). The calibration rows are pure
# (G1 all positive, G0 all negative), so the isotonic step maps G0 to 0 and G1 to 1, clipped
# to [e, 1 - e] with e = 0.5 / 8 calibration rows = 1/16.

E = datetime(2026, 10, 1)
F_AS_OF = E - timedelta(days=14)
C_AS_OF = E - timedelta(days=7)
PURCHASES = {
    "u1": (-20, -10, -4, 1),
    "u2": (-18, -9, -5, 7),
    "u3": (-17, -12, -2, 4),
    "u4": (-10, -7),
    "u5": (2,),
}
VISITS = {"u5": (-15,), "u6": (-19,), "u7": (-16,), "u8": (-13,)}
HAND_MODEL = [
    "propensity.serve=gbt",  # the hand values are the GBT's
    "propensity.snapshots=2",
    "propensity.grid.max_depth=[2]",
    "propensity.grid.max_iter=[5]",
    "propensity.features=[orders_lifetime, days_since_last_event]",
    "propensity.top_share=0.25",
]
# (orders_lifetime, days_since_last_event, label) per user at each as-of; a purchase at
# exactly T is a label of T, not a feature; one at exactly T + h is neither
HAND_ROWS = {
    F_AS_OF: {
        "u1": (1, 6.0, 1.0),
        "u2": (1, 4.0, 1.0),
        "u3": (1, 3.0, 1.0),
        "u5": (0, 1.0, 0.0),
        "u6": (0, 5.0, 0.0),
        "u7": (0, 2.0, 0.0),
    },
    C_AS_OF: {
        "u1": (2, 3.0, 1.0),
        "u2": (2, 2.0, 1.0),
        "u3": (2, 5.0, 1.0),
        "u4": (1, 3.0, 1.0),  # bought at C: a label of C, not a feature
        "u5": (0, 8.0, 0.0),
        "u6": (0, 12.0, 0.0),
        "u7": (0, 9.0, 0.0),
        "u8": (0, 6.0, 0.0),
    },
    E: {
        "u1": (3, 4.0, 1.0),
        "u2": (3, 5.0, 0.0),  # bought at E + h: not a label
        "u3": (3, 2.0, 1.0),
        "u4": (2, 7.0, 0.0),
        "u5": (0, 15.0, 1.0),  # never bought before E, buys in [E, E + h)
        "u6": (0, 19.0, 0.0),
        "u7": (0, 16.0, 0.0),
        "u8": (0, 13.0, 0.0),
    },
}
LOW, HIGH = 1 / 16, 15 / 16  # calibrated GBT score of G0 and G1
GBT_SCORES = {"u1": HIGH, "u2": HIGH, "u3": HIGH, "u4": HIGH} | {
    u: LOW for u in ("u5", "u6", "u7", "u8")
}
# Evaluation rows: G1 = u1 (1), u2 (0), u3 (1), u4 (0); G0 = u5 (1), u6, u7, u8 (0).
# ROC AUC = P(positive ranks above negative) + 1/2 P(tie) over the 3 x 5 pairs:
#   u1, u3: tie u2, u4 and beat u6, u7, u8 -> 2 x (1 + 3); u5: ties u6, u7, u8 -> 1.5
#   (8 + 1.5) / 15 = 19/30
# PR curve (Spark prepends (0, precision of the first threshold)): G1 cut at recall 2/3,
# precision 2/4; everyone at recall 1, precision 3/8:
#   2/3 x 1/2 + 1/3 x (1/2 + 3/8) / 2 = 1/3 + 7/48 = 23/48
# top 25% = ceil(0.25 x 8) = 2 rows: G1 ties go by user_key -> u1 (1), u2 (0): precision 1/2,
# lift (1/2) / (3/8) = 4/3; log loss: five rows scored right (-ln 15/16), three wrong (-ln 1/16)
GBT_METRICS = {
    "roc_auc": 19 / 30,
    "pr_auc": 23 / 48,
    "log_loss": (5 * -math.log(15 / 16) + 3 * -math.log(1 / 16)) / 8,
    "precision_top": 0.5,
    "lift_top": 4 / 3,
    "base_rate": 3 / 8,
    "rows": 8.0,
}
# The heuristic (1 + orders_lifetime) / (1 + days_since_last_event) on the calibration rows:
#   negatives u6 1/13, u7 1/10, u5 1/9, u8 1/7; positives u3 = u4 1/2, u1 3/4, u2 1
# already in label order, so the isotonic fit keeps them: 0 on [1/13, 1/7], 1 on [1/2, 1],
# linear between 1/7 and 1/2. At E: u3 4/3, u1 4/5, u2 2/3 -> 1 (clipped to 15/16);
# u4 3/8 -> (3/8 - 1/7) / (1/2 - 1/7) = 13/20; u8 1/14, u5 1/16, u7 1/17, u6 1/20 -> 0 (1/16).
# Ranked by the heuristic: u3 (1), u1 (1), u2, u4, u8, u5 (1), u7, u6.
# ROC AUC: u3 and u1 beat all five negatives, u5 beats u7 and u6: (5 + 5 + 2) / 15 = 4/5.
# PR: (1/3, 1) (2/3, 1) then recall stays 2/3 down to precision 2/5 at u8, (1, 1/2) at u5:
#   2/3 + 1/3 x (2/5 + 1/2) / 2 = 2/3 + 3/20 = 49/60. Top 2: u3, u1: precision 1, lift 8/3.
HEURISTIC_METRICS = {
    "roc_auc": 4 / 5,
    "pr_auc": 49 / 60,
    "log_loss": (5 * -math.log(15 / 16) + 2 * -math.log(1 / 16) - math.log(7 / 20)) / 8,
    "precision_top": 1.0,
    "lift_top": 8 / 3,
    "base_rate": 3 / 8,
    "rows": 8.0,
}
# registry.training_data_hash of the 14 fit and calibration rows of HAND_ROWS (user_key, as_of,
# label, orders_lifetime, days_since_last_event); worked out with hashlib alone
HAND_DATA_HASH = "9fa650513e16d45ba43794ad249354f0beb50eb8b920add268ae06b003e0e051"


def gbt_margin() -> float:
    """The hand model's GBT margin for G1 (minus it for G0). Every tree splits on orders and
    its leaves are pure: the first tree fits the labels as +1/-1 (weight 1), each of the next
    four the log-loss pseudo-residual 4 / (1 + e^(2 F)) of the current margin F (weight 0.1)."""
    margin = 1.0
    for _ in range(4):
        margin += 0.1 * 4 / (1 + math.exp(2 * margin))
    return margin  # 1.16967...


def hand_events() -> list[tuple]:
    rows = []
    for user, days in PURCHASES.items():
        for day in days:
            purchase = ev(f"{user}-p{day}", 0, "purchase", user=user, price=10.0)
            rows.append(at(purchase, E + timedelta(days=day)))
    for user, days in VISITS.items():
        for day in days:
            rows.append(
                at(ev(f"{user}-v{day}", 0, "page_view", user=user), E + timedelta(days=day))
            )
    return rows


@pytest.fixture(scope="module")
def trained(spark, tmp_path_factory):
    root = tmp_path_factory.mktemp("propensity")
    cfg = make_config(root, *HAND_MODEL)
    write_bronze(spark, cfg, hand_events())
    report = train_propensity(spark, cfg, target="purchase_7d", as_of=E)
    return cfg, report


def test_training_rows_are_the_hand_table(spark, trained):
    cfg, _ = trained
    for as_of, expected in HAND_ROWS.items():
        frame_df, computed = labeled_snapshot(spark, cfg, target="purchase_7d", as_of=as_of)
        assert not computed  # training computed every snapshot; this reads the same rows
        got = {
            r.user_key: (r.orders_lifetime, r.days_since_last_event, r.label)
            for r in frame_df.collect()
        }
        assert got == expected, as_of


def test_training_report_by_hand(trained):
    _, report = trained
    assert (report.training_as_of, report.calibration_as_of) == ([F_AS_OF, C_AS_OF], C_AS_OF)
    assert report.features_computed == [F_AS_OF, C_AS_OF, E]
    assert report.snapshots == [
        {"as_of": "2026-09-17T00:00:00", "role": "fit", "rows": 6, "positives": 3},
        {"as_of": "2026-09-24T00:00:00", "role": "calibration", "rows": 8, "positives": 4},
        {"as_of": "2026-10-01T00:00:00", "role": "evaluation", "rows": 8, "positives": 3},
    ]
    assert (report.features, report.dropped_features) == (
        ["orders_lifetime", "days_since_last_event"],
        [],
    )
    assert report.chosen_params == {"maxDepth": 2, "maxIter": 5, "stepSize": 0.1}
    assert report.feature_importances == [
        ("orders_lifetime", 1.0),
        ("days_since_last_event", 0.0),
    ]
    # TreeSHAP: 3 fit rows on each side of the orders split (the cover), so the base is 0
    # and orders carries the whole margin, 2 x margin in log-odds, for each evaluation row
    assert report.shap_base == pytest.approx(0.0, abs=1e-12)
    assert report.shap_rows == 8
    assert report.shap_importances == [
        ("orders_lifetime", pytest.approx(2 * gbt_margin())),
        ("days_since_last_event", 0.0),
    ]
    assert report.metrics["gbt"] == pytest.approx(GBT_METRICS)
    assert report.metrics["heuristic"] == pytest.approx(HEURISTIC_METRICS)
    assert set(report.metrics) == {"gbt", "logistic_regression", "heuristic"}
    # deciles of 8 rows are single rows, ordered by score, then raw score, then user_key
    assert report.calibration_table == [
        {"decile": d, "mean_predicted": p, "observed_rate": y, "rows": 1}
        for d, (p, y) in enumerate(
            [(0.0625, 1.0), (0.0625, 0.0), (0.0625, 0.0), (0.0625, 0.0)]  # u5, u6, u7, u8
            + [(0.9375, 1.0), (0.9375, 0.0), (0.9375, 1.0), (0.9375, 0.0)],  # u1 .. u4
            start=1,
        )
    ]
    # the heuristic is better on every metric: GBT beats no baseline
    assert report.beats_baselines == {
        "roc_auc": False,
        "pr_auc": False,
        "lift_top": False,
        "log_loss": False,
    }
    assert report.verdict.startswith("GBT does NOT beat every baseline: ")
    assert "roc_auc 0.6333 vs heuristic 0.8000" in report.verdict
    assert "lift_top 1.3333 vs heuristic 2.6667" in report.verdict
    assert report.heuristic == "(1 + orders_lifetime) / (1 + days_since_last_event)"
    # the fit and calibration rows of HAND_ROWS (see registry.training_data_hash)
    assert report.data_hash == HAND_DATA_HASH


def test_registry_entry_by_hand(spark, trained):
    cfg, report = trained
    entry = registry.get(spark, cfg.lake.root, "purchase_7d", kind="propensity")
    assert (entry.model_name, entry.kind, entry.version) == (
        "purchase_7d",
        "propensity",
        report.version,
    )
    assert entry.training_as_of == (F_AS_OF, C_AS_OF)
    assert entry.evaluation_as_of == E
    assert entry.path == lake.model_path(cfg.lake.root, "purchase_7d", report.version)
    assert entry.training_data_hash == HAND_DATA_HASH
    assert "training_seconds" in entry.metrics  # wall clock
    hand_metrics = {
        k: v
        for k, v in entry.metrics.items()
        if not k.startswith("logistic_regression_") and k != "training_seconds"
    }
    assert hand_metrics == (
        pytest.approx(
            {
                **{f"gbt_{k}": v for k, v in GBT_METRICS.items() if k not in ("base_rate", "rows")},
                **{
                    f"heuristic_{k}": v
                    for k, v in HEURISTIC_METRICS.items()
                    if k not in ("base_rate", "rows")
                },
                "evaluation_base_rate": 3 / 8,
                "evaluation_rows": 8.0,
                "training_rows": 14.0,  # 6 fit + 8 calibration rows
                "gbt_beats_baselines_roc_auc": 0.0,
                "gbt_beats_baselines_pr_auc": 0.0,
                "gbt_beats_baselines_lift_top": 0.0,
                "gbt_beats_baselines_log_loss": 0.0,
            }
        )
    )
    assert entry.params["chosen"] == {"maxDepth": 2, "maxIter": 5, "stepSize": 0.1}
    assert entry.params["class_weights"] == {"mode": "balanced", "negative": 1.0, "positive": 1.0}
    assert entry.params["calibration_as_of"] == "2026-09-24T00:00:00"
    assert entry.details["feature_importances"] == {
        "orders_lifetime": 1.0,
        "days_since_last_event": 0.0,
    }
    # the heuristic's calibrated scores, ordered as in the calibration table:
    # u6, u7, u5, u8 (1/16), u4 (13/20), u2, u1, u3 (15/16)
    assert entry.details["calibration_tables"]["heuristic"] == [
        {"decile": d, "mean_predicted": p, "observed_rate": y, "rows": 1}
        for d, (p, y) in enumerate(
            [(0.0625, 0.0), (0.0625, 0.0), (0.0625, 1.0), (0.0625, 0.0), (0.65, 0.0)]
            + [(0.9375, 0.0), (0.9375, 1.0), (0.9375, 1.0)],
            start=1,
        )
    ]


def test_saved_pipeline_loads_as_one_model_with_the_hand_scores(spark, trained):
    cfg, report = trained
    loaded = PipelineModel.load(report.path)
    assert [type(s).__name__ for s in loaded.stages] == [
        "ImputerModel",
        "VectorAssembler",
        "GBTClassificationModel",
        "IsotonicCalibrationModel",
    ]
    rows_df, _ = labeled_snapshot(spark, cfg, target="purchase_7d", as_of=E)
    for model in (report.model, loaded):
        got = model.transform(rows_df).select("user_key", "score").collect()
        assert {r.user_key: r.score for r in got} == pytest.approx(GBT_SCORES)


def test_evaluation_window_must_be_complete(spark, trained):
    cfg, _ = trained
    # E + 2d + 7d is after the last event (E + 7d)
    with pytest.raises(ValueError, match="not complete"):
        train_propensity(spark, cfg, target="purchase_7d", as_of=E + timedelta(days=2))


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
        scope=membership.Scope("propensity", "churn_30d"),
        as_of=E - timedelta(days=1),
        run_id="r0",
        members_df=other,
        versions={"propensity_churn_30d_top10": "v-churn"},
    )
    got = score_propensity(spark, cfg, target="purchase_7d", as_of=E)
    # ranked by raw score (G1 above G0), ties by user_key; percentile = (8 - rank + 1) / 8
    rows = lake.read_table(spark, root, lake.PROPENSITY_SCORES).collect()
    ranked = ["u1", "u2", "u3", "u4", "u5", "u6", "u7", "u8"]
    assert {r.user_key: (r.rank, r.percentile, r.score) for r in rows} == {
        user: (rank, (9 - rank) / 8, GBT_SCORES[user]) for rank, user in enumerate(ranked, 1)
    }
    assert {(r.model_name, r.model_version, r.as_of) for r in rows} == {
        ("purchase_7d", report.version, E)
    }
    # one reason each (days_since_last_event contributes nothing): orders, at the user's
    # orders, +-2 x the margin (see gbt_margin)
    log_odds = 2 * gbt_margin()
    assert {r.user_key: [tuple(x) for x in r.reasons] for r in rows} == {
        "u1": [("orders_lifetime", 3.0, pytest.approx(log_odds))],
        "u2": [("orders_lifetime", 3.0, pytest.approx(log_odds))],
        "u3": [("orders_lifetime", 3.0, pytest.approx(log_odds))],
        "u4": [("orders_lifetime", 2.0, pytest.approx(log_odds))],
        **{
            u: [("orders_lifetime", 0.0, pytest.approx(-log_odds))]
            for u in ("u5", "u6", "u7", "u8")
        },
    }
    # and the GBT's own probability agrees: raw_score = 1 / (1 + e^(-2 margin))
    assert {r.user_key: r.raw_score for r in rows}["u1"] == pytest.approx(
        1 / (1 + math.exp(-log_odds))
    )
    # the API answers with the latest score per target and its reasons
    from fastapi.testclient import TestClient

    from microseg.serving.api import create_app

    body = TestClient(create_app(cfg)).get("/users/u5/scores").json()
    assert body == {
        "id": "u5",
        "user_key": "u5",
        "scores": [
            {
                "model_name": "purchase_7d",
                "model_version": report.version,
                "as_of": "2026-10-01T00:00:00Z",
                "score": pytest.approx(LOW),
                "rank": 5,
                "percentile": 0.5,
                "reasons": [
                    {
                        "feature": "orders_lifetime",
                        "value": 0.0,
                        "contribution": pytest.approx(-log_odds),
                    }
                ],
            }
        ],
    }
    # top 25% of 8 users: the first two of G1 by user_key
    members = membership.members_at(spark, root, "propensity_purchase_7d_top25", E).collect()
    assert {r.user_key: (r.source, r.definition_version, r.score) for r in members} == {
        "u1": ("propensity", report.version, HIGH),
        "u2": ("propensity", report.version, HIGH),
    }
    assert (got.users, got.segment_id, got.members, got.entered, got.exited) == (
        8,
        "propensity_purchase_7d_top25",
        2,
        2,
        0,
    )
    assert got.min_member_score == pytest.approx(HIGH)
    assert got.mean_score == pytest.approx((4 * HIGH + 4 * LOW) / 8)  # = 1/2
    assert (got.version, got.features_computed) == (report.version, False)
    kept = membership.members_at(spark, root, "propensity_churn_30d_top10", E)
    assert [r.user_key for r in kept.collect()] == ["u1"]
    catalog = lake.read_table(spark, root, lake.SEGMENT_CATALOG).filter(
        F.col("segment_id") == "propensity_purchase_7d_top25"
    )
    assert [(r.source, r.matched, r.size, r.definition_version) for r in catalog.collect()] == [
        ("propensity", 2, 2, report.version)
    ]

    # re-running the as-of replaces its 8 score rows and changes no membership: the three
    # intervals (u1 in the churn segment, u1 and u2 in this one) stay as they are
    again = score_propensity(spark, cfg, target="purchase_7d", as_of=E)
    assert (again.users, again.members, again.entered, again.exited) == (8, 2, 2, 0)
    assert lake.read_table(spark, root, lake.PROPENSITY_SCORES).count() == 8
    assert lake.read_table(spark, root, lake.SEGMENT_MEMBERSHIP).count() == 3

    # BI tools without Spark read the same tables (the deltalake package)
    from deltalake import DeltaTable

    scores = DeltaTable(lake.table_path(root, lake.PROPENSITY_SCORES)).to_pandas()
    assert sorted(scores["rank"]) == [1, 2, 3, 4, 5, 6, 7, 8]
    registry_df = DeltaTable(lake.table_path(root, lake.MODEL_REGISTRY)).to_pandas()
    assert [(r.kind, r.version) for r in registry_df.itertuples()] == [
        ("propensity", report.version)
    ]


def test_model_path_is_under_the_lake(trained):
    cfg, report = trained
    assert Path(report.path).is_dir()
    assert report.path.startswith(str(Path(cfg.lake.root).resolve()))


def test_logistic_regression_serves_when_chosen_and_explains_exactly(spark, trained):
    """Runs after the GBT tests of this lake: it registers two more versions."""
    cfg, _ = trained
    root = Path(cfg.lake.root).parent
    lr_cfg = make_config(root, *HAND_MODEL, "propensity.serve=logistic_regression")
    report = train_propensity(spark, lr_cfg, target="purchase_7d", as_of=E)
    assert (report.serving, report.selection["reason"]) == (
        "logistic_regression",
        "propensity.serve",
    )
    assert [type(s).__name__ for s in PipelineModel.load(report.path).stages][-2:] == [
        "LogisticRegressionModel",
        "IsotonicCalibrationModel",
    ]
    entry = registry.get(spark, cfg.lake.root, "purchase_7d", kind="propensity")
    assert (entry.version, entry.params["serving"]) == (report.version, "logistic_regression")
    score_propensity(spark, lr_cfg, target="purchase_7d", as_of=E)
    rows = (
        lake.read_table(spark, cfg.lake.root, lake.PROPENSITY_SCORES)
        .filter(F.col("model_version") == report.version)
        .collect()
    )
    assert len(rows) == 8
    for r in rows:
        # linear SHAP: intercept + sum of coefficient x standardized value = logit(raw score),
        # with both features among the 3 reasons; the values shown are the raw orders
        contributions = {x.feature: x.contribution for x in r.reasons}
        assert set(contributions) <= {"orders_lifetime", "days_since_last_event"}
        logit = math.log(r.raw_score / (1 - r.raw_score))
        assert report.shap_base + sum(contributions.values()) == pytest.approx(logit, abs=1e-6)
        orders = next(x for x in r.reasons if x.feature == "orders_lifetime")
        assert orders.value == HAND_ROWS[E][r.user_key][0]
        # more orders than the fit rows' mean (1/2): a positive push, none: a negative one
        assert (orders.contribution > 0) == (orders.value > 0)

    # auto, on the trained GBT and the hand fit rows (F_AS_OF): the validation users of the 6
    # fit rows (a quarter, by a hash of the key) hold one label only, so nothing tells the
    # models apart and the GBT serves by default
    fit_df, _ = labeled_snapshot(spark, cfg, target="purchase_7d", as_of=F_AS_OF)
    _, gbt_report = trained
    settings = make_config(root, *HAND_MODEL, "propensity.serve=auto").propensity
    auto = _select(
        fit_df.withColumn("weight", F.lit(1.0)),
        PipelineModel(stages=gbt_report.model.stages[:-1]),
        ["orders_lifetime", "days_since_last_event"],
        settings,
    )
    assert (auto["serving"], auto["reason"]) == (
        "gbt",
        "a validation side has one label only: the GBT serves by default",
    )


@pytest.mark.soak  # about 3.5 minutes; the default suite keeps the hand-made model tests
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
    with recorded(spark, cfg, job="propensity train", as_of=as_of) as run:
        report = train_propensity(spark, cfg, target="purchase_7d", as_of=as_of, run_id=run.run_id)
    assert report.training_as_of == [
        datetime(2026, 9, 8),
        datetime(2026, 9, 15),
        datetime(2026, 9, 22),
    ]
    assert report.metrics["gbt"]["roc_auc"] > 0.6  # the personas differ in buying: signal
    with recorded(spark, cfg, job="propensity score") as run:
        scored = score_propensity(
            spark, cfg, target="purchase_7d", as_of=datetime(2026, 10, 6), run_id=run.run_id
        )
    assert scored.features_computed  # no snapshot as of 2026-10-06 before
    # every row joins to the run that wrote it (the ingest ran outside recorded(): no run)
    jobs = lineage(spark, cfg.lake.root)
    del jobs["bronze/events"], jobs["ops/ingested_files"]
    assert jobs == {
        "gold/user_features": {"propensity train", "propensity score"},
        "gold/model_registry": {"propensity train"},
        "gold/propensity_scores": {"propensity score"},
        "gold/segment_membership": {"propensity score"},
        "gold/segment_changes": {"propensity score"},
        "gold/segment_catalog": {"propensity score"},
        # training brought silver up to date before its first snapshot (sessionize's mark)
        "ops/watermarks": {"propensity train"},
    }
