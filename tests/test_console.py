"""The console: progress lines, a quiet Spark log, one line per failure, and a stream that
stops between micro-batches."""

from __future__ import annotations

import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
from tests.conftest import DATA, ROOT, TEST_SETTINGS
from tests.test_sessions import ev, write_bronze
from tests.test_streaming import CAB, at, changes, stream_config

from microseg.cli import build_parser
from microseg.core import lake, progress
from microseg.core.config import SparkConfig, load_config
from microseg.core.spark import driver_java_options, relay_stderr
from microseg.ingest.quarantine import ReasonCount, reason_counts
from microseg.serving.progress import Progress
from microseg.streaming import lifecycle
from microseg.streaming import query as streaming

# --------------------------------------------------------------------------------------
# the progress display


def test_a_step_gets_a_line_only_when_it_runs_long(capsys):
    with Progress("features", live=False, slow=0.3, tick=0.05):
        progress.step("quick")
        time.sleep(0.1)
        progress.step("slow")
        time.sleep(0.6)
        progress.step("quick again")
    err = capsys.readouterr().err
    assert re.fullmatch(r"\.\.\. features: slow \(0:00\)\n", err), err


def test_the_line_names_command_stage_step_and_elapsed_time():
    shown = Progress("pipeline", live=False)
    with shown:
        assert shown.line() == "pipeline · 0:00"
        progress.stage("features")
        progress.step("starting Spark")
        assert shown.line() == "pipeline features · starting Spark · 0:00"
        shown.started -= 3725
        assert shown.line() == "pipeline features · starting Spark · 1:02:05"
    progress.step("after the display")  # nobody listens: nothing changes
    assert shown.step == "starting Spark"


# --------------------------------------------------------------------------------------
# Spark's log and the command line


def test_log_config_is_read_beside_the_config_file_that_names_it(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "base.yaml").write_text("spark:\n  log_config: log4j2.properties\n")
    (conf / "env.yaml").write_text("extends: base.yaml\n")
    monkeypatch.chdir(tmp_path)
    assert load_config("conf/env.yaml").spark.log_config == str(conf / "log4j2.properties")
    # from --set, relative to the current directory like every other path
    cfg = load_config("conf/env.yaml", ["spark.log_config=mine.properties"])
    assert cfg.spark.log_config == "mine.properties"


def test_driver_options_name_the_log_config_and_level(tmp_path):
    cfg = SparkConfig(log_config=str(tmp_path / "my log.properties"))
    config = f"-Dlog4j2.configurationFile=file://{tmp_path}/my%20log.properties"
    assert driver_java_options(cfg) == config  # the file's own level
    assert driver_java_options(cfg, log="quiet") == f"{config} -Dmicroseg.spark.log=off"
    assert driver_java_options(cfg, log="verbose") == (
        f"{config} -Dmicroseg.spark.log=warn -Dmicroseg.spark.trace=full"
    )
    assert driver_java_options(SparkConfig(log_config=None), log="verbose") == ""


def test_the_jvm_notices_about_itself_are_not_relayed(capsys):
    relay_stderr(
        io.BytesIO(
            b"WARNING: Using incubator modules: jdk.incubator.vector\n"
            b"10:00:00 ERROR DAGScheduler: something Spark says\n"
            b"netlib-blas: JNI_OnLoad: dlopen(libblas.so.3) failed: libblas.so.3: cannot open\n"
        )
    )
    assert capsys.readouterr().err == "10:00:00 ERROR DAGScheduler: something Spark says\n"
    relay_stderr(io.BytesIO(b"WARNING: Using incubator modules: x\n"), drop=())  # verbose
    assert capsys.readouterr().err == "WARNING: Using incubator modules: x\n"


def test_verbose_has_short_and_old_names():
    parser = build_parser()
    assert not parser.parse_args(["status"]).verbose
    for flag in ("--verbose", "-v", "--debug"):
        assert parser.parse_args(["status", flag]).verbose


@pytest.mark.slow
def test_a_command_from_another_folder_prints_its_report_and_no_spark_log(spark, tmp_path):
    """Results on stdout; on stderr only the closing line (and a line per long step). Run
    without a network where the machine can cut it (root, unshare, ip): with the Delta JARs
    cached (the session fixture made sure), none is needed."""
    command = [
        os.path.join(os.path.dirname(sys.executable), "microseg"),
        "ingest",
        "--conf",
        str(ROOT / "conf" / "local.yaml"),
        *[a for s in TEST_SETTINGS for a in ("--set", s)],
        "--set",
        f"lake.root={tmp_path / 'lake'}",
        "--set",
        f"ingest.sources_dir={ROOT / 'conf' / 'sources'}",
        "--source",
        "taobao",
        "--path",
        str(DATA / "taobao-userbehavior-excerpt.csv"),
    ]
    offline = os.geteuid() == 0 and shutil.which("unshare") and shutil.which("ip")
    if offline:  # a new network namespace with only the loopback interface
        script = "ip link set lo up && exec " + " ".join(shlex.quote(c) for c in command)
        command = ["unshare", "-n", "sh", "-c", script]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2,000" in result.stdout
    err = result.stderr.splitlines()
    assert err[-1].startswith("microseg ingest finished in "), err
    for line in err[:-1]:  # the progress of slow steps
        assert line.startswith("... ingest: "), err


