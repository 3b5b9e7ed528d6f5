"""`microseg pipeline`: all stages in order, skipping what has nothing new, resumable."""

from __future__ import annotations

import pytest
from tests.conftest import DATA, lineage
from tests.test_cli import job_args

from microseg.cli import main
from microseg.core import lake

TAOBAO = DATA / "taobao-userbehavior-excerpt.csv"
STAGES = ("ingest", "sessionize", "features", "segments", "clusters", "propensity", "health")


def stages(out: str) -> dict[str, str]:
    """stage -> status from the progress lines ("   stage: status, ...")."""
    found = {}
    for line in out.splitlines():
        for stage in STAGES:
            if line.startswith(f"   {stage}: "):
                found[stage] = line.split(": ", 1)[1].split(",")[0].split(";")[0]
    return found


def test_pipeline_runs_skips_and_resumes(spark, tmp_path, capsys):
    inputs = f"pipeline.inputs=[{{source: taobao, path: '{TAOBAO}'}}]"
    args = job_args(tmp_path, "pipeline", "--as-of", "2017-12-04", "--set", inputs)
    assert main(args) == 0
    assert stages(capsys.readouterr().out) == {
        "ingest": "done",
        "sessionize": "done",
        "features": "done",
        "segments": "done",
        "clusters": "skipped",
        "propensity": "skipped",
        "health": "done",
    }
    # nothing new: every stage is skipped
    assert main(args) == 0
    out = capsys.readouterr().out
    assert set(stages(out).values()) == {"skipped"}
    assert "pipeline finished in" in out

    # a stage fails: the run stops there with a message naming it; fixed, a re-run resumes
    broken = tmp_path / "segments.yaml"
    broken.write_text(
        "segments:\n  - id: x\n    name: X\n    conditions: [{feature: nope, gte: 1}]\n"
    )
    assert main([*args, "--set", f"segments.file={broken}"]) == 1
    captured = capsys.readouterr()
    assert stages(captured.out)["segments"] == "failed"
    assert "clusters" not in stages(captured.out)
    assert "stage 'segments' failed: SegmentFileError:" in captured.err
    assert main(args) == 0
    assert stages(capsys.readouterr().out)["segments"] == "skipped"  # the first run's are current

    runs = lake.read_table(spark, str(tmp_path / "lake"), lake.RUNS)
    counts = {r.job: r["count"] for r in runs.groupBy("job").count().collect()}
    assert counts == {
        "pipeline": 4,
        "ingest": 4,
        "sessionize": 4,
        "features": 1,
        "segments run": 1,
        "health": 1,
    }
    failed = runs.filter("status = 'failed'").select("job").collect()
    assert sorted(r.job for r in failed) == ["pipeline"]
    assert lineage(spark, str(tmp_path / "lake")) == {
        "bronze/events": {"ingest"},
        "ops/ingested_files": {"ingest"},
        "ops/watermarks": {"sessionize"},
        "gold/user_features": {"features"},
        "gold/segment_membership": {"segments run"},
        "gold/segment_changes": {"segments run"},
        "gold/segment_catalog": {"segments run"},
        "gold/segment_kpis": {"health"},  # no alert: gold/segment_alerts has no rows
    }


@pytest.mark.parametrize("as_of", ["yesterday"])
def test_pipeline_needs_a_valid_as_of(tmp_path, as_of):
    with pytest.raises(SystemExit) as info:
        main(job_args(tmp_path, "pipeline", "--as-of", as_of))
    assert info.value.code == 2
