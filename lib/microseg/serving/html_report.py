"""`microseg report`: one self-contained HTML file about the lake, with plotly charts.

The report only reads the lake. Each section aggregates one Delta table with Spark, collects
the (small) result to pandas and draws it with plotly; plotly.js is inlined once in the page
head, so the file opens from disk with no server and no network. A section whose table is
missing or empty says which command fills it instead of drawing an empty chart.

Loading (`load_*`, Spark) and drawing (`*_section`, pandas in, `Section` out) are separate, so
the drawing functions can be called with hand-made frames.
"""

from __future__ import annotations

import html
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.offline import get_plotlyjs
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from microseg.core import lake

DEFAULT_OUTPUT = "report/microseg-report.html"

# Chart titles (per-model charts add the model name in parentheses).
SIZES_TITLE = "Rule segment sizes over time"
CHANGES_TITLE = "Users entering and leaving segments per run"
OVERLAP_TITLE = "Segment overlap (Jaccard index) at the latest run"
STABILITY_TITLE = "Segment stability per run (share of previous members kept)"
CLUSTER_SIZES_TITLE = "Cluster sizes at training"
CLUSTER_Z_TITLE = "Cluster centroids as z-scores"
CALIBRATION_TITLE = "Propensity calibration"
LIFT_TITLE = "Propensity lift by score decile"
QUARANTINE_TITLE = "Quarantined records per day and reason"
RUN_DURATION_TITLE = "Job run durations"
RUN_STATUS_TITLE = "Job runs per job and status"

PALETTE = qualitative.Dark24
SCORERS = ("gbt", "logistic_regression", "heuristic")
SCORER_NAMES = {
    "gbt": "GBT",
    "logistic_regression": "logistic regression",
    "heuristic": "recency/frequency heuristic",
}
STATUS_COLORS = {"succeeded": "#2ca02c", "failed": "#d62728", "interrupted": "#ff7f0e"}
STATUS_SYMBOLS = {"succeeded": "circle", "failed": "x", "interrupted": "diamond"}
MAX_RUNS = 2000  # the latest runs drawn in the run history


def titled(base: str, model_name: str) -> str:
    """The title of a per-model chart, e.g. 'Propensity calibration (purchase_7d)'."""
    return f"{base} ({model_name})"


@dataclass
class Chart:
    title: str
    figure: go.Figure


@dataclass
class Section:
    anchor: str
    heading: str
    charts: list[Chart] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # plain text; `code` spans allowed
    tables: list[tuple[list[str], list[list[Any]]]] = field(default_factory=list)
    missing: str | None = None  # why there is no chart: "no data yet: run ..."


@dataclass
class TableVersion:
    table: str
    version: int | None
    operation: str | None
    timestamp: datetime | None


@dataclass
class Report:
    lake_root: str
    generated_at: datetime
    tables: list[TableVersion]
    sections: list[Section]

    @property
    def chart_titles(self) -> list[str]:
        return [c.title for s in self.sections for c in s.charts]


@dataclass(frozen=True)
class WrittenReport:
    path: Path
    charts: int
    missing_sections: int
    bytes: int


# --------------------------------------------------------------------------------------
# loading (Spark: small aggregates only)


def _read(spark: SparkSession, root: str, table: lake.Table) -> DataFrame | None:
    if not lake.table_exists(spark, root, table):
        return None
    return lake.read_table(spark, root, table)


