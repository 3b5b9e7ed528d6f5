"""Daily increment benchmark: what one more day costs, against a full build of the history.

    .venv/bin/python bench/increment_bench.py --events-per-day 11000 --days 90 180

For each history length D (days): generate D + 1 days of synthetic events at the same daily
volume (the same users, each active over more days; seeded, Parquet, reused while the
manifest matches), ingest days
1..D into a fresh lake (not timed), then time in one Spark session:

* full build: `sessionize --full`, features as of T_D (the midnight after day D) and rule
  segments as of T_D;
* ingest of day D + 1 (reported on its own);
* the increment: sessionize (incremental), features as of T_D+1 and segments as of T_D+1.

It prints a table per D and the ratios the batch-speed issue sets targets for: increment /
full build (<= 10%), and increment(2D) / increment(D) (<= 1.2x when the history doubles).
Results go to bench/results/increment-<events per day>.json. Run it alone: on a busy machine
the numbers mean nothing (the load average is recorded with them).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START = datetime(2026, 1, 1, tzinfo=timezone.utc)
log = logging.getLogger("bench")


def prepare_data(work: Path, days: int, per_day: int) -> tuple[Path, dict]:
    from microseg.core.config import GenerateConfig
    from microseg.ingest.generate import estimate_users_for_events, generate

    out = work / f"increment-data-{per_day}-{days}"
    # the estimate is for 60 days; a user's events scale with the days generated, so the same
    # users over days + 1 days keep the daily volume at about per_day
    users = estimate_users_for_events(per_day * 60)
    manifest = out / "manifest.json"
    if manifest.is_file():
        found = json.loads(manifest.read_text())
        if found.get("settings", {}).get("users") == users:
            return out, found
    shutil.rmtree(out, ignore_errors=True)
    log.info("generating %d days, %d users into %s", days + 1, users, out)
    settings = GenerateConfig(
        users=users, days=days + 1, start=START, format="parquet", output=str(out)
    )
    return out, generate(settings, out)


def day_files(data: Path) -> list[Path]:
    return sorted((data / "events").glob("events-*.parquet"))


def timed(label: str, timings: dict, fn, *args, **kwargs):
    t0 = time.monotonic()
    result = fn(*args, **kwargs)
    timings[label] = round(time.monotonic() - t0, 2)
    log.info("%-28s %7.2f s", label, timings[label])
    return result


def run_one(spark, args, days: int) -> dict:
    from microseg.core import lake
    from microseg.core.config import load_config
    from microseg.features.job import run_features
    from microseg.ingest.files import run_ingest
    from microseg.segments.evaluate import run_segments
    from microseg.silver.sessions import run_sessionize

    work = Path(args.work)
    data, manifest = prepare_data(work, days, args.events_per_day)
    files = day_files(data)
    staging = work / f"increment-staging-{days}"
    root = work / f"increment-lake-{days}"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)
    staging.mkdir(parents=True)
    # Without a lookback the increment reads only the events ingested after the watermark (the
    # new day). The default 1 h lookback also re-reads the batch the watermark came from (the
    # previous run's last ingest): here the whole history, ingested in one run; in daily
    # operation one more day. So this measures the increment without that re-read.
    cfg = load_config(args.conf, [f"lake.root={root}", "sessions.lookback=0s", *args.sets])
    history, new_day = files[:-1], files[-1]
    for f in history:
        os.symlink(f, staging / f.name)
    t_full = START.replace(tzinfo=None) + timedelta(days=len(history))
    t_next = t_full + timedelta(days=1)
    log.info("D=%d: ingesting %d day files (not timed)", days, len(history))
    run_ingest(spark, cfg, source="synthetic", path=str(staging), fmt="parquet")
    events = lake.read_table(spark, str(root), lake.EVENTS).count()

    full: dict[str, float] = {}
    timed("full: sessionize", full, run_sessionize, spark, cfg, full=True)
    timed("full: features", full, run_features, spark, cfg, as_of=t_full, refresh_silver=False)
    timed("full: segments", full, run_segments, spark, cfg, as_of=t_full)

    os.symlink(new_day, staging / new_day.name)
    ingest: dict[str, float] = {}
    timed(
        "ingest one day",
        ingest,
        run_ingest,
        spark,
        cfg,
        source="synthetic",
        path=str(staging),
        fmt="parquet",
    )
    added = lake.read_table(spark, str(root), lake.EVENTS).count() - events

    increment: dict[str, float] = {}
    timed("increment: sessionize", increment, run_sessionize, spark, cfg)
    timed(
        "increment: features",
        increment,
        run_features,
        spark,
        cfg,
        as_of=t_next,
        refresh_silver=False,
    )
    timed("increment: segments", increment, run_segments, spark, cfg, as_of=t_next)
    return {
        "days": len(history),
        "events": events,
        "new_day_events": added,
        "users": manifest.get("users"),
        "full_seconds": full,
        "full_total": round(sum(full.values()), 2),
        "ingest_seconds": ingest,
        "increment_seconds": increment,
        "increment_total": round(sum(increment.values()), 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events-per-day", type=int, default=11_000)
    parser.add_argument("--days", type=int, nargs="+", default=[90, 180])
    parser.add_argument("--work", default=str(ROOT / "bench" / "work"))
    parser.add_argument("--conf", default=str(ROOT / "conf" / "local.yaml"))
    parser.add_argument("--set", dest="sets", action="append", default=[])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.chdir(ROOT)
    os.environ.setdefault("MICROSEG_PSEUDONYMIZATION_KEY", "bench-only-key")

    from rich.console import Console
    from rich.table import Table

    from microseg.core.config import load_config
    from microseg.core.spark import build_spark

    load_before = os.getloadavg()
    cfg = load_config(args.conf, args.sets)
    spark = build_spark(cfg.spark, app_name="bench-increment")
    results = [run_one(spark, args, days) for days in args.days]
    load_after = os.getloadavg()

    table = Table(title="daily increment vs full build (seconds)")
    for column in (
        "history",
        "events",
        "full build",
        "one day's events",
        "ingest",
        "increment",
        "increment / full",
    ):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(
            f"{r['days']} days",
            f"{r['events']:,}",
            f"{r['full_total']:.1f}",
            f"{r['new_day_events']:,}",
            f"{sum(r['ingest_seconds'].values()):.1f}",
            f"{r['increment_total']:.1f}",
            f"{r['increment_total'] / r['full_total']:.1%}",
        )
    console = Console()
    console.print(table)
    growth = None
    if len(results) >= 2:
        growth = results[-1]["increment_total"] / results[0]["increment_total"]
        console.print(
            f"increment at {results[-1]['days']} days / at {results[0]['days']} days: {growth:.2f}x"
        )
    out = ROOT / "bench" / "results" / f"increment-{args.events_per_day}.json"
    out.write_text(
        json.dumps(
            {
                "command": "bench/increment_bench.py",
                "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                "load_average_before": load_before,
                "load_average_after": load_after,
                "results": results,
                "increment_growth_when_history_doubles": growth,
            },
            indent=2,
        )
    )
    console.print(f"wrote {out}")
    spark.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
