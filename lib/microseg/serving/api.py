"""`microseg serve`: "which segments is this user in?" over HTTP (FastAPI on uvicorn).

Current answers come from the online store (microseg.core.online_store), which batch runs
and the stream keep; answers as of a past time, the catalog and sizes over time come from
the Delta tables, read with the `deltalake` package (no JVM in the server). OpenAPI docs are
at /docs.

Ids. `GET /users/{id}/segments` takes a user id or an anonymous id: an anonymous id stitched
to a user (silver/identity_map, as the store's aliases hold it) answers with that user's
segments; an id with rows of its own answers for itself; otherwise the anonymous key
`anon:<id>`. The response names the key that answered. An unknown id gets an empty list.

Sources. A segment the stream keeps is answered from the stream's rows only (they are
fresher than the batch run of the same rule); every other segment from the rows of whichever
run published it (rule, cluster, propensity).
"""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Annotated

import pyarrow as pa
import pyarrow.compute as pc
from fastapi import FastAPI, HTTPException, Path, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from microseg import __version__
from microseg.core import lake
from microseg.core.config import Config
from microseg.core.online_store import Member, OnlineStore, open_store
from microseg.silver.keys import ANON_PREFIX

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_US = timedelta(microseconds=1)


class SegmentMembership(BaseModel):
    segment_id: str
    source: str = Field(description="What assigned it: rule, cluster, propensity or stream")
    scope: str = Field(description="The rule file, cluster model or propensity target")
    entered_at: datetime = Field(description="When the user entered (UTC)")
    score: float | None = Field(description="Cluster distance or propensity at entry")
    definition_version: str


class UserSegments(BaseModel):
    id: str = Field(description="The id asked about")
    user_key: str = Field(description="The key that answered (after identity stitching)")
    as_of: datetime | None = Field(description="null: now (the online store)")
    segments: list[SegmentMembership]


class SegmentSummary(BaseModel):
    segment_id: str
    name: str | None
    source: str
    scope: str
    size: int = Field(description="Current members (online store)")
    definition_version: str | None
    status: str | None = Field(description="At the latest batch run (gold/segment_catalog)")
    streamed: bool = Field(description="Kept fresh by the stream")


class SizePoint(BaseModel):
    as_of: datetime
    size: int
    status: str


class SegmentDetail(SegmentSummary):
    description: str | None
    definition: dict | None = Field(description="The definition as the catalog stores it")
    sizes: list[SizePoint] = Field(description="Size at each batch run, oldest first")


class Assignment(BaseModel):
    experiment_id: str
    variant: str = Field(description="Variant name, or `holdout`")
    assigned_at: datetime = Field(description="When the user was assigned (UTC); sticky")


class UserExperiments(BaseModel):
    id: str = Field(description="The id asked about")
    user_key: str = Field(description="The key that answered (after identity stitching)")
    experiments: list[Assignment]


class VariantResult(BaseModel):
    variant: str
    assigned: int
    exposed: int
    conversion_rate: float | None
    lift: float | None
    lift_ci_low: float | None
    lift_ci_high: float | None
    p_value: float | None
    revenue_per_user: float | None


class ExperimentDetail(BaseModel):
    experiment_id: str
    allocation_version: int | None = Field(description="The bandit's latest version; null: fixed")
    weights: dict[str, float] | None = Field(description="The bandit's latest weights")
    analyzed_as_of: datetime | None = Field(description="as-of of the latest analysis")
    srm_flag: bool | None = Field(description="Sample ratio mismatch at the latest analysis")
    results: list[VariantResult] = Field(description="Per variant at the latest analysis")


class Reason(BaseModel):
    feature: str
    value: float | None = Field(description="The user's value, after imputation")
    contribution: float = Field(
        description="TreeSHAP value: log-odds the feature adds to the GBT's score"
    )


class PropensityScore(BaseModel):
    model_name: str = Field(description="The propensity target, e.g. purchase_7d")
    model_version: str
    as_of: datetime = Field(description="The latest scoring of this target that has the user")
    score: float = Field(description="Calibrated probability")
    rank: int
    percentile: float
    reasons: list[Reason] | None = Field(
        description="The features that moved the score most, largest first"
    )