def _frame(df: DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """Collect rows as a pandas frame (maps stay dicts, timestamps naive UTC)."""
    rows = [r.asDict(recursive=False) for r in df.collect()]
    return pd.DataFrame(rows, columns=list(columns))


def table_versions(spark: SparkSession, root: str) -> list[TableVersion]:
    from delta.tables import DeltaTable

    versions = []
    for table in lake.ALL_TABLES:
        if not lake.table_exists(spark, root, table):
            versions.append(TableVersion(table.name, None, None, None))
            continue
        last = DeltaTable.forPath(spark, lake.table_path(root, table)).history(1).first()
        versions.append(
            TableVersion(table.name, last["version"], last["operation"], last["timestamp"])
        )
    return versions


CATALOG_COLUMNS = (
    "as_of",
    "source",
    "segment_id",
    "name",
    "status",
    "matched",
    "size",
    "entered",
    "exited",
    "stability",
    "overlap",
)


def load_catalog(spark: SparkSession, root: str) -> pd.DataFrame | None:
    df = _read(spark, root, lake.SEGMENT_CATALOG)
    return None if df is None else _frame(df.select(*CATALOG_COLUMNS), CATALOG_COLUMNS)


REGISTRY_COLUMNS = (
    "model_name",
    "version",
    "kind",
    "trained_at",
    "evaluation_as_of",
    "metrics",
    "details",
)


def load_latest_models(spark: SparkSession, root: str) -> pd.DataFrame | None:
    """The latest version (versions sort by time) of every model in gold/model_registry."""
    df = _read(spark, root, lake.MODEL_REGISTRY)
    if df is None:
        return None
    latest = Window.partitionBy("kind", "model_name").orderBy(F.desc("version"))
    df = df.withColumn("_n", F.row_number().over(latest)).filter(F.col("_n") == 1)
    return _frame(df.select(*REGISTRY_COLUMNS), REGISTRY_COLUMNS)


def load_quarantine(spark: SparkSession, root: str) -> pd.DataFrame | None:
    df = _read(spark, root, lake.QUARANTINE)
    if df is None:
        return None
    counts = df.groupBy(F.to_date("quarantined_at").alias("day"), "reason").count()
    return _frame(counts, ("day", "reason", "count"))


RUN_COLUMNS = ("run_id", "job", "as_of", "started_at", "ended_at", "status", "error")


def load_runs(spark: SparkSession, root: str) -> pd.DataFrame | None:
    df = _read(spark, root, lake.RUNS)
    if df is None:
        return None
    latest = df.select(*RUN_COLUMNS).orderBy(F.desc("started_at")).limit(MAX_RUNS)
    return _frame(latest, RUN_COLUMNS)


# --------------------------------------------------------------------------------------
# drawing (pandas in, sections out)


def _when(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NaT:
        return ""
    stamp = pd.Timestamp(value)
    if stamp.hour == stamp.minute == stamp.second == 0 and stamp.microsecond == 0:
        return stamp.strftime("%Y-%m-%d")
    return stamp.strftime("%Y-%m-%d %H:%M")


def _layout(fig: go.Figure, title: str, height: int = 460, **axes: Any) -> go.Figure:
    fig.update_layout(
        title={"text": title, "x": 0.01, "xanchor": "left"},
        template="plotly_white",
        height=height,
        margin={"l": 70, "r": 30, "t": 70, "b": 60},
        legend={"orientation": "v"},
        **axes,
    )
    return fig


def _color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


SEGMENTS_HINT = (
    "no data yet: run `microseg features --as-of T`, then `microseg segments run --as-of T`"
)


def segment_sizes_section(catalog: pd.DataFrame | None) -> Section:
    section = Section("sizes", "Segment sizes")
    rules = None if catalog is None else catalog[catalog["source"] == "rule"]
    if rules is None or rules.empty:
        section.missing = SEGMENTS_HINT
        return section
    fig = go.Figure()
    for i, (segment_id, rows) in enumerate(sorted(rules.groupby("segment_id"))):
        rows = rows.sort_values("as_of")
        fig.add_trace(
            go.Scatter(
                x=rows["as_of"],
                y=rows["size"],
                mode="lines+markers",
                name=segment_id,
                line={"color": _color(i)},
                customdata=list(zip(rows["status"], rows["matched"], strict=True)),
                hovertemplate=(
                    f"{html.escape(segment_id)}<br>as-of %{{x}}<br>members %{{y}}"
                    "<br>matched %{customdata[1]}<br>%{customdata[0]}<extra></extra>"
                ),
            )
        )
    _layout(fig, SIZES_TITLE, xaxis_title="as-of (UTC)", yaxis_title="published members")
    section.charts.append(Chart(SIZES_TITLE, fig))
    as_ofs = rules["as_of"].nunique()
    section.notes.append(
        f"{rules['segment_id'].nunique()} rule segments over {as_ofs} runs "
        f"(latest as-of {_when(rules['as_of'].max())}), from `gold/segment_catalog`."
    )
    return section


def changes_section(catalog: pd.DataFrame | None) -> Section:
    section = Section("changes", "Entered and exited per run")
    if catalog is None or catalog.empty:
        section.missing = SEGMENTS_HINT
        return section
    runs = sorted(set(catalog["as_of"]))
    fig = go.Figure()
    for i, (segment_id, rows) in enumerate(sorted(catalog.groupby("segment_id"))):
        rows = rows.sort_values("as_of")
        x = [_when(t) for t in rows["as_of"]]
        for change, values, show in (
            ("entered", rows["entered"], True),
            ("exited", -rows["exited"], False),
        ):
            fig.add_trace(
                go.Bar(
                    x=x,
                    y=values,
                    name=segment_id,
                    legendgroup=segment_id,
                    showlegend=show,
                    marker={"color": _color(i), "opacity": 1.0 if show else 0.55},
                    hovertemplate=(
                        f"{html.escape(segment_id)}<br>as-of %{{x}}<br>{change} "
                        "%{customdata}<extra></extra>"
                    ),
                    customdata=values.abs(),
                )
            )
    _layout(
        fig,
        CHANGES_TITLE,
        barmode="relative",
        xaxis={
            "title": "as-of (UTC)",
            "type": "category",
            "categoryorder": "array",
            "categoryarray": [_when(t) for t in runs],
        },
        yaxis_title="users (entered above 0, exited below)",
    )
    fig.add_hline(y=0, line_width=1, line_color="#444")
    section.charts.append(Chart(CHANGES_TITLE, fig))
    totals = catalog.groupby("as_of")[["entered", "exited"]].sum()
    section.notes.append(
        "Per run of every source (rule, cluster, propensity): "
        + "; ".join(
            f"{_when(t)}: +{int(r.entered):,} -{int(r.exited):,}" for t, r in totals.iterrows()
        )
        + ". Per-user rows are in `gold/segment_changes`."
    )
    return section


def overlap_section(catalog: pd.DataFrame | None) -> Section:
    section = Section("overlap", "Overlap")
    published = None if catalog is None else catalog[catalog["overlap"].notna()]
    if published is None or published.empty:
        section.missing = SEGMENTS_HINT
        return section
    latest = published["as_of"].max()
    rows = published[published["as_of"] == latest]
    maps = {r.segment_id: dict(r.overlap or {}) for r in rows.itertuples()}
    ids = sorted(set(maps) | {other for m in maps.values() for other in m})

    def jaccard(a: str, b: str) -> float | None:
        if a == b:
            return 1.0
        value = maps.get(a, {}).get(b, maps.get(b, {}).get(a))
        return None if value is None else float(value)

    z = [[jaccard(a, b) for b in ids] for a in ids]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=ids,
            y=ids,
            zmin=0,
            zmax=1,
            colorscale="Blues",
            texttemplate="%{z:.2f}",
            colorbar={"title": {"text": "Jaccard"}},
            hovertemplate="%{y} and %{x}<br>Jaccard %{z:.3f}<extra></extra>",
            hoverongaps=False,
        )
    )
    _layout(
        fig,
        OVERLAP_TITLE,
        height=max(420, 160 + 34 * len(ids)),
        yaxis={"autorange": "reversed"},
        xaxis={"tickangle": -40},
    )
    section.charts.append(Chart(OVERLAP_TITLE, fig))
    section.notes.append(
        f"As-of {_when(latest)}: Jaccard index (shared members / members of either) between "
        "every two segments with members; the diagonal is 1."
    )
    return section


