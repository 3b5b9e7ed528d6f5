"""The training job (`microseg propensity train`): snapshots, tuning, calibration,
evaluation against the baselines, and the registry entry."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import numpy as np
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.evaluation import BinaryClassificationEvaluator
from pyspark.ml.tuning import CrossValidator, ParamGridBuilder
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from microseg.core import lake
from microseg.core.clock import naive_utc
from microseg.core.config import Config, PropensityConfig
from microseg.core.failpoints import durable
from microseg.core.runs import new_run_id
from microseg.ml import registry
from microseg.ml.propensity.calibration import IsotonicCalibrationModel, IsotonicCalibrator
from microseg.ml.propensity.explain import global_importance, read_explainer, with_inputs
from microseg.ml.propensity.labels import (
    SnapshotPlan,
    ensure_snapshots,
    labeled_snapshot,
    plan_snapshots,
)
from microseg.ml.propensity.metrics import compare_to_baselines, evaluate_scores
from microseg.ml.propensity.models import (
    class_weights,
    gbt_pipeline,
    in_user_holdout,
    logistic_pipeline,
    user_fold,
)
from microseg.ml.propensity.targets import (
    FOLD,
    HEURISTIC,
    HEURISTICS,
    LABEL,
    RAW_SCORE,
    SCORE,
    SOURCE,
    WEIGHT,
    model_features,
    target_spec,
)


@dataclass
class PropensityTrainReport:
    run_id: str
    target: str
    kind: str
    horizon: timedelta
    version: str
    path: str
    evaluation_as_of: datetime
    training_as_of: list[datetime]  # fit snapshots, then the calibration snapshot
    calibration_as_of: datetime
    skipped_as_of: list[tuple[datetime, str]]
    features_computed: list[datetime]
    snapshots: list[dict]  # as_of, role, rows, positives
    features: list[str]
    dropped_features: list[str]
    chosen_params: dict
    validation_metrics: list[dict]
    metrics: dict[str, dict[str, float]]  # model -> metric -> value
    calibration_table: list[dict]  # the served model on the evaluation as-of
    serving: str  # gbt or logistic_regression: what the saved model scores with
    selection: dict  # how: serve setting, validation metric of both, reason
    feature_importances: list[tuple[str, float]]
    shap_importances: list[tuple[str, float]]  # mean |SHAP value| (log-odds), evaluation rows
    shap_base: float  # expected log-odds: the GBT's over its training cover, or LR's intercept
    shap_rows: int
    beats_baselines: dict[str, bool]  # metric -> GBT better than both baselines
    verdict: str
    heuristic: str | None
    seconds: float
    data_hash: str
    model: PipelineModel | None = field(default=None, repr=False)  # as saved at `path`


@contextmanager
def persisted(frame_df: DataFrame) -> Iterator[DataFrame]:
    """frame_df persisted for the block and unpersisted when it ends, error or not."""
    cached_df = frame_df.persist()
    try:
        yield cached_df
    finally:
        cached_df.unpersist()


def _labeled_rows(
    spark: SparkSession, cfg: Config, target: str, plan: SnapshotPlan, features: list[str]
) -> DataFrame:
    """The labeled rows of every snapshot of the plan (which exist: see ensure_snapshots)."""
    frames = [
        labeled_snapshot(spark, cfg, target=target, as_of=t, columns=features, ensure=False)[0]
        for t in plan.every
    ]
    all_df = frames[0]
    for frame_df in frames[1:]:
        all_df = all_df.unionByName(frame_df)
    # one partition per core: a fit is one Spark job per tree level, and on rows this few
    # its time is the tasks' overhead (5 snapshot files made 5 tasks per job)
    return all_df.coalesce(spark.sparkContext.defaultParallelism)


def _inputs_sample(transformed_df: DataFrame, *, rows: int, settings: PropensityConfig):
    """The GBT's inputs (after imputation) of a seeded sample of about importance_rows of
    transformed_df's `rows` rows, as a numpy array on the driver."""
    inputs_df = with_inputs(transformed_df)
    if rows > settings.importance_rows:
        inputs_df = inputs_df.sample(fraction=settings.importance_rows / rows, seed=settings.seed)
    values = [r[0] for r in inputs_df.collect()]
    return np.array(values, dtype=np.float64).reshape(len(values), -1)


