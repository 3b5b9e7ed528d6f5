"""`microseg report`: one self-contained HTML file about the lake, with plotly charts.

The report only reads the lake. Each section aggregates one Delta table with Spark, collects
the (small) result to pandas and draws it with plotly; plotly.js is inlined once in the page
head, so the file opens from disk with no server and no network. A section whose table is
missing or empty says which command fills it instead of drawing an empty chart.

Loading (`lake_data`: `load_*`, Spark) and drawing (`figures`, `model_figures`: `*_section`,
pandas in, `Section` out) are separate, so the drawing functions can be called with hand-made
frames; `page` builds the report and renders and writes the HTML.
"""

from microseg.serving.html_report.figures import (
    CALIBRATION_TITLE,
    CHANGES_TITLE,
    CLUSTER_SIZES_TITLE,
    CLUSTER_Z_TITLE,
    EXPERIMENT_TITLE,
    HEALTH_TITLE,
    LIFT_TITLE,
    OVERLAP_TITLE,
    QUARANTINE_TITLE,
    RUN_DURATION_TITLE,
    RUN_STATUS_TITLE,
    SHAP_TITLE,
    SIZES_TITLE,
    STABILITY_TITLE,
    Chart,
    Section,
    titled,
)
from microseg.serving.html_report.lake_data import TableVersion, table_versions
from microseg.serving.html_report.page import (
    DEFAULT_OUTPUT,
    SECTIONS,
    Report,
    WrittenReport,
    build_report,
    render_html,
    write_report,
)

__all__ = [
    "CALIBRATION_TITLE",
    "CHANGES_TITLE",
    "CLUSTER_SIZES_TITLE",
    "CLUSTER_Z_TITLE",
    "EXPERIMENT_TITLE",
    "DEFAULT_OUTPUT",
    "HEALTH_TITLE",
    "LIFT_TITLE",
    "OVERLAP_TITLE",
    "QUARANTINE_TITLE",
    "RUN_DURATION_TITLE",
    "RUN_STATUS_TITLE",
    "SECTIONS",
    "SHAP_TITLE",
    "SIZES_TITLE",
    "STABILITY_TITLE",
    "Chart",
    "Report",
    "Section",
    "TableVersion",
    "WrittenReport",
    "build_report",
    "render_html",
    "table_versions",
    "titled",
    "write_report",
]
