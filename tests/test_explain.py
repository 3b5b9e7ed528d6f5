"""TreeSHAP explanations of the propensity GBT: by hand on a stump, and against shap's own
reader of Spark trees and Spark's own margins on a deeper ensemble."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import shap
from pyspark.ml import PipelineModel
from pyspark.ml.classification import GBTClassifier
from pyspark.ml.linalg import Vectors

from microseg.ml.propensity.explain import explain, read_ensemble, top_reasons, with_inputs


def fit_saved(spark, tmp_path, rows, **params):
    """A PipelineModel of one GBT fitted on (features, label) rows, saved; (model, path, df)."""
    df = spark.createDataFrame([(Vectors.dense(x), y) for x, y in rows], ["features", "label"])
    model = PipelineModel(stages=[GBTClassifier(seed=1, **params).fit(df)])
    path = str(tmp_path / "model")
    model.write().save(path)
    return model, path, df


# x1 splits 0 | 1; x2 never helps a depth-1 tree as much. Spark's first GBT tree fits the
# labels as -1/+1: the left leaf (x1 = 0: labels 0, 0, 1) predicts (-1 - 1 + 1) / 3 = -1/3,
# the right leaf (labels 1, 1) predicts 1. Probability = 1 / (1 + e^(-2 margin)), so in
# log-odds the leaves are -2/3 and 2, and the mean over the 5 training rows (the cover) is
# (3 x -2/3 + 2 x 2) / 5 = 2/5. SHAP(x1) = leaf - 2/5: -16/15 on the left, 8/5 on the right;
# SHAP(x2) = 0.
STUMP_ROWS = [
    ([0.0, 5.0], 0.0),
    ([0.0, 6.0], 0.0),
    ([0.0, 7.0], 1.0),
    ([1.0, 5.0], 1.0),
    ([1.0, 8.0], 1.0),
]


def test_tree_shap_of_a_stump_by_hand(spark, tmp_path):
    model, path, df = fit_saved(spark, tmp_path, STUMP_ROWS, maxDepth=1, maxIter=1)
    ensemble = read_ensemble(spark, model, path, ["x1", "x2"])
    values, base = ensemble.contributions(np.array([x for x, _ in STUMP_ROWS]))
    assert base == pytest.approx(2 / 5)
    assert values == pytest.approx(np.array([[-16 / 15, 0.0]] * 3 + [[8 / 5, 0.0]] * 2))
    # the Spark path: one reason per row (x2 contributes nothing), with the row's value
    got = explain(with_inputs(model.transform(df), "label"), ensemble, top=2).collect()
    reasons = sorted(
        (r.label, [(x.feature, x.value, round(x.contribution, 9)) for x in r.reasons]) for r in got
    )
    assert reasons == [
        (0.0, [("x1", 0.0, round(-16 / 15, 9))]),
        (0.0, [("x1", 0.0, round(-16 / 15, 9))]),
        (1.0, [("x1", 0.0, round(-16 / 15, 9))]),
        (1.0, [("x1", 1.0, 1.6)]),
        (1.0, [("x1", 1.0, 1.6)]),
    ]


def test_top_reasons_order_and_ties():
    values = np.array([[0.5, -2.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]])
    x = np.array([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    got = top_reasons(values, x, ("a", "b", "c", "d"), 3)
    assert got == [
        [
            {"feature": "b", "value": 2.0, "contribution": -2.0},
            {"feature": "a", "value": 1.0, "contribution": 0.5},  # tie: feature order
            {"feature": "c", "value": 3.0, "contribution": 0.5},
        ],
        [],
    ]


def test_deeper_ensemble_adds_up_to_sparks_margin_and_matches_shaps_reader(spark, tmp_path):
    """60 rows, 3 features with an interaction, depth 3, 12 trees: our reading of the saved
    files gives the values shap computes from the live Spark model (its py4j reader, margin
    units, so ours are twice its), and base + sum = 2 x Spark's margin for every row."""
    rng = random.Random(3)
    rows = []
    for _ in range(60):
        x = [rng.uniform(0, 10), rng.uniform(0, 5), float(rng.randint(0, 3))]
        label = 1.0 if (x[0] > 5 and x[1] < 3) or (x[2] == 3 and rng.random() < 0.8) else 0.0
        rows.append((x, label))
    model, path, df = fit_saved(spark, tmp_path, rows, maxDepth=3, maxIter=12, stepSize=0.3)
    x = np.array([features for features, _ in rows])
    values, base = read_ensemble(spark, model, path, ["a", "b", "c"]).contributions(x)
    native = shap.TreeExplainer(model.stages[0])
    assert values == pytest.approx(2 * np.asarray(native.shap_values(x, check_additivity=False)))
    assert base == pytest.approx(2 * float(np.ravel(native.expected_value)[0]))
    margins = [2 * r.rawPrediction[1] for r in model.transform(df).collect()]
    assert (values.sum(axis=1) + base).tolist() == pytest.approx(margins, abs=1e-9)
    # every feature matters somewhere
    assert (np.abs(values).sum(axis=0) > 0).all()
    assert math.isfinite(base)