def _snapshot_counts(all_df: DataFrame, plan: SnapshotPlan, target: str) -> list[dict]:
    """as_of, role, rows, positives per snapshot; ValueError when the fit, calibration or
    evaluation rows lack one of the labels."""
    counts = {
        r.as_of: (r.rows, int(r.positives or 0))
        for r in all_df.groupBy("as_of")
        .agg(F.count(F.lit(1)).alias("rows"), F.sum(LABEL).alias("positives"))
        .collect()
    }
    snapshots = [
        {
            "as_of": t.isoformat(),
            "role": plan.role(t),
            "rows": counts.get(t, (0, 0))[0],
            "positives": counts.get(t, (0, 0))[1],
        }
        for t in plan.every
    ]
    for role in ("fit", "calibration", "evaluation"):
        rows = sum(s["rows"] for s in snapshots if s["role"] == role)
        positives = sum(s["positives"] for s in snapshots if s["role"] == role)
        if positives == 0 or positives == rows:
            raise ValueError(
                f"the {role} rows of target {target} have {positives} positives among {rows} "
                f"rows: both labels are needed (snapshots: {snapshots})"
            )
    return snapshots


def _usable_features(fit_df: DataFrame, features: list[str]) -> tuple[list[str], list[str]]:
    """(features with a value in some fit row, features null in every fit row)."""
    non_null = fit_df.agg(*[F.count(F.col(f)).alias(f) for f in features]).first()
    dropped = [f for f in features if non_null[f] == 0]
    used = [f for f in features if f not in dropped]
    if not used:
        raise ValueError("every model feature is null in the training rows")
    return used, dropped


def _validation_value(
    estimator: Pipeline, params: dict, fit_df: DataFrame, settings: PropensityConfig
) -> float | None:
    """propensity.metric of the estimator (with params) on held-out users of the fit rows,
    split as the grid search splits them (the mean over the folds for cross_validation);
    None when a validation side lacks one of the labels."""
    evaluator = BinaryClassificationEvaluator(
        labelCol=LABEL, rawPredictionCol="rawPrediction", metricName=settings.metric
    )
    if settings.validation == "cross_validation":
        folded_df = fit_df.withColumn(FOLD, user_fold(settings.folds, settings.seed))
        splits = [
            (folded_df.filter(F.col(FOLD) != k), folded_df.filter(F.col(FOLD) == k))
            for k in range(settings.folds)
        ]
    else:
        held_out = in_user_holdout(settings.train_ratio, settings.seed)
        splits = [(fit_df.filter(~held_out), fit_df.filter(held_out))]
    values = []
    for train_df, validation_df in splits:
        if not (_both_labels(train_df) and _both_labels(validation_df)):
            return None
        values.append(evaluator.evaluate(estimator.fit(train_df, params).transform(validation_df)))
    return float(sum(values) / len(values))


def _both_labels(frame_df: DataFrame) -> bool:
    low, high = frame_df.agg(F.min(LABEL), F.max(LABEL)).first()
    return low is not None and low != high


def _select(
    fit_df: DataFrame,
    best: PipelineModel,
    used: list[str],
    settings: PropensityConfig,
    validation_metrics: Sequence[dict] = (),
) -> dict:
    """Which model the training saves (propensity.serve): with auto, the GBT at its chosen
    grid point only when its validation metric is better than the logistic regression's.
    validation_metrics: the grid search's, on the same split or folds; the chosen point's
    value is taken from them instead of fitting it again (a one-point grid has none)."""
    if settings.serve != "auto":
        return {"serve": settings.serve, "serving": settings.serve, "reason": "propensity.serve"}
    if validation_metrics:
        gbt_value = max(m[settings.metric] for m in validation_metrics)
    else:
        pipeline, gbt = gbt_pipeline(used, seed=settings.seed)
        tuned = best.stages[-1]
        params = {
            gbt.maxDepth: tuned.getMaxDepth(),
            gbt.maxIter: tuned.getMaxIter(),
            gbt.stepSize: tuned.getStepSize(),
        }
        gbt_value = _validation_value(pipeline, params, fit_df, settings)
    values = {
        "gbt": gbt_value,
        "logistic_regression": _validation_value(logistic_pipeline(used), {}, fit_df, settings),
    }
    chosen = {"serve": "auto", "metric": settings.metric, "validation": values}
    if None in values.values():
        return {
            **chosen,
            "serving": "gbt",
            "reason": "a validation side has one label only: the GBT serves by default",
        }
    gbt_value, lr_value = values["gbt"], values["logistic_regression"]
    if gbt_value > lr_value:
        return {
            **chosen,
            "serving": "gbt",
            "reason": f"GBT {gbt_value:.4f} > logistic regression {lr_value:.4f}",
        }
    return {
        **chosen,
        "serving": "logistic_regression",
        "reason": f"GBT {gbt_value:.4f} does not beat logistic regression {lr_value:.4f}",
    }


