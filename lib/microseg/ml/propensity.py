"""Propensity models: point-in-time labels, one calibrated GBT pipeline, scores and segments.

A target (`propensity.targets`) is a name (purchase_7d), a kind and a horizon h. For an as-of
time T the population is the users with features at T (gold/user_features: events strictly
before T), and the label comes only from events in [T, T + h):

* purchase: 1 if the user has a purchase event in [T, T + h), else 0.
* churn: only prior buyers are in the population (a purchase before T, which is
  orders_lifetime >= 1 at T); 1 if the user has no purchase in [T, T + h), else 0.

Window events are keyed with the identity map learned from the events before T + h; a user
who was anonymous at T (anon:<id>) and whose id is stitched to a user id by T + h also gets
that user's window purchases.

Training for an evaluation as-of E uses the snapshots E - h - k x snapshot_interval,
k = 0 .. snapshots - 1: every training label window ends at or before E, so nothing the
evaluation labels see is used for training. The latest training snapshot is held out to fit
the calibration; the GBT is tuned and fitted on the earlier ones. E's own label window must be
complete (E + h at or before the latest event in the lake). Missing feature snapshots are
computed with features.run_features (the same job as `microseg features --as-of T`); existing
ones are reused as they are.

The saved model is one PipelineModel: Imputer (nulls -> the training median of the feature),
VectorAssembler, GBTClassifier (class weights from the training label balance) and an
IsotonicCalibrationModel (isotonic regression of the label on the GBT's positive-class
probability, fitted on the held-out snapshot). Two baselines are scored on the same split:
logistic regression on the standardized same features, and a recency/frequency rule (HEURISTICS);
both are calibrated the same way, so every metric compares like with like.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from pyspark import keyword_only
from pyspark.ml import Estimator, Model, Pipeline, PipelineModel
from pyspark.ml.classification import GBTClassifier, LogisticRegression
from pyspark.ml.evaluation import BinaryClassificationEvaluator
from pyspark.ml.feature import Imputer, StandardScaler, VectorAssembler
from pyspark.ml.functions import vector_to_array
from pyspark.ml.linalg import VectorUDT
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.param.shared import HasInputCol, HasLabelCol, HasOutputCol
from pyspark.ml.regression import IsotonicRegression
from pyspark.ml.tuning import CrossValidator, ParamGridBuilder, TrainValidationSplit
from pyspark.ml.util import DefaultParamsReadable, DefaultParamsWritable
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from microseg.core import lake
from microseg.core.config import Config, ConfigError, PropensityConfig
from microseg.features import snapshots
from microseg.features.user_features import (
    FEATURES,
    keyed_events_before,
    run_features,
    select_features,
)
from microseg.segments import membership
from microseg.silver.sessions import ANON_PREFIX, identity_map, with_user_key

SOURCE = "propensity"
LABEL = "label"
WEIGHT = "weight"
RAW_SCORE = "raw_score"
FOLD = "_fold"
SCORE = "score"
MODELS = ("gbt", "logistic_regression", "heuristic")
COMPARED = ("roc_auc", "pr_auc", "lift_top")  # higher is better; log_loss: lower is better
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")

# kind -> (features it needs, formula as text, expression): higher = more likely positive.
HEURISTICS = {
    "purchase": (
        ("orders_lifetime", "days_since_last_event"),
        "(1 + orders_lifetime) / (1 + days_since_last_event)",
        lambda: (
            (1 + F.coalesce(F.col("orders_lifetime"), F.lit(0)))
            / (1 + F.coalesce(F.col("days_since_last_event"), F.lit(1e6)))
        ),
    ),
    "churn": (
        ("orders_lifetime", "days_since_last_purchase"),
        "days_since_last_purchase / (1 + orders_lifetime)",
        lambda: (
            F.coalesce(F.col("days_since_last_purchase"), F.lit(1e6))
            / (1 + F.coalesce(F.col("orders_lifetime"), F.lit(0)))
        ),
    ),
}
HEURISTIC = "heuristic_score"


# --------------------------------------------------------------------------------------
# config helpers


def target_spec(cfg: Config, target: str) -> PropensityConfig.Target:
    """The configured target; a ConfigError names propensity.targets when it is unknown."""
    for name in cfg.propensity.targets:
        if not _NAME.match(name):
            raise ConfigError(
                f"propensity.targets: '{name}' must be lower_snake_case (a-z, 0-9, _)"
            )
    if target not in cfg.propensity.targets:
        known = ", ".join(sorted(cfg.propensity.targets)) or "none"
        raise ConfigError(f"propensity.targets: unknown target '{target}' (known: {known})")
    return cfg.propensity.targets[target]


def model_features(cfg: Config) -> list[str]:
    """The numeric features the models use: propensity.features, or all numeric features
    selected by features.include."""
    computed = [f.name for f in select_features(cfg.features.include) if f.kind == "number"]
    names = cfg.propensity.features
    if not names:
        return computed
    unknown = [n for n in names if n not in FEATURES]
    if unknown:
        raise ConfigError(
            f"propensity.features: unknown feature(s) {unknown}; see README for the list"
        )
    strings = [n for n in names if FEATURES[n].kind != "number"]
    if strings:
        raise ConfigError(f"propensity.features: {strings} not numeric; the models need numbers")
    absent = [n for n in names if n not in computed]
    if absent:
        raise ConfigError(
            f"propensity.features: {absent} not computed: add them to features.include"
        )
    return list(dict.fromkeys(names))


def segment_id(target: str, top_share: float) -> str:
    """propensity_<target>_top<percent>, e.g. propensity_purchase_7d_top10 (top 2.5%: top2p5)."""
    percent = f"{top_share * 100:.4f}".rstrip("0").rstrip(".").replace(".", "p")
    return f"propensity_{target}_top{percent}"


# --------------------------------------------------------------------------------------
# point-in-time labels


def window_buyers(events_df: DataFrame, *, start: datetime, end: datetime) -> DataFrame:
    """user_key of everyone with a purchase event in [start, end), keyed with the identity map
    learned from the events before `end`; also anon:<id> for every anonymous id stitched by
    then to such a buyer (a visitor anonymous at `start` who logs in and buys)."""
    before_end_df = events_df.filter(F.col("event_time") < F.lit(end))
    identity_df = identity_map(before_end_df)
    keyed_df = with_user_key(before_end_df, identity_df)
    buyers_df = (
        keyed_df.filter((F.col("event_time") >= F.lit(start)) & (F.col("event_type") == "purchase"))
        .select("user_key")
        .distinct()
    )
    stitched_df = identity_df.join(buyers_df, on="user_key", how="left_semi").select(
        F.concat(F.lit(ANON_PREFIX), F.col("anonymous_id")).alias("user_key")
    )
    return buyers_df.unionByName(stitched_df).distinct()


def prior_buyers(events_df: DataFrame, *, as_of: datetime) -> DataFrame:
    """user_key of everyone with a purchase before as_of (orders_lifetime >= 1 at as_of)."""
    return (
        keyed_events_before(events_df, as_of)
        .filter(F.col("event_type") == "purchase")
        .select("user_key")
        .distinct()
    )


def with_labels(
    features_df: DataFrame,
    events_df: DataFrame,
    *,
    as_of: datetime,
    kind: str,
    horizon: timedelta,
) -> DataFrame:
    """features_df (one row per user_key at as_of) plus `label` (double 0/1) from the events in
    [as_of, as_of + horizon); for churn only the prior buyers are kept."""
    bought_df = window_buyers(events_df, start=as_of, end=as_of + horizon).select(
        "user_key", F.lit(1.0).alias("_bought")
    )
    population_df = features_df
    if kind == "churn":
        population_df = features_df.join(
            prior_buyers(events_df, as_of=as_of), on="user_key", how="left_semi"
        )
    bought = F.coalesce(F.col("_bought"), F.lit(0.0))
    label = bought if kind == "purchase" else 1.0 - bought
    return (
        population_df.join(bought_df, on="user_key", how="left")
        .withColumn(LABEL, label)
        .drop("_bought")
    )


def training_snapshots(
    as_of: datetime, *, horizon: timedelta, interval: timedelta, count: int
) -> list[datetime]:
    """The training as-of times for evaluation as-of `as_of`, oldest first: as_of - horizon -
    k x interval, k = 0 .. count - 1 (each label window ends at or before as_of)."""
    return sorted(as_of - horizon - k * interval for k in range(count))


def _naive_utc(value: datetime) -> datetime:
    return value.astimezone(timezone.utc).replace(tzinfo=None) if value.tzinfo else value


def ensure_snapshots(spark: SparkSession, cfg: Config, as_ofs: list[datetime]) -> list[datetime]:
    """Compute with features.run_features the as-ofs that gold/user_features lacks (one query
    finds them); return those computed. Existing snapshots are reused as they are."""
    root = cfg.lake.root
    present: set[datetime] = set()
    if lake.table_exists(spark, root, lake.USER_FEATURES):
        present = {
            r.as_of
            for r in lake.read_table(spark, root, lake.USER_FEATURES)
            .filter(
                F.col("as_of_date").isin(sorted({t.date() for t in as_ofs}))
                & F.col("as_of").isin(list(as_ofs))
            )
            .select("as_of")
            .distinct()
            .collect()
        }
    computed = []
    for as_of in as_ofs:
        if as_of not in present:
            run_features(spark, cfg, as_of=as_of)
            computed.append(as_of)
    return computed


def labeled_snapshot(
    spark: SparkSession,
    cfg: Config,
    *,
    target: str,
    as_of: datetime,
    columns: list[str] | None = None,
    ensure: bool = True,
) -> tuple[DataFrame, bool]:
    """Training rows of one as-of: user_key, as_of, the model features (and the heuristic's
    features where computed), label. Features from events before as_of only; labels from
    [as_of, as_of + horizon) only. Returns the frame and whether the snapshot was computed
    (with ensure=False the caller has made sure it exists)."""
    spec = target_spec(cfg, target)
    as_of = _naive_utc(as_of)
    columns = model_features(cfg) if columns is None else columns
    computed = bool(ensure_snapshots(spark, cfg, [as_of])) if ensure else False
    features_df = snapshots.snapshot(
        spark,
        cfg.lake.root,
        as_of,
        columns=columns,
        optional=HEURISTICS[spec.kind][0],
        require=False,
    )
    events_df = lake.read_table(spark, cfg.lake.root, lake.EVENTS)
    return (
        with_labels(features_df, events_df, as_of=as_of, kind=spec.kind, horizon=spec.horizon),
        computed,
    )


# --------------------------------------------------------------------------------------
# calibration step (a pyspark.ml Estimator and Model, saved inside the PipelineModel)


class _CalibratorParams(HasInputCol, HasOutputCol, HasLabelCol):
    rawScoreCol: Param[str] = Param(
        Params._dummy(),
        "rawScoreCol",
        "output column: the uncalibrated score as a double",
        typeConverter=TypeConverters.toString,
    )

    def __init__(self, *args):
        super().__init__(*args)
        self._setDefault(
            inputCol="probability", outputCol=SCORE, labelCol=LABEL, rawScoreCol=RAW_SCORE
        )

    def getRawScoreCol(self) -> str:
        return self.getOrDefault(self.rawScoreCol)


def positive_score(dataset: DataFrame, column: str) -> Column:
    """The positive-class probability of a probability vector column, or a double column."""
    if isinstance(dataset.schema[column].dataType, VectorUDT):
        return vector_to_array(F.col(column)).getItem(1)
    return F.col(column).cast("double")


def isotonic_value(
    raw: Column, boundaries: list[float], predictions: list[float], epsilon: float
) -> Column:
    """Spark's IsotonicRegressionModel.predict as a Column (no UDF): the prediction of the
    nearest boundary outside the range, linear interpolation between boundaries inside it;
    then clipped to [epsilon, 1 - epsilon]. Non-decreasing in `raw`."""
    n = len(boundaries)
    b = F.lit([float(v) for v in boundaries])
    p = F.lit([float(v) for v in predictions])
    below = F.size(F.filter(b, lambda v: v <= raw))  # boundaries <= raw: 1-based index
    lo, hi = F.try_element_at(b, below), F.try_element_at(b, below + 1)
    p_lo, p_hi = F.try_element_at(p, below), F.try_element_at(p, below + 1)
    value = (
        F.when(below == 0, F.lit(float(predictions[0])))
        .when(below >= n, F.lit(float(predictions[-1])))
        .otherwise(p_lo + (p_hi - p_lo) * (raw - lo) / (hi - lo))
    )
    return F.least(F.greatest(value, F.lit(epsilon)), F.lit(1.0 - epsilon))


class IsotonicCalibrator(
    Estimator, _CalibratorParams, DefaultParamsReadable, DefaultParamsWritable
):
    """Fits isotonic regression of the label on the positive-class score of `inputCol` (a
    probability vector or a double) and returns an IsotonicCalibrationModel."""

    @keyword_only
    def __init__(
        self,
        *,
        inputCol: str = "probability",
        outputCol: str = SCORE,
        labelCol: str = LABEL,
        rawScoreCol: str = RAW_SCORE,
    ):
        super().__init__()
        self._set(**self._input_kwargs)

    def _fit(self, dataset: DataFrame) -> IsotonicCalibrationModel:
        frame_df = dataset.select(
            positive_score(dataset, self.getInputCol()).alias("_raw"),
            F.col(self.getLabelCol()).cast("double").alias("_label"),
        ).persist()
        rows = frame_df.count()
        if rows == 0:
            raise ValueError("calibration needs at least one row")
        fitted = IsotonicRegression(
            featuresCol="_raw", labelCol="_label", predictionCol="_calibrated", isotonic=True
        ).fit(frame_df)
        frame_df.unpersist()
        model = IsotonicCalibrationModel(
            boundaries=[float(v) for v in fitted.boundaries.toArray()],
            predictions=[float(v) for v in fitted.predictions.toArray()],
            epsilon=0.5 / rows,
        )
        return self._copyValues(model)


class IsotonicCalibrationModel(
    Model, _CalibratorParams, DefaultParamsReadable, DefaultParamsWritable
):
    """Adds `rawScoreCol` (the positive-class score of `inputCol`) and `outputCol` (the
    calibrated probability, non-decreasing in the raw score, in [epsilon, 1 - epsilon];
    epsilon is half an observation of the calibration set)."""

    boundaries: Param[list[float]] = Param(
        Params._dummy(), "boundaries", "raw scores of the steps", TypeConverters.toListFloat
    )
    predictions: Param[list[float]] = Param(
        Params._dummy(),
        "predictions",
        "calibrated value at each boundary",
        TypeConverters.toListFloat,
    )
    epsilon: Param[float] = Param(
        Params._dummy(),
        "epsilon",
        "outputs are clipped to [epsilon, 1 - epsilon]",
        TypeConverters.toFloat,
    )

    @keyword_only
    def __init__(
        self,
        *,
        boundaries: list[float] | None = None,
        predictions: list[float] | None = None,
        epsilon: float | None = None,
        inputCol: str | None = None,
        outputCol: str | None = None,
        labelCol: str | None = None,
        rawScoreCol: str | None = None,
    ):
        super().__init__()
        self._setDefault(boundaries=[], predictions=[], epsilon=1e-6)
        self._set(**{k: v for k, v in self._input_kwargs.items() if v is not None})

    def _transform(self, dataset: DataFrame) -> DataFrame:
        boundaries = self.getOrDefault(self.boundaries)
        predictions = self.getOrDefault(self.predictions)
        if not boundaries or len(boundaries) != len(predictions):
            raise ValueError("IsotonicCalibrationModel has no fitted boundaries")
        raw_col = self.getRawScoreCol()
        with_raw_df = dataset.withColumn(raw_col, positive_score(dataset, self.getInputCol()))
        return with_raw_df.withColumn(
            self.getOutputCol(),
            isotonic_value(
                F.col(raw_col), boundaries, predictions, self.getOrDefault(self.epsilon)
            ),
        )


# --------------------------------------------------------------------------------------
# pipelines and metrics


def _imputed(name: str) -> str:
    return f"_imputed_{name}"


def gbt_pipeline(features: list[str], *, seed: int) -> tuple[Pipeline, GBTClassifier]:
    """Imputer (median), VectorAssembler, GBTClassifier weighted by `weight`."""
    gbt = GBTClassifier(
        featuresCol="features", labelCol=LABEL, weightCol=WEIGHT, seed=seed, cacheNodeIds=False
    )
    return (
        Pipeline(
            stages=[
                Imputer(
                    inputCols=features,
                    outputCols=[_imputed(f) for f in features],
                    strategy="median",
                ),
                VectorAssembler(inputCols=[_imputed(f) for f in features], outputCol="features"),
                gbt,
            ]
        ),
        gbt,
    )


def logistic_pipeline(features: list[str]) -> Pipeline:
    """The baseline: same imputation, standardized features, weighted logistic regression."""
    return Pipeline(
        stages=[
            Imputer(
                inputCols=features, outputCols=[_imputed(f) for f in features], strategy="median"
            ),
            VectorAssembler(inputCols=[_imputed(f) for f in features], outputCol="raw_features"),
            StandardScaler(
                inputCol="raw_features", outputCol="features", withMean=True, withStd=True
            ),
            LogisticRegression(
                featuresCol="features",
                labelCol=LABEL,
                weightCol=WEIGHT,
                regParam=0.01,
                maxIter=100,
                tol=1e-4,
            ),
        ]
    )


def user_fold(folds: int, seed: int) -> Column:
    """Cross-validation fold of a row, 0 .. folds - 1, from its user_key: every snapshot of a
    user lands in the same fold, so no user is on both sides of a split."""
    return F.pmod(F.xxhash64(F.col("user_key"), F.lit(seed)), F.lit(folds)).cast("int")


def class_weights(positives: int, negatives: int) -> tuple[float, float]:
    """(negative weight, positive weight) so that both classes weigh half of the rows."""
    rows = positives + negatives
    return rows / (2.0 * negatives), rows / (2.0 * positives)


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


def training_data_hash(rows_df: DataFrame, columns: list[str]) -> str:
    """Order-independent hash of the rows: sha256 of (count, xor and sum of row hashes)."""
    row_hash = F.xxhash64(*[F.col(c) for c in columns])
    summary = rows_df.agg(
        F.count(F.lit(1)).alias("n"),
        F.bit_xor(row_hash).alias("x"),
        F.sum(F.pmod(row_hash, F.lit(2_147_483_647))).alias("s"),
    ).first()
    text = f"{summary['n']}:{summary['x']}:{summary['s']}:{','.join(columns)}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def new_version(now: datetime | None = None) -> str:
    """A version id that sorts by time: 20261124T051500Z-<6 hex>."""
    now = now or datetime.now(timezone.utc)
    return f"{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


# --------------------------------------------------------------------------------------
# training job


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
    calibration_table: list[dict]  # GBT on the evaluation as-of
    feature_importances: list[tuple[str, float]]
    beats_baselines: dict[str, bool]  # metric -> GBT better than both baselines
    verdict: str
    heuristic: str | None
    seconds: float
    data_hash: str
    model: PipelineModel | None = field(default=None, repr=False)  # as saved at `path`


def _verdict(metrics: dict[str, dict[str, float]]) -> tuple[dict[str, bool], str]:
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


def train_propensity(
    spark: SparkSession, cfg: Config, *, target: str, as_of: datetime
) -> PropensityTrainReport:
    """Train, calibrate, evaluate and register a propensity model; `as_of` is the evaluation
    snapshot, the training snapshots lie before it (see the module docstring)."""
    started = time.monotonic()
    root = cfg.lake.root
    settings = cfg.propensity
    spec = target_spec(cfg, target)
    features = model_features(cfg)
    evaluation_as_of = _naive_utc(as_of)
    if not lake.table_exists(spark, root, lake.EVENTS):
        raise FileNotFoundError(f"no bronze/events table under {root}: run `microseg ingest` first")
    events_df = lake.read_table(spark, root, lake.EVENTS)
    span = events_df.agg(F.min("event_time").alias("first"), F.max("event_time").alias("last"))
    first_event, last_event = span.first()
    if first_event is None:
        raise ValueError("bronze/events is empty")
    if evaluation_as_of + spec.horizon > last_event:
        raise ValueError(
            f"the label window of as-of {evaluation_as_of.isoformat()} ends at "
            f"{(evaluation_as_of + spec.horizon).isoformat()}, after the latest event "
            f"({last_event.isoformat()}): not complete; the latest usable evaluation as-of is "
            f"{(last_event - spec.horizon).isoformat()}"
        )
    candidates = training_snapshots(
        evaluation_as_of,
        horizon=spec.horizon,
        interval=settings.snapshot_interval,
        count=settings.snapshots,
    )
    skipped = [(t, "no events before it") for t in candidates if t <= first_event]
    training_as_of = [t for t in candidates if t > first_event]
    if len(training_as_of) < 2:
        raise ValueError(
            f"training needs two snapshots with events before them (one to fit, one to "
            f"calibrate); as-ofs {[t.isoformat() for t in candidates]} leave "
            f"{len(training_as_of)} after the first event ({first_event.isoformat()}): use a "
            "later --as-of or fewer/closer propensity.snapshots"
        )
    calibration_as_of = training_as_of[-1]

    computed = ensure_snapshots(spark, cfg, [*training_as_of, evaluation_as_of])
    frames = [
        labeled_snapshot(spark, cfg, target=target, as_of=t, columns=features, ensure=False)[0]
        for t in [*training_as_of, evaluation_as_of]
    ]
    all_df = frames[0]
    for frame_df in frames[1:]:
        all_df = all_df.unionByName(frame_df)
    all_df = all_df.persist()
    counts = {
        r.as_of: (r.rows, int(r.positives or 0))
        for r in all_df.groupBy("as_of")
        .agg(F.count(F.lit(1)).alias("rows"), F.sum(LABEL).alias("positives"))
        .collect()
    }
    roles = {t: "fit" for t in training_as_of[:-1]}
    roles[calibration_as_of] = "calibration"
    roles[evaluation_as_of] = "evaluation"
    snapshots = [
        {
            "as_of": t.isoformat(),
            "role": roles[t],
            "rows": counts.get(t, (0, 0))[0],
            "positives": counts.get(t, (0, 0))[1],
        }
        for t in [*training_as_of, evaluation_as_of]
    ]
    fit_rows = sum(counts.get(t, (0, 0))[0] for t in training_as_of[:-1])
    fit_positives = sum(counts.get(t, (0, 0))[1] for t in training_as_of[:-1])
    for role, rows, positives in (
        ("fit", fit_rows, fit_positives),
        ("calibration", *counts.get(calibration_as_of, (0, 0))),
        ("evaluation", *counts.get(evaluation_as_of, (0, 0))),
    ):
        if positives == 0 or positives == rows:
            all_df.unpersist()
            raise ValueError(
                f"the {role} rows of target {target} have {positives} positives among {rows} "
                f"rows: both labels are needed (snapshots: {snapshots})"
            )

    w_negative, w_positive = (
        class_weights(fit_positives, fit_rows - fit_positives)
        if settings.class_weights == "balanced"
        else (1.0, 1.0)
    )
    weighted_df = all_df.withColumn(
        WEIGHT, F.when(F.col(LABEL) == 1.0, w_positive).otherwise(w_negative)
    )
    fit_df = weighted_df.filter(F.col("as_of") < F.lit(calibration_as_of))
    calibration_df = weighted_df.filter(F.col("as_of") == F.lit(calibration_as_of))
    evaluation_df = weighted_df.filter(F.col("as_of") == F.lit(evaluation_as_of))

    non_null = fit_df.agg(*[F.count(F.col(f)).alias(f) for f in features]).first()
    dropped = [f for f in features if non_null[f] == 0]
    used = [f for f in features if f not in dropped]
    if not used:
        all_df.unpersist()
        raise ValueError("every model feature is null in the training rows")

    # GBT: tuned on the fit snapshots, calibrated on the held-out snapshot
    pipeline, gbt = gbt_pipeline(used, seed=settings.seed)
    grid = (
        ParamGridBuilder()
        .addGrid(gbt.maxDepth, list(settings.grid.max_depth))
        .addGrid(gbt.maxIter, list(settings.grid.max_iter))
        .addGrid(gbt.stepSize, list(settings.grid.step_size))
        .build()
    )
    validation_metrics: list[dict] = []
    if len(grid) == 1:
        best = pipeline.fit(fit_df, grid[0])
    else:
        evaluator = BinaryClassificationEvaluator(
            labelCol=LABEL, rawPredictionCol="rawPrediction", metricName=settings.metric
        )
        if settings.validation == "cross_validation":
            tuner = CrossValidator(numFolds=settings.folds, foldCol=FOLD)
        else:
            tuner = TrainValidationSplit(trainRatio=settings.train_ratio)
        tuned = (
            tuner.setEstimator(pipeline)
            .setEstimatorParamMaps(grid)
            .setEvaluator(evaluator)
            .setSeed(settings.seed)
            .fit(fit_df.withColumn(FOLD, user_fold(settings.folds, settings.seed)))
        )
        values = tuned.avgMetrics if isinstance(tuner, CrossValidator) else tuned.validationMetrics
        validation_metrics = [
            {**{p.name: v for p, v in params.items()}, settings.metric: float(value)}
            for params, value in zip(grid, values, strict=True)
        ]
        best = tuned.bestModel
    gbt_model = best.stages[-1]
    calibrator = IsotonicCalibrator().fit(best.transform(calibration_df))
    model = PipelineModel(stages=[*best.stages, calibrator])
    version = new_version()
    path = lake.model_path(root, target, version)
    model.write().save(path)

    metrics: dict[str, dict[str, float]] = {}
    tables: dict[str, list[dict]] = {}
    gbt_eval_df = model.transform(evaluation_df).select("user_key", LABEL, RAW_SCORE, SCORE)
    metrics["gbt"], tables["gbt"] = evaluate_scores(
        gbt_eval_df.persist(),
        rank_col=RAW_SCORE,
        probability_col=SCORE,
        top_share=settings.top_share,
    )
    gbt_eval_df.unpersist()

    lr_model = logistic_pipeline(used).fit(fit_df)
    lr_calibrator = IsotonicCalibrator().fit(lr_model.transform(calibration_df))
    lr_eval_df = lr_calibrator.transform(lr_model.transform(evaluation_df)).select(
        "user_key", LABEL, RAW_SCORE, SCORE
    )
    metrics["logistic_regression"], tables["logistic_regression"] = evaluate_scores(
        lr_eval_df.persist(),
        rank_col=RAW_SCORE,
        probability_col=SCORE,
        top_share=settings.top_share,
    )
    lr_eval_df.unpersist()

    needs, formula, expression = HEURISTICS[spec.kind]
    heuristic = formula if all(c in all_df.columns for c in needs) else None
    if heuristic is not None:
        rule_calibrator = IsotonicCalibrator(inputCol=HEURISTIC).fit(
            calibration_df.withColumn(HEURISTIC, expression())
        )
        rule_eval_df = rule_calibrator.transform(
            evaluation_df.withColumn(HEURISTIC, expression())
        ).select("user_key", LABEL, RAW_SCORE, SCORE)
        metrics["heuristic"], tables["heuristic"] = evaluate_scores(
            rule_eval_df.persist(),
            rank_col=RAW_SCORE,
            probability_col=SCORE,
            top_share=settings.top_share,
        )
        rule_eval_df.unpersist()

    beats, verdict = _verdict(metrics)
    importances = sorted(
        zip(used, (float(v) for v in gbt_model.featureImportances.toArray()), strict=True),
        key=lambda kv: -kv[1],
    )
    chosen = {
        "maxDepth": gbt_model.getMaxDepth(),
        "maxIter": gbt_model.getMaxIter(),
        "stepSize": gbt_model.getStepSize(),
    }
    data_hash = training_data_hash(
        weighted_df.filter(F.col("as_of") <= F.lit(calibration_as_of)),
        ["user_key", "as_of", LABEL, *used],
    )
    all_df.unpersist()
    seconds = time.monotonic() - started
    report = PropensityTrainReport(
        run_id=uuid.uuid4().hex,
        target=target,
        kind=spec.kind,
        horizon=spec.horizon,
        version=version,
        path=path,
        evaluation_as_of=evaluation_as_of,
        training_as_of=training_as_of,
        calibration_as_of=calibration_as_of,
        skipped_as_of=skipped,
        features_computed=computed,
        snapshots=snapshots,
        features=used,
        dropped_features=dropped,
        chosen_params=chosen,
        validation_metrics=validation_metrics,
        metrics=metrics,
        calibration_table=tables["gbt"],
        feature_importances=importances,
        beats_baselines=beats,
        verdict=verdict,
        heuristic=heuristic,
        seconds=seconds,
        data_hash=data_hash,
        model=model,
    )
    _register(spark, cfg, report, tables, (w_negative, w_positive))
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
        "calibration_tables": tables,
        "heuristic": report.heuristic,
        "beats_baselines": report.beats_baselines,
        "verdict": report.verdict,
    }
    row = (
        report.target,
        report.version,
        SOURCE,
        datetime.now(timezone.utc).replace(tzinfo=None),
        report.training_as_of,
        report.evaluation_as_of,
        json.dumps(params, sort_keys=True),
        {k: v for k, v in metrics.items() if not math.isnan(v)},
        json.dumps(details, sort_keys=True),
        report.data_hash,
        report.path,
        report.run_id,
    )
    row_df = spark.createDataFrame([row], lake.MODEL_REGISTRY.schema)
    lake.insert_new(spark, cfg.lake.root, lake.MODEL_REGISTRY, row_df, ("model_name", "version"))


# --------------------------------------------------------------------------------------
# scoring job


def model_version(spark: SparkSession, root: str, target: str, version: str | None = None):
    """The registry row of `version` of the target's propensity model, or of the latest."""
    missing = f"no propensity model for target '{target}' in gold/model_registry"
    if not lake.table_exists(spark, root, lake.MODEL_REGISTRY):
        raise FileNotFoundError(f"{missing}: run `microseg propensity train` first")
    rows_df = lake.read_table(spark, root, lake.MODEL_REGISTRY).filter(
        (F.col("model_name") == target) & (F.col("kind") == SOURCE)
    )
    if version is not None:
        row = rows_df.filter(F.col("version") == version).first()
        if row is None:
            raise ValueError(f"{missing} with version '{version}'")
        return row
    row = rows_df.orderBy(F.desc("version")).first()
    if row is None:
        raise FileNotFoundError(f"{missing}: run `microseg propensity train` first")
    return row


