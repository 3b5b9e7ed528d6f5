"""`microseg report`: the HTML report of a small real lake, checked as text and in Chromium.

The lake is built by the real jobs through the CLI: generate (with malformed and invalid
records, so quarantine has rows), ingest, sessionize, features and rule segments at two
as-ofs a week apart. Training real cluster and propensity models needs far more data (their
own tests do that), so one registry row of each kind is appended in the shape those jobs
write (see microseg.ml.registry.RegistryEntry).
"""

from __future__ import annotations

import contextlib
import html
import io
import json
import os
import re
import shutil
import struct
import subprocess
import zlib
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from tests.conftest import make_config
from tests.test_cli import job_args

from microseg.cli import main
from microseg.core import lake
from microseg.serving import html_report

T1 = "2026-09-15T00:00:00Z"
T2 = "2026-09-22T00:00:00Z"
KEY = "privacy.pseudonymization_key=test-only-pseudonymization-key"

EXPECTED_TITLES = [
    html_report.SIZES_TITLE,
    html_report.CHANGES_TITLE,
    html_report.OVERLAP_TITLE,
    html_report.STABILITY_TITLE,
    html_report.titled(html_report.CLUSTER_SIZES_TITLE, "behavior"),
    html_report.titled(html_report.CLUSTER_Z_TITLE, "behavior"),
    html_report.titled(html_report.CALIBRATION_TITLE, "purchase_7d"),
    html_report.titled(html_report.LIFT_TITLE, "purchase_7d"),
    html_report.titled(html_report.SHAP_TITLE, "purchase_7d"),
    html_report.HEALTH_TITLE,
    html_report.EXPERIMENT_TITLE,
    html_report.QUARANTINE_TITLE,
    html_report.RUN_DURATION_TITLE,
    html_report.RUN_STATUS_TITLE,
]


def _cluster_row(root: str):
    features = ["orders_lifetime", "sessions_90d", "days_since_last_event"]
    profiles = [
        {
            "index": i,
            "stable_id": f"c{i + 1}",
            "segment_id": f"cluster_behavior_c{i + 1}",
            "name": name,
            "size": size,
            "share": round(size / 60, 6),
            "mean": dict(zip(features, z, strict=True)),
            "median": dict(zip(features, z, strict=True)),
            "z": dict(zip(features, z, strict=True)),
            "centroid": dict(zip(features, z, strict=True)),
            "top_features": [],
        }
        for i, (name, size, z) in enumerate(
            [
                ("frequent buyers", 25, [1.4, 1.1, -0.8]),
                ("window shoppers", 20, [-0.6, 0.4, -0.2]),
                ("lapsed customers", 15, [-0.3, -1.2, 1.6]),
            ]
        )
    ]
    details = {
        "features": features,
        "profiles": profiles,
        "sizes": {p["stable_id"]: p["size"] for p in profiles},
    }
    return (
        "behavior",
        "20260922T000000Z-abcdef",
        "cluster",
        datetime(2026, 9, 22, 1),
        [datetime(2026, 9, 22)],
        None,
        json.dumps({"k": 3}),
        {"k": 3.0, "silhouette": 0.41, "wcss": 12.5, "users": 60.0, "training_seconds": 3.0},
        json.dumps(details),
        "hash",
        lake.model_path(root, "behavior", "20260922T000000Z-abcdef"),
        "run-cluster",
    )


def _propensity_row(root: str):
    def deciles(slope):
        return [
            {
                "decile": d,
                "mean_predicted": round(0.03 * d, 6),
                "observed_rate": round(min(1.0, slope * 0.03 * d), 6),
                "rows": 6,
            }
            for d in range(1, 11)
        ]

    metrics = {"evaluation_base_rate": 0.15, "evaluation_rows": 60.0}
    for scorer, auc in (("gbt", 0.81), ("logistic_regression", 0.78), ("heuristic", 0.7)):
        metrics |= {
            f"{scorer}_roc_auc": auc,
            f"{scorer}_pr_auc": auc - 0.3,
            f"{scorer}_log_loss": 0.4,
            f"{scorer}_precision_top": 0.5,
            f"{scorer}_lift_top": 3.3,
        }
    details = {
        "calibration_tables": {
            "gbt": deciles(1.0),
            "logistic_regression": deciles(0.9),
            "heuristic": deciles(0.8),
        },
        "verdict": "GBT beats logistic_regression and heuristic on ROC AUC, PR AUC, lift",
        "shap_importances": {"orders_lifetime": 0.9, "days_since_last_event": 0.4},
    }
    return (
        "purchase_7d",
        "20260922T000000Z-123456",
        "propensity",
        datetime(2026, 9, 22, 2),
        [datetime(2026, 9, 1), datetime(2026, 9, 8)],
        datetime(2026, 9, 15),
        json.dumps({"target": "purchase_7d"}),
        metrics,
        json.dumps(details),
        "hash",
        lake.model_path(root, "purchase_7d", "20260922T000000Z-123456"),
        "run-propensity",
    )


