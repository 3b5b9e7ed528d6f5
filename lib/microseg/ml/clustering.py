"""Behavioral clusters: a KMeans pipeline per model version, with cluster ids that stay stable.

`train_clusters` (job `microseg cluster train --as-of T`) reads gold/user_features as of T and
fits one pyspark.ml pipeline, saved as one PipelineModel under
<lake>/models/<model_name>/<version>:

    FillMissing -> Log1p -> VectorAssembler -> StandardScaler(mean, std) -> [PCA]
        -> KMeans | BisectingKMeans -> ClusterLabeler

* FillMissing replaces nulls (see FILL_FROM): days_since_last_purchase of a user who never
  bought takes the user's tenure_days (no purchase in all the time we have seen them; 365 if
  tenure_days is not computed); every other null (a ratio whose denominator is zero, an RFM
  score of a non-buyer) takes 0.
* Log1p takes ln(1 + max(x, 0)) of the skewed money and count features (cluster.log_features).
* The k search fits each k in [k_min, k_max] on a sample of about search_sample_rows rows of
  the scaled vectors (computed once and cached), scores it with Spark's silhouette
  (ClusteringEvaluator, squared Euclidean) and the within-cluster sum of squares, and keeps
  the k with the best silhouette (ties: the smaller k). The final model is fitted with that k
  on all rows.
* ClusterLabeler, the last stage, maps KMeans' raw index to the stable id and adds
  `cluster_id` (e.g. c03), `segment_id` (cluster_<model_name>_<stable id>), `cluster_name`
  and `cluster_distance`: the Euclidean distance from the user's vector to the cluster
  centre in the space KMeans clusters in (standardized features, PCA-projected when
  pca_components is set); smaller is more typical. It is the membership score.

Profiles, per cluster: size, share, mean and median of every feature in its original units
(after FillMissing, before Log1p), z (the cluster mean of the standardized model input, i.e.
(cluster mean - overall mean) / overall standard deviation, on the log1p scale for log
features), the three features with the largest |z|, and a name from NAME_RULES.

Stable ids: each cluster of a new version is matched to the clusters of the previous version
(the latest of the same model_name in gold/model_registry). Both versions' centroids in the
model-input space (after FillMissing and Log1p, before scaling) are standardized with the NEW
model's scaler; the distance is the RMS difference over the features both versions use (with
the same log flag), in standard deviations per feature. scipy's linear_sum_assignment finds
the one-to-one matching of least total distance; a pair closer than match_max_distance is a
match: the new cluster keeps the old stable id and name. Unmatched new clusters get fresh ids
(one past the largest id the model ever issued, largest cluster first); unmatched old
clusters are reported as vanished. A first version numbers its clusters c01, c02, ... by
size, largest first.

`assign_clusters` (job `microseg cluster assign --as-of T [--version V]`) loads the latest (or
the given) version, transforms the features as of T and writes the members through
membership.write_membership (source "cluster", definition_version = the model version), and
one gold/segment_catalog row per cluster.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
from pyspark import keyword_only
from pyspark.ml import Pipeline, PipelineModel, Transformer
from pyspark.ml.clustering import BisectingKMeans, KMeans
from pyspark.ml.evaluation import ClusteringEvaluator
from pyspark.ml.feature import PCA, StandardScaler, StandardScalerModel, VectorAssembler
from pyspark.ml.functions import vector_to_array
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.param.shared import HasFeaturesCol, HasInputCols, HasOutputCols, HasPredictionCol
from pyspark.ml.util import DefaultParamsReadable, DefaultParamsWritable
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from scipy.optimize import linear_sum_assignment

from microseg.core import lake
from microseg.core.config import ClusterConfig, Config, ConfigError
from microseg.features import snapshots
from microseg.features.user_features import FEATURES, select_features
from microseg.segments import membership

SOURCE = "cluster"
KIND = "cluster"

# null -> the value of another feature; every other null is filled with 0
FILL_FROM = {"days_since_last_purchase": "tenure_days"}
FILL_FROM_FALLBACK = {"days_since_last_purchase": 365.0}  # when the other feature is absent
LOG_PREFIX = "_log1p_"
RAW_VECTOR = "_cluster_input"
SCALED = "_cluster_scaled"
PROJECTED = "_cluster_pca"
INDEX = "_cluster_index"
CLUSTER_ID = "cluster_id"
SEGMENT_ID = "segment_id"
CLUSTER_NAME = "cluster_name"
DISTANCE = "cluster_distance"


# --------------------------------------------------------------------------------------
# custom pipeline stages


class FillMissing(Transformer, HasInputCols, DefaultParamsReadable, DefaultParamsWritable):
    """Casts inputCols to double in place and replaces null (and NaN): by the value of
    fillFromCols[i] when that names a column and it is not null, else by fillValues[i]."""

    fillValues = Param(
        Params._dummy(),
        "fillValues",
        "value per input column that replaces null",
        typeConverter=TypeConverters.toListFloat,
    )
    fillFromCols = Param(
        Params._dummy(),
        "fillFromCols",
        "column per input column whose value replaces null first ('' for none)",
        typeConverter=TypeConverters.toListString,
    )

    @keyword_only
    def __init__(self, *, inputCols=None, fillValues=None, fillFromCols=None):
        super().__init__()
        self._setDefault(fillValues=[], fillFromCols=[])
        self._set(**self._input_kwargs)

    def _transform(self, dataset: DataFrame) -> DataFrame:
        names = self.getInputCols()
        values = self.getOrDefault(self.fillValues) or [0.0] * len(names)
        sources = self.getOrDefault(self.fillFromCols) or [""] * len(names)
        if not len(names) == len(values) == len(sources):
            raise ValueError("FillMissing: inputCols, fillValues and fillFromCols differ in length")
        filled = {}
        for name, value, source in zip(names, values, sources, strict=True):
            column = _not_nan(F.col(name))
            if source:
                column = F.coalesce(column, _not_nan(F.col(source)))
            filled[name] = F.coalesce(column, F.lit(float(value)))
        return dataset.withColumns(filled)


def _not_nan(column: Column) -> Column:
    value = column.cast("double")
    return F.when(~F.isnan(value), value)


class Log1p(Transformer, HasInputCols, HasOutputCols, DefaultParamsReadable, DefaultParamsWritable):
    """outputCols[i] = ln(1 + max(inputCols[i], 0)); null stays null."""

    @keyword_only
    def __init__(self, *, inputCols=None, outputCols=None):
        super().__init__()
        self._set(**self._input_kwargs)

    def _transform(self, dataset: DataFrame) -> DataFrame:
        return dataset.withColumns(
            {
                out: F.log1p(F.when(F.col(name) < 0, 0.0).otherwise(F.col(name).cast("double")))
                for name, out in zip(self.getInputCols(), self.getOutputCols(), strict=True)
            }
        )


class ClusterLabeler(
    Transformer, HasFeaturesCol, HasPredictionCol, DefaultParamsReadable, DefaultParamsWritable
):
    """Adds cluster_id (stableIds[raw index]), segment_id (segmentPrefix + cluster_id),
    cluster_name and cluster_distance (Euclidean distance from featuresCol to
    centers[raw index]). Plain Spark SQL, no Python UDF."""

    stableIds = Param(
        Params._dummy(),
        "stableIds",
        "stable cluster id per raw cluster index",
        typeConverter=TypeConverters.toListString,
    )
    names = Param(
        Params._dummy(), "names", "name per raw index", typeConverter=TypeConverters.toListString
    )
    centers = Param(
        Params._dummy(),
        "centers",
        "cluster centre per raw index, in the featuresCol space",
        typeConverter=TypeConverters.identity,
    )
    segmentPrefix = Param(
        Params._dummy(),
        "segmentPrefix",
        "segment_id = segmentPrefix + stable id",
        typeConverter=TypeConverters.toString,
    )

    @keyword_only
    def __init__(
        self,
        *,
        featuresCol=None,
        predictionCol=None,
        stableIds=None,
        names=None,
        centers=None,
        segmentPrefix=None,
    ):
        super().__init__()
        self._setDefault(segmentPrefix="cluster_")
        self._set(**self._input_kwargs)

    def _transform(self, dataset: DataFrame) -> DataFrame:
        ids = self.getOrDefault(self.stableIds)
        names = self.getOrDefault(self.names)
        centers = self.getOrDefault(self.centers)
        position = F.col(self.getPredictionCol()) + 1
        center = F.element_at(
            F.array(*[F.array(*[F.lit(float(x)) for x in c]) for c in centers]), position
        )
        vector = vector_to_array(F.col(self.getFeaturesCol()))
        squares = F.zip_with(vector, center, lambda a, b: (a - b) * (a - b))
        cluster_id = F.element_at(F.array(*[F.lit(i) for i in ids]), position)
        return dataset.withColumns(
            {
                CLUSTER_ID: cluster_id,
                SEGMENT_ID: F.concat(F.lit(self.getOrDefault(self.segmentPrefix)), cluster_id),
                CLUSTER_NAME: F.element_at(F.array(*[F.lit(n) for n in names]), position),
                DISTANCE: F.sqrt(F.aggregate(squares, F.lit(0.0), lambda acc, x: acc + x)),
            }
        )


# --------------------------------------------------------------------------------------
# config and pipeline


def check_config(cfg: Config) -> tuple[str, ...]:
    """The cluster features, after checking cluster.* against the features features.include
    computes; raises ConfigError naming every bad key."""
    settings = cfg.cluster
    available = {f.name: f for f in select_features(cfg.features.include)}
    problems = []
    names = settings.features
    if not names:
        problems.append("cluster.features: empty; list at least two number features")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        problems.append(f"cluster.features: listed twice: {duplicates}")
    unknown = [n for n in names if n not in FEATURES]
    if unknown:
        problems.append(f"cluster.features: unknown feature(s) {unknown}; see README for the list")
    excluded = [n for n in names if n in FEATURES and n not in available]
    if excluded:
        problems.append(f"cluster.features: {excluded} not computed: not in features.include")
    strings = [n for n in names if n in FEATURES and FEATURES[n].kind != "number"]
    if strings:
        problems.append(f"cluster.features: {strings} are not number features")
    stray = [n for n in settings.log_features if n not in names]
    if stray:
        problems.append(f"cluster.log_features: {stray} not in cluster.features")
    if settings.k_min > settings.k_max:
        problems.append(
            f"cluster.k_min ({settings.k_min}) is larger than cluster.k_max ({settings.k_max})"
        )
    if settings.pca_components is not None and settings.pca_components > len(names):
        problems.append(
            f"cluster.pca_components ({settings.pca_components}) is more than the "
            f"{len(names)} cluster.features"
        )
    if problems:
        raise ConfigError("; ".join(problems))
    return tuple(names)


def fill_rules(features: tuple[str, ...], available: set[str]) -> dict[str, tuple[str, float]]:
    """feature -> (column whose value replaces a null, or '', then this constant)."""
    rules = {}
    for name in features:
        source = FILL_FROM.get(name, "")
        if source and source in available:
            rules[name] = (source, FILL_FROM_FALLBACK.get(name, 0.0))
        else:
            rules[name] = ("", FILL_FROM_FALLBACK.get(name, 0.0))
    return rules


def model_input_columns(settings: ClusterConfig) -> list[str]:
    """The assembler's inputs: log features as their log1p column, in cluster.features order."""
    logged = set(settings.log_features)
    return [f"{LOG_PREFIX}{n}" if n in logged else n for n in settings.features]