def _tune_gbt(
    fit_df: DataFrame, used: list[str], settings: PropensityConfig
) -> tuple[PipelineModel, list[dict]]:
    """The GBT pipeline fitted on all fit rows at the best point of propensity.grid (by
    propensity.metric on held-out users of the fit rows) and the validation metric of every
    point ([] for a one-point grid)."""
    pipeline, gbt = gbt_pipeline(used, seed=settings.seed)
    grid = (
        ParamGridBuilder()
        .addGrid(gbt.maxDepth, list(settings.grid.max_depth))
        .addGrid(gbt.maxIter, list(settings.grid.max_iter))
        .addGrid(gbt.stepSize, list(settings.grid.step_size))
        .build()
    )
    if len(grid) == 1:
        return pipeline.fit(fit_df, grid[0]), []
    evaluator = BinaryClassificationEvaluator(
        labelCol=LABEL, rawPredictionCol="rawPrediction", metricName=settings.metric
    )
    if settings.validation == "cross_validation":
        tuned = (
            CrossValidator(numFolds=settings.folds, foldCol=FOLD)
            .setEstimator(pipeline)
            .setEstimatorParamMaps(grid)
            .setEvaluator(evaluator)
            .setSeed(settings.seed)
            .fit(fit_df.withColumn(FOLD, user_fold(settings.folds, settings.seed)))
        )
        best, values = tuned.bestModel, list(tuned.avgMetrics)
    else:
        # one split by user: each point is fitted once on the other users, then the best
        # point once more on every fit row (k + 1 fits where k-fold cross-validation needs
        # k * points + 1)
        held_out = in_user_holdout(settings.train_ratio, settings.seed)
        train_df, validation_df = fit_df.filter(~held_out), fit_df.filter(held_out)
        values = [
            evaluator.evaluate(pipeline.fit(train_df, params).transform(validation_df))
            for params in grid
        ]
        pick = max if evaluator.isLargerBetter() else min
        best = pipeline.fit(fit_df, grid[pick(range(len(grid)), key=values.__getitem__)])
    validation_metrics = [
        {**{p.name: v for p, v in params.items()}, settings.metric: float(value)}
        for params, value in zip(grid, values, strict=True)
    ]
    return best, validation_metrics


@dataclass(frozen=True)
class CalibratedScorer:
    calibrator: IsotonicCalibrationModel
    metrics: dict[str, float]
    table: list[dict]  # the calibration table on the evaluation rows


def calibrate_and_evaluate(
    scored_calibration_df: DataFrame,
    scored_evaluation_df: DataFrame,
    *,
    raw_col: str = "probability",
    top_share: float,
) -> CalibratedScorer:
    """One scorer (GBT, a baseline) on the split: the isotonic calibration of its raw score
    `raw_col` fitted on the calibration rows, then the metrics of the calibrated scores on
    the evaluation rows (both frames already carry raw_col)."""
    calibrator = IsotonicCalibrator(inputCol=raw_col).fit(scored_calibration_df)
    calibrated_df = calibrator.transform(scored_evaluation_df).select(
        "user_key", LABEL, RAW_SCORE, SCORE
    )
    with persisted(calibrated_df) as evaluation_df:
        metrics, table = evaluate_scores(
            evaluation_df, rank_col=RAW_SCORE, probability_col=SCORE, top_share=top_share
        )
    return CalibratedScorer(calibrator, metrics, table)