def stability_section(catalog: pd.DataFrame | None) -> Section:
    section = Section("stability", "Stability")
    if catalog is None or catalog.empty:
        section.missing = SEGMENTS_HINT
        return section
    rated = catalog[catalog["stability"].notna()]
    if rated.empty:
        section.missing = (
            "no data yet: stability compares two runs; run `microseg segments run` "
            "again at a later as-of"
        )
        return section
    runs = sorted(set(rated["as_of"]))
    ids = sorted(set(rated["segment_id"]))
    value = {(r.segment_id, r.as_of): float(r.stability) for r in rated.itertuples()}
    z = [[value.get((s, t)) for t in runs] for s in ids]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=[_when(t) for t in runs],
            y=ids,
            zmin=0,
            zmax=1,
            colorscale="RdYlGn",
            texttemplate="%{z:.2f}",
            colorbar={"title": {"text": "kept"}},
            hovertemplate="%{y}<br>as-of %{x}<br>kept %{z:.3f}<extra></extra>",
            hoverongaps=False,
        )
    )
    _layout(
        fig,
        STABILITY_TITLE,
        height=max(360, 160 + 30 * len(ids)),
        xaxis={"title": "as-of (UTC)", "type": "category"},
        yaxis={"autorange": "reversed"},
    )
    section.charts.append(Chart(STABILITY_TITLE, fig))
    latest = rated[rated["as_of"] == runs[-1]].sort_values("stability")
    low = [f"{r.segment_id} {r.stability:.2f}" for r in latest.head(3).itertuples()]
    section.notes.append(
        "Stability = (previous members - exited) / previous members. "
        f"Least stable at {_when(runs[-1])}: {', '.join(low)}."
    )
    return section