def space_column(settings: ClusterConfig) -> str:
    return PROJECTED if settings.pca_components else SCALED


def feature_stages(
    settings: ClusterConfig, fill: dict[str, tuple[str, float]]
) -> list[Transformer]:
    """FillMissing, Log1p, VectorAssembler, StandardScaler and optional PCA (unfitted)."""
    features = list(settings.features)
    stages: list = [
        FillMissing(
            inputCols=features,
            fillValues=[fill[n][1] for n in features],
            fillFromCols=[fill[n][0] for n in features],
        )
    ]
    if settings.log_features:
        stages.append(
            Log1p(
                inputCols=list(settings.log_features),
                outputCols=[f"{LOG_PREFIX}{n}" for n in settings.log_features],
            )
        )
    stages += [
        VectorAssembler(
            inputCols=model_input_columns(settings), outputCol=RAW_VECTOR, handleInvalid="error"
        ),
        # Spark's BisectingKMeans leaves data centred at the origin in one cluster (seen with
        # Spark 4.2), so it gets scaled, uncentred vectors: a shift changes no distance
        StandardScaler(
            inputCol=RAW_VECTOR,
            outputCol=SCALED,
            withMean=settings.algorithm == "kmeans",
            withStd=True,
        ),
    ]
    if settings.pca_components:
        stages.append(PCA(k=settings.pca_components, inputCol=SCALED, outputCol=PROJECTED))
    return stages


