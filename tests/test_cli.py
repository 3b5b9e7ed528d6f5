"""The jobs as a person runs them: real processes, exit codes, crashes and re-runs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from tests.conftest import DATA, ROOT, TEST_SETTINGS, make_config

from microseg.cli import main
from microseg.core import lake
from microseg.ingest.files import run_ingest

REES46 = str(DATA / "rees46-2019-oct-excerpt.csv")


def cli(tmp_path, *args, env=None, module=True, timeout=600):
    settings = [a for s in TEST_SETTINGS for a in ("--set", s)]
    command = (
        [sys.executable, "-m", "microseg"]
        if module
        else [os.path.join(os.path.dirname(sys.executable), "microseg")]
    )
    return subprocess.run(
        [
            *command,
            *args,
            "--conf",
            "conf/local.yaml",
            *settings,
            "--set",
            f"lake.root={tmp_path / 'lake'}",
        ],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def job_args(tmp_path, *args):
    """CLI arguments for an in-process run against a per-test lake with the test settings."""
    return [
        *args,
        "--conf",
        "conf/local.yaml",
        *[a for s in TEST_SETTINGS for a in ("--set", s)],
        "--set",
        f"lake.root={tmp_path / 'lake'}",
    ]


def test_module_and_console_script_list_commands():
    for command in (
        [sys.executable, "-m", "microseg", "--help"],
        [os.path.join(os.path.dirname(sys.executable), "microseg"), "--help"],
    ):
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert result.returncode == 0
        for command in ("generate", "ingest", "sessionize", "features", "segments", "status"):
            assert command in result.stdout


def test_job_failure_exits_1_with_one_line(spark, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    status = main(job_args(tmp_path, "ingest", "--source", "rees46", "--path", str(bad)))
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1
    assert err[-1].startswith(
        f"microseg ingest: failed: SourceFormatError: file:{bad}: header 'a,b' differs"
    )
    (run,) = lake.read_table(spark, str(tmp_path / "lake"), lake.RUNS).collect()
    assert (run.job, run.status, run.rows_written, run.delta_versions) == (
        "ingest",
        "failed",
        {},
        {},
    )
    assert run.error.startswith(f"SourceFormatError: file:{bad}: header 'a,b' differs")


def test_missing_input_exits_2(spark, tmp_path, capsys):
    status = main(
        job_args(tmp_path, "ingest", "--source", "rees46", "--path", str(tmp_path / "none.csv"))
    )
    assert status == 2
    assert (
        capsys.readouterr().err.strip().splitlines()[-1]
        == f"microseg ingest: no input files at {tmp_path / 'none.csv'}"
    )


@pytest.mark.soak  # a real process killed at a kill point; tests/test_crashes.py has the rest
@pytest.mark.parametrize("crash_at", ["ingest.after_quarantine"])
def test_crash_mid_run_then_rerun_completes(spark, tmp_path, crash_at):
    """A real process dies at a kill point (exit 137, no cleanup) and a rerun completes; every
    kill point of every batch job: tests/test_crashes.py (-m soak)."""
    crashed = cli(
        tmp_path,
        "ingest",
        "--source",
        "rees46",
        "--path",
        REES46,
        env={"MICROSEG_FAILPOINTS": crash_at},
    )
    assert crashed.returncode == 137, crashed.stderr
    cfg = make_config(tmp_path)
    root = cfg.lake.root
    assert lake.read_table(spark, root, lake.QUARANTINE).count() == 3
    events_visible = (
        lake.read_table(spark, root, lake.EVENTS).count()
        if lake.table_exists(spark, root, lake.EVENTS)
        else 0
    )
    assert events_visible == (0 if crash_at == "ingest.after_quarantine" else 3997)
    assert not lake.table_exists(spark, root, lake.INGESTED_FILES)

    report = run_ingest(spark, cfg, source="rees46", path=REES46)
    assert report.records == 4000
    assert lake.read_table(spark, root, lake.EVENTS).count() == 3997
    assert lake.read_table(spark, root, lake.QUARANTINE).count() == 3
    assert lake.read_table(spark, root, lake.INGESTED_FILES).count() == 1


@pytest.mark.soak  # tests/test_cluster_submit.py submits through scripts/submit to a real cluster
def test_spark_submit_runs_the_job(spark, tmp_path):
    settings = [a for s in TEST_SETTINGS for a in ("--set", s)]
    result = subprocess.run(
        [
            "./scripts/submit",
            "--master",
            "local[2]",
            "ingest",
            "--conf",
            "conf/local.yaml",
            *settings,
            "--set",
            f"lake.root={tmp_path / 'lake'}",
            "--source",
            "taobao",
            "--path",
            str(DATA / "taobao-userbehavior-excerpt.csv"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2,000" in result.stdout
    cfg = make_config(tmp_path)
    assert lake.read_table(spark, cfg.lake.root, lake.EVENTS).count() == 2000


def test_pipeline_commands_in_process(spark, tmp_path, capsys):
    taobao = str(DATA / "taobao-userbehavior-excerpt.csv")
    assert main(job_args(tmp_path, "ingest", "--source", "taobao", "--path", taobao)) == 0
    assert main(job_args(tmp_path, "sessionize")) == 0
    assert "mode=full" in capsys.readouterr().out
    assert main(job_args(tmp_path, "sessionize")) == 0
    assert "mode=nothing new" in capsys.readouterr().out
    assert main(job_args(tmp_path, "features", "--as-of", "2017-12-04")) == 0
    assert "as of 2017-12-04 00:00:00 UTC: 30 users" in capsys.readouterr().out
    assert main(job_args(tmp_path, "segments", "run", "--as-of", "2017-12-04")) == 0
    out = capsys.readouterr().out
    assert "segments as of 2017-12-04T00:00:00Z" in out and "users=30" in out
    assert main(job_args(tmp_path, "segments", "show", "recent_buyers")) == 0
    out = capsys.readouterr().out
    assert "recent_buyers: Recent buyers (version " in out
    assert "2017-12-04T00:00:00" in out  # its catalog row
    runs = sorted(
        lake.read_table(spark, str(tmp_path / "lake"), lake.RUNS).collect(),
        key=lambda r: r.started_at,
    )
    assert [(r.job, r.status) for r in runs] == [
        ("ingest", "succeeded"),
        ("sessionize", "succeeded"),
        ("sessionize", "succeeded"),
        ("features", "succeeded"),
        ("segments run", "succeeded"),
    ]
    events = lake.read_table(spark, str(tmp_path / "lake"), lake.EVENTS).count()
    assert runs[0].rows_read == {"input records": 2000}
    assert runs[0].rows_written["bronze/events"] == events
    assert runs[0].delta_versions["bronze/events"] == 1  # created empty (0), then the MERGE
    assert runs[2].rows_written == {} and runs[2].delta_versions == {}  # nothing new
    assert str(runs[3].as_of) == "2017-12-04 00:00:00"
    assert main(job_args(tmp_path, "runs", "--limit", "2")) == 0
    out = capsys.readouterr().out
    assert "segments run" in out and "features" in out and "ingest" not in out
    assert main(job_args(tmp_path, "status")) == 0
    out = capsys.readouterr().out
    for table in (
        "bronze/events",
        "silver/sessions",
        "silver/identity_map",
        "gold/user_features",
        "gold/segment_membership",
        "gold/segment_changes",
        "gold/segment_catalog",
    ):
        assert table in out
    with pytest.raises(SystemExit) as exit_info:
        main(job_args(tmp_path, "features", "--as-of", "yesterday"))
    assert exit_info.value.code == 2

    # an experiment on recent_buyers (the 22 Taobao buyers, all in the 30 days before
    # 2017-12-04) and a file destination of its changes
    experiments = tmp_path / "experiments.yaml"
    experiments.write_text(
        "experiments:\n  - id: e1\n    segment: recent_buyers\n"
        "    start: 2017-11-01T00:00:00Z\n    variants: [a, b]\n"
    )
    args = ("--file", str(experiments), "--as-of", "2017-12-04")
    assert main(job_args(tmp_path, "experiment", "assign", *args)) == 0
    out = capsys.readouterr().out
    assert "experiment assign" in out and "online store: 22 assignments sent" in out
    assert main(job_args(tmp_path, "experiment", "analyze", *args)) == 0
    assert "e1 (segment recent_buyers, fixed): sample ratio ok" in capsys.readouterr().out
    assert main(job_args(tmp_path, "experiment", "size", "--baseline", "0.1", "--mde", "0.1")) == 0
    assert "14,751 exposed users per variant" in capsys.readouterr().out
    # a preview of a changed file publishes nothing: recent_buyers as published (the 22
    # buyers), and a new segment of the 10 users with 2 or more `buy` rows in the file
    # (awk -F, '$4=="buy"' | count per user), all of them recent buyers
    preview = tmp_path / "preview.yaml"
    preview.write_text(
        "segments:\n  - id: recent_buyers\n    name: Recent buyers\n"
        "    conditions: [{last: purchase, within: 30d}]\n"
        "  - id: repeat_buyers\n    name: Repeat buyers\n"
        "    conditions: [{event: purchase, at_least: 2}]\n"
    )
    assert main(job_args(tmp_path, "segments", "preview", str(preview))) == 0
    out = capsys.readouterr().out
    flat = " ".join(out.split())  # long lines wrap at the console's width
    assert "as of 2017-12-04 00:00:00 (30 users; nothing published)" in flat
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if "│" in line}
    cells = [c.strip() for c in rows["recent_buyers"].split("│")[2:8]]
    assert cells == ["active", "22", "22", "22", "22", "0"]
    cells = [c.strip() for c in rows["repeat_buyers"].split("│")[2:8]]
    assert cells == ["active", "10", "10", "-", "0", "10"]
    assert "repeat_buyers: shares most with recent_buyers (10)," in flat
    assert "members such as 999478, 999479, 999482, 99950, 999520" in flat
    assert main(job_args(tmp_path, "triggers", "validate")) == 0
    assert "cart_reminder: on event add_to_cart, delay 0:30:00" in capsys.readouterr().out
    assert main(job_args(tmp_path, "triggers", "run")) == 2
    assert "triggers run needs --as-of TIME" in capsys.readouterr().err
    destinations = tmp_path / "destinations.yaml"
    destinations.write_text(
        f"destinations:\n  - id: out\n    type: file\n    path: {tmp_path / 'exports'}\n"
        "    segments: [recent_buyers]\n    consent: none\n"
    )
    assert main(job_args(tmp_path, "activate", "--file", str(destinations))) == 0
    out = capsys.readouterr().out
    assert "out" in out and "22" in out  # the 22 enters, one file
    assert len(list((tmp_path / "exports" / "out").glob("changes-*/*.csv"))) == 1
    assert main(job_args(tmp_path, "activate", "--file", str(destinations))) == 0
    assert len(list((tmp_path / "exports" / "out").glob("changes-*/*.csv"))) == 1


def test_segments_validate(spark, tmp_path, capsys):
    assert main(job_args(tmp_path, "segments", "validate")) == 0
    out = capsys.readouterr().out
    assert "conf/segments.yaml: 12 segments, no problems" in out
    assert "browsing_enthusiasts" in out and "no: line" in out  # not streaming-capable
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "segments:\n"
        "  - id: a\n"
        "    name: A\n"
        "    conditions: [{feature: nope, gte: 1}]\n"
        "  - id: b\n"
        "    name: B\n"
        "    parent: a\n"
        "    conditions: [{sql: orders_lifetime >}]\n"
    )
    assert main(job_args(tmp_path, "segments", "validate", "--file", str(bad))) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (
        f"microseg segments: {bad} line 4: segment 'a': unknown feature 'nope' "
        "(features.include in the config selects the available ones)"
    )
    assert len(err) == 1  # b's parent is in the file: not reported as unknown
    assert main(job_args(tmp_path, "segments", "run")) == 2
    assert "segments run needs --as-of TIME" in capsys.readouterr().err


def test_batch_runs_each_line_and_stops_at_the_first_failure(tmp_path, capsys):
    steps = tmp_path / "steps.txt"
    steps.write_text(
        "## checking the rules\n"
        "# a comment line\n"
        "\n"
        "microseg segments validate\n"
        "features --as-of yesterday\n"
        "segments validate\n"
    )
    assert main(job_args(tmp_path, "batch", str(steps))) == 2
    out, err = capsys.readouterr()
    assert "== checking the rules" in out
    assert out.count("conf/segments.yaml: 12 segments, no problems") == 1  # not line 6
    assert "microseg features: error: argument --as-of" in err
    assert "microseg batch: line 5 failed (features --as-of yesterday)" in err
    assert main(job_args(tmp_path, "batch", str(tmp_path / "missing.txt"))) == 2
    assert "missing.txt" in capsys.readouterr().err
