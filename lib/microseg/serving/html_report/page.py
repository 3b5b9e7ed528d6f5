"""The report: build every section from the lake, render the HTML page, write it atomically."""

from __future__ import annotations

import html
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from plotly.offline import get_plotlyjs
from pyspark.sql import SparkSession

from microseg.core import lake
from microseg.serving.html_report.figures import (
    Chart,
    Section,
    changes_section,
    experiments_section,
    health_section,
    overlap_section,
    quarantine_section,
    runs_section,
    segment_sizes_section,
    stability_section,
)
from microseg.serving.html_report.lake_data import (
    TableVersion,
    load_catalog,
    load_experiments,
    load_health,
    load_latest_models,
    load_quarantine,
    load_runs,
    table_versions,
)
from microseg.serving.html_report.model_figures import cluster_section, propensity_section

DEFAULT_OUTPUT = "report/microseg-report.html"


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


SECTIONS: tuple[tuple[str, Callable[..., Section]], ...] = (
    ("catalog", segment_sizes_section),
    ("catalog", changes_section),
    ("catalog", overlap_section),
    ("catalog", stability_section),
    ("models", cluster_section),
    ("models", propensity_section),
    ("health", health_section),
    ("experiments", experiments_section),
    ("quarantine", quarantine_section),
    ("runs", runs_section),
)


def build_report(spark: SparkSession, root: str, *, now: datetime | None = None) -> Report:
    """Read the lake and build every section (the lake is only read)."""
    data = {
        "catalog": load_catalog(spark, root),
        "models": load_latest_models(spark, root),
        "quarantine": load_quarantine(spark, root),
        "experiments": load_experiments(spark, root),
        "runs": load_runs(spark, root),
        "health": load_health(spark, root),
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
