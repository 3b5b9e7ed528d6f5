"""Drawing the report's sections (pandas in, `Section` out): the shared chart helpers, the
rule segment charts, quarantine and the run history. Model charts are in model_figures.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative

from microseg.segments.health import KPI_LABELS, kpi_text

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
EXPERIMENT_TITLE = "Experiment conversion by variant (95% interval)"
RUN_DURATION_TITLE = "Job run durations"
RUN_STATUS_TITLE = "Job runs per job and status"
SHAP_TITLE = "Propensity SHAP importance (mean |log-odds| per feature)"
HEALTH_TITLE = "Segment conversion rate over time (orders in the last 30 days)"

PALETTE = qualitative.Dark24
STATUS_COLORS = {"succeeded": "#2ca02c", "failed": "#d62728", "interrupted": "#ff7f0e"}
STATUS_SYMBOLS = {"succeeded": "circle", "failed": "x", "interrupted": "diamond"}


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


def when_text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NaT:
        return ""
    stamp = pd.Timestamp(value)
    if stamp.hour == stamp.minute == stamp.second == 0 and stamp.microsecond == 0:
        return stamp.strftime("%Y-%m-%d")
    return stamp.strftime("%Y-%m-%d %H:%M")


def layout(fig: go.Figure, title: str, height: int = 460, **axes: Any) -> go.Figure:
    fig.update_layout(
        title={"text": title, "x": 0.01, "xanchor": "left"},
        template="plotly_white",
        height=height,
        margin={"l": 70, "r": 30, "t": 70, "b": 60},
        legend={"orientation": "v"},
        **axes,
    )
    return fig


def color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


# --------------------------------------------------------------------------------------
# rule segments (gold/segment_catalog)


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
                line={"color": color(i)},
                customdata=list(zip(rows["status"], rows["matched"], strict=True)),
                hovertemplate=(
                    f"{html.escape(segment_id)}<br>as-of %{{x}}<br>members %{{y}}"
                    "<br>matched %{customdata[1]}<br>%{customdata[0]}<extra></extra>"
                ),
            )
        )
    layout(fig, SIZES_TITLE, xaxis_title="as-of (UTC)", yaxis_title="published members")
    section.charts.append(Chart(SIZES_TITLE, fig))
    as_ofs = rules["as_of"].nunique()
    section.notes.append(
        f"{rules['segment_id'].nunique()} rule segments over {as_ofs} runs "
        f"(latest as-of {when_text(rules['as_of'].max())}), from `gold/segment_catalog`."
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
        x = [when_text(t) for t in rows["as_of"]]
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
                    marker={"color": color(i), "opacity": 1.0 if show else 0.55},
                    hovertemplate=(
                        f"{html.escape(segment_id)}<br>as-of %{{x}}<br>{change} "
                        "%{customdata}<extra></extra>"
                    ),
                    customdata=values.abs(),
                )
            )
    layout(
        fig,
        CHANGES_TITLE,
        barmode="relative",
        xaxis={
            "title": "as-of (UTC)",
            "type": "category",
            "categoryorder": "array",
            "categoryarray": [when_text(t) for t in runs],
        },
        yaxis_title="users (entered above 0, exited below)",
    )
    fig.add_hline(y=0, line_width=1, line_color="#444")
    section.charts.append(Chart(CHANGES_TITLE, fig))
    totals = catalog.groupby("as_of")[["entered", "exited"]].sum()
    section.notes.append(
        "Per run of every source (rule, cluster, propensity): "
        + "; ".join(
            f"{when_text(t)}: +{int(r.entered):,} -{int(r.exited):,}" for t, r in totals.iterrows()
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
    layout(
        fig,
        OVERLAP_TITLE,
        height=max(420, 160 + 34 * len(ids)),
        yaxis={"autorange": "reversed"},
        xaxis={"tickangle": -40},
    )
    section.charts.append(Chart(OVERLAP_TITLE, fig))
    section.notes.append(
        f"As-of {when_text(latest)}: Jaccard index (shared members / members of either) between "
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
            x=[when_text(t) for t in runs],
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
    layout(
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
        f"Least stable at {when_text(runs[-1])}: {', '.join(low)}."
    )
    return section


# --------------------------------------------------------------------------------------
# operations: quarantine and run history


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
                x=[when_text(d) for d in rows["day"]],
                y=rows["count"],
                name=reason,
                marker={"color": color(i)},
                hovertemplate=f"{html.escape(reason)}<br>%{{x}}: %{{y}}<extra></extra>",
            )
        )
    layout(
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
                    "color": color(i),
                    "size": 9,
                    "symbol": [STATUS_SYMBOLS.get(s, "square") for s in rows["status"]],
                },
                customdata=list(
                    zip(
                        rows["status"],
                        [when_text(t) for t in rows["as_of"]],
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
    layout(
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
    layout(
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
        f"{len(runs):,} runs from {when_text(runs['started_at'].min())} to "
        f"{when_text(runs['started_at'].max())} UTC (markers: circle succeeded, x failed, "
        "diamond interrupted)"
    )
    if not failed.empty:
        last = failed.iloc[-1]
        note += (
            f"; latest failure: {last['job']} at {when_text(last['started_at'])}: {last['error']}"
        )
    section.notes.append(note + ". `microseg runs` lists them.")
    return section


def experiments_section(results: pd.DataFrame | None) -> Section:
    section = Section("experiments", "Experiments")
    if results is None or results.empty:
        section.missing = (
            "no data yet: run `microseg experiment assign --as-of T`, then "
            "`microseg experiment analyze --as-of T`"
        )
        return section
    results = results.copy()
    results["order"] = results["variant"].map(lambda v: 2 if v == "holdout" else 1)
    results.loc[results["is_control"], "order"] = 0
    results = results.sort_values(["experiment_id", "order", "variant"])
    fig = go.Figure()
    for i, (experiment_id, rows) in enumerate(results.groupby("experiment_id", sort=True)):
        rates = rows["conversion_rate"].fillna(0.0)
        n = rows["exposed"].clip(lower=1)
        half = 1.959964 * (rates * (1 - rates) / n) ** 0.5
        fig.add_trace(
            go.Bar(
                x=[f"{experiment_id}: {v}" for v in rows["variant"]],
                y=rates,
                error_y={"type": "data", "array": list(half)},
                name=experiment_id,
                marker={"color": color(i)},
                hovertemplate="%{x}<br>conversion %{y:.2%}<extra></extra>",
            )
        )
    layout(
        fig, EXPERIMENT_TITLE, yaxis={"title": "conversion of exposed users", "tickformat": ".0%"}
    )
    section.charts.append(Chart(EXPERIMENT_TITLE, fig))

    def pct(value: Any) -> str:
        return "" if value is None or pd.isna(value) else f"{100 * value:.1f}%"

    table = []
    for row in results.itertuples():
        lift = ""
        if not pd.isna(row.lift):
            lift = f"{pct(row.lift)} ({pct(row.lift_ci_low)} to {pct(row.lift_ci_high)})"
        table.append(
            [
                row.experiment_id,
                when_text(row.as_of),
                row.variant + (" (control)" if row.is_control else ""),
                int(row.assigned),
                int(row.exposed),
                pct(row.conversion_rate),
                lift,
                "" if pd.isna(row.p_value) else f"{row.p_value:.4f}",
                "" if pd.isna(row.revenue_per_user) else f"{row.revenue_per_user:,.2f}",
                "MISMATCH" if row.srm_flag else "ok",
            ]
        )
    section.tables.append(
        (
            [
                "experiment",
                "analyzed as of",
                "variant",
                "assigned",
                "exposed",
                "conversion",
                "lift (95% CI)",
                "p",
                "revenue / user",
                "sample ratio",
            ],
            table,
        )
    )
    section.notes.append(
        "Latest analysis of each experiment (`gold/experiment_results`); lift against the "
        "control, two-proportion z-test p; sample ratio: chi-square of assigned counts "
        "against the weights, MISMATCH below p = 0.001."
    )
    return section


def health_section(health: tuple[pd.DataFrame | None, pd.DataFrame | None]) -> Section:
    section = Section("health", "Segment health")
    kpis, alerts = health
    if kpis is None or kpis.empty:
        section.missing = "no data yet: run `microseg health --as-of T`"
        return section
    kpis = kpis.sort_values(["segment_id", "as_of"])
    fig = go.Figure()
    for i, (segment_id, rows) in enumerate(kpis.groupby("segment_id", sort=True)):
        fig.add_trace(
            go.Scatter(
                x=rows["as_of"],
                y=rows["conversion_rate_30d"],
                mode="lines+markers",
                name=segment_id,
                line={"color": color(i)},
                hovertemplate="%{x}<br>%{y:.1%}<extra>%{fullData.name}</extra>",
            )
        )
    layout(fig, HEALTH_TITLE, yaxis={"title": "members who ordered", "tickformat": ".0%"})
    section.charts.append(Chart(HEALTH_TITLE, fig))
    latest = kpis[kpis["as_of"] == kpis["as_of"].max()]
    section.notes.append(
        f"KPIs as of {when_text(kpis['as_of'].max())} (`gold/segment_kpis`); `all_users` is "
        "everyone with features."
    )
    section.tables.append(
        (
            ["segment", *(label for _, label, _ in KPI_LABELS)],
            [
                [row["segment_id"], *(kpi_text(row[c], kind) for c, _, kind in KPI_LABELS)]
                for row in latest.to_dict("records")
            ],
        )
    )
    if alerts is None or alerts.empty:
        section.notes.append("No alert at any run (`gold/segment_alerts`).")
    else:
        alerts = alerts.sort_values(["as_of", "segment_id"], ascending=[False, True]).head(50)
        section.tables.append(
            (
                ["as of", "segment", "alert", "what"],
                [
                    [when_text(a.as_of), a.segment_id, a.alert, a.message]
                    for a in alerts.itertuples()
                ],
            )
        )
    return section
