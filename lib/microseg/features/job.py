"""The `microseg features --as-of T` job: gold/user_features rows for one as-of time."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from microseg.core import lake, progress
from microseg.core.clock import naive_utc
from microseg.core.config import Config
from microseg.core.failpoints import durable
from microseg.core.runs import new_run_id
from microseg.features.point_in_time import features_as_of
from microseg.features.user_features import compute_features, keyed_events_before, select_features
from microseg.silver.consent import consented, read_history
from microseg.silver.sessions import run_sessionize


@dataclass
class FeaturesReport:
    run_id: str
    as_of: datetime
    users: int
    features: int


def run_features(
    spark: SparkSession,
    cfg: Config,
    *,
    as_of: datetime,
    run_id: str | None = None,
    from_scratch: bool = False,
    refresh_silver: bool = True,
) -> FeaturesReport:
    """Compute features as of `as_of` and replace that as-of's rows in gold/user_features.

    By default from silver (features.point_in_time), which is first brought up to date with
    bronze (an incremental sessionize; `refresh_silver=False` when the caller just did).
    `from_scratch` recomputes them from every event before as_of instead: the definition
    the default must equal, kept as a check.
    """
    root = cfg.lake.root
    if not lake.table_exists(spark, root, lake.EVENTS):
        raise FileNotFoundError(f"no bronze/events table under {root}: run `microseg ingest` first")
    as_of = naive_utc(as_of)
    features = select_features(cfg.features.include)
    run_id = run_id or new_run_id()
    sessions = cfg.sessions
    keyed_df = None
    if from_scratch:
        keyed_df = keyed_events_before(lake.read_table(spark, root, lake.EVENTS), as_of).persist()
        features_df = compute_features(
            keyed_df,
            as_of=as_of,
            features=features,
            inactivity_timeout=sessions.inactivity_timeout,
            max_session_length=sessions.max_session_length,
        )
    else:
        if refresh_silver:
            run_sessionize(spark, cfg, run_id=run_id)
        features_df = features_as_of(
            spark,
            root,
            as_of=as_of,
            features=features,
            inactivity_timeout=sessions.inactivity_timeout,
            max_session_length=sessions.max_session_length,
        )
    # users whose analytics consent does not hold at as_of get no features (nor segments,
    # clusters or scores, which read these)
    features_df = consented(
        features_df,
        read_history(spark, root),
        "analytics",
        as_of,
        default=cfg.privacy.consent.analytics_unknown == "granted",
    )
    progress.step(f"writing {lake.USER_FEATURES.name}")
    try:
        _write(features_df, root=root, as_of=as_of, run_id=run_id)
    finally:
        if keyed_df is not None:
            keyed_df.unpersist()
    users = lake.last_commit_rows(spark, root, lake.USER_FEATURES)
    return FeaturesReport(run_id=run_id, as_of=as_of, users=users, features=len(features))


def _write(features_df, *, root: str, as_of: datetime, run_id: str) -> None:
    """Replace the as-of's rows of gold/user_features with features_df (one commit)."""
    (
        features_df.select(
            "*",
            F.to_date("as_of").alias("as_of_date"),
            F.current_timestamp().alias("computed_at"),
            F.lit(run_id).alias("run_id"),
        )
        .write.format("delta")
        .mode("overwrite")
        .option("replaceWhere", f"as_of = TIMESTAMP '{as_of.isoformat(sep=' ')}'")
        .option("mergeSchema", "true")
        .partitionBy("as_of_date")
        .save(lake.table_path(root, lake.USER_FEATURES))
    )
    durable(lake.USER_FEATURES.name)