def cluster_estimator(settings: ClusterConfig, k: int):
    common = {
        "k": k,
        "seed": settings.seed,
        "maxIter": settings.max_iter,
        "featuresCol": space_column(settings),
        "predictionCol": INDEX,
    }
    if settings.algorithm == "bisecting_kmeans":
        return BisectingKMeans(**common)
    return KMeans(**common, initSteps=settings.init_steps, initMode="k-means||")


def build_pipeline(
    settings: ClusterConfig, fill: dict[str, tuple[str, float]], *, k: int
) -> Pipeline:
    """The whole unfitted pipeline for one k (train_clusters fits the feature stages once and
    the clusterer per k on the cached vectors instead, then appends a ClusterLabeler)."""
    return Pipeline(stages=[*feature_stages(settings, fill), cluster_estimator(settings, k)])


# --------------------------------------------------------------------------------------
# names


@dataclass(frozen=True)
class NameRule:
    name: str
    meaning: str
    test: Any  # (z: dict, mean: dict) -> bool; a feature missing from the profile fails


def _first(values: Mapping[str, float], *names: str) -> float | None:
    for name in names:
        if values.get(name) is not None:
            return values[name]
    return None


def _z_at_least(limit: float, *names: str):
    def test(z: Mapping[str, float], mean: Mapping[str, float]) -> bool:
        value = _first(z, *names)
        return value is not None and value >= limit

    return test


def _z_at_most(limit: float, *names: str):
    def test(z: Mapping[str, float], mean: Mapping[str, float]) -> bool:
        value = _first(z, *names)
        return value is not None and value <= limit

    return test


def _all(*tests):
    return lambda z, mean: all(t(z, mean) for t in tests)


ORDERS = ("orders_lifetime", "orders_90d", "orders_30d")
SPEND = (
    "revenue_lifetime",
    "revenue_90d",
    "revenue_30d",
    "avg_order_value_lifetime",
    "avg_order_value_90d",
    "avg_order_value_30d",
)
AOV = ("avg_order_value_lifetime", "avg_order_value_90d", "avg_order_value_30d")
ABANDON = (
    "cart_abandonment_rate_lifetime",
    "cart_abandonment_rate_90d",
    "cart_abandoned_sessions_lifetime",
    "cart_abandoned_sessions_90d",
)
BOUNCE = ("bounce_rate_lifetime", "bounce_rate_90d", "bounce_rate_30d")
SECONDS = ("avg_session_seconds_lifetime", "avg_session_seconds_90d", "avg_session_seconds_30d")
PAGES = ("pages_per_session_lifetime", "pages_per_session_90d", "pages_per_session_30d")
RECENCY = ("days_since_last_event",)
TENURE = ("tenure_days",)
CAMPAIGN = ("campaign_session_share",)


def _orders_below(limit: float):
    """Mean orders (original units) below `limit`: most members never bought."""

    def test(z: Mapping[str, float], mean: Mapping[str, float]) -> bool:
        orders = _first(mean, *ORDERS)
        return orders is not None and orders < limit

    return test


def _any(*tests):
    return lambda z, mean: any(t(z, mean) for t in tests)


# The first rule that holds names the cluster. z: the cluster's standardized means (see the
# profiles); a feature the model does not use fails its test. Each list of names (ORDERS,
# SPEND, ...) means the first of them the model uses: spend is revenue, else average order
# value.
NAME_RULES = (
    NameRule(
        "Bouncers",
        "bounce rate z >= 1.5, or session seconds z <= -2.5",
        _any(_z_at_least(1.5, *BOUNCE), _z_at_most(-2.5, *SECONDS)),
    ),
    NameRule(
        "New visitors from campaigns",
        "tenure_days z <= -1 and campaign_session_share z >= 1",
        _all(_z_at_most(-1.0, *TENURE), _z_at_least(1.0, *CAMPAIGN)),
    ),
    NameRule("New visitors", "tenure_days z <= -1", _z_at_most(-1.0, *TENURE)),
    NameRule(
        "Lapsed high spenders",
        "days_since_last_event z >= 1 and spend z >= 0.5",
        _all(_z_at_least(1.0, *RECENCY), _z_at_least(0.5, *SPEND)),
    ),
    NameRule("Lapsed customers", "days_since_last_event z >= 1", _z_at_least(1.0, *RECENCY)),
    NameRule(
        "High-value frequent buyers",
        "orders z >= 1 and spend z >= 0.5",
        _all(_z_at_least(1.0, *ORDERS), _z_at_least(0.5, *SPEND)),
    ),
    NameRule("Frequent buyers", "orders z >= 1", _z_at_least(1.0, *ORDERS)),
    NameRule(
        "Cart abandoners",
        "cart abandonment (rate, else abandoned sessions) z >= 0.75 and mean orders below 0.5",
        _all(_z_at_least(0.75, *ABANDON), _orders_below(0.5)),
    ),
    NameRule("Deal seekers", "campaign_session_share z >= 1", _z_at_least(1.0, *CAMPAIGN)),
    NameRule("Big-ticket buyers", "average order value z >= 0.75", _z_at_least(0.75, *AOV)),
    NameRule(
        "Window shoppers",
        "mean orders below 0.5 and pages per session z >= 0",
        _all(_orders_below(0.5), _z_at_least(0.0, *PAGES)),
    ),
)


