"""Why a user got their propensity score: exact TreeSHAP over the Spark GBT's trees (or, when
the registry serves the logistic regression, its exact linear SHAP values).

The GBT of a saved propensity PipelineModel is read back from its own files (the stage's
`data` Parquet: one row per node with its split, prediction and weighted count; the tree
weights from the model) into shap's custom-tree form, and shap's TreeExplainer computes the
path-dependent TreeSHAP values, exactly, for every user.

Spark's GBT margin is m(x) = sum_i w_i tree_i(x) and its probability 1 / (1 + e^(-2m)), so
the trees' values are taken as 2 w_i prediction: the contributions are in log-odds of the
GBT's uncalibrated probability, and base + sum of a user's contributions = logit(raw_score)
exactly. The calibration after it is monotone: it keeps the order the contributions explain,
not their scale. Each node's cover is its weighted training count (the class weights the GBT
was fitted with), as shap's own reader of Spark trees takes it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
from pyspark.ml import PipelineModel
from pyspark.ml.classification import GBTClassificationModel, LogisticRegressionModel
from pyspark.ml.functions import vector_to_array
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from microseg.core.schemas import PROPENSITY_SCORES

REASONS = "reasons"
REASONS_TYPE = PROPENSITY_SCORES[REASONS].dataType  # array<struct<feature, value, contribution>>
ASSEMBLED = "features"  # what the classifier reads: imputed (GBT) or also standardized (LR)
UNSCALED = "raw_features"  # the logistic regression pipeline's imputed, unscaled features
_X = "_explained_x"
_SHOWN = "_shown_x"


@dataclass(frozen=True)
class LinearModel:
    """A logistic regression on standardized features: its SHAP values are exact and closed
    form, coefficient x standardized value (the scaler centres on the training mean, where
    the standardized features average 0), and the base is the intercept."""

    features: tuple[str, ...]
    coefficients: tuple[float, ...]
    intercept: float
    shown: str = UNSCALED

    def explainer(self) -> LinearModel:
        return self

    def shap_values(self, x: np.ndarray, check_additivity: bool = False) -> np.ndarray:
        return np.asarray(x, dtype=np.float64) * np.asarray(self.coefficients)

    def contributions(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        return self.shap_values(x), self.intercept


@dataclass(frozen=True)
class TreeEnsemble:
    """A GBT's trees in shap's custom-tree form; values in log-odds."""

    features: tuple[str, ...]
    trees: tuple[dict, ...]
    shown: str = ASSEMBLED

    def shap_model(self) -> dict:
        return {
            "trees": list(self.trees),
            "base_offset": 0.0,
            "tree_output": "log_odds",
            "objective": "binary_crossentropy",
            "input_dtype": np.float64,
            "internal_dtype": np.float64,
        }

    def explainer(self):
        import shap  # imported here: numba's start-up is paid only where explanations run

        return shap.TreeExplainer(self.shap_model(), feature_perturbation="tree_path_dependent")

    def contributions(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        """(per row and feature: the SHAP value in log-odds, the base value)."""
        explainer = self.explainer()
        values = explainer.shap_values(np.asarray(x, dtype=np.float64), check_additivity=False)
        return np.asarray(values), float(np.ravel(explainer.expected_value)[0])


def gbt_stage(model: PipelineModel) -> tuple[int, GBTClassificationModel]:
    for index, stage in enumerate(model.stages):
        if isinstance(stage, GBTClassificationModel):
            return index, stage
    raise ValueError("the propensity model has no GBT stage to explain")


def read_explainer(
    spark: SparkSession, model: PipelineModel, path: str, features: list[str]
) -> TreeEnsemble | LinearModel:
    """What explains the saved propensity model at `path`: its GBT's trees, or its logistic
    regression's coefficients."""
    for stage in model.stages:
        if isinstance(stage, LogisticRegressionModel):
            return LinearModel(
                tuple(features),
                tuple(float(c) for c in stage.coefficients.toArray()),
                float(stage.intercept),
            )
    return read_ensemble(spark, model, path, features)


