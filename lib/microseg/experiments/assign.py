"""`microseg experiment assign --as-of T`: the members of each active experiment's target
segment at T get a variant, once.

A user's variant is GrowthBook's: the bucket is `hash(seed, user_key, hash_version)` and the
variant the range that holds it (microseg.experiments.hashing), so a GrowthBook SDK given
the same experiment (key/seed, variations, weights, coverage, namespace) and the user key as
its hash attribute picks the same variant. Before that, a share `holdout` of the eligible
users (by a second hash, seed `<seed>__holdout`) is kept out as the holdout group, and a
namespace, where set, admits only its users.

Sticky: gold/experiment_assignments is insert-once on (experiment, user). A user who leaves
the segment keeps the variant, a later run never re-assigns, and a bandit's new weights apply
to new users only. The store gets every assignment too, for `GET /users/{id}/experiments`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from microseg.core import lake
from microseg.core.config import Config
from microseg.core.failpoints import durable
from microseg.core.online_store import OnlineStore, Variant, open_store
from microseg.experiments.hashing import choose_variation_col, gb_hash_col, in_namespace_col
from microseg.experiments.model import Experiment, load_experiments, utc

STORE_WRITER = "batch:experiments"
HOLDOUT = "holdout"


def assignment_columns(
    key: Column, experiment: Experiment, weights: tuple[float, ...]
) -> tuple[Column, Column, Column, Column]:
    """(eligible, variant, variant_index, bucket) of a user key column; eligible is false for
    users outside the namespace or the coverage."""
    bucket = gb_hash_col(experiment.hash_seed, key, experiment.hash_version)
    index = choose_variation_col(bucket, experiment.ranges(weights))
    if experiment.holdout > 0:
        held = gb_hash_col(f"{experiment.hash_seed}__{HOLDOUT}", key, 2) < F.lit(experiment.holdout)
    else:
        held = F.lit(False)
    in_scope = in_namespace_col(key, experiment.namespace) if experiment.namespace else F.lit(True)
    names = F.array(*[F.lit(v) for v in experiment.variants])
    variant = F.when(held, F.lit(HOLDOUT)).otherwise(F.element_at(names, index + 1))
    variant_index = F.when(held, F.lit(-1)).otherwise(index)
    eligible = in_scope & (held | (index >= 0))
    return eligible, variant, variant_index, bucket


def assignments(
    users: DataFrame,
    experiment: Experiment,
    *,
    weights: tuple[float, ...],
    allocation_version: int,
    as_of: datetime,
    run_id: str,
) -> DataFrame:
    """The assignment rows of `users` (a frame with user_key) in gold/experiment_assignments'
    schema; users outside namespace or coverage get no row."""
    eligible, variant, index, bucket = assignment_columns(F.col("user_key"), experiment, weights)
    rows = users.select(
        F.lit(experiment.id).alias("experiment_id"),
        "user_key",
        variant.alias("variant"),
        index.alias("variant_index"),
        bucket.alias("bucket"),
        F.array(*[F.lit(float(w)) for w in weights]).alias("weights"),
        F.lit(allocation_version).alias("allocation_version"),
        F.lit(experiment.segment).alias("segment_id"),
        F.lit(experiment.version()).alias("definition_version"),
        F.lit(as_of).cast("timestamp").alias("assigned_at"),
        F.lit(run_id).alias("run_id"),
        eligible.alias("_eligible"),
    )
    return lake.conform(rows.filter("_eligible"), lake.EXPERIMENT_ASSIGNMENTS)


def segment_members_at(spark: SparkSession, root: str, segment_id: str, at: datetime) -> DataFrame:
    """User keys in `segment_id` at `at` (any source), from gold/segment_membership."""
    if not lake.table_exists(spark, root, lake.SEGMENT_MEMBERSHIP):
        return spark.createDataFrame([], "user_key string")
    at_col = F.lit(at).cast("timestamp")
    return (
        lake.read_table(spark, root, lake.SEGMENT_MEMBERSHIP)
        .filter(
            (F.col("segment_id") == segment_id)
            & (F.col("valid_from") <= at_col)
            & (F.col("valid_to").isNull() | (F.col("valid_to") > at_col))
        )
        .select("user_key")
        .distinct()
    )


def current_weights(
    spark: SparkSession, root: str, experiment: Experiment
) -> tuple[tuple[float, ...], int]:
    """The weights new users are assigned with, and their allocation version: the file's
    (version 0), or for a bandit its latest allocation (the file's until the first one)."""
    if experiment.allocation != "bandit" or not lake.table_exists(
        spark, root, lake.EXPERIMENT_ALLOCATIONS
    ):
        return experiment.fixed_weights(), 0
    rows = (
        lake.read_table(spark, root, lake.EXPERIMENT_ALLOCATIONS)
        .filter(F.col("experiment_id") == experiment.id)
        .select("version", "variant", "weight")
        .collect()
    )
    if not rows:
        return experiment.fixed_weights(), 0
    latest = max(r.version for r in rows)
    by_variant = {r.variant: r.weight for r in rows if r.version == latest}
    return tuple(by_variant[v] for v in experiment.variants), latest


@dataclass
class AssignReport:
    as_of: datetime
    run_id: str
    # experiment id -> variant -> users newly assigned in this run
    added: dict[str, dict[str, int]] = field(default_factory=dict)
    # experiment id -> variant -> users assigned in all
    total: dict[str, dict[str, int]] = field(default_factory=dict)
    inactive: list[str] = field(default_factory=list)
    store_synced: int = 0


def run_assign(
    spark: SparkSession,
    cfg: Config,
    *,
    as_of: datetime,
    run_id: str,
    path: str | None = None,
    store: OnlineStore | None = None,
) -> AssignReport:
    as_of = utc(as_of)
    root = cfg.lake.root
    experiments = load_experiments(cfg, path).experiments
    report = AssignReport(as_of, run_id)
    frames = []
    for experiment in experiments:
        if not experiment.active_at(as_of):
            report.inactive.append(experiment.id)
            continue
        weights, version = current_weights(spark, root, experiment)
        users = segment_members_at(spark, root, experiment.segment, as_of)
        frames.append(
            assignments(
                users,
                experiment,
                weights=weights,
                allocation_version=version,
                as_of=as_of,
                run_id=run_id,
            )
        )
    if frames:
        rows = frames[0]
        for frame in frames[1:]:
            rows = rows.unionByName(frame)
        lake.insert_new(
            spark, root, lake.EXPERIMENT_ASSIGNMENTS, rows, ("experiment_id", "user_key")
        )
    if not lake.table_exists(spark, root, lake.EXPERIMENT_ASSIGNMENTS):
        return report
    table = lake.read_table(spark, root, lake.EXPERIMENT_ASSIGNMENTS)
    for r in (
        table.groupBy("experiment_id", "variant", (F.col("run_id") == run_id).alias("new"))
        .count()
        .collect()
    ):
        report.total.setdefault(r.experiment_id, {}).setdefault(r.variant, 0)
        report.total[r.experiment_id][r.variant] += r["count"]
        if r.new:
            report.added.setdefault(r.experiment_id, {})[r.variant] = r["count"]
    own = store is None
    store = store or open_store(cfg)
    try:
        report.store_synced = sync_variants(spark, root, store)
    finally:
        if own:
            store.close()
    return report


def sync_variants(spark: SparkSession, root: str, store: OnlineStore) -> int:
    """Every assignment into the store (insert-once there too), marked with the table's
    version: a sync the store already has is skipped, and one cut short by a crash is
    completed by the next run. The number of assignments sent (0: already in the store)."""
    version = lake.table_version(spark, root, lake.EXPERIMENT_ASSIGNMENTS)
    marker = store.marker(STORE_WRITER)
    if version is None or (marker is not None and marker.batch >= version):
        return 0
    rows = lake.read_table(spark, root, lake.EXPERIMENT_ASSIGNMENTS).select(
        "user_key", "experiment_id", "variant", F.unix_micros("assigned_at").alias("at")
    )
    variants = [
        Variant(r.user_key, r.experiment_id, r.variant, r.at) for r in rows.toLocalIterator()
    ]
    store.add_variants(STORE_WRITER, version, variants)
    durable(f"store {STORE_WRITER}")
    return len(variants)
