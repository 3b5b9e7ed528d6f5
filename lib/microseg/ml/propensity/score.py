"""The scoring job (`microseg propensity score`): scores of every user as of T in
gold/propensity_scores, and the top share published as the target's segment."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

from pyspark.ml import PipelineModel
from pyspark.sql import SparkSession, Window
from pyspark.sql import functions as F

from microseg.core import lake
from microseg.core.clock import naive_utc
from microseg.core.config import Config, PropensityConfig
from microseg.core.failpoints import durable
from microseg.core.runs import new_run_id
from microseg.features import snapshots
from microseg.ml import registry
from microseg.ml.propensity.explain import (
    REASONS,
    REASONS_TYPE,
    explain,
    read_explainer,
    with_inputs,
)
from microseg.ml.propensity.labels import ensure_snapshots
from microseg.ml.propensity.targets import RAW_SCORE, SCORE, SOURCE, segment_id, target_spec
from microseg.segments import membership, online
from microseg.segments.catalog import CatalogRow, write_catalog
from microseg.segments.membership import Scope


def load_model(
    spark: SparkSession, cfg: Config, *, target: str, version: str | None = None
) -> tuple[PipelineModel, str]:
    """The saved PipelineModel of a version (default: the latest) and its version id."""
    entry = registry.get(spark, cfg.lake.root, target, kind=SOURCE, version=version)
    return PipelineModel.load(entry.path), entry.version


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


def score_propensity(
    spark: SparkSession,
    cfg: Config,
    *,
    target: str,
    as_of: datetime,
    version: str | None = None,
    run_id: str | None = None,
) -> PropensityScoreReport:
    """Score every user with features at as_of, replace the target's rows of that as-of in
    gold/propensity_scores, and publish the top share as segment `segment_id(target, ...)`
    (scope: source "propensity", the target; other targets' segments are left as they are)."""
    root = cfg.lake.root
    spec = target_spec(cfg, target)
    as_of = naive_utc(as_of)
    row = registry.get(spark, root, target, kind=SOURCE, version=version)
    model = PipelineModel.load(row.path)
    features = row.params["features"]
    run_id = run_id or new_run_id()
    computed = bool(ensure_snapshots(spark, cfg, [as_of], run_id=run_id))
    features_df = snapshots.snapshot(spark, cfg.lake.root, as_of, columns=features, require=False)
    order = Window.orderBy(F.desc(RAW_SCORE), F.asc("user_key"))
    transformed_df = model.transform(features_df)
    if cfg.propensity.reasons:
        explainer = read_explainer(spark, model, row.path, features)
        scored_df = explain(
            with_inputs(transformed_df, "user_key", SCORE, RAW_SCORE, shown=explainer.shown),
            explainer,
            top=cfg.propensity.reasons,
        )
    else:
        scored_df = transformed_df.select(
            "user_key", SCORE, RAW_SCORE, F.lit(None).cast(REASONS_TYPE).alias(REASONS)
        )
    ranked_df = scored_df.withColumn("rank", F.row_number().over(order).cast("long")).persist()
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
        REASONS,
        F.lit(run_id).alias("run_id"),
        F.current_timestamp().alias("scored_at"),
    )
    lake.ensure_table(spark, root, lake.PROPENSITY_SCORES)
    (
        lake.conform(scores_df, lake.PROPENSITY_SCORES)
        .write.format("delta")
        .mode("overwrite")
        .option("mergeSchema", "true")  # a table written before `reasons` existed gains it
        .option(
            "replaceWhere",
            f"as_of_date = DATE '{as_of.date().isoformat()}' AND model_name = '{target}' "
            f"AND as_of = TIMESTAMP '{as_of.isoformat(sep=' ')}'",
        )
        .save(lake.table_path(root, lake.PROPENSITY_SCORES))
    )
    durable(lake.PROPENSITY_SCORES.name)

    segment = segment_id(target, cfg.propensity.top_share)
    top = math.ceil(cfg.propensity.top_share * users)
    members_df = ranked_df.filter(F.col("rank") <= top).select(
        "user_key", F.lit(segment).alias("segment_id"), SCORE, F.lit(False).alias("fallback")
    )
    scope = Scope(SOURCE, target)
    stats = membership.write_membership(
        spark,
        root,
        scope=scope,
        as_of=as_of,
        run_id=run_id,
        members_df=members_df,
        versions={segment: row.version},
    )
    online.publish(spark, cfg, scope)
    min_score = ranked_df.filter(F.col("rank") <= top).agg(F.min(SCORE)).first()[0]
    ranked_df.unpersist()
    stat = stats.get(segment)
    write_catalog(
        spark,
        root,
        [
            _catalog_row(
                cfg,
                spec,
                scope,
                segment,
                row.version,
                stats,
                membership.overlap(spark, root, as_of=as_of),
                top,
                as_of=as_of,
                run_id=run_id,
            )
        ],
        update_unchanged=True,
    )
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
    )


def _catalog_row(
    cfg: Config,
    spec: PropensityConfig.Target,
    scope: Scope,
    segment: str,
    version: str,
    stats: dict[str, membership.SegmentStats],
    overlaps: dict[str, dict[str, float]],
    matched: int,
    *,
    as_of: datetime,
    run_id: str,
) -> CatalogRow:
    """The gold/segment_catalog row of the target's top-share segment."""
    share = cfg.propensity.top_share
    what = "likely buyers" if spec.kind == "purchase" else "churn risk among buyers"
    days = spec.horizon.total_seconds() / 86400
    return CatalogRow.of(
        scope,
        segment,
        stats.get(segment),
        as_of=as_of,
        run_id=run_id,
        definition={
            "target": scope.name,
            "kind": spec.kind,
            "horizon_days": days,
            "top_share": share,
        },
        overlaps=overlaps,
        name=f"{what.capitalize()}, next {days:g} days (top {share:.0%})",
        description=(
            f"Top {share:.1%} of users by calibrated {scope.name} propensity "
            f"({spec.kind} within {days:g} days of the as-of time)"
        ),
        tags=("propensity", scope.name),
        definition_version=version,
        matched=matched,
        status="active",
    )
