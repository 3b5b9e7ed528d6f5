"""Propensity targets: the configured target and features, the segment a target publishes,
the column names the models share and the recency/frequency heuristic of each kind."""

from __future__ import annotations

import re

from pyspark.sql import functions as F

from microseg.core.config import Config, ConfigError, PropensityConfig
from microseg.features.user_features import FEATURES, select_features

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
