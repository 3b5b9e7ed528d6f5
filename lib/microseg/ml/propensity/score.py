"""The scoring job (`microseg propensity score`): scores of every user as of T in
gold/propensity_scores, and the top share published as the target's segment."""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

from pyspark.ml import PipelineModel
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from microseg.core import lake
from microseg.core.config import Config, PropensityConfig
from microseg.features import snapshots
from microseg.ml import registry
from microseg.ml.propensity.labels import ensure_snapshots, naive_utc
from microseg.ml.propensity.targets import RAW_SCORE, SCORE, SOURCE, segment_id, target_spec
from microseg.segments import membership


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
    as_of = naive_utc(as_of)
    row = registry.get(spark, root, target, kind=SOURCE, version=version)
    model = PipelineModel.load(row.path)
    features = row.params["features"]
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
