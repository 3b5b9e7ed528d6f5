"""The cluster jobs: `train_clusters` (microseg cluster train) and `assign_clusters`
(microseg cluster assign), with the reports they return."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from pyspark.ml import PipelineModel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from microseg.core import lake
from microseg.core.clock import naive_utc
from microseg.core.config import ClusterConfig, Config
from microseg.core.failpoints import durable
from microseg.core.runs import new_run_id
from microseg.features import snapshots
from microseg.features.user_features import select_features
from microseg.ml import registry
from microseg.ml.clustering.fit import KScore, fit_clusters
from microseg.ml.clustering.matching import stable_number
from microseg.ml.clustering.naming import feature_label as _label
from microseg.ml.clustering.pipeline import (
    check_config,
    fill_rules,
    population,
    population_text,
)
from microseg.ml.clustering.quality import persona_ari
from microseg.ml.clustering.steps import DISTANCE, SEGMENT_ID
from microseg.segments import membership, online
from microseg.segments.catalog import CatalogRow, write_catalog
from microseg.segments.membership import Scope

SOURCE = "cluster"
KIND = "cluster"


@dataclass
class ClusterTrainReport:
    run_id: str
    model_name: str
    version: str
    path: str
    as_of: datetime
    users: int
    k: int
    silhouette: float | None
    silhouette_metric: str
    population: str
    wcss: float
    scores: list[KScore]
    sample_rows: int
    profiles: list[dict]
    matching: dict
    ari: float | None
    ari_users: int | None
    training_data_hash: str
    training_seconds: float


@dataclass(frozen=True)
class ClusterResult:
    segment_id: str
    cluster_id: str
    name: str
    size: int
    previous_size: int | None
    entered: int
    exited: int
    stability: float | None
    status: str = "active"


@dataclass
class ClusterAssignReport:
    run_id: str
    as_of: datetime
    model_name: str
    version: str
    users: int
    clusters: list[ClusterResult] = field(default_factory=list)


def _require_columns(features_df: DataFrame, needed: list[str], as_of: datetime) -> None:
    missing = [c for c in needed if c not in features_df.columns]
    if missing:
        raise ValueError(
            f"gold/user_features as of {as_of.isoformat()} has no column(s) {missing}: "
            "re-run `microseg features` with them in features.include"
        )


def train_clusters(
    spark: SparkSession,
    cfg: Config,
    *,
    as_of: datetime,
    ground_truth: str | None = None,
    run_id: str | None = None,
) -> ClusterTrainReport:
    """Train a new version on gold/user_features as of `as_of`, save its PipelineModel and
    append its gold/model_registry row (under `run_id`). ground_truth: a generator's
    users.csv, for the ARI."""
    started = time.monotonic()
    settings = cfg.cluster
    root = cfg.lake.root
    features = check_config(cfg)
    as_of = naive_utc(as_of)
    available = {f.name for f in select_features(cfg.features.include)}
    fill = fill_rules(features, available)
    features_df = population(snapshots.snapshot(spark, cfg.lake.root, as_of), settings.population)
    sources = sorted({s for s, _ in fill.values() if s})
    _require_columns(features_df, [*features, *sources], as_of)
    features_df = features_df.select("user_key", *dict.fromkeys([*features, *sources]))
    entries = registry.entries(spark, root, kind=KIND, model_name=settings.model_name)
    previous = None
    issued = 0
    for entry in entries:
        details = entry.details or {}
        issued = max(
            [issued, *(stable_number(p["stable_id"]) for p in details.get("profiles", []))]
        )
    if entries:
        previous = {**(entries[-1].details or {}), "version": entries[-1].version}
    fitted = fit_clusters(
        features_df, settings, fill=fill, previous=previous, next_number=issued + 1
    )
    ari, ari_users = None, None
    if ground_truth is not None:
        ari, ari_users = persona_ari(spark, fitted.assignments_df, ground_truth)
    fitted.release()
    data_hash = registry.training_data_hash(features_df, ["user_key", *features])
    trained_at = datetime.now(timezone.utc)
    version = registry.new_version(trained_at)
    path = lake.model_path(root, settings.model_name, version)
    fitted.model.write().overwrite().save(path)
    durable(f"model {settings.model_name}")
    run_id = run_id or new_run_id()
    seconds = round(time.monotonic() - started, 3)
    metrics = {"k": float(fitted.k), "wcss": fitted.wcss, "users": float(fitted.users)}
    if fitted.silhouette is not None:
        metrics["silhouette"] = fitted.silhouette
    if ari is not None:
        metrics["ari"] = ari
    metrics["training_seconds"] = seconds
    details = {
        "features": list(features),
        "log_features": list(settings.log_features),
        "fill": {f: {"from": s or None, "value": v} for f, (s, v) in fill.items()},
        "population": settings.population.model_dump(mode="json"),
        "silhouette_metric": settings.silhouette,
        "space": "pca"
        if settings.pca_components
        else "scaled"
        if settings.algorithm == "bisecting_kmeans"
        else "standardized",
        "search": [{"k": s.k, "silhouette": s.silhouette, "wcss": s.wcss} for s in fitted.scores],
        "sample_rows": fitted.sample_rows,
        "sizes": {p["stable_id"]: p["size"] for p in fitted.profiles},
        "mapping": {str(p["index"]): p["stable_id"] for p in fitted.profiles},
        "profiles": fitted.profiles,
        "matching": fitted.matching,
        "ari": None
        if ari is None
        else {"value": ari, "users": ari_users, "ground_truth": ground_truth},
    }
    registry.register(
        spark,
        root,
        registry.RegistryEntry(
            model_name=settings.model_name,
            version=version,
            kind=KIND,
            trained_at=trained_at.replace(tzinfo=None),
            training_as_of=(as_of,),
            evaluation_as_of=None,
            params={**settings.model_dump(mode="json"), "k": fitted.k},
            metrics=metrics,
            details=details,
            training_data_hash=data_hash,
            path=path,
            run_id=run_id,
        ),
    )
    return ClusterTrainReport(
        run_id=run_id,
        model_name=settings.model_name,
        version=version,
        path=path,
        as_of=as_of,
        users=fitted.users,
        k=fitted.k,
        silhouette=fitted.silhouette,
        silhouette_metric=settings.silhouette,
        population=population_text(settings.population),
        wcss=fitted.wcss,
        scores=fitted.scores,
        sample_rows=fitted.sample_rows,
        profiles=fitted.profiles,
        matching=fitted.matching,
        ari=ari,
        ari_users=ari_users,
        training_data_hash=data_hash,
        training_seconds=seconds,
    )


def assign_clusters(
    spark: SparkSession,
    cfg: Config,
    *,
    as_of: datetime,
    version: str | None = None,
    run_id: str | None = None,
) -> ClusterAssignReport:
    """Assign every user with features as of `as_of` to a cluster of the latest (or the
    given) model version and record it in gold/segment_membership (scope: source "cluster",
    the model name; score = distance to the cluster centre) and gold/segment_catalog."""
    root = cfg.lake.root
    as_of = naive_utc(as_of)
    entry = registry.get(spark, root, cfg.cluster.model_name, kind=KIND, version=version)
    details = entry.details
    model = PipelineModel.load(entry.path)
    # the population the version was trained on, whatever cluster.population says now
    features_df = population(
        snapshots.snapshot(spark, cfg.lake.root, as_of),
        ClusterConfig.Population(**details.get("population", {})),
    )
    needed = sorted(
        {*details["features"], *(f["from"] for f in details["fill"].values() if f["from"])}
    )
    _require_columns(features_df, needed, as_of)
    members_df = model.transform(features_df.select("user_key", *needed)).select(
        "user_key",
        SEGMENT_ID,
        F.col(DISTANCE).alias("score"),
        F.lit(False).alias("fallback"),
    )
    run_id = run_id or new_run_id()
    scope = Scope(SOURCE, cfg.cluster.model_name)
    profiles = {p["segment_id"]: p for p in details["profiles"]}
    stats = membership.write_membership(
        spark,
        root,
        scope=scope,
        as_of=as_of,
        run_id=run_id,
        members_df=members_df,
        versions={sid: entry.version for sid in profiles},
    )
    online.publish(spark, cfg, scope)
    overlaps = membership.overlap(spark, root, as_of=as_of)
    results = []
    for sid, profile in sorted(profiles.items()):
        stat = stats.get(sid)
        results.append(
            ClusterResult(
                segment_id=sid,
                cluster_id=profile["stable_id"],
                name=profile["name"],
                size=stat.size if stat else 0,
                previous_size=stat.previous_size if stat else None,
                entered=stat.entered if stat else 0,
                exited=stat.exited if stat else 0,
                stability=stat.stability if stat else None,
            )
        )
    for sid, stat in sorted(stats.items()):
        if sid not in profiles and (stat.exited or stat.size):
            results.append(
                ClusterResult(
                    segment_id=sid,
                    cluster_id=sid.rsplit("_", 1)[-1],
                    name=sid,
                    size=stat.size,
                    previous_size=stat.previous_size,
                    entered=stat.entered,
                    exited=stat.exited,
                    stability=stat.stability,
                    status="retired",
                )
            )
    write_catalog(
        spark,
        root,
        [
            _catalog_row(
                scope,
                entry,
                profiles.get(r.segment_id),
                r,
                stats,
                overlaps,
                as_of=as_of,
                run_id=run_id,
            )
            for r in results
        ],
    )
    return ClusterAssignReport(
        run_id=run_id,
        as_of=as_of,
        model_name=cfg.cluster.model_name,
        version=entry.version,
        users=sum(r.size for r in results),
        clusters=results,
    )


def _catalog_row(
    scope: Scope,
    entry: registry.RegistryEntry,
    profile: dict | None,
    result: ClusterResult,
    stats: dict[str, membership.SegmentStats],
    overlaps: dict[str, dict[str, float]],
    *,
    as_of: datetime,
    run_id: str,
) -> CatalogRow:
    """The gold/segment_catalog row of a cluster (or of one this version retired)."""
    if profile is None:
        definition: dict = {}
        description = f"no longer a cluster of model {entry.model_name} version {entry.version}"
    else:
        definition = {
            "model_name": entry.model_name,
            "version": entry.version,
            "cluster_id": profile["stable_id"],
            "top_features": profile["top_features"],
            "mean": profile["mean"],
            "median": profile["median"],
        }
        top = ", ".join(f"{t['direction']} {_label(t['feature'])}" for t in profile["top_features"])
        description = f"Cluster {result.cluster_id} of model {entry.model_name}: {top}"
    return CatalogRow.of(
        scope,
        result.segment_id,
        stats.get(result.segment_id),
        as_of=as_of,
        run_id=run_id,
        definition=definition,
        overlaps=overlaps,
        name=result.name,
        description=description,
        tags=("cluster", entry.model_name),
        definition_version=entry.version,
        exclusive_group=f"cluster_{entry.model_name}",
        matched=result.size,
        status=result.status,
        status_reason=None
        if result.status == "active"
        else f"not a cluster of version {entry.version}",
    )
