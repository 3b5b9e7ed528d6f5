"""Point-in-time training rows: features of an as-of T (events before T) and labels from
the events in [T, T + horizon) only; the snapshots a training uses."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from microseg.core import lake
from microseg.core.clock import naive_utc
from microseg.core.config import Config
from microseg.features import snapshots
from microseg.features.job import run_features
from microseg.features.user_features import keyed_events_before
from microseg.ml.propensity.targets import HEURISTICS, LABEL, model_features, target_spec
from microseg.silver.keys import ANON_PREFIX
from microseg.silver.sessions import identity_map, with_user_key


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


@dataclass(frozen=True)
class SnapshotPlan:
    """The snapshots of one training: fit, then calibration (held out), then evaluation."""

    fit: list[datetime]
    calibration: datetime
    evaluation: datetime
    skipped: list[tuple[datetime, str]]  # candidate training as-ofs with no event before

    @property
    def training(self) -> list[datetime]:
        return [*self.fit, self.calibration]

    @property
    def every(self) -> list[datetime]:
        return [*self.fit, self.calibration, self.evaluation]

    def role(self, as_of: datetime) -> str:
        if as_of == self.evaluation:
            return "evaluation"
        return "calibration" if as_of == self.calibration else "fit"


def plan_snapshots(
    events_df: DataFrame,
    *,
    evaluation_as_of: datetime,
    horizon: timedelta,
    interval: timedelta,
    count: int,
) -> SnapshotPlan:
    """The training snapshots for evaluation as-of E (see training_snapshots), less those with
    no event before them; ValueError when E's label window is not complete (E + horizon after
    the latest event) or fewer than two training snapshots are left."""
    span = events_df.agg(F.min("event_time").alias("first"), F.max("event_time").alias("last"))
    first_event, last_event = span.first()
    if first_event is None:
        raise ValueError("bronze/events is empty")
    if evaluation_as_of + horizon > last_event:
        raise ValueError(
            f"the label window of as-of {evaluation_as_of.isoformat()} ends at "
            f"{(evaluation_as_of + horizon).isoformat()}, after the latest event "
            f"({last_event.isoformat()}): not complete; the latest usable evaluation as-of is "
            f"{(last_event - horizon).isoformat()}"
        )
    candidates = training_snapshots(
        evaluation_as_of, horizon=horizon, interval=interval, count=count
    )
    training_as_of = [t for t in candidates if t > first_event]
    if len(training_as_of) < 2:
        raise ValueError(
            f"training needs two snapshots with events before them (one to fit, one to "
            f"calibrate); as-ofs {[t.isoformat() for t in candidates]} leave "
            f"{len(training_as_of)} after the first event ({first_event.isoformat()}): use a "
            "later --as-of or fewer/closer propensity.snapshots"
        )
    return SnapshotPlan(
        fit=training_as_of[:-1],
        calibration=training_as_of[-1],
        evaluation=evaluation_as_of,
        skipped=[(t, "no events before it") for t in candidates if t <= first_event],
    )


def ensure_snapshots(
    spark: SparkSession, cfg: Config, as_ofs: list[datetime], *, run_id: str | None = None
) -> list[datetime]:
    """Compute with features.run_features (under `run_id`, the caller's run) the as-ofs that
    gold/user_features lacks (one query finds them); return those computed. Existing
    snapshots are reused as they are."""
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
            # silver is brought up to date once, before the first
            run_features(spark, cfg, as_of=as_of, run_id=run_id, refresh_silver=not computed)
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
    as_of = naive_utc(as_of)
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