class UserScores(BaseModel):
    id: str = Field(description="The id asked about")
    user_key: str = Field(description="The key that answered (after identity stitching)")
    scores: list[PropensityScore]


class Health(BaseModel):
    status: str
    store: str
    store_location: str
    lake: str
    version: str


def _utc(at: datetime) -> datetime:
    return at.replace(tzinfo=timezone.utc) if at.tzinfo is None else at.astimezone(timezone.utc)


def _iso(at: datetime) -> str:
    """As the response models write times: 2026-09-05T10:00:00.000001Z, no fraction at 0."""
    return _utc(at).isoformat().replace("+00:00", "Z")


def _current(members: list[Member], streamed: set[str]) -> list[Member]:
    """The answer's rows: for streamed segments the stream's only (see the module docstring)."""
    kept = [m for m in members if (m.source == "stream") == (m.segment_id in streamed)]
    return sorted(kept, key=lambda m: (m.segment_id, m.source, m.scope))


class LakeReader:
    """Delta tables of the lake read with deltalake; a table is re-opened only when its log
    has a new version (checked at most once a second)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._tables: dict[str, tuple[float, object]] = {}
        self._lock = threading.Lock()

    def table(self, table: lake.Table):
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError

        path = lake.table_path(self.root, table)
        with self._lock:
            checked, dt = self._tables.get(table.name, (0.0, None))
            now = time.monotonic()
            if now - checked > 1.0:
                try:
                    if dt is None:
                        dt = DeltaTable(path)
                    else:
                        dt.update_incremental()
                except TableNotFoundError:
                    dt = None
                self._tables[table.name] = (now, dt)
            return dt


def create_app(cfg: Config, store: OnlineStore | None = None) -> FastAPI:
    """The API over `cfg`'s online store and lake."""
    store = store or open_store(cfg)
    reader = LakeReader(cfg.lake.root)
    app = FastAPI(
        title="microseg",
        version=__version__,
        summary="Which segments is this user in, now or as of a time.",
    )

    def resolve(user_id: str) -> tuple[str, list[Member]]:
        stitched = store.resolve(user_id)
        if stitched is not None:
            return stitched, store.user_segments(stitched)
        members = store.user_segments(user_id)
        if members or user_id.startswith(ANON_PREFIX):
            return user_id, members
        anonymous = f"{ANON_PREFIX}{user_id}"
        members = store.user_segments(anonymous)
        return (anonymous, members) if members else (user_id, [])

    @app.get("/health", response_model=Health, summary="Is the store reachable")
    def health():
        try:
            store.ping()
        except Exception as exc:  # the answer is the status, whatever the store raised
            return JSONResponse(
                status_code=503,
                content={"status": "unavailable", "store": cfg.serving.store, "error": str(exc)},
            )
        return Health(
            status="ok",
            store=cfg.serving.store,
            store_location=store.location,
            lake=cfg.lake.root,
            version=__version__,
        )

    streamed_cache: list = [0.0, set()]

    def streamed() -> set[str]:
        """The streamed segment ids, re-read at most once a second."""
        now = time.monotonic()
        if now - streamed_cache[0] > 1.0:
            streamed_cache[:] = [now, store.streamed()]
        return streamed_cache[1]

    @app.get(
        "/users/{user_id}/segments",
        response_model=UserSegments,
        summary="The user's segments now, or as of a time",
    )
    async def user_segments(
        user_id: Annotated[str, Path(min_length=1, max_length=512)],
        as_of: Annotated[
            datetime | None,
            Query(
                description="ISO 8601 time (UTC when it has no offset): membership then, "
                "from gold/segment_membership; omitted: now, from the online store"
            ),
        ] = None,
    ):
        # the hot path: a store lookup of microseconds runs on the event loop, and the body is
        # written directly (the same JSON the response model documents, without validating it
        # again); an as-of query reads Delta files and runs in the thread pool
        user_key, members = resolve(user_id)
        if as_of is None:
            rows = _current(members, streamed())
        else:
            as_of = _utc(as_of)
            rows = _current(await run_in_threadpool(history_at, user_key, as_of), streamed())
        body = {
            "id": user_id,
            "user_key": user_key,
            "as_of": None if as_of is None else _iso(as_of),
            "segments": [
                {
                    "segment_id": m.segment_id,
                    "source": m.source,
                    "scope": m.scope,
                    "entered_at": _iso(EPOCH + m.entered_at * _US),
                    "score": m.score,
                    "definition_version": m.definition_version,
                }
                for m in rows
            ],
        }
        return Response(json.dumps(body, separators=(",", ":")), media_type="application/json")

    def history_at(user_key: str, at: datetime) -> list[Member]:
        dt = reader.table(lake.SEGMENT_MEMBERSHIP)
        if dt is None:
            return []
        at = pa.scalar(at, type=pa.timestamp("us", tz="UTC"))
        table = dt.to_pyarrow_dataset().to_table(
            columns=[
                "user_key",
                "segment_id",
                "source",
                "scope",
                "definition_version",
                "score",
                "valid_from",
                "valid_to",
            ],
            filter=(pc.field("user_key") == user_key) & (pc.field("valid_from") <= at),
        )
        out = []
        for row in table.to_pylist():
            if row["valid_to"] is not None and row["valid_to"] <= at.as_py():
                continue
            entered = _utc(row["valid_from"])
            out.append(
                Member(
                    row["user_key"],
                    row["segment_id"],
                    row["source"],
                    row["scope"],
                    row["definition_version"],
                    row["score"],
                    (entered - EPOCH) // _US,
                )
            )
        return out

    def catalog_rows() -> dict[tuple[str, str, str], list[dict]]:
        dt = reader.table(lake.SEGMENT_CATALOG)
        if dt is None:
            return {}
        rows = (
            dt.to_pyarrow_dataset()
            .to_table(
                columns=[
                    "as_of",
                    "source",
                    "scope",
                    "segment_id",
                    "name",
                    "description",
                    "definition",
                    "definition_version",
                    "size",
                    "status",
                ]
            )
            .to_pylist()
        )
        out: dict[tuple[str, str, str], list[dict]] = {}
        for row in sorted(rows, key=lambda r: r["as_of"]):
            out.setdefault((row["segment_id"], row["source"], row["scope"]), []).append(row)
        return out

    def summaries() -> list[SegmentDetail]:
        sizes = {(s.segment_id, s.source, s.scope): s.size for s in store.sizes()}
        catalog = catalog_rows()
        keys = set(sizes) | set(catalog)
        out = []
        for segment_id, source, scope in sorted(keys):
            history = catalog.get((segment_id, source, scope), [])
            latest = history[-1] if history else None
            if latest is None and source == "stream":
                # the stream's segments are catalogued by the batch run of their rule file
                rule = catalog.get((segment_id, "rule", scope), [])
                latest = rule[-1] if rule else None
            out.append(
                SegmentDetail(
                    segment_id=segment_id,
                    name=latest and latest["name"],
                    source=source,
                    scope=scope,
                    size=sizes.get((segment_id, source, scope), 0),
                    definition_version=latest and latest["definition_version"],
                    status=latest and latest["status"],
                    streamed=source == "stream",
                    description=latest and latest["description"],
                    definition=json.loads(latest["definition"]) if latest else None,
                    sizes=[
                        SizePoint(as_of=_utc(r["as_of"]), size=r["size"], status=r["status"])
                        for r in history
                    ],
                )
            )
        return out

    @app.get(
        "/segments",
        response_model=list[SegmentSummary],
        summary="Every segment with its current size",
    )
    def segments():
        return [SegmentSummary(**d.model_dump()) for d in summaries()]

    @app.get(
        "/segments/{segment_id}",
        response_model=list[SegmentDetail],
        summary="A segment's definition, version and size over time (one entry per source)",
    )
    def segment(segment_id: Annotated[str, Path(min_length=1, max_length=200)]):
        found = [d for d in summaries() if d.segment_id == segment_id]
        if not found:
            raise HTTPException(status_code=404, detail=f"no segment '{segment_id}'")
        return found

    @app.get(
        "/users/{user_id}/experiments",
        response_model=UserExperiments,
        summary="The experiments and variants the user is in (sticky assignments)",
    )
    def user_experiments(user_id: Annotated[str, Path(min_length=1, max_length=512)]):
        stitched = store.resolve(user_id)
        candidates = [stitched] if stitched else [user_id]
        if not stitched and not user_id.startswith(ANON_PREFIX):
            candidates.append(f"{ANON_PREFIX}{user_id}")
        user_key, variants = candidates[0], []
        for key in candidates:
            variants = store.user_variants(key)
            if variants:
                user_key = key
                break
        return UserExperiments(
            id=user_id,
            user_key=user_key,
            experiments=[
                Assignment(
                    experiment_id=v.experiment_id,
                    variant=v.variant,
                    assigned_at=EPOCH + v.assigned_at * _US,
                )
                for v in variants
            ],
        )

    @app.get(
        "/users/{user_id}/scores",
        response_model=UserScores,
        summary="The user's latest propensity score per target, with its top reasons",
    )
    def user_scores(user_id: Annotated[str, Path(min_length=1, max_length=512)]):
        # read from gold/propensity_scores (not the online store): a scan filtered on the key
        user_key, _ = resolve(user_id)
        dt = reader.table(lake.PROPENSITY_SCORES)
        rows = []
        if dt is not None:
            candidates = [user_key]
            if not user_key.startswith(ANON_PREFIX) and user_key == user_id:
                candidates.append(f"{ANON_PREFIX}{user_id}")
            table = dt.to_pyarrow_dataset().to_table(filter=pc.field("user_key").isin(candidates))
            rows = table.to_pylist()
            if rows:
                user_key = max(rows, key=lambda r: r["as_of"])["user_key"]
        latest: dict[str, dict] = {}
        for row in rows:
            if row["user_key"] != user_key:
                continue
            best = latest.get(row["model_name"])
            if best is None or row["as_of"] > best["as_of"]:
                latest[row["model_name"]] = row
        return UserScores(
            id=user_id,
            user_key=user_key,
            scores=[
                PropensityScore(
                    model_name=name,
                    model_version=r["model_version"],
                    as_of=_utc(r["as_of"]),
                    score=r["score"],
                    rank=r["rank"],
                    percentile=r["percentile"],
                    reasons=r.get("reasons"),
                )
                for name, r in sorted(latest.items())
            ],
        )

    def _rows(table: lake.Table, experiment_id: str) -> list[dict]:
        dt = reader.table(table)
        if dt is None:
            return []
        return (
            dt.to_pyarrow_dataset()
            .to_table(filter=pc.field("experiment_id") == experiment_id)
            .to_pylist()
        )

    @app.get(
        "/experiments/{experiment_id}",
        response_model=ExperimentDetail,
        summary="An experiment's latest analysis and (bandits) its current allocation weights",
    )
    def experiment(experiment_id: Annotated[str, Path(min_length=1, max_length=200)]):
        results = _rows(lake.EXPERIMENT_RESULTS, experiment_id)
        allocations = _rows(lake.EXPERIMENT_ALLOCATIONS, experiment_id)
        if not results and not allocations:
            raise HTTPException(status_code=404, detail=f"no analysis of '{experiment_id}' yet")
        version = max((r["version"] for r in allocations), default=None)
        weights = {r["variant"]: r["weight"] for r in allocations if r["version"] == version}
        latest = max((r["as_of"] for r in results), default=None)
        rows = sorted(
            (r for r in results if r["as_of"] == latest),
            key=lambda r: (not r["is_control"], r["variant"] == "holdout", r["variant"]),
        )
        return ExperimentDetail(
            experiment_id=experiment_id,
            allocation_version=version,
            weights=weights or None,
            analyzed_as_of=latest and _utc(latest),
            srm_flag=rows[0]["srm_flag"] if rows else None,
            results=[VariantResult(**{k: r[k] for k in VariantResult.model_fields}) for r in rows],
        )

    app.state.store = store
    return app