def load_model(
    spark: SparkSession, cfg: Config, *, target: str, version: str | None = None
) -> tuple[PipelineModel, str]:
    """The saved PipelineModel of a version (default: the latest) and its version id."""
    row = model_version(spark, cfg.lake.root, target, version)
    return PipelineModel.load(row.path), row.version


@dataclass
class PropensityScoreReport:
    run_id: str
    target: str
    version: str
    as_of: datetime
    users: int
    segment_id: str
    members: int
    min_member_score: float | None
    mean_score: float | None
    entered: int
    exited: int
    features_computed: bool
    other_segments_kept: list[str] = field(default_factory=list)


def score_propensity(
    spark: SparkSession,
    cfg: Config,
    *,
    target: str,
    as_of: datetime,
    version: str | None = None,
) -> PropensityScoreReport:
    """Score every user with features at as_of, replace the target's rows of that as-of in
    gold/propensity_scores, and publish the top share as segment `segment_id(target, ...)`."""
    root = cfg.lake.root
    spec = target_spec(cfg, target)
    as_of = _naive_utc(as_of)
    row = model_version(spark, root, target, version)
    model = PipelineModel.load(row.path)
    features = json.loads(row.params)["features"]
    computed = bool(ensure_snapshots(spark, cfg, [as_of]))
    features_df = snapshots.snapshot(spark, cfg.lake.root, as_of, columns=features, require=False)
    run_id = uuid.uuid4().hex
    order = Window.orderBy(F.desc(RAW_SCORE), F.asc("user_key"))
    ranked_df = (
        model.transform(features_df)
        .select("user_key", SCORE, RAW_SCORE)
        .withColumn("rank", F.row_number().over(order).cast("long"))
        .persist()
    )
    summary = ranked_df.agg(F.count(F.lit(1)).alias("n"), F.avg(SCORE).alias("mean")).first()
    users = summary["n"]
    if users == 0:
        ranked_df.unpersist()
        raise ValueError(f"no users with features as of {as_of.isoformat()}")
    scores_df = ranked_df.select(
        F.lit(target).alias("model_name"),
        F.lit(row.version).alias("model_version"),
        F.lit(as_of).alias("as_of"),
        F.lit(as_of.date()).alias("as_of_date"),
        "user_key",
        SCORE,
        RAW_SCORE,
        "rank",
        ((F.lit(users) - F.col("rank") + 1) / F.lit(users)).alias("percentile"),
        F.lit(run_id).alias("run_id"),
        F.current_timestamp().alias("scored_at"),
    )
    lake.ensure_table(spark, root, lake.PROPENSITY_SCORES)
    (
        lake.conform(scores_df, lake.PROPENSITY_SCORES)
        .write.format("delta")
        .mode("overwrite")
        .option(
            "replaceWhere",
            f"as_of_date = DATE '{as_of.date().isoformat()}' AND model_name = '{target}' "
            f"AND as_of = TIMESTAMP '{as_of.isoformat(sep=' ')}'",
        )
        .save(lake.table_path(root, lake.PROPENSITY_SCORES))
    )

    segment = segment_id(target, cfg.propensity.top_share)
    top = math.ceil(cfg.propensity.top_share * users)
    members_df = ranked_df.filter(F.col("rank") <= top).select(
        "user_key", F.lit(segment).alias("segment_id"), SCORE, F.lit(False).alias("fallback")
    )
    versions = {segment: row.version}
    others_df, other_versions = _other_segments(spark, root, target, as_of)
    if other_versions:
        members_df = members_df.unionByName(others_df)
        versions.update(other_versions)
    stats = membership.write_membership(
        spark,
        root,
        source=SOURCE,
        as_of=as_of,
        run_id=run_id,
        members_df=members_df,
        versions=versions,
    )
    min_score = ranked_df.filter(F.col("rank") <= top).agg(F.min(SCORE)).first()[0]
    ranked_df.unpersist()
    stat = stats.get(segment)
    _write_catalog(spark, cfg, spec, target, segment, row.version, as_of, run_id, stat, top)
    return PropensityScoreReport(
        run_id=run_id,
        target=target,
        version=row.version,
        as_of=as_of,
        users=users,
        segment_id=segment,
        members=stat.size if stat else top,
        min_member_score=min_score,
        mean_score=summary["mean"],
        entered=stat.entered if stat else 0,
        exited=stat.exited if stat else 0,
        features_computed=computed,
        other_segments_kept=sorted(other_versions),
    )