def _label(feature: str) -> str:
    return feature.replace("_", " ")


def name_cluster(z: Mapping[str, float], mean: Mapping[str, float]) -> str:
    """The first NAME_RULES name whose test holds; else 'High <a>, low <b>' from the two
    largest |z| (or 'Average users' when no |z| reaches 0.5)."""
    if not z:
        return "Empty cluster"
    for rule in NAME_RULES:
        if rule.test(z, mean):
            return rule.name
    strong = sorted(
        ((f, v) for f, v in z.items() if abs(v) >= 0.5), key=lambda fv: (-abs(fv[1]), fv[0])
    )[:2]
    if not strong:
        return "Average users"
    text = ", ".join(f"{'high' if v > 0 else 'low'} {_label(f)}" for f, v in strong)
    return text[0].upper() + text[1:]


def unique_name(name: str, taken: set[str]) -> str:
    """name, or 'name 2', 'name 3', ... the first not taken."""
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name} {n}"
    return candidate


# --------------------------------------------------------------------------------------
# matching


def stable_id(number: int) -> str:
    return f"c{number:02d}"


def stable_number(cluster_id: str) -> int:
    match = re.fullmatch(r"c(\d+)", cluster_id)
    return int(match.group(1)) if match else 0


def match_distances(
    new_centroids: list[Mapping[str, float]],
    old_centroids: list[Mapping[str, float]],
    *,
    std: Mapping[str, float],
) -> np.ndarray:
    """RMS distance between centroids in the model-input space (before scaling), each
    feature divided by its standard deviation `std` (the new model's scaler; its mean
    cancels out), over the features both have with a positive std. Rows: new, columns:
    old; inf where nothing is comparable."""
    costs = np.full((len(new_centroids), len(old_centroids)), np.inf)
    for i, new in enumerate(new_centroids):
        for j, old in enumerate(old_centroids):
            common = [
                f
                for f in new
                if std.get(f, 0.0) > 0 and new[f] is not None and old.get(f) is not None
            ]
            if common:
                diffs = [(new[f] - old[f]) / std[f] for f in common]
                costs[i, j] = math.sqrt(sum(d * d for d in diffs) / len(diffs))
    return costs


def match_clusters(costs: np.ndarray, max_distance: float) -> list[tuple[int, int, float]]:
    """Optimal one-to-one (new, old, distance) pairs closer than max_distance."""
    if costs.size == 0:
        return []
    finite = np.where(np.isfinite(costs), costs, 1e12)
    rows, cols = linear_sum_assignment(finite)
    return [
        (int(i), int(j), float(costs[i, j]))
        for i, j in zip(rows, cols, strict=True)
        if costs[i, j] <= max_distance
    ]


# --------------------------------------------------------------------------------------
# quality


def adjusted_rand_index(contingency: Mapping[tuple[Any, Any], int]) -> float:
    """Adjusted Rand index (Hubert and Arabie) from a contingency table
    {(true label, predicted label): count}; 1.0 when both partitions are trivial alike."""
    rows: dict[Any, int] = {}
    cols: dict[Any, int] = {}
    for (a, b), count in contingency.items():
        rows[a] = rows.get(a, 0) + count
        cols[b] = cols.get(b, 0) + count
    n = sum(rows.values())
    if n < 2:
        return 1.0
    index = sum(math.comb(c, 2) for c in contingency.values())
    sum_rows = sum(math.comb(c, 2) for c in rows.values())
    sum_cols = sum(math.comb(c, 2) for c in cols.values())
    expected = sum_rows * sum_cols / math.comb(n, 2)
    maximum = (sum_rows + sum_cols) / 2
    if maximum == expected:
        return 1.0
    return (index - expected) / (maximum - expected)


def persona_labels(spark: SparkSession, users_csv: str) -> DataFrame:
    """user_key, persona from the users.csv `microseg generate` writes.

    A user's key after identity stitching is their user_id once any of their cookies was seen
    with it, else anon:<anonymous id> (a user who never logged in, or a cookie never used
    after login); every such key of the user carries the persona. Keys claimed by two
    personas (a shared family cookie, listed in anonymous_ids or shared_anonymous_id) are
    left out."""
    users_df = spark.read.csv(users_csv, header=True)
    cookies = F.concat_ws(";", F.col("anonymous_ids"), F.col("shared_anonymous_id"))
    keys_df = users_df.select(F.col("user_id").alias("user_key"), "persona").unionByName(
        users_df.select(F.explode(F.split(cookies, ";")).alias("_anon"), "persona")
        .filter(F.col("_anon") != "")
        .select(F.concat(F.lit("anon:"), F.col("_anon")).alias("user_key"), "persona")
    )
    return (
        keys_df.groupBy("user_key")
        .agg(F.min("persona").alias("persona"), F.count_distinct("persona").alias("_personas"))
        .filter(F.col("_personas") == 1)
        .select("user_key", "persona")
    )