def _json(text: str | None) -> dict:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _models(models: pd.DataFrame | None, kind: str) -> list[Any]:
    if models is None or models.empty:
        return []
    return sorted(models[models["kind"] == kind].itertuples(), key=lambda r: r.model_name)


def _metric(metrics: dict | None, name: str) -> float | None:
    value = (metrics or {}).get(name)
    return None if value is None or math.isnan(value) else float(value)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def cluster_section(models: pd.DataFrame | None) -> Section:
    section = Section("clusters", "Cluster profiles")
    entries = _models(models, "cluster")
    if not entries:
        section.missing = "no data yet: run `microseg cluster train --as-of T`"
        return section
    for entry in entries:
        details = _json(entry.details)
        profiles = sorted(
            details.get("profiles", []), key=lambda p: (-(p.get("size") or 0), p.get("index", 0))
        )
        metrics = entry.metrics or {}
        section.notes.append(
            f"Model `{entry.model_name}` version `{entry.version}` (trained "
            f"{_when(entry.trained_at)} UTC): k = {int(_metric(metrics, 'k') or len(profiles))}, "
            f"silhouette {_fmt(_metric(metrics, 'silhouette'))}, "
            f"{int(_metric(metrics, 'users') or 0):,} users"
            + (
                f", ARI vs ground truth {_fmt(_metric(metrics, 'ari'))}"
                if _metric(metrics, "ari") is not None
                else ""
            )
            + "."
        )
        if not profiles:
            section.notes.append(f"`{entry.model_name}`: no cluster profiles recorded.")
            continue
        labels = [f"{p.get('name') or p.get('stable_id')} ({p.get('stable_id')})" for p in profiles]
        sizes_title = titled(CLUSTER_SIZES_TITLE, entry.model_name)
        fig = go.Figure(
            go.Bar(
                x=[p.get("size") or 0 for p in profiles],
                y=labels,
                orientation="h",
                marker={"color": [_color(i) for i in range(len(profiles))]},
                text=[f"{(p.get('share') or 0):.1%}" for p in profiles],
                textposition="auto",
                hovertemplate="%{y}<br>%{x} users (%{text})<extra></extra>",
            )
        )
        _layout(
            fig,
            sizes_title,
            height=max(320, 140 + 34 * len(profiles)),
            xaxis_title="users at training",
            yaxis={"autorange": "reversed"},
        )
        section.charts.append(Chart(sizes_title, fig))
        features = list(
            details.get("features") or sorted({f for p in profiles for f in p.get("z") or {}})
        )
        z = [[(p.get("z") or {}).get(f) for f in features] for p in profiles]
        if features and any(v is not None for row in z for v in row):
            z_title = titled(CLUSTER_Z_TITLE, entry.model_name)
            fig = go.Figure(
                go.Heatmap(
                    z=z,
                    x=features,
                    y=labels,
                    zmid=0,
                    colorscale="RdBu_r",
                    texttemplate="%{z:.1f}",
                    colorbar={"title": {"text": "z"}},
                    hovertemplate="%{y}<br>%{x}: z = %{z:.2f}<extra></extra>",
                    hoverongaps=False,
                )
            )
            _layout(
                fig,
                z_title,
                height=max(380, 200 + 34 * len(profiles)),
                xaxis={"tickangle": -35},
                yaxis={"autorange": "reversed"},
            )
            section.charts.append(Chart(z_title, fig))
    section.notes.append(
        "z-score: the centroid's distance from the mean of all users, in standard deviations "
        "of the model's (log-transformed, standardized) input."
    )
    return section