def _other_segments(
    spark: SparkSession, root: str, target: str, as_of: datetime
) -> tuple[DataFrame | None, dict[str, str]]:
    """Members valid at as_of of the other targets' propensity segments, so that one target's
    run leaves them as they are (write_membership retires segments of the source it is not
    given)."""
    if not lake.table_exists(spark, root, lake.SEGMENT_MEMBERSHIP):
        return None, {}
    mine = f"propensity_{target}_top"
    current_df = (
        lake.read_table(spark, root, lake.SEGMENT_MEMBERSHIP)
        .filter((F.col("source") == SOURCE) & membership.valid_at(as_of))
        .filter(~F.col("segment_id").startswith(mine))
    )
    versions = {
        r.segment_id: r.definition_version
        for r in current_df.select("segment_id", "definition_version").distinct().collect()
    }
    return (
        current_df.select("user_key", "segment_id", "score", F.lit(False).alias("fallback")),
        versions,
    )


def _write_catalog(
    spark: SparkSession,
    cfg: Config,
    spec: PropensityConfig.Target,
    target: str,
    segment: str,
    version: str,
    as_of: datetime,
    run_id: str,
    stat: membership.SegmentStats | None,
    matched: int,
) -> None:
    share = cfg.propensity.top_share
    what = "likely buyers" if spec.kind == "purchase" else "churn risk among buyers"
    days = spec.horizon.total_seconds() / 86400
    row = {
        "as_of": as_of,
        "source": SOURCE,
        "segment_id": segment,
        "name": f"{what.capitalize()}, next {days:g} days (top {share:.0%})",
        "description": (
            f"Top {share:.1%} of users by calibrated {target} propensity "
            f"({spec.kind} within {days:g} days of the as-of time)"
        ),
        "tags": ["propensity", target],
        "definition": json.dumps(
            {"target": target, "kind": spec.kind, "horizon_days": days, "top_share": share},
            sort_keys=True,
        ),
        "definition_version": version,
        "parent": None,
        "exclusive_group": None,
        "priority": None,
        "min_size": None,
        "matched": matched,
        "size": stat.size if stat else 0,
        "status": "active",
        "status_reason": None,
        "previous_size": stat.previous_size if stat else None,
        "entered": stat.entered if stat else 0,
        "exited": stat.exited if stat else 0,
        "stability": stat.stability if stat else None,
        "overlap": membership.overlap(spark, cfg.lake.root, as_of=as_of).get(segment),
        "run_id": run_id,
        "recorded_at": datetime.now(timezone.utc).replace(tzinfo=None),
    }
    membership.write_catalog(spark, cfg.lake.root, [row], update_unchanged=True)


