"""The scorers a propensity training fits: the GBT pipeline, the logistic-regression
baseline, class weights and the validation splits by user."""

from __future__ import annotations

from pyspark.ml import Pipeline
from pyspark.ml.classification import GBTClassifier, LogisticRegression
from pyspark.ml.feature import Imputer, StandardScaler, VectorAssembler
from pyspark.sql import Column
from pyspark.sql import functions as F

from microseg.ml.propensity.targets import LABEL, WEIGHT


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


def in_user_holdout(train_ratio: float, seed: int) -> Column:
    """True for the rows of about 1 - train_ratio of the users (by a hash of user_key): the
    validation side of a split that keeps every snapshot of a user on one side."""
    return F.pmod(F.xxhash64(F.col("user_key"), F.lit(seed)), F.lit(10_000)) >= F.lit(
        round(train_ratio * 10_000)
    )


def class_weights(positives: int, negatives: int) -> tuple[float, float]:
    """(negative weight, positive weight) so that both classes weigh half of the rows."""
    rows = positives + negatives
    return rows / (2.0 * negatives), rows / (2.0 * positives)