def persona_ari(
    spark: SparkSession, assignments_df: DataFrame, users_csv: str, *, column: str = CLUSTER_ID
) -> tuple[float, int]:
    """(ARI between `column` of assignments_df and the generator's personas, users compared);
    users without a persona are left out."""
    joined_df = assignments_df.join(persona_labels(spark, users_csv), on="user_key", how="inner")
    counts = joined_df.groupBy("persona", column).count().collect()
    table = {(r["persona"], r[column]): r["count"] for r in counts}
    return adjusted_rand_index(table), sum(table.values())


# --------------------------------------------------------------------------------------
# fitting


@dataclass(frozen=True)
class KScore:
    k: int
    silhouette: float | None
    wcss: float


@dataclass
class FittedClusters:
    model: PipelineModel
    k: int
    scores: list[KScore]
    silhouette: float | None
    wcss: float
    users: int
    sample_rows: int
    profiles: list[dict]  # by raw index, see _profiles
    matching: dict
    assignments_df: DataFrame  # user_key, cluster_id, segment_id, cluster_distance
    _cached: list[DataFrame] = field(default_factory=list)

    def release(self) -> None:
        """Unpersist the cached training vectors (assignments_df is unusable after)."""
        for df in self._cached:
            df.unpersist()


def _silhouette(model, predictions_df: DataFrame, settings: ClusterConfig) -> float | None:
    """Spark's silhouette (squared Euclidean); None when fewer than two clusters have members."""
    if sum(1 for size in model.summary.clusterSizes if size > 0) < 2:
        return None
    evaluator = ClusteringEvaluator(
        featuresCol=space_column(settings), predictionCol=INDEX, metricName="silhouette"
    )
    return float(evaluator.evaluate(predictions_df))


def _wcss(model) -> float:
    return float(model.summary.trainingCost)


def search_k(
    vectors_df: DataFrame, settings: ClusterConfig, *, rows: int
) -> tuple[list[KScore], dict[int, Any], int]:
    """Fit every k on a sample (all rows if there are at most search_sample_rows):
    (scores, the models fitted on all rows keyed by k, sample rows)."""
    if rows > settings.search_sample_rows:
        sample_df = vectors_df.sample(
            fraction=settings.search_sample_rows / rows, seed=settings.seed
        ).persist()
        sample_rows = sample_df.count()
    else:
        sample_df, sample_rows = vectors_df, rows
    scores, full_models = [], {}
    for k in range(settings.k_min, settings.k_max + 1):
        if k >= sample_rows:
            break
        model = cluster_estimator(settings, k).fit(sample_df)
        silhouette = _silhouette(model, model.transform(sample_df), settings)
        scores.append(KScore(k, silhouette, _wcss(model)))
        if sample_df is vectors_df:
            full_models[k] = model
    if sample_df is not vectors_df:
        sample_df.unpersist()
    if not scores:
        raise ValueError(f"{rows} users: too few to fit k >= {settings.k_min} clusters")
    return scores, full_models, sample_rows


def best_k(scores: list[KScore]) -> int:
    """The k with the best silhouette (ties: the smaller k); the smallest k if none has one."""
    scored = [s for s in scores if s.silhouette is not None]
    if not scored:
        return scores[0].k
    return max(scored, key=lambda s: (s.silhouette, -s.k)).k


def _profiles(
    assigned_df: DataFrame, settings: ClusterConfig, scaler: StandardScalerModel, k: int
) -> list[dict]:
    """Per raw index: size, share, mean / median (original units), centroid (model-input
    space), z (centroid standardized with the scaler's mean and std; 0 where the std is 0),
    top features. One aggregation over the assigned rows."""
    features = list(settings.features)
    model_input = vector_to_array(F.col(RAW_VECTOR))
    aggs = [F.count(F.lit(1)).alias("_size")]
    for i, name in enumerate(features):
        aggs += [
            F.avg(name).alias(f"_mean{i}"),
            F.percentile_approx(name, 0.5, 10_000).alias(f"_median{i}"),
            F.avg(model_input[i]).alias(f"_centroid{i}"),
        ]
    rows = {r[INDEX]: r for r in assigned_df.groupBy(INDEX).agg(*aggs).collect()}
    total = sum(r["_size"] for r in rows.values())
    mean_vec, std_vec = scaler.mean.toArray(), scaler.std.toArray()
    profiles = []
    for index in range(k):
        row = rows.get(index)
        profile: dict[str, Any] = {"index": index, "size": 0, "share": 0.0}
        if row is None:
            profile.update(mean={}, median={}, z={}, centroid={}, top_features=[])
            profiles.append(profile)
            continue
        centroid = {f: row[f"_centroid{i}"] for i, f in enumerate(features)}
        z = {
            f: _round((centroid[f] - mean_vec[i]) / std_vec[i]) if std_vec[i] > 0 else 0.0
            for i, f in enumerate(features)
        }
        profile.update(
            size=row["_size"],
            share=_round(row["_size"] / total),
            mean={f: _round(row[f"_mean{i}"]) for i, f in enumerate(features)},
            median={f: _round(row[f"_median{i}"]) for i, f in enumerate(features)},
            z=z,
            centroid={f: _round(v) for f, v in centroid.items()},
            top_features=[
                {"feature": f, "z": v, "direction": "high" if v > 0 else "low"}
                for f, v in sorted(z.items(), key=lambda fv: (-abs(fv[1]), fv[0]))[:3]
            ],
        )
        profiles.append(profile)
    return profiles