# --------------------------------------------------------------------------------------
# what the CLI prints


def format_train_report(report: PropensityTrainReport) -> str:
    """A few lines for a person: snapshots, metrics of the three scorers, the verdict."""
    lines = [
        f"propensity train target={report.target} version={report.version} "
        f"({report.seconds:.0f} s)",
        f"model: {report.path}",
        "snapshots: "
        + ", ".join(
            f"{s['as_of']} {s['role']} {s['rows']} rows {s['positives']} positive"
            for s in report.snapshots
        ),
    ]
    if report.skipped_as_of:
        lines.append(
            "skipped: " + ", ".join(f"{t.isoformat()} ({why})" for t, why in report.skipped_as_of)
        )
    if report.features_computed:
        lines.append(
            "features computed for: " + ", ".join(t.isoformat() for t in report.features_computed)
        )
    lines.append(f"chosen: {report.chosen_params}")
    lines.append(
        f"{'model':<22}{'ROC AUC':>9}{'PR AUC':>9}{'log loss':>10}{'prec top':>10}{'lift':>7}"
    )
    for model, m in report.metrics.items():
        lines.append(
            f"{model:<22}{m['roc_auc']:>9.4f}{m['pr_auc']:>9.4f}{m['log_loss']:>10.4f}"
            f"{m['precision_top']:>10.4f}{m['lift_top']:>7.2f}"
        )
    base = report.metrics["gbt"]
    lines.append(f"evaluation rows {base['rows']:.0f}, base rate {base['base_rate']:.4f}")
    lines.append("calibration (GBT, deciles): mean predicted / observed / rows")
    lines += [
        f"  {r['decile']:>2}  {r['mean_predicted']:.4f}  {r['observed_rate']:.4f}  {r['rows']}"
        for r in report.calibration_table
    ]
    lines.append(
        "top features: "
        + ", ".join(f"{name} {value:.3f}" for name, value in report.feature_importances[:8])
    )
    lines.append(report.verdict)
    return "\n".join(lines)


def format_score_report(report: PropensityScoreReport) -> str:
    return "\n".join(
        [
            f"propensity score target={report.target} version={report.version} "
            f"as_of={report.as_of.isoformat()} users={report.users}",
            f"segment {report.segment_id}: {report.members} members (lowest score "
            f"{report.min_member_score:.4f}), entered {report.entered}, exited {report.exited}; "
            f"mean score {report.mean_score:.4f}",
        ]
    )
