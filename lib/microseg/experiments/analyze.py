"""`microseg experiment analyze --as-of T`: exposures, outcomes and the statistics per variant.

- Exposure: an assigned user's first session (silver/sessions) that starts at or after the
  assignment, before T and before the experiment's end. gold/exposures is insert-once, so an
  exposure never moves.
- Outcome: sessions from the exposure for `metrics.window` (cut at T): converted (a session
  with a purchase) and revenue. Covariate for CUPED: revenue in `metrics.pre_period` before
  the assignment.
- Per variant against the control (the first variant): conversion rate, relative lift and
  the difference with confidence intervals, the two-proportion z-test, Welch's test of
  revenue per user raw and after CUPED; over all variants a chi-square test of conversion by
  variant and the sample ratio mismatch check of assigned counts against the weights each user
  was assigned under (flagged below `metrics.srm_threshold`). Rows go to
  gold/experiment_results (a rerun at the same T replaces them).
- A bandit experiment then gets a new allocation version: Thompson sampling on the exposed
  users' conversions (gold/experiment_allocations); `experiment assign` uses it for new users.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from microseg.core import lake
from microseg.core.config import Config
from microseg.core.failpoints import durable
from microseg.experiments import stats
from microseg.experiments.assign import HOLDOUT
from microseg.experiments.model import Experiment, load_experiments, utc


def first_exposures(
    assignments: DataFrame, sessions: DataFrame, experiment: Experiment, as_of: datetime
) -> DataFrame:
    """(experiment_id, user_key, variant, exposed_at, session_id) of assigned users with a
    session in [assigned_at, min(as_of, end))."""
    until = min(as_of, experiment.end) if experiment.end else as_of
    joined = assignments.alias("a").join(
        sessions.alias("s"),
        (F.col("a.user_key") == F.col("s.user_key"))
        & (F.col("s.session_start") >= F.col("a.assigned_at"))
        & (F.col("s.session_start") < F.lit(until).cast("timestamp")),
    )
    first = F.min(F.struct(F.col("s.session_start").alias("t"), F.col("s.session_id").alias("id")))
    return (
        joined.groupBy("a.experiment_id", "a.user_key", "a.variant")
        .agg(first.alias("first"))
        .select(
            "experiment_id",
            "user_key",
            "variant",
            F.col("first.t").alias("exposed_at"),
            F.col("first.id").alias("session_id"),
        )
    )


def user_outcomes(
    exposures: DataFrame,
    assignments: DataFrame,
    sessions: DataFrame,
    experiment: Experiment,
    as_of: datetime,
) -> DataFrame:
    """Per exposed user: variant, converted (0/1), revenue in the window, pre_revenue."""
    window_s = int(experiment.metrics.window.total_seconds())
    pre_s = int(experiment.metrics.pre_period.total_seconds())
    as_of_col = F.lit(as_of).cast("timestamp")
    users = exposures.join(assignments.select("user_key", "assigned_at"), "user_key")
    s = sessions.select("user_key", "session_start", "has_purchase", "revenue")
    in_window = (
        (F.col("session_start") >= F.col("exposed_at"))
        & (F.col("session_start") < F.col("exposed_at") + F.expr(f"INTERVAL {window_s} SECONDS"))
        & (F.col("session_start") < as_of_col)
    )
    in_pre = (F.col("session_start") < F.col("assigned_at")) & (
        F.col("session_start") >= F.col("assigned_at") - F.expr(f"INTERVAL {pre_s} SECONDS")
    )
    return (
        users.join(s, "user_key", "left")
        .groupBy("user_key", "variant")
        .agg(
            F.max(F.when(in_window & F.col("has_purchase"), 1).otherwise(0)).alias("converted"),
            F.sum(F.when(in_window, F.col("revenue")).otherwise(0.0)).alias("revenue"),
            F.sum(F.when(in_pre, F.col("revenue")).otherwise(0.0)).alias("pre_revenue"),
        )
    )


def variant_moments(outcomes: DataFrame) -> dict[str, tuple[int, stats.Moments]]:
    """variant -> (conversions, revenue moments with the pre-period covariate)."""
    y, x = F.col("revenue"), F.col("pre_revenue")
    rows = (
        outcomes.groupBy("variant")
        .agg(
            F.count("*").alias("n"),
            F.sum("converted").alias("conversions"),
            F.sum(y).alias("sy"),
            F.sum(y * y).alias("syy"),
            F.sum(x).alias("sx"),
            F.sum(x * x).alias("sxx"),
            F.sum(x * y).alias("sxy"),
        )
        .collect()
    )
    return {
        r.variant: (
            int(r.conversions),
            stats.Moments(int(r.n), r.sy, r.syy, r.sx, r.sxx, r.sxy),
        )
        for r in rows
    }


def assigned_counts(assignments: DataFrame) -> tuple[dict[str, int], dict[int, float]]:
    """Assigned users per variant, and per variant index the count the weights expect (each
    user adds the share of every variant under the weights they were assigned with)."""
    counts = {r.variant: r["count"] for r in assignments.groupBy("variant").count().collect()}
    expected = (
        assignments.filter(F.col("variant") != HOLDOUT)
        .select(
            F.posexplode("weights").alias("i", "w"),
            F.aggregate("weights", F.lit(0.0), lambda a, w: a + w).alias("total"),
        )
        .groupBy("i")
        .agg(F.sum(F.col("w") / F.col("total")).alias("expected"))
        .collect()
    )
    return counts, {r.i: r.expected for r in expected}


@dataclass
class VariantResult:
    variant: str
    is_control: bool
    assigned: int
    expected_share: float | None
    exposed: int
    conversions: int
    conversion_rate: float | None
    revenue_per_user: float | None
    z: stats.ZTest | None = None
    revenue: stats.MeanTest | None = None
    cuped: stats.Cuped | None = None


@dataclass
class ExperimentResult:
    experiment: Experiment
    as_of: datetime
    variants: list[VariantResult]
    chi2_p_value: float
    srm_p_value: float
    srm_flag: bool
    allocation: dict[str, float] | None = None  # a bandit's new weights
    allocation_version: int | None = None


def analyze_experiment(
    experiment: Experiment,
    as_of: datetime,
    moments: dict[str, tuple[int, stats.Moments]],
    counts: dict[str, int],
    expected: dict[int, float],
) -> ExperimentResult:
    """The statistics of one experiment from its aggregates (no Spark)."""
    alpha = experiment.metrics.alpha
    empty = (0, stats.Moments(0, 0.0, 0.0))
    total_expected = sum(expected.values())
    results = []
    control_conv, control = moments.get(experiment.control, empty)
    for index, name in enumerate([*experiment.variants, HOLDOUT]):
        if name == HOLDOUT and name not in counts:
            continue
        conv, m = moments.get(name, empty)
        share = expected.get(index) / total_expected if name != HOLDOUT and total_expected else None
        result = VariantResult(
            variant=name,
            is_control=name == experiment.control,
            assigned=counts.get(name, 0),
            expected_share=share,
            exposed=m.n,
            conversions=conv,
            conversion_rate=conv / m.n if m.n else None,
            revenue_per_user=m.mean if m.n else None,
        )
        if name != experiment.control and m.n and control.n:
            result.z = stats.two_proportion_ztest(control_conv, control.n, conv, m.n, alpha=alpha)
            result.revenue = stats.welch(control, m, alpha=alpha)
            result.cuped = stats.cuped(control, m, alpha=alpha)
        results.append(result)
    arms = [r for r in results if r.variant != HOLDOUT and r.exposed]
    _, chi2_p = stats.chi_square_independence(
        [[r.conversions, r.exposed - r.conversions] for r in arms]
    )
    observed = [counts.get(v, 0) for v in experiment.variants]
    shares = [expected.get(i, 0.0) for i in range(len(experiment.variants))]
    srm_p = stats.sample_ratio_mismatch(observed, shares) if total_expected else math.nan
    return ExperimentResult(
        experiment,
        as_of,
        results,
        chi2_p,
        srm_p,
        bool(srm_p < experiment.metrics.srm_threshold) if not math.isnan(srm_p) else False,
    )


def _nan_none(value: float | None) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def result_rows(result: ExperimentResult, run_id: str, analyzed_at: datetime) -> list[dict]:
    rows = []
    for v in result.variants:
        z, rev, cu = v.z, v.revenue, v.cuped
        row = {
            "experiment_id": result.experiment.id,
            "as_of": result.as_of,
            "variant": v.variant,
            "is_control": v.is_control,
            "assigned": v.assigned,
            "expected_share": v.expected_share,
            "exposed": v.exposed,
            "conversions": v.conversions,
            "conversion_rate": v.conversion_rate,
            "revenue_per_user": v.revenue_per_user,
            "lift": z and z.lift,
            "lift_ci_low": z and z.lift_ci[0],
            "lift_ci_high": z and z.lift_ci[1],
            "diff": z and z.diff,
            "diff_ci_low": z and z.diff_ci[0],
            "diff_ci_high": z and z.diff_ci[1],
            "z": z and z.z,
            "p_value": z and z.p_value,
            "revenue_diff": rev and rev.diff,
            "revenue_p_value": rev and rev.p_value,
            "cuped_revenue_diff": cu and cu.test.diff,
            "cuped_revenue_ci_low": cu and cu.test.ci[0],
            "cuped_revenue_ci_high": cu and cu.test.ci[1],
            "cuped_revenue_p_value": cu and cu.test.p_value,
            "cuped_variance_reduction": cu and cu.variance_reduction,
            "chi2_p_value": result.chi2_p_value,
            "srm_p_value": result.srm_p_value,
            "srm_flag": result.srm_flag,
            "run_id": run_id,
            "analyzed_at": analyzed_at,
        }
        rows.append(
            {k: _nan_none(val) if isinstance(val, float) else val for k, val in row.items()}
        )
    return rows


def _seed(experiment_id: str, version: int) -> int:
    digest = hashlib.sha256(f"{experiment_id}:{version}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


@dataclass
class AnalyzeReport:
    as_of: datetime
    run_id: str
    results: list[ExperimentResult] = field(default_factory=list)
    new_exposures: int = 0


def run_analyze(
    spark: SparkSession,
    cfg: Config,
    *,
    as_of: datetime,
    run_id: str,
    path: str | None = None,
    experiment_id: str | None = None,
) -> AnalyzeReport:
    as_of = utc(as_of)
    root = cfg.lake.root
    file = load_experiments(cfg, path)
    chosen = [file[experiment_id]] if experiment_id else list(file.experiments)
    report = AnalyzeReport(as_of, run_id)
    if not lake.table_exists(spark, root, lake.EXPERIMENT_ASSIGNMENTS):
        return report
    all_assignments = lake.read_table(spark, root, lake.EXPERIMENT_ASSIGNMENTS)
    sessions = lake.read_table(spark, root, lake.SESSIONS).filter(
        F.col("session_start") < F.lit(as_of).cast("timestamp")
    )
    chosen = [e for e in chosen if e.start <= as_of]
    assigned_by = {
        e.id: all_assignments.filter(
            (F.col("experiment_id") == e.id) & (F.col("assigned_at") <= F.lit(as_of))
        )
        for e in chosen
    }
    exposure_frames = [first_exposures(assigned_by[e.id], sessions, e, as_of) for e in chosen]
    if exposure_frames:
        frame = exposure_frames[0]
        for other in exposure_frames[1:]:
            frame = frame.unionByName(other)
        lake.insert_new(
            spark,
            root,
            lake.EXPOSURES,
            frame.withColumn("run_id", F.lit(run_id)),
            ("experiment_id", "user_key"),
        )
        report.new_exposures = lake.last_commit_rows(spark, root, lake.EXPOSURES)
    exposures = lake.read_table(spark, root, lake.EXPOSURES)
    analyzed_at = datetime.now(timezone.utc)
    rows: list[dict] = []
    for experiment in chosen:
        assigned = assigned_by[experiment.id].cache()
        exposed = exposures.filter(
            (F.col("experiment_id") == experiment.id) & (F.col("exposed_at") < F.lit(as_of))
        ).select("user_key", "variant", "exposed_at")
        outcomes = user_outcomes(exposed, assigned, sessions, experiment, as_of)
        counts, expected = assigned_counts(assigned)
        result = analyze_experiment(experiment, as_of, variant_moments(outcomes), counts, expected)
        assigned.unpersist()
        if experiment.allocation == "bandit":
            allocate(spark, cfg, experiment, result, run_id)
        report.results.append(result)
        rows.extend(result_rows(result, run_id, analyzed_at))
    if rows:
        _replace_results(spark, root, rows, as_of, [e.id for e in chosen])
    return report


def _replace_results(spark, root, rows, as_of, experiment_ids) -> None:
    """The rows of these experiments at this as-of replace any earlier ones (one commit)."""
    frame = lake.conform(
        spark.createDataFrame(rows, schema=lake.EXPERIMENT_RESULTS.schema), lake.EXPERIMENT_RESULTS
    )
    target = lake.ensure_table(spark, root, lake.EXPERIMENT_RESULTS)
    (
        target.alias("t")
        .merge(
            frame.alias("s"),
            "t.experiment_id = s.experiment_id AND t.as_of = s.as_of AND t.variant = s.variant",
        )
        .whenMatchedUpdateAll()
        .whenNotMatchedInsertAll()
        .execute()
    )
    durable(lake.EXPERIMENT_RESULTS.name)


def allocate(
    spark: SparkSession, cfg: Config, experiment: Experiment, result: ExperimentResult, run_id: str
) -> None:
    """A new allocation version from the result's exposed users and conversions (skipped when
    the latest version already counted up to this as-of)."""
    root = cfg.lake.root
    latest, counted = 0, False
    if lake.table_exists(spark, root, lake.EXPERIMENT_ALLOCATIONS):
        last = (
            lake.read_table(spark, root, lake.EXPERIMENT_ALLOCATIONS)
            .filter(F.col("experiment_id") == experiment.id)
            .agg(
                F.max("version").alias("v"),
                F.max(F.col("as_of") >= F.lit(result.as_of).cast("timestamp")).alias("counted"),
            )
            .first()
        )
        latest, counted = last.v or 0, bool(last.counted)
    by_variant = {v.variant: v for v in result.variants}
    exposed = [by_variant[v].exposed if v in by_variant else 0 for v in experiment.variants]
    conversions = [by_variant[v].conversions if v in by_variant else 0 for v in experiment.variants]
    version = latest if counted else latest + 1
    weights, p_best = stats.thompson_weights(
        exposed,
        conversions,
        floor=experiment.bandit.floor,
        draws=experiment.bandit.draws,
        seed=_seed(experiment.id, version),
    )
    result.allocation = dict(zip(experiment.variants, weights, strict=True))
    result.allocation_version = version
    if counted:  # a rerun at an as-of already counted: the version stands
        return
    rows = [
        {
            "experiment_id": experiment.id,
            "version": version,
            "as_of": result.as_of,
            "variant": name,
            "weight": w,
            "p_best": p,
            "exposed": n,
            "conversions": c,
            "alpha": 1.0 + c,
            "beta": 1.0 + n - c,
            "run_id": run_id,
        }
        for name, w, p, n, c in zip(
            experiment.variants, weights, p_best, exposed, conversions, strict=True
        )
    ]
    frame = spark.createDataFrame(rows, schema=lake.EXPERIMENT_ALLOCATIONS.schema)
    lake.insert_new(
        spark, root, lake.EXPERIMENT_ALLOCATIONS, frame, ("experiment_id", "version", "variant")
    )
