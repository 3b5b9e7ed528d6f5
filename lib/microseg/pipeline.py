"""`microseg pipeline --as-of T`: every stage in order, each skipped when it has nothing new.

Stages: ingest (each configured input: only files not ingested yet), sessionize
(incremental), features as of T (recomputed when events arrived since they were computed),
rule segments as of T (re-run when the features or the segment definitions changed since the
last run for T), cluster assignment and propensity scoring (when a model has been trained).
Every stage is idempotent, so a failed run is resumed by running the same command again:
finished stages find nothing new, nothing is duplicated. Each stage appends its own row to
ops/runs, and the pipeline one more.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from microseg.core import lake
from microseg.core.clock import naive_utc
from microseg.core.config import Config
from microseg.core.runs import recorded
from microseg.features import snapshots
from microseg.ops.forget import recorded_job


class PipelineError(Exception):
    """A stage failed; the message names it and how to resume."""


@dataclass
class StageResult:
    stage: str
    status: str  # done, skipped, failed
    rows: int | None
    seconds: float
    detail: str


def _max(spark: SparkSession, cfg: Config, table: lake.Table, column: str, where=None):
    if not lake.table_exists(spark, cfg.lake.root, table):
        return None
    df = lake.read_table(spark, cfg.lake.root, table)
    if where is not None:
        df = df.filter(where)
    return df.agg(F.max(column)).first()[0]


def _has_model(spark: SparkSession, cfg: Config, kind: str, name: str) -> bool:
    from microseg.ml import registry

    return registry.exists(spark, cfg.lake.root, name, kind=kind)


# --------------------------------------------------------------------------------------
# stages: each returns (status, rows, detail)


def _ingest(spark, cfg, as_of):
    from microseg.ingest.files import run_ingest

    if not cfg.pipeline.inputs:
        return "skipped", None, "no pipeline.inputs configured"
    added, files, details = 0, 0, []
    for item in cfg.pipeline.inputs:
        with recorded_job(spark, cfg, job="ingest") as run:
            report = run_ingest(
                spark,
                cfg,
                source=item.source,
                path=item.path,
                fmt=item.format,
                run_id=run.run_id,
            )
            run.read("input records", report.records)
        added += report.events_added
        files += len(report.files)
        details.append(f"{item.source}: {len(report.files)} new file(s)")
    return ("done" if files else "skipped"), added, "; ".join(details)


def _sessionize(spark, cfg, as_of):
    from microseg.silver.sessions import run_sessionize

    with recorded_job(spark, cfg, job="sessionize") as run:
        report = run_sessionize(spark, cfg, run_id=run.run_id)
        run.read("bronze/events", report.new_events)
    if report.mode == "nothing new":
        return "skipped", 0, "no events ingested since the last run"
    return "done", report.sessions_written, f"{report.mode}: {report.new_events:,} new events"


def _features_current(spark, cfg, as_of) -> bool:
    computed = snapshots.computed_at(spark, cfg.lake.root, as_of)
    if computed is None:
        return False
    latest_ingest = _max(spark, cfg, lake.EVENTS, "ingested_at")
    return latest_ingest is None or latest_ingest <= computed


def _features(spark, cfg, as_of):
    from microseg.features.job import run_features

    if _features_current(spark, cfg, as_of):
        return "skipped", None, "features as of T are newer than the latest ingested event"
    with recorded_job(spark, cfg, job="features", as_of=as_of) as run:
        report = run_features(spark, cfg, as_of=as_of, run_id=run.run_id, refresh_silver=False)
    return "done", report.users, f"{report.features} features"


def _segments_current(spark, cfg, as_of) -> bool:
    from microseg.segments.membership import Scope
    from microseg.segments.parse import load_segments

    if not lake.table_exists(spark, cfg.lake.root, lake.SEGMENT_CATALOG):
        return False
    catalog = load_segments(cfg)
    wanted = {(s.id, catalog.version(s.id)) for s in catalog.segments}
    rows = (
        lake.read_table(spark, cfg.lake.root, lake.SEGMENT_CATALOG)
        .filter((F.col("as_of") == F.lit(as_of)) & Scope("rule", catalog.name).rows())
        .select("segment_id", "definition_version", "recorded_at")
        .collect()
    )
    if not wanted <= {(r.segment_id, r.definition_version) for r in rows}:
        return False
    computed = snapshots.computed_at(spark, cfg.lake.root, as_of)
    return computed is not None and computed <= min(r.recorded_at for r in rows)


def _segments(spark, cfg, as_of):
    from microseg.segments.evaluate import run_segments

    if _segments_current(spark, cfg, as_of):
        return "skipped", None, "segments as of T are up to date with features and definitions"
    with recorded_job(spark, cfg, job="segments run", as_of=as_of) as run:
        report = run_segments(spark, cfg, as_of=as_of, run_id=run.run_id)
    active = sum(1 for s in report.segments if s.status == "active")
    members = sum(s.size for s in report.segments)
    return "done", members, f"{active} of {len(report.segments)} segments published"


def _clusters(spark, cfg, as_of):
    from microseg.ml.clustering import assign_clusters

    name = cfg.cluster.model_name
    if not _has_model(spark, cfg, "cluster", name):
        return "skipped", None, f"no cluster model '{name}' yet: microseg cluster train --as-of T"
    with recorded_job(spark, cfg, job="cluster assign", as_of=as_of) as run:
        report = assign_clusters(spark, cfg, as_of=as_of, run_id=run.run_id)
    return "done", report.users, f"model version {report.version}"


def _propensity(spark, cfg, as_of):
    from microseg.ml.propensity import score_propensity

    done, rows, details = [], 0, []
    for target in cfg.propensity.targets:
        if not _has_model(spark, cfg, "propensity", target):
            details.append(f"{target}: no model (microseg propensity train --target {target})")
            continue
        with recorded_job(spark, cfg, job="propensity score", as_of=as_of) as run:
            report = score_propensity(spark, cfg, target=target, as_of=as_of, run_id=run.run_id)
        done.append(target)
        rows += report.users
        details.append(f"{target}: version {report.version}")
    return ("done" if done else "skipped"), (rows if done else None), "; ".join(details)


def _health(spark, cfg, as_of):
    from microseg.segments.health import run_health

    root = cfg.lake.root
    if not lake.table_exists(spark, root, lake.SEGMENT_CATALOG):
        return "skipped", None, "no segments yet"
    at_t = F.col("as_of") == F.lit(as_of)
    recorded = _max(spark, cfg, lake.SEGMENT_CATALOG, "recorded_at", at_t)
    checked = _max(spark, cfg, lake.SEGMENT_KPIS, "computed_at", at_t)
    if recorded is None:
        return "skipped", None, "no segments at T"
    if checked is not None and checked >= recorded:
        return "skipped", None, "health at T is newer than the segments at T"
    with recorded_job(spark, cfg, job="health", as_of=as_of) as run:
        report = run_health(spark, cfg, as_of=as_of, run_id=run.run_id)
    return "done", report.segments, f"{len(report.alerts)} alerts"


STAGES: list[tuple[str, Callable]] = [
    ("ingest", _ingest),
    ("sessionize", _sessionize),
    ("features", _features),
    ("segments", _segments),
    ("clusters", _clusters),
    ("propensity", _propensity),
    ("health", _health),
]


def run_pipeline(
    spark: SparkSession,
    cfg: Config,
    *,
    as_of: datetime,
    progress: Callable[[StageResult | str], None] = lambda event: None,
) -> list[StageResult]:
    """Run every stage in order; raise PipelineError naming the stage that failed."""
    as_of = naive_utc(as_of)
    results: list[StageResult] = []
    with recorded(spark, cfg, job="pipeline", as_of=as_of):
        for name, stage in STAGES:
            progress(name)
            started = time.monotonic()
            try:
                status, rows, detail = stage(spark, cfg, as_of)
            except Exception as exc:
                result = StageResult(
                    name, "failed", None, time.monotonic() - started, f"{type(exc).__name__}"
                )
                results.append(result)
                progress(result)
                first = (str(exc).strip() or type(exc).__name__).splitlines()[0]
                raise PipelineError(
                    f"stage '{name}' failed: {type(exc).__name__}: {first} -- fix it and run "
                    "the same command again: finished stages are skipped or repeated without "
                    "duplicates"
                ) from exc
            result = StageResult(name, status, rows, time.monotonic() - started, detail)
            results.append(result)
            progress(result)
    return results