def train_propensity(
    spark: SparkSession, cfg: Config, *, target: str, as_of: datetime, run_id: str | None = None
) -> PropensityTrainReport:
    """Train, calibrate, evaluate and register a propensity model (under `run_id`); `as_of` is
    the evaluation snapshot, the training snapshots lie before it (see the package docstring)."""
    started = time.monotonic()
    run_id = run_id or new_run_id()
    root = cfg.lake.root
    settings = cfg.propensity
    spec = target_spec(cfg, target)
    features = model_features(cfg)
    if not lake.table_exists(spark, root, lake.EVENTS):
        raise FileNotFoundError(f"no bronze/events table under {root}: run `microseg ingest` first")
    plan = plan_snapshots(
        lake.read_table(spark, root, lake.EVENTS),
        evaluation_as_of=naive_utc(as_of),
        horizon=spec.horizon,
        interval=settings.snapshot_interval,
        count=settings.snapshots,
    )
    computed = ensure_snapshots(spark, cfg, plan.every, run_id=run_id)
    with persisted(_labeled_rows(spark, cfg, target, plan, features)) as all_df:
        snapshots = _snapshot_counts(all_df, plan, target)
        fit_rows = sum(s["rows"] for s in snapshots if s["role"] == "fit")
        fit_positives = sum(s["positives"] for s in snapshots if s["role"] == "fit")
        weights = (
            class_weights(fit_positives, fit_rows - fit_positives)
            if settings.class_weights == "balanced"
            else (1.0, 1.0)
        )
        weighted_df = all_df.withColumn(
            WEIGHT, F.when(F.col(LABEL) == 1.0, weights[1]).otherwise(weights[0])
        )
        fit_df = weighted_df.filter(F.col("as_of") < F.lit(plan.calibration))
        calibration_df = weighted_df.filter(F.col("as_of") == F.lit(plan.calibration))
        evaluation_df = weighted_df.filter(F.col("as_of") == F.lit(plan.evaluation))
        used, dropped = _usable_features(fit_df, features)

        # GBT: tuned on the fit snapshots, calibrated on the held-out snapshot; the baselines
        # are calibrated and evaluated the same way
        best, validation_metrics = _tune_gbt(fit_df, used, settings)
        scorers = {
            "gbt": calibrate_and_evaluate(
                best.transform(calibration_df),
                best.transform(evaluation_df),
                top_share=settings.top_share,
            )
        }
        selection = _select(fit_df, best, used, settings, validation_metrics)
        lr_model = logistic_pipeline(used).fit(fit_df)
        scorers["logistic_regression"] = calibrate_and_evaluate(
            lr_model.transform(calibration_df),
            lr_model.transform(evaluation_df),
            top_share=settings.top_share,
        )
        needs, formula, expression = HEURISTICS[spec.kind]
        heuristic = formula if all(c in all_df.columns for c in needs) else None
        if heuristic is not None:
            scorers["heuristic"] = calibrate_and_evaluate(
                calibration_df.withColumn(HEURISTIC, expression()),
                evaluation_df.withColumn(HEURISTIC, expression()),
                raw_col=HEURISTIC,
                top_share=settings.top_share,
            )
        serving = best if selection["serving"] == "gbt" else lr_model
        explained_x = _inputs_sample(
            serving.transform(evaluation_df),
            rows=next(s["rows"] for s in snapshots if s["role"] == "evaluation"),
            settings=settings,
        )
        data_hash = registry.training_data_hash(
            weighted_df.filter(F.col("as_of") <= F.lit(plan.calibration)),
            ["user_key", "as_of", LABEL, *used],
        )

    served = selection["serving"]
    model = PipelineModel(stages=[*serving.stages, scorers[served].calibrator])
    version = registry.new_version()
    path = lake.model_path(root, target, version)
    model.write().save(path)
    durable(f"model {target}")
    shap_values, shap_base = read_explainer(spark, model, path, used).contributions(explained_x)
    metrics = {name: scorer.metrics for name, scorer in scorers.items()}
    beats, verdict = compare_to_baselines(metrics)
    gbt_model = best.stages[-1]
    report = PropensityTrainReport(
        run_id=run_id,
        target=target,
        kind=spec.kind,
        horizon=spec.horizon,
        version=version,
        path=path,
        evaluation_as_of=plan.evaluation,
        training_as_of=plan.training,
        calibration_as_of=plan.calibration,
        skipped_as_of=plan.skipped,
        features_computed=computed,
        snapshots=snapshots,
        features=used,
        dropped_features=dropped,
        chosen_params={
            "maxDepth": gbt_model.getMaxDepth(),
            "maxIter": gbt_model.getMaxIter(),
            "stepSize": gbt_model.getStepSize(),
        },
        validation_metrics=validation_metrics,
        metrics=metrics,
        calibration_table=scorers[served].table,
        serving=served,
        selection=selection,
        feature_importances=sorted(
            zip(used, (float(v) for v in gbt_model.featureImportances.toArray()), strict=True),
            key=lambda kv: -kv[1],
        ),
        shap_importances=global_importance(shap_values, tuple(used)),
        shap_base=shap_base,
        shap_rows=len(explained_x),
        beats_baselines=beats,
        verdict=verdict,
        heuristic=heuristic,
        seconds=time.monotonic() - started,
        data_hash=data_hash,
        model=model,
    )
    tables = {name: scorer.table for name, scorer in scorers.items()}
    _register(spark, cfg, report, tables, weights)
    return report


