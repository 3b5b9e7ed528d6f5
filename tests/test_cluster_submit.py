"""The jobs under spark-submit on a real Spark standalone cluster (master and worker on
loopback, started by scripts/cluster-start), with microseg shipped as the wheel built from
pyproject.toml and the Delta JARs from the local cache (scripts/submit)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import sysconfig
import textwrap
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from deltalake import DeltaTable
from tests.conftest import DATA, ROOT

from microseg.cli import COMMANDS

# Commands that write to the lake, each with a thin spark-submit entry point jobs/NAME.py.
LAKE_WRITING = (
    "ingest",
    "sessionize",
    "features",
    "segments",
    "cluster",
    "propensity",
    "pipeline",
    "stream",
)


@pytest.mark.parametrize("command", LAKE_WRITING)
def test_every_lake_writing_command_has_a_job(command):
    assert command in COMMANDS
    source = (ROOT / "jobs" / f"{command}.py").read_text()
    assert f'main(["{command}", *sys.argv[1:]])' in source


# --------------------------------------------------------------------------------------
# the cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@dataclass
class Cluster:
    url: str  # spark://127.0.0.1:PORT
    api: str  # the master's JSON status, http://127.0.0.1:PORT/json/
    pids: dict[str, int]

    def status(self) -> dict:
        with urllib.request.urlopen(self.api, timeout=10) as response:
            return json.load(response)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One master and one worker (2 cores) on loopback, on free ports; stopped at the end by
    scripts/cluster-stop, and any pid it started that is still alive then is killed."""
    state = tmp_path_factory.mktemp("cluster")
    webui = _free_port()
    env = {
        **os.environ,
        "MICROSEG_CLUSTER_DIR": str(state),
        "MICROSEG_MASTER_PORT": str(_free_port()),
        "MICROSEG_MASTER_WEBUI_PORT": str(webui),
        "MICROSEG_WORKER_WEBUI_PORT": str(_free_port()),
        "MICROSEG_WORKER_CORES": "2",
        "MICROSEG_WORKER_MEMORY": "2g",
    }
    pids: dict[str, int] = {}
    try:
        started = subprocess.run(
            [str(ROOT / "scripts" / "cluster-start")],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        for name in ("master", "worker"):
            pid_file = state / f"{name}.pid"
            if pid_file.exists():
                pids[name] = int(pid_file.read_text())
        assert started.returncode == 0, started.stderr[:1500] + "\n...\n" + started.stderr[-1500:]
        url = started.stdout.strip().splitlines()[-1]
        assert url == f"spark://127.0.0.1:{env['MICROSEG_MASTER_PORT']}"
        yield Cluster(url, f"http://127.0.0.1:{webui}/json/", pids)
    finally:
        subprocess.run(
            [str(ROOT / "scripts" / "cluster-stop")], env=env, capture_output=True, timeout=120
        )
        left = [pid for pid in pids.values() if _alive(pid)]
        for pid in left:  # cluster-stop failed: do not leave our JVMs behind
            os.kill(pid, 9)
        assert not left, f"cluster-stop left {left} running"
        assert not list(state.glob("*.pid"))


@pytest.fixture(scope="module")
def executor_python(tmp_path_factory) -> tuple[Path, Path]:
    """An interpreter for the executors that has microseg's dependencies but not microseg, as
    a cluster node's image would: a virtualenv whose one .pth file adds this virtualenv's
    site-packages as a plain folder (so its editable-install .pth, which puts lib/ on the
    path, is not processed). A wrapper script logs each start, to show executors used it.
    Returns (wrapper, log of starts)."""
    folder = tmp_path_factory.mktemp("executor-python")
    venv = folder / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site, "project_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    starts = folder / "starts.log"
    wrapper = folder / "python"
    wrapper.write_text(f'#!/bin/sh\necho "$$ $*" >> "{starts}"\nexec "{python}" "$@"\n')
    wrapper.chmod(0o755)
    check = subprocess.run(
        [
            wrapper,
            "-c",
            "import importlib.util, pandas, pyarrow, pyspark; "
            "assert importlib.util.find_spec('microseg') is None",
        ],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stderr
    starts.unlink()
    return wrapper, starts


# --------------------------------------------------------------------------------------
# the jobs

AS_OF = "2019-10-02T00:00:00Z"  # after every event of both excerpts


def submit(cluster: Cluster, executor_python: Path, conf: Path, job: str, *args: str):
    started = time.monotonic()
    result = subprocess.run(
        [
            str(ROOT / "scripts" / "submit"),
            "--master",
            cluster.url,
            "--conf",
            f"spark.pyspark.python={executor_python}",
            job,
            "--conf",
            str(conf),
            *args,
        ],
        cwd=ROOT,
        # the driver binds loopback, where the executors reach it
        env={**os.environ, "SPARK_LOCAL_IP": "127.0.0.1"},
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, f"{job}: {result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    print(f"{job} {' '.join(args)}: {time.monotonic() - started:.0f} s")
    return result


def table(lake: Path, name: str):
    return DeltaTable(str(lake / name)).to_pyarrow_table()


def current_members(lake: Path, segment: str, source: str) -> set[str]:
    rows = table(lake, "gold/segment_membership").to_pylist()
    return {
        r["user_key"]
        for r in rows
        if r["segment_id"] == segment and r["source"] == source and r["is_current"]
    }


@pytest.mark.slow
def test_the_pipeline_runs_on_a_standalone_cluster(cluster, executor_python, tmp_path):
    wrapper, executor_starts = executor_python
    lake = tmp_path / "lake"
    conf = tmp_path / "cluster-test.yaml"
    conf.write_text(
        textwrap.dedent(
            f"""\
            # conf/cluster.yaml, on a 2-core cluster on this machine
            extends: {ROOT / "conf" / "cluster.yaml"}
            lake:
              # a local folder instead of HDFS: driver and executors share this file system
              root: {lake}
            spark:
              # 64 partitions per shuffle suit a real cluster; for 6,000 events on 2 cores
              # they are task overhead only
              shuffle_partitions: 2
              conf:
                # the same for Delta's log replay (50 partitions) on every table read
                spark.databricks.delta.snapshotPartitions: 2
            """
        )
    )

    # microseg ships as the wheel; its .zip twin is what --py-files passes. It imports from
    # the zip with an interpreter that has no microseg: no data files are read from the package.
    wheel = Path(
        subprocess.run(
            [str(ROOT / "scripts" / "wheel")], capture_output=True, text=True, check=True
        ).stdout.strip()
    )
    assert re.fullmatch(r"microseg-[\d.]+-py3-none-any\.whl", wheel.name)
    pyfiles = wheel.with_suffix(".zip")
    assert pyfiles.read_bytes() == wheel.read_bytes()
    imported = subprocess.run(
        [
            wrapper,
            "-c",
            f"import sys; sys.path.insert(0, {str(pyfiles)!r}); import importlib, pkgutil, "
            "microseg; names = [m.name for m in pkgutil.walk_packages(microseg.__path__, "
            "'microseg.') if m.name != 'microseg.__main__']; "
            "[importlib.import_module(n) for n in names]; "
            "print(microseg.__file__, len(names))",
        ],
        capture_output=True,
        text=True,
    )
    assert imported.returncode == 0, imported.stderr[-3000:]
    location, modules = imported.stdout.split()
    assert location == f"{pyfiles}/microseg/__init__.py" and int(modules) > 20
    executor_starts.unlink(missing_ok=True)

    # One application for the whole sequence (jobs/batch.py): a driver and executors start
    # once instead of once per command; each command is still the one jobs/NAME.py runs.
    steps = tmp_path / "steps.txt"
    steps.write_text(
        textwrap.dedent(
            f"""\
            ingest --source taobao --path {DATA / "taobao-userbehavior-excerpt.csv"}
            ingest --source rees46 --path {DATA / "rees46-2019-oct-excerpt.csv"}
            sessionize
            features --as-of {AS_OF}
            segments run --as-of {AS_OF}
            # per-user state in Python workers (applyInPandasWithState): the executors import
            # microseg.streaming.query from the shipped zip, with pandas and pyarrow
            stream --available-now --quiet
            """
        )
    )
    output = submit(cluster, wrapper, conf, "batch", str(steps))
    assert "2,000" in output.stdout and "4,000" in output.stdout

    # Counts worked out from the input files (tests/data/README.md, and cut | sort | uniq -c):
    # Taobao: 2,000 valid records; REES46: 4,000 records, one line 4 times, so 3 duplicates.
    events = table(lake, "bronze/events")
    assert events.num_rows == 2000 + 3997
    assert table(lake, "bronze/quarantine").num_rows == 3
    # purchases: 48 Taobao `buy` + 46 REES46 `purchase` (none of them a duplicate)
    assert events.column("event_type").to_pylist().count("purchase") == 48 + 46
    assert table(lake, "silver/sessions").num_rows > 0
    # one row per user with an event before the as-of: 30 Taobao + 1,490 REES46 user ids
    # (the two id sets do not overlap)
    assert table(lake, "gold/user_features").num_rows == 30 + 1490
    # recent_buyers (a purchase within 30 days of 2019-10-02): the 40 distinct REES46 buyers,
    # 555110488 (3 purchases) among them; lapsed_customers (bought, nothing for 60 days):
    # the 22 Taobao buyers (last events in 2017), 999545 (7 purchases) among them.
    recent = current_members(lake, "recent_buyers", "rule")
    lapsed = current_members(lake, "lapsed_customers", "rule")
    assert len(recent) == 40 and "555110488" in recent
    assert len(lapsed) == 22 and "999545" in lapsed
    # the stream, at the end of its input, agrees with the batch job on event rules
    assert current_members(lake, "recent_buyers", "stream") == recent
    assert current_members(lake, "lapsed_customers", "stream") == lapsed

    # Every job ran as an application of this cluster, and Python ran on its executors
    # through the interpreter given to them (the driver runs the project's virtualenv).
    status = cluster.status()
    assert status["aliveworkers"] == 1 and status["activeapps"] == []
    # the application is named after the first command that started Spark
    finished = [(a["name"], a["state"]) for a in status["completedapps"]]
    assert finished == [("microseg-ingest", "FINISHED")]
    assert "pyspark.daemon" in executor_starts.read_text()
