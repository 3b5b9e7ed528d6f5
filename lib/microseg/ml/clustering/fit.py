"""Fitting a cluster model: the k search on the materialized scaled vectors, the final fit, the
per-cluster profiles and the stable ids, assembled into one PipelineModel."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.clustering import GaussianMixtureModel, KMeansSummary
from pyspark.ml.evaluation import ClusteringEvaluator
from pyspark.ml.feature import StandardScalerModel
from pyspark.ml.functions import vector_to_array
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from sklearn.metrics import silhouette_score

from microseg.core.config import ClusterConfig
from microseg.ml.clustering.matching import identify, rounded
from microseg.ml.clustering.pipeline import cluster_estimator, feature_stages, space_column
from microseg.ml.clustering.steps import (
    CLUSTER_ID,
    DISTANCE,
    INDEX,
    RAW_VECTOR,
    SEGMENT_ID,
    ClusterLabeler,
)


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
        """Unpersist the cached predictions (assignments_df is unusable after)."""
        for df in self._cached:
            df.unpersist()


SPARK_SILHOUETTE = {"squared_euclidean": "squaredEuclidean", "cosine": "cosine"}


def centers(model) -> list[list[float]]:
    """Cluster centres in the clustering space: KMeans' centroids, GaussianMixture's means."""
    if isinstance(model, GaussianMixtureModel):
        return [[float(x) for x in g.mean.toArray()] for g in model.gaussians]
    return [[float(x) for x in c] for c in model.clusterCenters()]


def euclidean_silhouette(
    predictions_df: DataFrame, settings: ClusterConfig, *, rows: int
) -> float | None:
    """The mean silhouette with Euclidean distances (scikit-learn's silhouette_score) on a
    seeded random sample of about silhouette_sample_rows rows, pulled to the driver; None
    when the sample holds fewer than two clusters."""
    sample_df = predictions_df.select(
        vector_to_array(F.col(space_column(settings))).alias("_v"), INDEX
    )
    if rows > settings.silhouette_sample_rows:
        sample_df = sample_df.sample(
            fraction=settings.silhouette_sample_rows / rows, seed=settings.seed
        )
    sample = sample_df.toPandas()
    labels = sample[INDEX].to_numpy()
    if len(set(labels.tolist())) < 2 or len(labels) < 3:
        return None
    vectors = np.stack(sample["_v"].to_numpy())
    return float(silhouette_score(vectors, labels, metric="euclidean"))


def silhouette(
    model, predictions_df: DataFrame, settings: ClusterConfig, *, rows: int
) -> float | None:
    """The cluster.silhouette of a fit; None when fewer than two clusters have members."""
    if sum(1 for size in model.summary.clusterSizes if size > 0) < 2:
        return None
    if settings.silhouette == "euclidean":
        return euclidean_silhouette(predictions_df, settings, rows=rows)
    evaluator = ClusteringEvaluator(
        featuresCol=space_column(settings),
        predictionCol=INDEX,
        metricName="silhouette",
        distanceMeasure=SPARK_SILHOUETTE[settings.silhouette],
    )
    return float(evaluator.evaluate(predictions_df))


def wcss(model, predictions_df: DataFrame, settings: ClusterConfig) -> float:
    """Within-cluster sum of squared Euclidean distances to the centres: KMeans' training
    cost, computed for the others."""
    if isinstance(model.summary, KMeansSummary):
        return float(model.summary.trainingCost)
    table = F.array(*(F.array(*(F.lit(x) for x in c)) for c in centers(model)))
    squared = F.aggregate(
        F.zip_with(
            vector_to_array(F.col(space_column(settings))),
            table[F.col(INDEX)],
            lambda x, c: (x - c) * (x - c),
        ),
        F.lit(0.0),
        lambda acc, d: acc + d,
    )
    return float(predictions_df.select(F.sum(squared)).first()[0] or 0.0)


def search_k(
    vectors_df: DataFrame, settings: ClusterConfig, *, rows: int
) -> tuple[list[KScore], dict[int, Any], int]:
    """Fit every k on a sample (all rows if there are at most search_sample_rows):
    (scores, the models fitted on all rows keyed by k, sample rows)."""
    if rows > settings.search_sample_rows:
        sample_df = vectors_df.sample(
            fraction=settings.search_sample_rows / rows, seed=settings.seed
        ).localCheckpoint(eager=True)
        sample_rows = sample_df.count()
    else:
        sample_df, sample_rows = vectors_df, rows
    scores, full_models = [], {}
    for k in range(settings.k_min, settings.k_max + 1):
        if k >= sample_rows:
            break
        model = cluster_estimator(settings, k).fit(sample_df)
        predictions_df = model.transform(sample_df)
        scores.append(
            KScore(
                k,
                silhouette(model, predictions_df, settings, rows=sample_rows),
                wcss(model, predictions_df, settings),
            )
        )
        if sample_df is vectors_df:
            full_models[k] = model
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
            f: rounded((centroid[f] - mean_vec[i]) / std_vec[i]) if std_vec[i] > 0 else 0.0
            for i, f in enumerate(features)
        }
        profile.update(
            size=row["_size"],
            share=rounded(row["_size"] / total),
            mean={f: rounded(row[f"_mean{i}"]) for i, f in enumerate(features)},
            median={f: rounded(row[f"_median{i}"]) for i, f in enumerate(features)},
            z=z,
            centroid={f: rounded(v) for f, v in centroid.items()},
            top_features=[
                {"feature": f, "z": v, "direction": "high" if v > 0 else "low"}
                for f, v in sorted(z.items(), key=lambda fv: (-abs(fv[1]), fv[0]))[:3]
            ],
        )
        profiles.append(profile)
    return profiles


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
    # materialized once, but not cached: KMeans then persists its own RDD of vectors for a
    # fit, where a cached DataFrame would be converted to vectors again on every pass (3.6x
    # slower at 1M rows, bench/ml_bench.py variants kmeans-cached and kmeans-checkpointed)
    vectors_df = (
        prep_model.transform(features_df)
        .select("user_key", *settings.features, RAW_VECTOR, space)
        .localCheckpoint(eager=True)
    )
    rows = vectors_df.count()
    scores, full_models, sample_rows = search_k(vectors_df, settings, rows=rows)
    k = best_k(scores)
    if k in full_models:  # the search ran on all rows
        cluster_model = full_models[k]
        predictions_df = cluster_model.transform(vectors_df).persist()
        score = next(s for s in scores if s.k == k)
        fit_silhouette, fit_wcss = score.silhouette, score.wcss
    else:
        cluster_model = cluster_estimator(settings, k).fit(vectors_df)
        predictions_df = cluster_model.transform(vectors_df).persist()
        fit_silhouette = silhouette(cluster_model, predictions_df, settings, rows=rows)
        fit_wcss = wcss(cluster_model, predictions_df, settings)
    scaler = next(s for s in prep_model.stages if isinstance(s, StandardScalerModel))
    profiles = _profiles(predictions_df, settings, scaler, k)
    matching = identify(profiles, settings, scaler, previous, next_number)
    labeler = ClusterLabeler(
        featuresCol=space,
        predictionCol=INDEX,
        stableIds=[p["stable_id"] for p in profiles],
        names=[p["name"] for p in profiles],
        centers=centers(cluster_model),
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
        silhouette=fit_silhouette,
        wcss=fit_wcss,
        users=rows,
        sample_rows=sample_rows,
        profiles=profiles,
        matching=matching,
        assignments_df=assignments_df,
        _cached=[predictions_df],
    )
