"""Metrics of a scorer on labeled rows (ROC AUC, PR AUC, log loss, precision and lift in
the top share, a calibration table) and the verdict of GBT against the baselines."""

from __future__ import annotations

import math

from pyspark.ml.evaluation import BinaryClassificationEvaluator
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from microseg.ml.propensity.targets import COMPARED, LABEL, MODELS


def evaluate_scores(
    predictions_df: DataFrame, *, rank_col: str, probability_col: str, top_share: float
) -> tuple[dict[str, float], list[dict]]:
    """Metrics of one scorer on labeled rows (user_key, label, rank_col, probability_col).

    ROC AUC and PR AUC (Spark's, exact: no binning) and the top share use rank_col; ties in
    the top cut go by user_key. log loss and the calibration table use probability_col. The
    table has ten equal-count groups of rows ordered by probability (then rank_col):
    mean predicted, observed rate, rows."""
    evaluator = BinaryClassificationEvaluator(rawPredictionCol=rank_col, labelCol=LABEL, numBins=0)
    roc_auc = evaluator.setMetricName("areaUnderROC").evaluate(predictions_df)
    pr_auc = evaluator.setMetricName("areaUnderPR").evaluate(predictions_df)
    p = F.least(F.greatest(F.col(probability_col), F.lit(1e-15)), F.lit(1 - 1e-15))
    y = F.col(LABEL)
    totals = predictions_df.agg(
        F.count(F.lit(1)).alias("rows"),
        F.sum(y).alias("positives"),
        F.avg(-(y * F.log(p) + (1 - y) * F.log(1 - p))).alias("log_loss"),
    ).first()
    rows, positives = totals["rows"], totals["positives"]
    top_rows = math.ceil(top_share * rows)
    top_positives = (
        predictions_df.orderBy(F.desc(rank_col), "user_key")
        .limit(top_rows)
        .agg(F.sum(y).alias("positives"))
        .first()["positives"]
    )
    base_rate = positives / rows
    precision_top = top_positives / top_rows
    order = Window.orderBy(probability_col, rank_col, "user_key")
    table = (
        predictions_df.select(
            F.ntile(10).over(order).alias("decile"), F.col(probability_col).alias("p"), y
        )
        .groupBy("decile")
        .agg(
            F.avg("p").alias("mean_predicted"),
            F.avg(LABEL).alias("observed_rate"),
            F.count(F.lit(1)).alias("rows"),
        )
        .orderBy("decile")
        .collect()
    )
    metrics = {
        "roc_auc": roc_auc,
        "pr_auc": pr_auc,
        "log_loss": totals["log_loss"],
        "precision_top": precision_top,
        "lift_top": precision_top / base_rate if base_rate else float("nan"),
        "base_rate": base_rate,
        "rows": float(rows),
    }
    return metrics, [
        {
            "decile": r.decile,
            "mean_predicted": round(r.mean_predicted, 6),
            "observed_rate": round(r.observed_rate, 6),
            "rows": r.rows,
        }
        for r in table
    ]


def compare_to_baselines(metrics: dict[str, dict[str, float]]) -> tuple[dict[str, bool], str]:
    """(metric -> GBT strictly better than every baseline, the verdict as one sentence); a
    tie counts as not better."""
    baselines = [m for m in MODELS[1:] if m in metrics]
    beats: dict[str, bool] = {}
    lost = []
    for name in (*COMPARED, "log_loss"):
        gbt = metrics["gbt"][name]
        worse = [
            b
            for b in baselines
            if (metrics[b][name] >= gbt if name != "log_loss" else metrics[b][name] <= gbt)
        ]
        beats[name] = not worse
        lost += [f"{name} {gbt:.4f} vs {b} {metrics[b][name]:.4f}" for b in worse]
    if not baselines:
        return beats, "no baseline could be scored"
    if not lost:
        return beats, f"GBT beats {' and '.join(baselines)} on ROC AUC, PR AUC, lift and log loss"
    return beats, "GBT does NOT beat every baseline: " + "; ".join(lost)