def propensity_section(models: pd.DataFrame | None) -> Section:
    section = Section("propensity", "Propensity models")
    entries = _models(models, "propensity")
    if not entries:
        section.missing = (
            "no data yet: run `microseg propensity train --target purchase_7d --as-of T`"
        )
        return section
    header = ["target", "scorer", "ROC AUC", "PR AUC", "log loss", "precision top", "lift top"]
    rows: list[list[Any]] = []
    for entry in entries:
        details = _json(entry.details)
        metrics = entry.metrics or {}
        tables = details.get("calibration_tables") or {}
        base_rate = _metric(metrics, "evaluation_base_rate")
        scorers = [s for s in SCORERS if tables.get(s)] + [
            s for s in sorted(tables) if s not in SCORERS and tables.get(s)
        ]
        for scorer in SCORERS:
            if _metric(metrics, f"{scorer}_roc_auc") is None:
                continue
            rows.append(
                [
                    entry.model_name,
                    SCORER_NAMES.get(scorer, scorer),
                    *(
                        _fmt(_metric(metrics, f"{scorer}_{m}"), 4)
                        for m in ("roc_auc", "pr_auc", "log_loss", "precision_top")
                    ),
                    _fmt(_metric(metrics, f"{scorer}_lift_top"), 2),
                ]
            )
        section.notes.append(
            f"Target `{entry.model_name}` version `{entry.version}`, evaluated as of "
            f"{_when(entry.evaluation_as_of)}"
            + (f" (base rate {base_rate:.3f})" if base_rate is not None else "")
            + (f": {details['verdict']}" if details.get("verdict") else ".")
        )
        if not scorers:
            continue
        calibration_title = titled(CALIBRATION_TITLE, entry.model_name)
        fig = go.Figure()
        top = 0.0
        for i, scorer in enumerate(scorers):
            table = sorted(tables[scorer], key=lambda d: d.get("decile", 0))
            x = [d.get("mean_predicted") for d in table]
            y = [d.get("observed_rate") for d in table]
            top = max([top, *(v for v in x + y if v is not None)])
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=y,
                    mode="lines+markers",
                    name=SCORER_NAMES.get(scorer, scorer),
                    line={"color": _color(i)},
                    customdata=[[d.get("decile"), d.get("rows")] for d in table],
                    hovertemplate=(
                        "decile %{customdata[0]} (%{customdata[1]} users)<br>predicted %{x:.3f}"
                        "<br>observed %{y:.3f}<extra>%{fullData.name}</extra>"
                    ),
                )
            )
        top = min(1.0, top * 1.05) or 1.0
        fig.add_trace(
            go.Scatter(
                x=[0, top],
                y=[0, top],
                mode="lines",
                name="perfectly calibrated",
                line={"color": "#888", "dash": "dash"},
                hoverinfo="skip",
            )
        )
        _layout(
            fig,
            calibration_title,
            xaxis_title="mean predicted probability (decile of the score)",
            yaxis_title="observed rate",
        )
        section.charts.append(Chart(calibration_title, fig))
        if base_rate:
            lift_title = titled(LIFT_TITLE, entry.model_name)
            fig = go.Figure()
            for i, scorer in enumerate(scorers):
                table = sorted(tables[scorer], key=lambda d: d.get("decile", 0))
                fig.add_trace(
                    go.Bar(
                        x=[d.get("decile") for d in table],
                        y=[(d.get("observed_rate") or 0) / base_rate for d in table],
                        name=SCORER_NAMES.get(scorer, scorer),
                        marker={"color": _color(i)},
                        hovertemplate=(
                            "decile %{x}<br>lift %{y:.2f}<extra>%{fullData.name}</extra>"
                        ),
                    )
                )
            fig.add_hline(y=1, line_dash="dot", line_color="#444")
            _layout(
                fig,
                lift_title,
                barmode="group",
                xaxis={"title": "score decile (10 = highest scores)", "dtick": 1},
                yaxis_title="observed rate / base rate",
            )
            section.charts.append(Chart(lift_title, fig))
    if rows:
        section.tables.append((header, rows))
    return section


def quarantine_section(quarantine: pd.DataFrame | None) -> Section:
    section = Section("quarantine", "Quarantine")
    if quarantine is None:
        section.missing = "no data yet: run `microseg ingest`"
        return section
    if quarantine.empty:
        section.missing = "no data yet: no record has been quarantined (`microseg ingest`)"
        return section
    totals = quarantine.groupby("reason")["count"].sum().sort_values(ascending=False)
    fig = go.Figure()
    for i, reason in enumerate(totals.index):
        rows = quarantine[quarantine["reason"] == reason].sort_values("day")
        fig.add_trace(
            go.Bar(
                x=[_when(d) for d in rows["day"]],
                y=rows["count"],
                name=reason,
                marker={"color": _color(i)},
                hovertemplate=f"{html.escape(reason)}<br>%{{x}}: %{{y}}<extra></extra>",
            )
        )
    _layout(
        fig,
        QUARANTINE_TITLE,
        barmode="stack",
        xaxis={
            "title": "day quarantined (UTC)",
            "type": "category",
            "categoryorder": "category ascending",
        },
        yaxis_title="records",
    )
    section.charts.append(Chart(QUARANTINE_TITLE, fig))
    section.notes.append(
        f"{int(totals.sum()):,} quarantined records: "
        + ", ".join(f"{reason} {int(n):,}" for reason, n in totals.items())
        + ". Raw records and messages are in `bronze/quarantine`."
    )
    return section


