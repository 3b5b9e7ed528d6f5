"""Drawing the model sections (pandas in, `Section` out): cluster profiles and propensity
calibration and lift, from the latest entry of each model in gold/model_registry."""

from __future__ import annotations

import json
import math
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from microseg.serving.html_report.figures import (
    CALIBRATION_TITLE,
    CLUSTER_SIZES_TITLE,
    CLUSTER_Z_TITLE,
    LIFT_TITLE,
    SHAP_TITLE,
    Chart,
    Section,
    color,
    layout,
    titled,
    when_text,
)

SCORERS = ("gbt", "logistic_regression", "heuristic")
SCORER_NAMES = {
    "gbt": "GBT",
    "logistic_regression": "logistic regression",
    "heuristic": "recency/frequency heuristic",
}


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


def _silhouette_label(details: dict) -> str:
    """The silhouette's distance; versions before cluster.silhouette used Spark's."""
    return details.get("silhouette_metric", "squared_euclidean").replace("_", " ")


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
            f"{when_text(entry.trained_at)} UTC): "
            f"k = {int(_metric(metrics, 'k') or len(profiles))}, "
            f"silhouette ({_silhouette_label(details)}) "
            f"{_fmt(_metric(metrics, 'silhouette'))}, "
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
                marker={"color": [color(i) for i in range(len(profiles))]},
                text=[f"{(p.get('share') or 0):.1%}" for p in profiles],
                textposition="auto",
                hovertemplate="%{y}<br>%{x} users (%{text})<extra></extra>",
            )
        )
        layout(
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
            layout(
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
            f"{when_text(entry.evaluation_as_of)}"
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
                    line={"color": color(i)},
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
        layout(
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
                        marker={"color": color(i)},
                        hovertemplate=(
                            "decile %{x}<br>lift %{y:.2f}<extra>%{fullData.name}</extra>"
                        ),
                    )
                )
            fig.add_hline(y=1, line_dash="dot", line_color="#444")
            layout(
                fig,
                lift_title,
                barmode="group",
                xaxis={"title": "score decile (10 = highest scores)", "dtick": 1},
                yaxis_title="observed rate / base rate",
            )
            section.charts.append(Chart(lift_title, fig))
        importances = details.get("shap_importances") or {}
        if importances:
            shap_title = titled(SHAP_TITLE, entry.model_name)
            top = sorted(importances.items(), key=lambda kv: -kv[1])[:15][::-1]
            fig = go.Figure(
                go.Bar(
                    x=[v for _, v in top],
                    y=[f for f, _ in top],
                    orientation="h",
                    marker={"color": color(0)},
                    hovertemplate="%{y}<br>mean |SHAP| %{x:.3f}<extra></extra>",
                )
            )
            layout(fig, shap_title, xaxis_title="mean |contribution| to the log-odds")
            section.charts.append(Chart(shap_title, fig))
    if rows:
        section.tables.append((header, rows))
    return section