def read_ensemble(
    spark: SparkSession, model: PipelineModel, path: str, features: list[str]
) -> TreeEnsemble:
    """The GBT of the PipelineModel saved at `path` (`model` is that model, loaded)."""
    index, gbt = gbt_stage(model)
    nodes = (
        spark.read.parquet(f"{path}/stages/{index}_{gbt.uid}/data")
        .select("treeID", "nodeData.*")
        .collect()
    )
    by_tree: dict[int, list] = {}
    for node in nodes:
        by_tree.setdefault(node.treeID, []).append(node)
    weights = gbt.treeWeights
    trees = []
    for tree_id in sorted(by_tree):
        rows = sorted(by_tree[tree_id], key=lambda n: n.id)
        if [n.id for n in rows] != list(range(len(rows))):
            raise ValueError(f"GBT tree {tree_id} under {path}: node ids are not 0..n-1")
        leaf = [n.leftChild < 0 for n in rows]
        categorical = [
            n.id
            for n, is_leaf in zip(rows, leaf, strict=True)
            if not is_leaf and n.split.numCategories >= 0
        ]
        if categorical:
            raise ValueError(f"GBT tree {tree_id}: categorical splits cannot be explained")
        left = np.array([n.leftChild for n in rows], dtype=np.int32)
        trees.append(
            {
                "children_left": left,
                "children_right": np.array([n.rightChild for n in rows], dtype=np.int32),
                "children_default": left.copy(),
                "features": np.array(
                    [
                        -2 if is_leaf else n.split.featureIndex
                        for n, is_leaf in zip(rows, leaf, strict=True)
                    ],
                    dtype=np.int32,
                ),
                "thresholds": np.array(
                    [
                        0.0 if is_leaf else n.split.leftCategoriesOrThreshold[0]
                        for n, is_leaf in zip(rows, leaf, strict=True)
                    ],
                    dtype=np.float64,
                ),
                "values": np.array(
                    [[2.0 * weights[tree_id] * n.prediction] for n in rows], dtype=np.float64
                ),
                "node_sample_weight": np.array(
                    [n.impurityStats[0] for n in rows], dtype=np.float64
                ),
            }
        )
    return TreeEnsemble(tuple(features), tuple(trees))


def with_inputs(transformed_df: DataFrame, *columns: str, shown: str | None = None) -> DataFrame:
    """`columns` of transformed_df (the propensity model's output), the classifier's inputs
    as an array column (what the explanation is computed on) and, with `shown`, that vector
    column as the values the reasons show (the features after imputation)."""
    extra = [] if shown is None else [vector_to_array(F.col(shown)).alias(_SHOWN)]
    return transformed_df.select(*columns, vector_to_array(F.col(ASSEMBLED)).alias(_X), *extra)


def top_reasons(
    values: np.ndarray, x: np.ndarray, features: tuple[str, ...], top: int
) -> list[list[dict]]:
    """Per row: the `top` features by |contribution|, largest first (ties: feature order),
    leaving out features that contribute nothing."""
    order = np.argsort(-np.abs(values), axis=1, kind="stable")[:, :top]
    return [
        [
            {"feature": features[j], "value": float(x[i, j]), "contribution": float(values[i, j])}
            for j in order[i]
            if values[i, j] != 0.0
        ]
        for i in range(values.shape[0])
    ]


def explain(scored_df: DataFrame, ensemble: TreeEnsemble | LinearModel, *, top: int) -> DataFrame:
    """scored_df (from with_inputs, shown=ensemble.shown) without the input columns and with
    `reasons`: the user's `top` features by the size of their SHAP value, each with the
    feature's value (after imputation) and its contribution in log-odds. Computed in the
    Python workers, one explainer per task."""
    hidden = (_X, _SHOWN)
    keep = [c for c in scored_df.columns if c not in hidden]
    schema = T.StructType(
        [f for f in scored_df.schema.fields if f.name not in hidden]
        + [T.StructField(REASONS, REASONS_TYPE, False)]
    )
    features = ensemble.features
    shown = _SHOWN if _SHOWN in scored_df.columns else _X

    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        explainer = None
        for pdf in batches:
            if pdf.empty:
                continue
            if explainer is None:
                explainer = ensemble.explainer()
            x = np.stack(pdf[_X].to_numpy()).astype(np.float64)
            values = np.asarray(explainer.shap_values(x, check_additivity=False))
            out = pdf[keep].copy()
            out[REASONS] = top_reasons(
                values, np.stack(pdf[shown].to_numpy()).astype(np.float64), features, top
            )
            yield out

    return scored_df.mapInPandas(run, schema)


def global_importance(values: np.ndarray, features: tuple[str, ...]) -> list[tuple[str, float]]:
    """(feature, mean |SHAP value| in log-odds) over the rows, largest first."""
    means = np.abs(values).mean(axis=0) if values.size else np.zeros(len(features))
    return sorted(
        ((f, float(m)) for f, m in zip(features, means, strict=True)), key=lambda fm: -fm[1]
    )