# --------------------------------------------------------------------------------------
# bronze/quarantine in summary


def test_reason_counts_by_source_then_most_frequent(spark, tmp_path):
    root = str(tmp_path / "lake")
    assert reason_counts(spark, root) == []
    rows = [
        (f"r{i}", source, "file:/f", i, None, reason, "m", None, datetime(2026, 1, 1), "run")
        for i, (source, reason) in enumerate(
            [
                ("taobao", "unknown_event_type"),
                ("rees46", "invalid_time"),
                ("rees46", "unknown_event_type"),
                ("rees46", "unknown_event_type"),
            ]
        )
    ]
    lake.ensure_table(spark, root, lake.QUARANTINE)
    spark.createDataFrame(rows, lake.QUARANTINE.schema).write.format("delta").mode("append").save(
        lake.table_path(root, lake.QUARANTINE)
    )
    assert reason_counts(spark, root) == [
        ReasonCount("rees46", "unknown_event_type", 2),
        ReasonCount("rees46", "invalid_time", 1),
        ReasonCount("taobao", "unknown_event_type", 1),
    ]


# --------------------------------------------------------------------------------------
# stopping the stream between micro-batches


def test_closing_the_gate_waits_for_the_running_batch_and_holds_later_ones(monkeypatch):
    def held(spark):
        raise lifecycle.QueryStopped(lifecycle.STOPPED)

    monkeypatch.setattr(lifecycle, "_hold_until_stopped", held)
    gate, written, release = lifecycle.BatchGate(), [], threading.Event()

    def write(batch_df, batch_id):
        release.wait(5)
        written.append(batch_id)

    batch, batch_df = gate.wrap(write), SimpleNamespace(sparkSession=None)
    running = threading.Thread(target=batch, args=(batch_df, 0))
    running.start()
    time.sleep(0.1)
    closing = threading.Thread(target=gate.close)
    closing.start()
    time.sleep(0.2)
    assert closing.is_alive() and written == []  # close() waits for batch 0
    release.set()
    closing.join(5)
    running.join(5)
    assert not closing.is_alive() and written == [0]
    with pytest.raises(lifecycle.QueryStopped):
        batch(batch_df, 1)
    assert gate.held == 1 and written == [0]


def _no_java_trouble(capsys) -> None:
    time.sleep(1)  # the JVM's stderr reaches sys.stderr through a thread
    err = capsys.readouterr().err
    assert "Exception" not in err and "Error" not in err, err[-3000:]


@pytest.mark.slow
def test_stop_waits_for_the_running_micro_batch(spark, tmp_path, monkeypatch, capsys):
    cfg = stream_config(tmp_path)
    write_bronze(spark, cfg, [ev("e1", 0, "add_to_cart", user="u1")])
    entered, release = threading.Event(), threading.Event()
    write_batch = streaming.write_batch

    def slow_write_batch(batch_df, batch_id, *, sink):
        entered.set()
        release.wait(60)
        write_batch(batch_df, batch_id, sink=sink)

    monkeypatch.setattr(streaming, "write_batch", slow_write_batch)
    gate = lifecycle.BatchGate()
    query = streaming.start_stream(spark, cfg, gate=gate)
    try:
        assert entered.wait(600), "no micro-batch"
        threading.Timer(2, release.set).start()
        lifecycle.stop_between_batches([query], gate)
    finally:
        release.set()
        if query.isActive:
            query.stop()
    assert query.exception() is None
    assert changes(spark, cfg) == [("u1", CAB, "enter", "rule_matched", at(0))]
    assert Path(streaming.checkpoint_path(cfg), "commits", "0").exists()
    _no_java_trouble(capsys)


@pytest.mark.slow
def test_a_micro_batch_after_the_stop_writes_nothing_and_runs_at_the_next_start(
    spark, tmp_path, capsys
):
    cfg = stream_config(tmp_path)
    write_bronze(spark, cfg, [ev("e1", 0, "add_to_cart", user="u1")])
    gate = lifecycle.BatchGate()
    query = streaming.start_stream(spark, cfg, gate=gate)
    commits = Path(streaming.checkpoint_path(cfg), "commits")
    try:
        deadline = time.monotonic() + 600
        while not (commits / "0").exists():
            assert time.monotonic() < deadline and query.isActive, "no first micro-batch"
            time.sleep(0.5)
        gate.close()
        write_bronze(spark, cfg, [ev("e2", 30, "purchase", user="u1", batch=1)])
        # Batch 0 wrote e1; a batch without data (the watermark moving on) may have
        # followed it before the gate closed, so the held batch's id is not always 1.
        while gate.held is None:
            assert time.monotonic() < deadline and query.isActive, "no second micro-batch"
            time.sleep(0.2)
        lifecycle.stop_between_batches([query], gate)
    finally:
        if query.isActive:
            query.stop()
    assert query.exception() is None
    assert changes(spark, cfg) == [("u1", CAB, "enter", "rule_matched", at(0))]
    assert not (commits / str(gate.held)).exists()
    _no_java_trouble(capsys)

    streaming.run_stream(spark, cfg, available_now=True)
    assert changes(spark, cfg) == [
        ("u1", CAB, "enter", "rule_matched", at(0)),
        ("u1", CAB, "exit", "no_longer_matched", at(30)),
        ("u1", "recent_buyers", "enter", "rule_matched", at(30)),
    ]