def _register(
    spark: SparkSession,
    cfg: Config,
    report: PropensityTrainReport,
    tables: dict[str, list[dict]],
    weights: tuple[float, float],
) -> None:
    settings = cfg.propensity
    params = {
        "target": report.target,
        "kind": report.kind,
        "horizon_seconds": report.horizon.total_seconds(),
        "features": report.features,
        "dropped_features": report.dropped_features,
        "imputation": "median of the fit rows",
        "class_weights": {
            "mode": settings.class_weights,
            "negative": weights[0],
            "positive": weights[1],
        },
        "grid": settings.grid.model_dump(),
        "validation": settings.validation,
        "train_ratio": settings.train_ratio,
        "folds": settings.folds,
        "metric": settings.metric,
        "chosen": report.chosen_params,
        "serving": report.serving,
        "calibration": settings.calibration,
        "calibration_as_of": report.calibration_as_of.isoformat(),
        "snapshot_interval_seconds": settings.snapshot_interval.total_seconds(),
        "top_share": settings.top_share,
        "seed": settings.seed,
    }
    metrics = {
        f"{model}_{name}": float(value)
        for model, values in report.metrics.items()
        for name, value in values.items()
        if name not in ("base_rate", "rows")
    }
    metrics["evaluation_base_rate"] = report.metrics["gbt"]["base_rate"]
    metrics["evaluation_rows"] = report.metrics["gbt"]["rows"]
    metrics["training_rows"] = float(
        sum(s["rows"] for s in report.snapshots if s["role"] != "evaluation")
    )
    metrics["training_seconds"] = report.seconds
    for name, won in report.beats_baselines.items():
        metrics[f"gbt_beats_baselines_{name}"] = 1.0 if won else 0.0
    details = {
        "snapshots": report.snapshots,
        "skipped_snapshots": [
            {"as_of": t.isoformat(), "reason": why} for t, why in report.skipped_as_of
        ],
        "features_computed": [t.isoformat() for t in report.features_computed],
        "validation_metrics": report.validation_metrics,
        "feature_importances": dict(report.feature_importances),
        "shap_importances": dict(report.shap_importances),
        "shap_base": report.shap_base,
        "shap_rows": report.shap_rows,
        "calibration_tables": tables,
        "heuristic": report.heuristic,
        "beats_baselines": report.beats_baselines,
        "verdict": report.verdict,
        "selection": report.selection,
    }
    registry.register(
        spark,
        cfg.lake.root,
        registry.RegistryEntry(
            model_name=report.target,
            version=report.version,
            kind=SOURCE,
            trained_at=datetime.now(timezone.utc).replace(tzinfo=None),
            training_as_of=tuple(report.training_as_of),
            evaluation_as_of=report.evaluation_as_of,
            params=params,
            metrics=metrics,
            details=details,
            training_data_hash=report.data_hash,
            path=report.path,
            run_id=report.run_id,
        ),
    )