def _round(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(float(value), digits)


def _identify(
    profiles: list[dict],
    settings: ClusterConfig,
    scaler: StandardScalerModel,
    previous: dict | None,
    next_number: int,
) -> dict:
    """Give every profile stable_id, name and segment_id (in place); return the matching
    report: previous_version, matched, appeared, vanished."""
    report: dict[str, Any] = {
        "previous_version": None,
        "matched": [],
        "appeared": [],
        "vanished": [],
    }
    taken: set[str] = set()
    pending = list(range(len(profiles)))
    if previous is not None:
        report["previous_version"] = previous["version"]
        old = previous["profiles"]
        old_logged = set(previous.get("log_features", []))
        logged = set(settings.log_features)
        features = list(settings.features)
        std = dict(zip(features, scaler.std.toArray().tolist(), strict=True))
        comparable = {f for f in features if (f in logged) == (f in old_logged)}

        def centroid(p: dict) -> dict:
            return {f: v for f, v in p.get("centroid", {}).items() if f in comparable}

        costs = match_distances(
            [centroid(p) for p in profiles], [centroid(p) for p in old], std=std
        )
        pairs = match_clusters(costs, settings.match_max_distance)
        matched_old = set()
        for i, j, distance in pairs:
            profiles[i]["stable_id"] = old[j]["stable_id"]
            profiles[i]["name"] = old[j]["name"]
            taken.add(old[j]["name"])
            matched_old.add(j)
            pending.remove(i)
            report["matched"].append(
                {
                    "stable_id": old[j]["stable_id"],
                    "name": old[j]["name"],
                    "index": profiles[i]["index"],
                    "distance": _round(distance),
                }
            )
        for j, p in enumerate(old):
            if j not in matched_old:
                nearest = float(np.min(costs[:, j])) if costs.shape[0] else math.inf
                report["vanished"].append(
                    {
                        "stable_id": p["stable_id"],
                        "name": p["name"],
                        "nearest_distance": _round(nearest) if math.isfinite(nearest) else None,
                    }
                )
    for i in sorted(pending, key=lambda i: (-profiles[i]["size"], profiles[i]["index"])):
        profile = profiles[i]
        profile["stable_id"] = stable_id(next_number)
        next_number += 1
        profile["name"] = unique_name(name_cluster(profile["z"], profile["mean"]), taken)
        taken.add(profile["name"])
        if previous is not None:
            report["appeared"].append(
                {"stable_id": profile["stable_id"], "name": profile["name"], "index": i}
            )
    for profile in profiles:
        profile["segment_id"] = segment_id(settings.model_name, profile["stable_id"])
    return report


def segment_id(model_name: str, cluster_id: str) -> str:
    """The segment id a cluster's members get in gold/segment_membership."""
    return f"cluster_{model_name}_{cluster_id}"


def fit_clusters(
    features_df: DataFrame,
    settings: ClusterConfig,
    *,
    fill: dict[str, tuple[str, float]],
    previous: dict | None = None,
    next_number: int = 1,
) -> FittedClusters:
    """Fit the pipeline on features_df (user_key and the feature columns): k search, final
    fit, profiles, stable ids. previous: the previous version's details (with `version`),
    whose clusters the new ones are matched to; next_number: the first fresh stable id."""
    prep_model = Pipeline(stages=feature_stages(settings, fill)).fit(features_df)
    space = space_column(settings)
    vectors_df = (
        prep_model.transform(features_df)
        .select("user_key", *settings.features, RAW_VECTOR, space)
        .persist()
    )
    rows = vectors_df.count()
    scores, full_models, sample_rows = search_k(vectors_df, settings, rows=rows)
    k = best_k(scores)
    if k in full_models:  # the search ran on all rows
        cluster_model = full_models[k]
        predictions_df = cluster_model.transform(vectors_df).persist()
        silhouette = next(s.silhouette for s in scores if s.k == k)
    else:
        cluster_model = cluster_estimator(settings, k).fit(vectors_df)
        predictions_df = cluster_model.transform(vectors_df).persist()
        silhouette = _silhouette(cluster_model, predictions_df, settings)
    scaler = next(s for s in prep_model.stages if isinstance(s, StandardScalerModel))
    profiles = _profiles(predictions_df, settings, scaler, k)
    matching = _identify(profiles, settings, scaler, previous, next_number)
    labeler = ClusterLabeler(
        featuresCol=space,
        predictionCol=INDEX,
        stableIds=[p["stable_id"] for p in profiles],
        names=[p["name"] for p in profiles],
        centers=[[float(x) for x in c] for c in cluster_model.clusterCenters()],
        segmentPrefix=f"cluster_{settings.model_name}_",
    )
    model = PipelineModel(stages=[*prep_model.stages, cluster_model, labeler])
    assignments_df = labeler.transform(predictions_df).select(
        "user_key", CLUSTER_ID, SEGMENT_ID, DISTANCE
    )
    return FittedClusters(
        model=model,
        k=k,
        scores=scores,
        silhouette=silhouette,
        wcss=_wcss(cluster_model),
        users=rows,
        sample_rows=sample_rows,
        profiles=profiles,
        matching=matching,
        assignments_df=assignments_df,
        _cached=[predictions_df, vectors_df],
    )


def training_data_hash(features_df: DataFrame, features: tuple[str, ...]) -> str:
    """sha256 of the feature names, the row count and the sums of four 60-bit slices of each
    row's sha256(user_key, values): the same rows in any order (and partitioning) give the
    same hash."""
    values = [F.coalesce(F.col(f).cast("double").cast("string"), F.lit("\\N")) for f in features]
    row_hash = F.sha2(F.concat_ws("\x1f", F.col("user_key"), *values), 256)
    slices = [
        F.sum(F.conv(F.substring("_h", 1 + 15 * i, 15), 16, 10).cast("decimal(38,0)"))
        .cast("string")
        .alias(f"s{i}")
        for i in range(4)
    ]
    row = features_df.select(row_hash.alias("_h")).agg(F.count(F.lit(1)).alias("n"), *slices)
    summary = row.first().asDict()
    payload = json.dumps({"features": list(features), **summary}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


# --------------------------------------------------------------------------------------
# registry


def new_version(now: datetime) -> str:
    """'20261124T051500Z-0a1b2c': UTC time, then the microseconds as 6 hex digits, so
    versions sort by training time."""
    return f"{now:%Y%m%dT%H%M%SZ}-{now.microsecond:06x}"


def registry_entries(spark: SparkSession, root: str, model_name: str) -> list:
    """The model's cluster versions in gold/model_registry, oldest first."""
    if not lake.table_exists(spark, root, lake.MODEL_REGISTRY):
        return []
    return (
        lake.read_table(spark, root, lake.MODEL_REGISTRY)
        .filter((F.col("model_name") == model_name) & (F.col("kind") == KIND))
        .orderBy("trained_at", "version")
        .collect()
    )


def registry_entry(spark: SparkSession, root: str, model_name: str, version: str | None = None):
    """The given version's registry row, or the latest; FileNotFoundError if there is none."""
    entries = registry_entries(spark, root, model_name)
    if version is not None:
        entries = [e for e in entries if e.version == version]
        if not entries:
            raise FileNotFoundError(
                f"no cluster model '{model_name}' version {version} in gold/model_registry "
                f"under {root}"
            )
    if not entries:
        raise FileNotFoundError(
            f"no cluster model '{model_name}' in gold/model_registry under {root}: run "
            "`microseg cluster train --as-of T` first"
        )
    return entries[-1]


# --------------------------------------------------------------------------------------
# jobs


@dataclass
class ClusterTrainReport:
    run_id: str
    model_name: str
    version: str
    path: str
    as_of: datetime
    users: int
    k: int
    silhouette: float | None
    wcss: float
    scores: list[KScore]
    sample_rows: int
    profiles: list[dict]
    matching: dict
    ari: float | None
    ari_users: int | None
    training_data_hash: str
    training_seconds: float


@dataclass(frozen=True)
class ClusterResult:
    segment_id: str
    cluster_id: str
    name: str
    size: int
    previous_size: int | None
    entered: int
    exited: int
    stability: float | None
    status: str = "active"


@dataclass
class ClusterAssignReport:
    run_id: str
    as_of: datetime
    model_name: str
    version: str
    users: int
    clusters: list[ClusterResult] = field(default_factory=list)


def _naive_utc(value: datetime) -> datetime:
    return value.astimezone(timezone.utc).replace(tzinfo=None) if value.tzinfo else value


def _require_columns(features_df: DataFrame, needed: list[str], as_of: datetime) -> None:
    missing = [c for c in needed if c not in features_df.columns]
    if missing:
        raise ValueError(
            f"gold/user_features as of {as_of.isoformat()} has no column(s) {missing}: "
            "re-run `microseg features` with them in features.include"
        )


def train_clusters(
    spark: SparkSession, cfg: Config, *, as_of: datetime, ground_truth: str | None = None
) -> ClusterTrainReport:
    """Train a new version on gold/user_features as of `as_of`, save its PipelineModel and
    append its gold/model_registry row. ground_truth: a generator's users.csv, for the ARI."""
    started = time.monotonic()
    settings = cfg.cluster
    root = cfg.lake.root
    features = check_config(cfg)
    as_of = _naive_utc(as_of)
    available = {f.name for f in select_features(cfg.features.include)}
    fill = fill_rules(features, available)
    features_df = snapshots.snapshot(spark, cfg.lake.root, as_of)
    sources = sorted({s for s, _ in fill.values() if s})
    _require_columns(features_df, [*features, *sources], as_of)
    features_df = features_df.select("user_key", *dict.fromkeys([*features, *sources]))
    entries = registry_entries(spark, root, settings.model_name)
    previous = None
    issued = 0
    for entry in entries:
        details = json.loads(entry.details or "{}")
        issued = max(
            [issued, *(stable_number(p["stable_id"]) for p in details.get("profiles", []))]
        )
    if entries:
        previous = {**json.loads(entries[-1].details or "{}"), "version": entries[-1].version}
    fitted = fit_clusters(
        features_df, settings, fill=fill, previous=previous, next_number=issued + 1
    )
    ari, ari_users = None, None
    if ground_truth is not None:
        ari, ari_users = persona_ari(spark, fitted.assignments_df, ground_truth)
    fitted.release()
    data_hash = training_data_hash(features_df, features)
    trained_at = datetime.now(timezone.utc)
    version = new_version(trained_at)
    path = lake.model_path(root, settings.model_name, version)
    fitted.model.write().overwrite().save(path)
    run_id = uuid.uuid4().hex
    seconds = round(time.monotonic() - started, 3)
    metrics = {"k": float(fitted.k), "wcss": fitted.wcss, "users": float(fitted.users)}
    if fitted.silhouette is not None:
        metrics["silhouette"] = fitted.silhouette
    if ari is not None:
        metrics["ari"] = ari
    metrics["training_seconds"] = seconds
    details = {
        "features": list(features),
        "log_features": list(settings.log_features),
        "fill": {f: {"from": s or None, "value": v} for f, (s, v) in fill.items()},
        "space": "pca"
        if settings.pca_components
        else "standardized"
        if settings.algorithm == "kmeans"
        else "scaled",
        "search": [{"k": s.k, "silhouette": s.silhouette, "wcss": s.wcss} for s in fitted.scores],
        "sample_rows": fitted.sample_rows,
        "sizes": {p["stable_id"]: p["size"] for p in fitted.profiles},
        "mapping": {str(p["index"]): p["stable_id"] for p in fitted.profiles},
        "profiles": fitted.profiles,
        "matching": fitted.matching,
        "ari": None
        if ari is None
        else {"value": ari, "users": ari_users, "ground_truth": ground_truth},
    }
    params = {**settings.model_dump(mode="json"), "k": fitted.k}
    row = (
        settings.model_name,
        version,
        KIND,
        trained_at.replace(tzinfo=None),
        [as_of],
        None,
        json.dumps(params, sort_keys=True),
        metrics,
        json.dumps(details, sort_keys=True),
        data_hash,
        path,
        run_id,
    )
    # a plain append: the version is new by construction (time to the microsecond)
    lake.ensure_table(spark, root, lake.MODEL_REGISTRY)
    (
        spark.createDataFrame([row], lake.MODEL_REGISTRY.schema)
        .write.format("delta")
        .mode("append")
        .save(lake.table_path(root, lake.MODEL_REGISTRY))
    )
    return ClusterTrainReport(
        run_id=run_id,
        model_name=settings.model_name,
        version=version,
        path=path,
        as_of=as_of,
        users=fitted.users,
        k=fitted.k,
        silhouette=fitted.silhouette,
        wcss=fitted.wcss,
        scores=fitted.scores,
        sample_rows=fitted.sample_rows,
        profiles=fitted.profiles,
        matching=fitted.matching,
        ari=ari,
        ari_users=ari_users,
        training_data_hash=data_hash,
        training_seconds=seconds,
    )


def assign_clusters(
    spark: SparkSession, cfg: Config, *, as_of: datetime, version: str | None = None
) -> ClusterAssignReport:
    """Assign every user with features as of `as_of` to a cluster of the latest (or the
    given) model version and record it in gold/segment_membership (source "cluster", score =
    distance to the cluster centre) and gold/segment_catalog."""
    root = cfg.lake.root
    as_of = _naive_utc(as_of)
    entry = registry_entry(spark, root, cfg.cluster.model_name, version)
    details = json.loads(entry.details)
    model = PipelineModel.load(entry.path)
    features_df = snapshots.snapshot(spark, cfg.lake.root, as_of)
    needed = sorted(
        {*details["features"], *(f["from"] for f in details["fill"].values() if f["from"])}
    )
    _require_columns(features_df, needed, as_of)
    members_df = model.transform(features_df.select("user_key", *needed)).select(
        "user_key",
        SEGMENT_ID,
        F.col(DISTANCE).alias("score"),
        F.lit(False).alias("fallback"),
    )
    run_id = uuid.uuid4().hex
    profiles = {p["segment_id"]: p for p in details["profiles"]}
    stats = membership.write_membership(
        spark,
        root,
        source=SOURCE,
        as_of=as_of,
        run_id=run_id,
        members_df=members_df,
        versions={sid: entry.version for sid in profiles},
    )
    results = []
    for sid, profile in sorted(profiles.items()):
        stat = stats.get(sid)
        results.append(
            ClusterResult(
                segment_id=sid,
                cluster_id=profile["stable_id"],
                name=profile["name"],
                size=stat.size if stat else 0,
                previous_size=stat.previous_size if stat else None,
                entered=stat.entered if stat else 0,
                exited=stat.exited if stat else 0,
                stability=stat.stability if stat else None,
            )
        )
    for sid, stat in sorted(stats.items()):
        if sid not in profiles and (stat.exited or stat.size):
            results.append(
                ClusterResult(
                    segment_id=sid,
                    cluster_id=sid.rsplit("_", 1)[-1],
                    name=sid,
                    size=stat.size,
                    previous_size=stat.previous_size,
                    entered=stat.entered,
                    exited=stat.exited,
                    stability=stat.stability,
                    status="retired",
                )
            )
    _write_catalog(spark, root, entry, profiles, results, as_of=as_of, run_id=run_id)
    return ClusterAssignReport(
        run_id=run_id,
        as_of=as_of,
        model_name=cfg.cluster.model_name,
        version=entry.version,
        users=sum(r.size for r in results),
        clusters=results,
    )


def _write_catalog(
    spark: SparkSession,
    root: str,
    entry,
    profiles: dict[str, dict],
    results: list[ClusterResult],
    *,
    as_of: datetime,
    run_id: str,
) -> None:
    """One gold/segment_catalog row per cluster (and per cluster retired by this version)."""
    overlaps = membership.overlap(spark, root, as_of=as_of)
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    rows = []
    for result in results:
        profile = profiles.get(result.segment_id)
        top = ", ".join(
            f"{t['direction']} {_label(t['feature'])}"
            for t in (profile or {}).get("top_features", [])
        )
        definition = (
            {
                "model_name": entry.model_name,
                "version": entry.version,
                "cluster_id": profile["stable_id"],
                "top_features": profile["top_features"],
                "mean": profile["mean"],
                "median": profile["median"],
            }
            if profile
            else {}
        )
        rows.append(
            {
                "as_of": as_of,
                "source": SOURCE,
                "segment_id": result.segment_id,
                "name": result.name,
                "description": f"Cluster {result.cluster_id} of model {entry.model_name}: {top}"
                if profile
                else f"no longer a cluster of model {entry.model_name} version {entry.version}",
                "tags": ["cluster", entry.model_name],
                "definition": json.dumps(definition, sort_keys=True),
                "definition_version": entry.version,
                "parent": None,
                "exclusive_group": f"cluster_{entry.model_name}",
                "priority": None,
                "min_size": None,
                "matched": result.size,
                "size": result.size,
                "status": result.status,
                "status_reason": None
                if result.status == "active"
                else f"not a cluster of version {entry.version}",
                "previous_size": result.previous_size,
                "entered": result.entered,
                "exited": result.exited,
                "stability": result.stability,
                "overlap": overlaps.get(result.segment_id) if result.size else None,
                "run_id": run_id,
                "recorded_at": now,
            }
        )
    membership.write_catalog(spark, root, rows)