def runs_section(runs: pd.DataFrame | None) -> Section:
    section = Section("runs", "Run history")
    if runs is None or runs.empty:
        section.missing = (
            "no data yet: every command that writes to the lake records its run, e.g. "
            "`microseg pipeline --as-of T`"
        )
        return section
    runs = runs.sort_values("started_at").copy()
    runs["seconds"] = (
        pd.to_datetime(runs["ended_at"]) - pd.to_datetime(runs["started_at"])
    ).dt.total_seconds()
    fig = go.Figure()
    for i, (job, rows) in enumerate(sorted(runs.groupby("job"))):
        fig.add_trace(
            go.Scatter(
                x=rows["started_at"],
                y=rows["seconds"],
                mode="markers",
                name=job,
                marker={
                    "color": _color(i),
                    "size": 9,
                    "symbol": [STATUS_SYMBOLS.get(s, "square") for s in rows["status"]],
                },
                customdata=list(
                    zip(
                        rows["status"],
                        [_when(t) for t in rows["as_of"]],
                        [html.escape((e or "")[:200]) for e in rows["error"]],
                        strict=True,
                    )
                ),
                hovertemplate=(
                    f"{html.escape(job)}<br>started %{{x}}<br>%{{y:.1f}} s, %{{customdata[0]}}"
                    "<br>as-of %{customdata[1]}<br>%{customdata[2]}<extra></extra>"
                ),
            )
        )
    _layout(
        fig,
        RUN_DURATION_TITLE,
        xaxis_title="started (UTC)",
        yaxis={"title": "duration (s)", "rangemode": "tozero"},
    )
    section.charts.append(Chart(RUN_DURATION_TITLE, fig))
    counts = runs.groupby(["job", "status"]).size().unstack(fill_value=0)
    fig = go.Figure()
    for status in sorted(counts.columns, key=lambda s: (s not in STATUS_COLORS, s)):
        fig.add_trace(
            go.Bar(
                x=list(counts.index),
                y=counts[status],
                name=status,
                marker={"color": STATUS_COLORS.get(status, "#7f7f7f")},
                hovertemplate=f"%{{x}}<br>{status}: %{{y}}<extra></extra>",
            )
        )
    _layout(
        fig,
        RUN_STATUS_TITLE,
        height=400,
        barmode="stack",
        xaxis={"title": "job", "type": "category"},
        yaxis_title="runs",
    )
    section.charts.append(Chart(RUN_STATUS_TITLE, fig))
    failed = runs[runs["status"] != "succeeded"]
    note = (
        f"{len(runs):,} runs from {_when(runs['started_at'].min())} to "
        f"{_when(runs['started_at'].max())} UTC (markers: circle succeeded, x failed, "
        "diamond interrupted)"
    )
    if not failed.empty:
        last = failed.iloc[-1]
        note += f"; latest failure: {last['job']} at {_when(last['started_at'])}: {last['error']}"
    section.notes.append(note + ". `microseg runs` lists them.")
    return section


# --------------------------------------------------------------------------------------
# the report


SECTIONS: tuple[tuple[str, Callable[..., Section]], ...] = (
    ("catalog", segment_sizes_section),
    ("catalog", changes_section),
    ("catalog", overlap_section),
    ("catalog", stability_section),
    ("models", cluster_section),
    ("models", propensity_section),
    ("quarantine", quarantine_section),
    ("runs", runs_section),
)


def build_report(spark: SparkSession, root: str, *, now: datetime | None = None) -> Report:
    """Read the lake and build every section (the lake is only read)."""
    data = {
        "catalog": load_catalog(spark, root),
        "models": load_latest_models(spark, root),
        "quarantine": load_quarantine(spark, root),
        "runs": load_runs(spark, root),
    }
    return Report(
        lake_root=lake.table_path(root, lake.EVENTS).rsplit("/bronze/events", 1)[0],
        generated_at=now or datetime.now(timezone.utc),
        tables=table_versions(spark, root),
        sections=[build(data[key]) for key, build in SECTIONS],
    )


STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0;
       color: #222; background: #f6f7f9; }
header, section { background: #fff; margin: 16px auto; max-width: 1180px; padding: 16px 24px;
                  border-radius: 8px; box-shadow: 0 1px 3px rgba(0,0,0,.08); }
h1 { margin: 0 0 6px; font-size: 1.6em; }
h2 { margin: 0 0 8px; font-size: 1.25em; }
nav { max-width: 1180px; margin: 0 auto; padding: 0 24px; font-size: .95em; }
nav a { margin-right: 14px; color: #1f5fa8; text-decoration: none; }
table { border-collapse: collapse; font-size: .9em; margin: 8px 0; }
th, td { border-bottom: 1px solid #e3e5e8; padding: 3px 10px; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code { background: #f0f1f3; padding: 0 4px; border-radius: 3px; }
p.note { margin: 4px 0; color: #444; }
p.missing { color: #8a5a00; background: #fff7e6; padding: 8px 12px; border-radius: 6px; }
.chart { margin: 12px 0; }
"""


def _text(value: str) -> str:
    """Plain text to HTML, with `code` spans."""
    parts = html.escape(value).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _cell(value: Any) -> str:
    try:
        float(value)
    except (TypeError, ValueError):
        return f"<td>{_text(str(value))}</td>"
    return f'<td class="num">{html.escape(str(value))}</td>'


def _table(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure_html(chart: Chart, div_id: str) -> str:
    height = chart.figure.layout.height or 460
    return chart.figure.to_html(
        full_html=False,
        include_plotlyjs=False,
        div_id=div_id,
        default_width="100%",
        default_height=f"{height}px",
        config={"displaylogo": False, "responsive": True},
    )


def render_html(report: Report) -> str:
    """The whole page: plotly.js inlined once in the head, then every section."""
    generated = report.generated_at.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    versions = _table(
        ["table", "Delta version", "last operation", "last commit (UTC)"],
        [
            [
                f"`{t.table}`",
                "" if t.version is None else t.version,
                t.operation or "not created yet",
                "" if t.timestamp is None else f"{t.timestamp:%Y-%m-%d %H:%M:%S}",
            ]
            for t in report.tables
        ],
    )
    nav = "".join(f'<a href="#{s.anchor}">{html.escape(s.heading)}</a>' for s in report.sections)
    body = []
    for section in report.sections:
        parts = [f'<section id="{section.anchor}"><h2>{html.escape(section.heading)}</h2>']
        if section.missing:
            parts.append(f'<p class="missing">{_text(section.missing)}</p>')
        parts += [f'<p class="note">{_text(n)}</p>' for n in section.notes]
        parts += [_table(h, rows) for h, rows in section.tables]
        for i, chart in enumerate(section.charts):
            div = f"chart-{section.anchor}-{i + 1}"
            parts.append(f'<div class="chart">{_figure_html(chart, div)}</div>')
        parts.append("</section>")
        body.append("\n".join(parts))
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>microseg report: {html.escape(report.lake_root)}</title>",
            f"<style>{STYLE}</style>",
            f'<script type="text/javascript">{get_plotlyjs()}</script>',
            "</head>",
            "<body>",
            "<header>",
            "<h1>microseg report</h1>",
            f'<p class="note">Lake <code>{html.escape(report.lake_root)}</code>, generated '
            f"{generated}. Self-contained: opens from disk, no server or network needed.</p>",
            "<details open><summary>Table versions</summary>",
            versions,
            "</details>",
            "</header>",
            f"<nav>{nav}</nav>",
            *body,
            "</body>",
            "</html>",
            "",
        ]
    )


def write_report(
    spark: SparkSession,
    root: str,
    output: str | os.PathLike = DEFAULT_OUTPUT,
    *,
    now: datetime | None = None,
) -> WrittenReport:
    """Build the report and write it to `output` (a local path) in one atomic rename."""
    report = build_report(spark, root, now=now)
    text = render_html(report).encode("utf-8")
    path = Path(output).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(text)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return WrittenReport(
        path=path,
        charts=len(report.chart_titles),
        missing_sections=sum(1 for s in report.sections if s.missing),
        bytes=len(text),
    )
