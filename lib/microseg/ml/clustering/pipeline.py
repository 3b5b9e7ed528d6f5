"""The unfitted cluster pipeline: cluster.* checked against the computed features, the
null-filling rules, the feature stages and the KMeans or BisectingKMeans estimator."""

from __future__ import annotations

from pyspark.errors import AnalysisException, ParseException
from pyspark.ml import Pipeline, Transformer
from pyspark.ml.clustering import BisectingKMeans, GaussianMixture, KMeans
from pyspark.ml.feature import PCA, StandardScaler, VectorAssembler
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from microseg.core.config import ClusterConfig, Config, ConfigError
from microseg.features.user_features import FEATURES, select_features
from microseg.ml.clustering.steps import (
    INDEX,
    LOG_PREFIX,
    PROBABILITY,
    PROJECTED,
    RAW_VECTOR,
    SCALED,
    FillMissing,
    Log1p,
)

# null -> the value of another feature; every other null is filled with 0
FILL_FROM = {"days_since_last_purchase": "tenure_days"}
FILL_FROM_FALLBACK = {"days_since_last_purchase": 365.0}  # when the other feature is absent


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


def population(features_df: DataFrame, chosen: ClusterConfig.Population) -> DataFrame:
    """The users of features_df a model is trained on and assigns (cluster.population);
    ConfigError naming the key when `where` does not parse or names an unknown column."""
    if chosen.active_within_days is not None:
        if "days_since_last_event" not in features_df.columns:
            raise ConfigError(
                "cluster.population.active_within_days needs days_since_last_event in "
                "gold/user_features (features.include)"
            )
        features_df = features_df.filter(
            F.col("days_since_last_event") <= F.lit(chosen.active_within_days)
        )
    if chosen.where:
        try:
            features_df = features_df.filter(F.expr(chosen.where))
            features_df.schema  # noqa: B018 - analyzed here, so a bad column fails now
        except (ParseException, AnalysisException) as exc:
            reason = str(exc).strip().splitlines()[0]
            raise ConfigError(f"cluster.population.where {chosen.where!r}: {reason}") from exc
    return features_df


def population_text(chosen: ClusterConfig.Population) -> str:
    parts = []
    if chosen.active_within_days is not None:
        parts.append(f"last event within {chosen.active_within_days:g} days")
    if chosen.where:
        parts.append(chosen.where)
    return " and ".join(parts) or "everyone"


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
            withMean=settings.algorithm != "bisecting_kmeans",
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
    if settings.algorithm == "gaussian_mixture":
        return GaussianMixture(**common, probabilityCol=PROBABILITY)
    return KMeans(**common, initSteps=settings.init_steps, initMode="k-means||")


def build_pipeline(
    settings: ClusterConfig, fill: dict[str, tuple[str, float]], *, k: int
) -> Pipeline:
    """The whole unfitted pipeline for one k (train_clusters fits the feature stages once and
    the clusterer per k on the cached vectors instead, then appends a ClusterLabeler)."""
    return Pipeline(stages=[*feature_stages(settings, fill), cluster_estimator(settings, k)])