@pytest.fixture(scope="module")
def report_file(spark, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("html_report")
    cfg = make_config(tmp_path)
    gen = tmp_path / "gen"

    def run(*args):
        assert main(job_args(tmp_path, *args, "--set", KEY)) == 0, args

    run(
        "generate",
        "--users",
        "40",
        "--days",
        "21",
        "--malformed-share",
        "0.01",
        "--invalid-share",
        "0.01",
        "--output",
        str(gen),
    )
    run("ingest", "--source", "synthetic", "--path", str(gen / "events"))
    run("sessionize")
    for as_of in (T1, T2):
        run("features", "--as-of", as_of)
        run("segments", "run", "--as-of", as_of)
        run("health", "--as-of", as_of)
    experiments = tmp_path / "experiments.yaml"
    experiments.write_text(
        "experiments:\n  - id: e1\n    segment: repeat_visitors\n"
        "    start: 2026-09-01T00:00:00Z\n    variants: [a, b]\n"
    )
    run("experiment", "assign", "--as-of", T1, "--file", str(experiments))
    run("experiment", "analyze", "--as-of", T2, "--file", str(experiments))
    lake.ensure_table(spark, cfg.lake.root, lake.MODEL_REGISTRY)
    (
        spark.createDataFrame(
            [_cluster_row(cfg.lake.root), _propensity_row(cfg.lake.root)],
            lake.MODEL_REGISTRY.schema,
        )
        .write.format("delta")
        .mode("append")
        .save(lake.table_path(cfg.lake.root, lake.MODEL_REGISTRY))
    )
    versions_before = {t.table: t.version for t in html_report.table_versions(spark, cfg.lake.root)}
    output = tmp_path / "out" / "report.html"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        run("report", "--output", str(output))
    versions_after = {t.table: t.version for t in html_report.table_versions(spark, cfg.lake.root)}
    assert versions_after == versions_before  # the report only reads the lake
    return output, stdout.getvalue(), cfg


def test_report_is_one_self_contained_file_with_every_chart(spark, report_file):
    from plotly.offline import get_plotlyjs

    output, stdout, cfg = report_file
    assert str(output) in stdout
    text = output.read_text(encoding="utf-8")
    for title in EXPECTED_TITLES:
        assert title in text, title
    assert len(set(EXPECTED_TITLES)) == len(EXPECTED_TITLES)
    assert text.count(get_plotlyjs()) == 1  # plotly.js inlined exactly once
    scripts = re.findall(r"<script\b[^>]*>", text, flags=re.I)
    assert scripts and not [s for s in scripts if re.search(r"\bsrc\s*=", s, flags=re.I)]
    assert not re.search(r"<link\b[^>]*href\s*=\s*[\"']?(https?:)?//", text, flags=re.I)
    assert "no data yet" not in text
    # header: lake root, generation time, table versions
    assert str(Path(cfg.lake.root).resolve()) in text
    assert re.search(r"generated \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", text)
    for table in ("bronze/events", "bronze/quarantine", "gold/segment_catalog", "ops/runs"):
        assert f"<code>{table}</code>" in text
    # the quarantine note counts what is in bronze/quarantine (malformed and invalid records)
    quarantined = lake.read_table(spark, cfg.lake.root, lake.QUARANTINE).count()
    assert quarantined > 0
    assert f"{quarantined:,} quarantined records: " in text


def test_missing_tables_say_which_command_fills_them(spark, tmp_path):
    written = html_report.write_report(spark, str(tmp_path / "empty-lake"), tmp_path / "r.html")
    text = written.path.read_text(encoding="utf-8")
    assert (written.charts, written.missing_sections) == (0, len(html_report.SECTIONS))
    assert text.count('class="missing">no data yet') == len(html_report.SECTIONS)
    for command in ("segments run", "cluster train", "propensity train", "ingest", "pipeline"):
        assert f"<code>microseg {command}" in text
    assert not (tmp_path / "empty-lake").exists()  # nothing created


# --------------------------------------------------------------------------------------
# headless Chromium


@pytest.fixture(scope="session")  # session: resolved before the module's lake
def chromium() -> str:
    """The headless browser, or skip (before the lake is built) saying what is missing."""
    for name in (os.environ.get("MICROSEG_CHROMIUM"), "chromium", "chromium-browser"):
        if name and shutil.which(name):
            return shutil.which(name)
    pytest.skip(
        "chromium not found on PATH (Debian package `chromium`: ./scripts/test installs it "
        "when run as root with apt-get; or set MICROSEG_CHROMIUM to a Chromium binary)"
    )


def _browse(browser: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "chromium-profile"
    return subprocess.run(
        [
            browser,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=15000",
            *args,
        ],
        capture_output=True,
        timeout=180,
        check=False,
    )


def decode_png(data: bytes) -> np.ndarray:
    """Pixels (height, width, channels) of an 8-bit RGB or RGBA, non-interlaced PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, []
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        pos += 12 + length
    assert depth == 8 and color in (2, 6) and interlace == 0, (depth, color, interlace)
    bpp = 3 if color == 2 else 4
    stride = width * bpp
    raw = zlib.decompress(b"".join(idat))
    pixels = np.zeros((height, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.uint8)
    for y in range(height):
        start = y * (stride + 1)
        kind = raw[start]
        line = np.frombuffer(raw, np.uint8, stride, start + 1)
        if kind == 0:  # None
            cur = line.copy()
        elif kind == 1:  # Sub: running sum per channel, modulo 256
            cur = np.cumsum(line.reshape(width, bpp), axis=0, dtype=np.uint8).reshape(stride)
        elif kind == 2:  # Up
            cur = line + prev
        else:  # Average (3), Paeth (4): byte by byte
            row, up = bytearray(line.tobytes()), prev.tobytes()
            for x in range(stride):
                a = row[x - bpp] if x >= bpp else 0
                b = up[x]
                if kind == 3:
                    row[x] = (row[x] + ((a + b) >> 1)) & 255
                else:
                    c = up[x - bpp] if x >= bpp else 0
                    pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                    row[x] = (row[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
            cur = np.frombuffer(bytes(row), np.uint8)
        pixels[y] = cur
        prev = cur
    return pixels.reshape(height, width, bpp)


def test_report_renders_in_headless_chromium(chromium, report_file, tmp_path):
    output, _, _ = report_file
    url = output.resolve().as_uri()

    dom = _browse(chromium, tmp_path, "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr.decode(errors="replace")[-2000:]
    page = dom.stdout.decode("utf-8")
    assert page.count('class="main-svg"') >= len(EXPECTED_TITLES)  # plotly drew every chart
    drawn = {
        html.unescape(t) for t in re.findall(r'<text class="gtitle"[^>]*>([^<]*)</text>', page)
    }
    assert set(EXPECTED_TITLES) <= drawn, set(EXPECTED_TITLES) - drawn
    for mark in ('class="point', 'class="trace bars"', 'class="hm"'):  # markers, bars, heatmaps
        assert mark in page, mark

    png = tmp_path / "report.png"
    shot = _browse(
        chromium,
        tmp_path,
        "--hide-scrollbars",
        "--window-size=1200,3000",
        f"--screenshot={png}",
        url,
    )
    assert shot.returncode == 0 and png.exists(), shot.stderr.decode(errors="replace")[-2000:]
    pixels = decode_png(png.read_bytes())
    assert pixels.shape[:2] == (3000, 1200)
    rgb = pixels[..., :3].astype(np.uint32)
    colors = np.unique((rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2])
    assert len(colors) > 200, f"only {len(colors)} distinct colors: blank page?"
    background = (pixels[..., :3] >= 245).all(axis=2).mean()
    assert background < 0.95, f"{background:.0%} of the page is background"
